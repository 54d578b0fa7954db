"""Slice folders: pairing by id, every refusal reported once per bad file, npy and NIfTI, stacking with padding."""

from __future__ import annotations

import gzip
import pickle

import nibabel as nib
import numpy as np
import pytest
import torch

from hpcseg.data import DataError, SlicePair, Split, find_pairs, load_images, load_split, save_slice


def _slice(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.random((h, w), dtype=np.float32)
    label = rng.integers(0, 4, size=(h, w), dtype=np.uint8)
    return image, label


def _problems(folder, num_classes: int = 4) -> list[str]:
    with pytest.raises(DataError) as info:
        load_split(folder, num_classes)
    return info.value.problems


def _lines_for(problems: list[str], name: str) -> list[str]:
    return [p for p in problems if p.split(": ", 1)[0].endswith(f"/{name}")]


# --------------------------------------------------------------------------------------------------- pairing


def test_pairs_by_id_not_by_position(tmp_path):
    for k in range(5):
        save_slice(tmp_path, f"s{k}", *_slice(8, 8, seed=k))
    (tmp_path / "s2_T1w_tissue_segmentation.npy").unlink()  # label missing in the middle
    (tmp_path / "README.md").write_text("ignored")
    (tmp_path / "manifest.csv").write_text("id\n")
    with pytest.raises(DataError) as info:
        find_pairs(tmp_path)
    assert info.value.problems == [f"{tmp_path / 's2_T1w.npy'}: image without label "
                                   "(expected s2_T1w_tissue_segmentation.npy or .nii.gz)"]
    problems = _problems(tmp_path)
    assert len(problems) == 1 and "s2_T1w.npy: image without label" in problems[0]

    # With the orphan gone, every remaining image keeps its own label.
    (tmp_path / "s2_T1w.npy").unlink()
    pairs = find_pairs(tmp_path)
    assert [p.id for p in pairs] == ["s0", "s1", "s3", "s4"]
    assert all(p == SlicePair(p.id, tmp_path / f"{p.id}_T1w.npy",
                              tmp_path / f"{p.id}_T1w_tissue_segmentation.npy") for p in pairs)
    split = load_split(tmp_path, 4)
    for slice_id, image, label in zip(split.ids, split.images, split.labels):
        want_image, want_label = _slice(8, 8, seed=int(slice_id[1:]))
        np.testing.assert_array_equal(image, want_image)
        np.testing.assert_array_equal(label, want_label)


def test_label_without_image_and_both_directions_reported(tmp_path):
    save_slice(tmp_path, "a", *_slice(4, 4))
    save_slice(tmp_path, "b", *_slice(4, 4))
    save_slice(tmp_path, "c", *_slice(4, 4))
    (tmp_path / "a_T1w.npy").unlink()
    (tmp_path / "c_T1w_tissue_segmentation.npy").unlink()
    problems = _problems(tmp_path)
    assert len(problems) == 2
    assert _lines_for(problems, "a_T1w_tissue_segmentation.npy")[0].endswith("label without image "
                                                                              "(expected a_T1w.npy or .nii.gz)")
    assert "image without label" in _lines_for(problems, "c_T1w.npy")[0]


def test_sorted_by_id_and_mixed_formats(tmp_path):
    image, label = _slice(6, 5)
    np.save(tmp_path / "z_T1w.npy", image)
    nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / "z_T1w_tissue_segmentation.nii.gz")
    save_slice(tmp_path, "a", image, label, fmt="nifti")
    split = load_split(tmp_path, 4)
    assert split.ids == ["a", "z"]
    assert len(split) == 2


