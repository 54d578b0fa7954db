"""`hpcseg prepare`: 3D scans with labels -> the slice data set train reads, split by subject; bad input refused."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import volume_phantom as P
from click.testing import CliRunner

from hpcseg import volumes as V
from hpcseg.cli import main
from hpcseg.data import load_split
from hpcseg.prepare import SPLITS, assign_splits

SCANS = ["sub-01_ses-1", "sub-01_ses-2", "sub-02", "sub-03", "sub-04", "sub-05"]


def hpcseg(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def manifest(out):
    return list(csv.DictReader((out / "manifest.csv").open()))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study") / "scans"
    for k, name in enumerate(SCANS):
        geometry = (P.RAS, P.PERMUTED, P.ANISO)[k % 3]
        P.save(folder, name, *geometry, centre=P.CENTRE + [k, 0, 0])
    (folder / "README.txt").write_text("not a scan")
    return folder


def test_prepare_writes_the_slice_data_set_split_by_subject(study, tmp_path):
    out = tmp_path / "data"
    code, output = hpcseg("prepare", study, "--out", out, "--fractions", "0.4,0.2,0.4", "--seed", "3")
    assert code == 0, output
    assert sorted(p.name for p in out.iterdir()) == sorted([*SPLITS, "manifest.csv", "prepare.json"])
    rows = manifest(out)
    split_of = {}
    for row in rows:
        assert split_of.setdefault(row["subject"], row["split"]) == row["split"]  # one split per subject
    assert split_of["sub-01"] and {r["scan"] for r in rows if r["subject"] == "sub-01"} == set(SCANS[:2])
    assert sorted(split_of.values()).count("validation_data") == 1 and sorted(split_of.values()).count("test_data") == 2
    record = json.loads((out / "prepare.json").read_text())
    assert record["normalisation"] == V.RULE and record["subjects"] == split_of
    for split in SPLITS:
        data = load_split(out / split, 4)  # what train reads
        assert sorted(data.ids) == sorted(r["id"] for r in rows if r["split"] == split)
        for image, label, row in zip(data.images, data.labels, sorted((r for r in rows if r["split"] == split),
                                                                      key=lambda r: r["id"])):
            assert image.shape == label.shape == (176, 176) and label.any()  # slices without brain dropped
            assert np.bincount(label.ravel(), minlength=4).tolist() == [int(row[k]) for k in
                                                                         ("background", "csf", "grey_matter",
                                                                          "white_matter")]
    # the same seed gives the same split
    code, _ = hpcseg("prepare", study, "--out", tmp_path / "again", "--fractions", "0.4,0.2,0.4", "--seed", "3")
    assert code == 0 and json.loads((tmp_path / "again" / "prepare.json").read_text())["subjects"] == split_of


def test_slices_match_the_scan_in_brain2d_geometry(study, tmp_path):
    out = tmp_path / "data"
    assert hpcseg("prepare", study, "--out", out, "--test", "sub-02")[0] == 0
    rows = [r for r in manifest(out) if r["scan"] == "sub-02"]
    assert {r["split"] for r in rows} == {"test_data"}
    image, labels = P.scan(*P.ANISO, centre=P.CENTRE + [2, 0, 0])  # sub-02: anisotropic voxels
    result = V.cut_scan("x", image, P.ANISO[0])
    for row in rows:
        j = round(float(row["y_mm"]) - result.grid.y_mm(0))
        np.testing.assert_array_equal(np.load(out / "test_data" / f"{row['id']}_T1w.npy"), result.image[j])
    assert len(rows) == result.grid.shape[0]  # one slice per mm of brain along y


def test_lists_name_the_validation_and_test_subjects(study, tmp_path):
    out = tmp_path / "data"
    code, output = hpcseg("prepare", study, "--out", out, "--val", "sub-02,sub-03", "--test", "sub-01")
    assert code == 0, output
    split_of = json.loads((out / "prepare.json").read_text())["subjects"]
    assert split_of == {"sub-01": "test_data", "sub-02": "validation_data", "sub-03": "validation_data",
                        "sub-04": "training_data", "sub-05": "training_data"}


def test_split_that_would_leak_a_subject_is_refused(study, tmp_path):
    code, output = hpcseg("prepare", study, "--out", tmp_path / "d", "--val", "sub-02", "--test", "sub-02,sub-03")
    assert code == 2 and output.strip().splitlines() == [
        "hpcseg: error: subject sub-02 is listed for validation and for test: a subject's slices must sit in one "
        "split only, or its own slices would be tested"]
    code, output = hpcseg("prepare", study, "--out", tmp_path / "d", "--test", "sub-09")
    assert code == 2 and "--test: no scan of subject sub-09" in output
    assert not (tmp_path / "d").exists()


def test_assign_splits_by_fraction():
    subjects = [f"s{i}" for i in range(10)]
    split = assign_splits(subjects, (0.6, 0.2, 0.2), seed=0)
    assert sorted(split.values()) == ["test_data"] * 2 + ["training_data"] * 6 + ["validation_data"] * 2
    assert assign_splits(subjects, (0.6, 0.2, 0.2), seed=1) != split
    assert set(assign_splits(["one"], (0, 0, 1)).values()) == {"test_data"}


def test_fast_names_and_other_codes_are_mapped(tmp_path):
    scans = tmp_path / "fast"
    P.save(scans, "a", *P.RAS, suffix="_seg")  # FSL FAST: <scan>_T1w_seg.nii.gz, its codes are hpcseg's
    code, output = hpcseg("prepare", scans, "--out", tmp_path / "d1", "--label-suffix", "_seg", "--fractions", "1,0,0")
    assert code == 0, output
    # another tool: 0 background, 1 GM, 2 WM, 3 CSF
    other = tmp_path / "other"
    image, labels = P.scan(*P.RAS)
    nib.save(nib.Nifti1Image(image, P.RAS[0]), other.mkdir() or other / "a_T1w.nii.gz")
    recoded = np.choose(labels, [0, 3, 1, 2]).astype(np.int16)
    nib.save(nib.Nifti1Image(recoded, P.RAS[0]), other / "a_T1w_tissue_segmentation.nii.gz")
    code, output = hpcseg("prepare", other, "--out", tmp_path / "d2", "--map", "1=2,2=3,3=1", "--fractions", "1,0,0")
    assert code == 0, output
    for name in sorted(p.name for p in (tmp_path / "d1" / "training_data").iterdir()):
        a, b = (np.load(tmp_path / d / "training_data" / name) for d in ("d1", "d2"))
        np.testing.assert_array_equal(a, b)
    code, output = hpcseg("prepare", other, "--out", tmp_path / "d3", "--map", "1=2,2=3", "--fractions", "1,0,0")
    assert code == 2 and output.strip().splitlines() == [
        f"hpcseg: error: {other / 'a_T1w_tissue_segmentation.nii.gz'}: label codes outside the mapping "
        f"0=0,1=2,2=3: 3 ({np.count_nonzero(recoded == 3)} voxel(s), first at voxel "
        f"{tuple(int(v) for v in np.argwhere(recoded == 3)[0])}); map them with --map"]
    assert not (tmp_path / "d3").exists()


def _bad_study(folder):
    """Five scans, each wrong in one way, and one good one."""
    affine, shape = P.RAS
    image, labels = P.scan(affine, shape)
    save = lambda name, array, aff=affine: nib.save(nib.Nifti1Image(array, aff), folder / name)  # noqa: E731
    folder.mkdir()
    save("good_T1w.nii.gz", image), save("good_T1w_tissue_segmentation.nii.gz", labels)
    save("fourd_T1w.nii.gz", np.stack([image, image], -1)), save("fourd_T1w_tissue_segmentation.nii.gz", labels)
    moved = affine.copy()
    moved[2, 3] += 3
    save("moved_T1w.nii.gz", image), save("moved_T1w_tissue_segmentation.nii.gz", labels, moved)
    nan = image.copy()
    nan[40, 40, 40] = np.nan
    save("nan_T1w.nii.gz", nan), save("nan_T1w_tissue_segmentation.nii.gz", labels)
    save("empty_T1w.nii.gz", image), save("empty_T1w_tissue_segmentation.nii.gz", np.zeros_like(labels))
    noisy = image + np.random.default_rng(0).uniform(1, 5, image.shape).astype(np.float32)
    save("head_T1w.nii.gz", noisy), save("head_T1w_tissue_segmentation.nii.gz", labels)
    save("codes_T1w.nii.gz", image), save("codes_T1w_tissue_segmentation.nii.gz", labels * 2)


def test_bad_scans_are_each_named_on_one_line_and_nothing_is_written(tmp_path):
    folder = tmp_path / "bad"
    _bad_study(folder)
    code, output = hpcseg("prepare", folder, "--out", tmp_path / "d", "--fractions", "1,0,0")
    assert code == 2 and "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("hpcseg: error:")]
    expected = {
        "codes": "codes_T1w_tissue_segmentation.nii.gz: label codes outside the mapping 0=0,1=1,2=2,3=3: 4, 6 (",
        "empty": "empty_T1w_tissue_segmentation.nii.gz: no brain labelled (every voxel maps to background): empty mask",
        "fourd": "fourd_T1w.nii.gz: scan is 4D (2 volumes), shape 97x77x87x2; hpcseg takes one 3D scan per file",
        "head": "head_T1w.nii.gz: scan does not look skull-stripped: 100% of the voxels on the volume's faces",
        "moved": "moved_T1w_tissue_segmentation.nii.gz: affine differs from its scan moved_T1w.nii.gz's (by up to 3)",
        "nan": "nan_T1w.nii.gz: scan has 1 non-finite voxel(s) (NaN or inf; first at voxel (40, 40, 40))",
    }
    assert len(lines) == len(expected)
    for line, (name, text) in zip(lines, sorted(expected.items())):
        assert line.startswith(f"hpcseg: error: {folder / name}_T1w") and text in line, line
    assert not (tmp_path / "d").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_label_on_another_grid_and_missing_labels(tmp_path):
    folder = tmp_path / "scans"
    P.save(folder, "a", *P.RAS)
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), folder / "a_T1w_tissue_segmentation.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), folder / "b_T1w.nii.gz")
    code, output = hpcseg("prepare", folder, "--out", tmp_path / "d")
    assert code == 2 and output.strip().splitlines() == [
        f"hpcseg: error: {folder / 'b_T1w.nii.gz'}: scan without labels (expected b_T1w_tissue_segmentation.nii.gz "
        f"or .nii; see --label-suffix)"]
    (folder / "b_T1w.nii.gz").unlink()
    code, output = hpcseg("prepare", folder, "--out", tmp_path / "d")
    assert code == 2 and "a_T1w_tissue_segmentation.nii.gz: shape 5x5x5 differs from its scan a_T1w.nii.gz" in output


def test_out_holding_other_files_is_refused(study, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    code, output = hpcseg("prepare", study, "--out", tmp_path / "d")
    assert code == 2 and "holds more than a prepare output (notes.txt)" in output
    assert (tmp_path / "d" / "notes.txt").read_text() == "mine"