def test_folder_problems(tmp_path):
    missing = tmp_path / "nope"
    assert _problems(missing) == [f"{missing}: folder does not exist"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert _problems(a_file) == [f"{a_file}: is not a folder"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("only docs")
    assert _problems(empty) == [f"{empty}: no slices (<id>_T1w.npy + <id>_T1w_tissue_segmentation.npy, or .nii.gz)"]
    with pytest.raises(DataError, match="folder does not exist"):
        find_pairs(missing)


# -------------------------------------------------------------------------------------------- every refusal


def test_every_bad_file_reported_once(tmp_path):
    good_image, good_label = _slice(10, 12)
    save_slice(tmp_path, "good", good_image, good_label)
    # naming
    np.save(tmp_path / "stray.npy", good_image)
    (tmp_path / "x_t1.nii").write_bytes(b"junk")  # a .nii that is not named right
    np.save(tmp_path / "y_T2w.npy", good_image)
    # unreadable / corrupt
    save_slice(tmp_path, "trunc", good_image, good_label)
    data = (tmp_path / "trunc_T1w.npy").read_bytes()
    (tmp_path / "trunc_T1w.npy").write_bytes(data[: len(data) // 2])
    save_slice(tmp_path, "garbage", good_image, good_label, fmt="nifti")
    (tmp_path / "garbage_T1w_tissue_segmentation.nii.gz").write_bytes(b"not a nifti at all")
    save_slice(tmp_path, "badgz", good_image, good_label, fmt="nifti")
    raw = gzip.decompress((tmp_path / "badgz_T1w.nii.gz").read_bytes())
    (tmp_path / "badgz_T1w.nii.gz").write_bytes(gzip.compress(raw)[:-40])  # truncated gzip stream
    save_slice(tmp_path, "pickled", good_image, good_label)
    np.save(tmp_path / "pickled_T1w.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    save_slice(tmp_path, "noise", good_image, good_label)
    (tmp_path / "noise_T1w_tissue_segmentation.npy").write_bytes(bytes(range(256)) * 2)  # random bytes, no header
    # not 2D
    save_slice(tmp_path, "vol", good_image, good_label)
    np.save(tmp_path / "vol_T1w.npy", np.zeros((2, 10, 12), np.float32))
    save_slice(tmp_path, "flat", good_image, good_label)
    np.save(tmp_path / "flat_T1w_tissue_segmentation.npy", np.zeros(120, np.uint8))
    save_slice(tmp_path, "vol3", good_image, good_label, fmt="nifti")
    nib.save(nib.Nifti1Image(np.zeros((10, 12, 2), np.float32), np.eye(4)), tmp_path / "vol3_T1w.nii.gz")
    # shapes differ
    save_slice(tmp_path, "shape", good_image, good_label)
    np.save(tmp_path / "shape_T1w_tissue_segmentation.npy", np.zeros((12, 10), np.uint8))
    # non-finite image
    nan_image = good_image.copy()
    nan_image[3, 4] = np.nan
    nan_image[5, 5] = np.inf
    save_slice(tmp_path, "nan", nan_image, good_label)
    save_slice(tmp_path, "huge", good_image, good_label)
    np.save(tmp_path / "huge_T1w.npy", np.full((10, 12), 1e300))  # finite float64, inf as float32
    # non-integer labels
    save_slice(tmp_path, "frac", good_image, good_label)
    frac = good_label.astype(np.float32)
    frac[2, 3] = 1.5
    np.save(tmp_path / "frac_T1w_tissue_segmentation.npy", frac)
    save_slice(tmp_path, "nanlab", good_image, good_label)
    nanlab = good_label.astype(np.float64)
    nanlab[0, 0] = np.nan
    np.save(tmp_path / "nanlab_T1w_tissue_segmentation.npy", nanlab)
    # labels outside 0..3
    save_slice(tmp_path, "big", good_image, np.where(good_label == 3, 7, good_label))
    save_slice(tmp_path, "neg", good_image, good_label)
    neg = good_label.astype(np.int16)
    neg[0, 1] = -1
    np.save(tmp_path / "neg_T1w_tissue_segmentation.npy", neg)
    # orphan
    np.save(tmp_path / "orphan_T1w.npy", good_image)
    # ignored
    (tmp_path / "manifest.csv").write_text("id\n")
    (tmp_path / "notes.txt").write_text("hello")

    problems = _problems(tmp_path)
    expected = {
        "stray.npy": "name follows neither",
        "x_t1.nii": "name follows neither",
        "y_T2w.npy": "name follows neither",
        "trunc_T1w.npy": "cannot read image",
        "garbage_T1w_tissue_segmentation.nii.gz": "cannot read label",
        "badgz_T1w.nii.gz": "cannot read image",
        "pickled_T1w.npy": "cannot read image (ValueError: Object arrays cannot be loaded when allow_pickle=False)",
        "noise_T1w_tissue_segmentation.npy": "cannot read label (ValueError: not a .npy file (no NumPy header))",
        "vol_T1w.npy": "image is not 2D (shape (2, 10, 12))",
        "flat_T1w_tissue_segmentation.npy": "label is not 2D (shape (120,))",
        "vol3_T1w.nii.gz": "image is not 2D (shape (10, 12, 2))",
        "shape_T1w_tissue_segmentation.npy": "shape 12x10 differs from its image shape_T1w.npy (10x12)",
        "nan_T1w.npy": "image has 2 non-finite value(s)",
        "huge_T1w.npy": "image has 120 non-finite value(s)",
        "frac_T1w_tissue_segmentation.npy": "label has 1 non-integer value(s) (e.g. 1.5 at row 2, col 3)",
        "nanlab_T1w_tissue_segmentation.npy": "label has 1 non-integer value(s)",
        "big_T1w_tissue_segmentation.npy": "label values outside 0..3: 7",
        "neg_T1w_tissue_segmentation.npy": "label values outside 0..3: -1 (1 pixel(s), first at row 0, col 1)",
        "orphan_T1w.npy": "image without label",
    }
    assert len(problems) == len(expected), "\n".join(problems)
    for name, text in expected.items():
        lines = _lines_for(problems, name)
        assert len(lines) == 1 and text in lines[0], (name, lines)
        assert lines[0].startswith(str(tmp_path / name) + ": ")
    assert all("\n" not in p for p in problems)
    # str() is the lines joined; nothing about the good slice or the ignored files
    with pytest.raises(DataError) as info:
        load_split(tmp_path, 4)
    assert str(info.value) == "\n".join(problems)
    assert not any("good" in p or "manifest" in p or "notes" in p for p in problems)


def test_label_range_follows_num_classes(tmp_path):
    image, label = _slice(5, 5)
    save_slice(tmp_path, "a", image, label)
    load_split(tmp_path, 4)
    problems = _problems(tmp_path, num_classes=3)
    assert len(problems) == 1 and "label values outside 0..2: 3" in problems[0]
    with pytest.raises(ValueError):
        load_split(tmp_path, 0)


def test_duplicate_id_in_two_formats(tmp_path):
    image, label = _slice(5, 5)
    save_slice(tmp_path, "a", image, label)
    save_slice(tmp_path, "a", image, label, fmt="nifti")
    problems = _problems(tmp_path)
    assert len(problems) == 2
    assert all("a second" in p for p in problems)


def test_load_images_checks_images_and_skips_labels(tmp_path):
    """New scans: images alone, read and checked as load_split does; label files, even a second one, are skipped."""
    for k, fmt in enumerate(["npy", "nifti", "npy"]):
        save_slice(tmp_path, f"s{k}", *_slice(6 + k, 5, seed=k), fmt=fmt)
    save_slice(tmp_path, "s1", *_slice(7, 5, seed=1))  # s1's image twice (npy and NIfTI), and its label twice
    (tmp_path / "s2_T1w_tissue_segmentation.npy").write_bytes(b"junk")
    (tmp_path / "odd.npy").write_bytes(b"junk")
    with pytest.raises(DataError) as info:
        load_images(tmp_path)
    assert info.value.problems == [
        f"{tmp_path / 'odd.npy'}: name follows neither <id>_T1w.<ext> nor <id>_T1w_tissue_segmentation.<ext> "
        "(ext .npy, .nii or .nii.gz)",
        f"{tmp_path / 's1_T1w.npy'}: a second image for id 's1' (also s1_T1w.nii.gz)"]
    (tmp_path / "odd.npy").unlink()
    (tmp_path / "s1_T1w.npy").unlink()
    scans = load_images(tmp_path)
    assert scans.ids == ["s0", "s1", "s2"]
    assert [p.name for p in scans.paths] == ["s0_T1w.npy", "s1_T1w.nii.gz", "s2_T1w.npy"]
    assert [(img.dtype, img.shape) for img in scans.images] == [(np.float32, (6, 5)), (np.float32, (7, 5)),
                                                               (np.float32, (8, 5))]
    assert np.array_equal(scans.images[2], _slice(8, 5, seed=2)[0])


def test_dataerror_pickles_and_accepts_a_string():
    error = pickle.loads(pickle.dumps(DataError(["a: x", "b: y"])))
    assert error.problems == ["a: x", "b: y"] and str(error) == "a: x\nb: y"
    assert DataError("c: z").problems == ["c: z"]


# ------------------------------------------------------------------------------------------- formats, dtypes


def test_npy_and_nifti_read_the_same(tmp_path):
    image, label = _slice(37, 53, seed=3)
    save_slice(tmp_path / "npy", "s", image, label)
    save_slice(tmp_path / "nii", "s", image, label, fmt="nifti")
    a, b = load_split(tmp_path / "npy", 4), load_split(tmp_path / "nii", 4)
    for split in (a, b):
        assert split.images[0].dtype == np.float32 and split.labels[0].dtype == np.uint8
        np.testing.assert_array_equal(split.images[0], image)
        np.testing.assert_array_equal(split.labels[0], label)


def test_nifti_singleton_axis_and_uncompressed(tmp_path):
    image, label = _slice(20, 30)
    nib.save(nib.Nifti1Image(image[:, :, None], np.eye(4)), tmp_path / "a_T1w.nii")
    nib.save(nib.Nifti1Image(label[None, :, :].astype(np.int16), np.eye(4)),
             tmp_path / "a_T1w_tissue_segmentation.nii.gz")
    # float labels holding whole numbers are fine
    nib.save(nib.Nifti1Image(image[:, :, None, None], np.eye(4)), tmp_path / "b_T1w.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.float32), np.eye(4)), tmp_path / "b_T1w_tissue_segmentation.nii.gz")
    split = load_split(tmp_path, 4)
    assert split.ids == ["a", "b"]
    for img, lab in zip(split.images, split.labels):
        assert img.shape == lab.shape == (20, 30)
        np.testing.assert_array_equal(img, image)
        np.testing.assert_array_equal(lab, label)
        assert lab.dtype == np.uint8


def test_int_images_and_bool_labels_accepted(tmp_path):
    np.save(tmp_path / "a_T1w.npy", np.arange(12, dtype=np.int16).reshape(3, 4))
    np.save(tmp_path / "a_T1w_tissue_segmentation.npy", np.eye(3, 4, dtype=bool))
    split = load_split(tmp_path, 4)
    assert split.images[0].dtype == np.float32 and split.images[0][2, 3] == 11
    assert split.labels[0].dtype == np.uint8 and split.labels[0].sum() == 3


def test_save_slice_refuses_bad_arrays(tmp_path):
    image, label = _slice(4, 4)
    with pytest.raises(ValueError):
        save_slice(tmp_path, "a", image, label[:3])
    with pytest.raises(ValueError):
        save_slice(tmp_path, "a", image, label + 0.5)
    with pytest.raises(ValueError):
        save_slice(tmp_path, "a", image, label.astype(int) - 1)
    with pytest.raises(ValueError):
        save_slice(tmp_path, "../a", image, label)
    with pytest.raises(ValueError):
        save_slice(tmp_path, "a", image, label, fmt="png")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------- stacked


def test_stacked_pads_bottom_right_to_common_size(tmp_path):
    shapes = {"a": (176, 176), "b": (181, 97), "c": (33, 199), "d": (1, 1)}
    for k, (slice_id, (h, w)) in enumerate(shapes.items()):
        image, label = _slice(h, w, seed=k)
        save_slice(tmp_path, slice_id, image + 1, np.maximum(label, 1))  # no zeros inside a slice
    split = load_split(tmp_path, 4)
    images, labels, sizes = split.stacked()
    assert images.dtype == torch.float32 and labels.dtype == torch.uint8 and sizes.dtype == torch.int64
    assert images.shape == labels.shape == (4, 1, 181, 199)
    assert sizes.tolist() == [list(s) for s in shapes.values()]
    for k, (h, w) in enumerate(shapes.values()):
        np.testing.assert_array_equal(images[k, 0, :h, :w].numpy(), split.images[k])
        np.testing.assert_array_equal(labels[k, 0, :h, :w].numpy(), split.labels[k])
        assert (images[k, 0, :h, :w] > 0).all() and (labels[k, 0, :h, :w] > 0).all()
        assert images[k, 0, h:].abs().sum() == 0 and images[k, 0, :, w:].abs().sum() == 0
        assert labels[k, 0, h:].sum() == 0 and labels[k, 0, :, w:].sum() == 0

    # at least min_size (e.g. a 200x200 training crop), per axis
    images, labels, sizes = split.stacked(min_size=(200, 150))
    assert images.shape == labels.shape == (4, 1, 200, 199)
    assert sizes.tolist() == [list(s) for s in shapes.values()]


def test_stacked_small_odd_slices(tmp_path):
    image, label = _slice(37, 41)
    save_slice(tmp_path, "odd", image, label)
    images, labels, sizes = load_split(tmp_path, 4).stacked(min_size=(200, 200))
    assert images.shape == (1, 1, 200, 200)
    assert sizes.tolist() == [[37, 41]]
    assert images[0, 0, 37:].abs().sum() == 0 and images[0, 0, :, 41:].abs().sum() == 0


def test_empty_split_stacks_to_zero_slices(tmp_path):
    images, labels, sizes = Split(tmp_path, [], [], []).stacked(min_size=(8, 9))
    assert images.shape == (0, 1, 8, 9) and sizes.shape == (0, 2)
