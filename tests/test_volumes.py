"""3D scans cut into brain2d's coronal slices and mapped back: orientation, resampling, normalisation, refusals."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import volume_phantom as P
from PIL import Image

from hpcseg import volumes as V
from hpcseg.data import DataError


def cut(affine, shape):
    image, labels = P.scan(affine, shape)
    result = V.cut_scan("scan.nii.gz", image, affine)
    sliced = V.resample(labels, affine, result.grid.affine, result.grid.shape, order=0)
    return result, sliced, labels


def test_slices_run_top_down_and_left_to_right_in_1mm():
    result, sliced, _ = cut(*P.RAS)
    assert result.grid.shape[1:] == (V.SIZE, V.SIZE)  # the phantom lies inside brain2d's MNI window
    j = int(round(P.MARKER[1] - result.grid.y_mm(0)))
    assert result.grid.y_mm(j) == P.MARKER[1]
    row, col = int(V.MNI_TOP_Z - P.MARKER[2]), int(P.MARKER[0] - V.MNI_LEFT_X)
    # the marker sits on the subject's right (x > 0: right half of the columns), near the top of the head
    assert sliced[j, row, col] == 3 and sliced[j, row, V.SIZE - 1 - col] != 3
    brain_rows = np.flatnonzero(sliced[j].any(axis=1))
    assert brain_rows[0] == V.MNI_TOP_Z - (P.CENTRE[2] + P.RADII[2])  # the top of the phantom, 1 mm per row


def test_window_holds_the_volume_voxel_for_voxel():
    # voxel value encodes its world position x*1000 + z, on the MNI template's grid (origin -98, -134, -72 mm)
    affine = np.eye(4)
    affine[:3, 3] = (-98, -134, -72)
    x = np.arange(197)[:, None, None] - 98
    z = np.arange(189)[None, None, :] - 72
    volume = np.broadcast_to(x * 1000 + z + 500_000, (197, 3, 189)).astype(np.int64)
    brain = np.zeros(volume.shape, bool)
    brain[60:140, :, 40:150] = True
    grid = V.slice_grid(brain, affine)
    window = V.resample(volume, affine, grid.affine, grid.shape, order=0)[1]
    assert window.shape == (176, 176) and window.dtype == np.int64
    assert window[0, 0] == -88 * 1000 + 95 + 500_000  # top row z = +95 mm, first column x = -88 mm (subject's left)
    assert window[0, 175] == 87 * 1000 + 95 + 500_000  # last column x = +87 mm (subject's right)
    assert window[167, 0] == -88 * 1000 - 72 + 500_000  # the volume's lowest plane, z = -72 mm
    assert (window[168:] == 0).all()  # below the volume: zero padding


def test_axis_order_and_direction_do_not_change_the_slices():
    a, a_labels, _ = cut(*P.RAS)
    b, b_labels, _ = cut(*P.PERMUTED)
    np.testing.assert_array_equal(a.grid.affine, b.grid.affine)
    np.testing.assert_array_equal(a.image, b.image)  # same 1 mm lattice: voxels copied, not interpolated
    np.testing.assert_array_equal(a_labels, b_labels)


def test_anisotropic_voxels_are_resampled_to_1mm():
    a, a_labels, _ = cut(*P.RAS)
    c, c_labels, _ = cut(*P.ANISO)
    assert c.grid.shape[1:] == a.grid.shape[1:]
    y = {round(a.grid.y_mm(j)): j for j in range(a.grid.shape[0])}
    pairs = [(y[round(c.grid.y_mm(j))], j) for j in range(c.grid.shape[0]) if round(c.grid.y_mm(j)) in y]
    assert len(pairs) >= a.grid.shape[0] - 4
    ja, jc = map(list, zip(*pairs))
    brain = (a_labels[ja] > 0) | (c_labels[jc] > 0)
    assert (a_labels[ja] == c_labels[jc])[brain].mean() > 0.9
    assert np.abs(a.image[ja] - c.image[jc])[brain].mean() < 0.1
    assert ((c.image != 0) == (c_labels > 0)).all()  # no halo of interpolated background around the brain


@pytest.mark.parametrize("geometry", [P.PERMUTED, P.ANISO], ids=["permuted", "anisotropic"])
def test_slices_map_back_onto_the_scans_voxels(geometry):
    affine, shape = geometry
    result, sliced, labels = cut(affine, shape)
    back = V.to_scan(sliced, result.grid, nib.Nifti1Image(np.zeros(shape, np.float32), affine))
    assert back.shape == labels.shape and back.dtype == np.uint8
    agree = (back == labels).mean()
    assert agree == 1.0 if geometry is P.PERMUTED else agree > 0.97


def test_window_is_centred_on_a_brain_outside_the_mni_window():
    affine, shape = P.RAS
    affine = affine.copy()
    affine[0, 3] += 300  # a scanner-space scan far from MNI's origin
    image, _ = P.scan(affine, shape, centre=P.CENTRE + [300, 0, 0])
    result = V.cut_scan("scan.nii.gz", image, affine)
    assert result.grid.shape[1:] == (V.SIZE, V.SIZE)
    cols = np.flatnonzero(result.image.any(axis=(0, 1)))
    assert abs((cols[0] + cols[-1]) / 2 - (V.SIZE - 1) / 2) <= 1


def test_intensity_is_divided_by_the_99th_percentile_inside_the_brain():
    image, _ = P.scan(*P.RAS)
    result = V.cut_scan("scan.nii.gz", image, P.RAS[0])
    assert result.scale == pytest.approx(np.percentile(image[image != 0], 99))
    assert 0.9 < float(result.image.max()) < 1.1 and result.image.min() == 0


def test_label_mapping():
    codes = np.array([[[0, 1], [2, 3]]], dtype=np.int16)
    assert V.map_labels("x", codes, V.parse_mapping(None)).tolist() == [[[0, 1], [2, 3]]]
    assert V.map_labels("x", codes, V.parse_mapping("1=2,2=3,3=1")).tolist() == [[[0, 2], [3, 1]]]
    with pytest.raises(DataError, match=r"seg.nii.gz: label codes outside the mapping 0=0,1=1: 2, 3 \(2 voxel"):
        V.map_labels("seg.nii.gz", codes, V.parse_mapping("1=1"))
    with pytest.raises(DataError, match="--map 1=7: '1=7' is not CODE=CLASS"):
        V.parse_mapping("1=7")
    with pytest.raises(DataError, match="non-integer voxel"):
        V.map_labels("p.nii.gz", np.array([[[0.0, 0.4]]]), V.IDENTITY)


def _write(path, array, affine=np.eye(4)):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def test_read_volume_refuses_4d_nonfinite_and_2d(tmp_path):
    with pytest.raises(DataError, match=r"a_T1w.nii.gz: scan is 4D \(2 volumes\), shape 4x4x4x2; .*fslroi"):
        V.read_volume(_write(tmp_path / "a_T1w.nii.gz", np.ones((4, 4, 4, 2), np.float32)))
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    with pytest.raises(DataError, match=r"b_T1w.nii.gz: scan has 1 non-finite voxel\(s\) .*first at voxel \(1, 2, 3\)"):
        V.read_volume(_write(tmp_path / "b_T1w.nii.gz", data))
    with pytest.raises(DataError, match="c_T1w.nii.gz: scan is 2D"):
        V.read_volume(_write(tmp_path / "c_T1w.nii.gz", np.ones((4, 4), np.float32)))
    assert V.read_volume(_write(tmp_path / "d_T1w.nii.gz", np.ones((4, 4, 4, 1), np.float32)))[0].shape == (4, 4, 4)


def test_label_volume_must_lie_on_its_scans_voxels(tmp_path):
    scan = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    moved = np.eye(4)
    moved[0, 3] = 2
    with pytest.raises(DataError, match="l.nii.gz: shape 4x4x5 differs from its scan s.nii.gz"):
        V.check_same_grid(tmp_path / "l.nii.gz", nib.Nifti1Image(np.ones((4, 4, 5)), np.eye(4)),
                          tmp_path / "s.nii.gz", scan)
    with pytest.raises(DataError, match="l.nii.gz: affine differs from its scan s.nii.gz's"):
        V.check_same_grid(tmp_path / "l.nii.gz", nib.Nifti1Image(np.ones((4, 4, 4)), moved), tmp_path / "s.nii.gz",
                          scan)


def test_scan_that_is_not_skull_stripped_is_refused():
    image, labels = P.scan(*P.RAS)
    V.check_skull_stripped("s.nii.gz", image, labels > 0)
    noisy = image + np.random.default_rng(0).uniform(1, 5, image.shape).astype(np.float32)
    with pytest.raises(DataError, match=r"s.nii.gz: scan does not look skull-stripped: 100% of the voxels on the "
                                        r"volume's faces are non-zero .* brain extraction"):
        V.check_skull_stripped("s.nii.gz", noisy)
    skull = image.copy()
    shell = np.zeros_like(labels, bool)
    shell[4:-4, 4:-4, 4:-4] = True
    skull[shell & (labels == 0)] = 80.0  # bright skull and scalp around the brain, air at the faces
    with pytest.raises(DataError, match="non-zero voxels lie outside the brain labelled in seg.nii.gz"):
        V.check_skull_stripped("s.nii.gz", skull, labels > 0, P.Path("seg.nii.gz"))


def test_empty_scan_is_refused():
    with pytest.raises(DataError, match="s.nii.gz: scan is 0 everywhere: no brain to segment"):
        V.cut_scan("s.nii.gz", np.zeros((8, 8, 8), np.float32), np.eye(4))


# ----------------------------------------------------------------------------------------------- predict and test

from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from fixtures_cluster import TINY  # noqa: E402

from hpcseg.cli import main  # noqa: E402

JOB = Path(__file__).resolve().parents[1] / "jobs" / "exercise-improved.toml"


def hpcseg(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def run_and_scans(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    args = ["train", JOB, "--data", tiny_data, "--out", root / "run", "--set", "train.epochs=1"]
    for s in [*TINY, "infer.roi=[176,176]"]:  # whole slices in one pass: no sliding window, faster
        args += ["--set", s]
    code, output = hpcseg(*args)
    assert code == 0, output
    P.save(root / "scans", "sub-01", *P.PERMUTED)
    P.save(root / "scans", "sub-02", *P.ANISO, centre=P.CENTRE + [3, 0, 0])
    return root / "run", root / "scans"


def test_predict_writes_a_label_volume_on_each_scan(run_and_scans, tmp_path):
    run, scans = run_and_scans
    code, output = hpcseg("predict", run, "--data", scans, "--out", tmp_path / "out")
    assert code == 0, output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["predict.json", "sub-01_prediction.nii.gz", "sub-01_views.png", "sub-02_prediction.nii.gz",
                     "sub-02_views.png"]
    for name in ("sub-01", "sub-02"):
        scan, pred = nib.load(scans / f"{name}_T1w.nii.gz"), nib.load(tmp_path / "out" / f"{name}_prediction.nii.gz")
        assert pred.shape == scan.shape and np.array_equal(pred.affine, scan.affine)
        assert pred.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}
    summary = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert summary["scans"] == 2 and summary["normalisation"] == V.RULE
    # no label to compare with: the plain scan above the prediction, and the scan's id as the title
    assert Image.open(tmp_path / "out" / "sub-02_views.png").text == {
        "Title": "sub-02", "Views": "coronal, axial, sagittal", "Rows": "scan, prediction"}


def test_predicting_a_volume_equals_predicting_its_slices_one_by_one(run_and_scans, tmp_path):
    from hpcseg.infer import predict_logits
    from hpcseg.segment import segment_volume
    from hpcseg.trained import load_best_model

    run, scans = run_and_scans
    best = load_best_model(run)
    best.model.eval()
    for name in ("sub-01", "sub-02"):
        seg = segment_volume(best, scans / f"{name}_T1w.nii.gz")
        for j, image in enumerate(seg.cut.image):
            logits = next(predict_logits(best.model, torch.from_numpy(image)[None, None], best.job.infer))[0]
            top2 = logits.topk(2, dim=0).values
            clear = (top2[0] - top2[1] > 1e-4).numpy()  # a batch of other size may round a near-tie otherwise
            assert clear.mean() > 0.99
            np.testing.assert_array_equal(seg.slices[j][clear], logits.argmax(0).numpy()[clear], err_msg=f"{name} {j}")
        np.testing.assert_array_equal(seg.labels, V.to_scan(seg.slices, seg.cut.grid, seg.source))
    # and through the command line: the prepared slices of a scan, predicted as a 2D folder
    assert hpcseg("prepare", scans, "--out", tmp_path / "data", "--fractions", "0,0,1")[0] == 0
    assert hpcseg("predict", run, "--data", tmp_path / "data" / "test_data", "--out", tmp_path / "p2d")[0] == 0
    seg = segment_volume(best, scans / "sub-01_T1w.nii.gz")
    for path in sorted((tmp_path / "p2d").glob("sub-01-cor*_prediction.npy")):
        j = int(path.name.split("-cor")[1][:3])
        np.testing.assert_array_equal(np.load(path), seg.slices[j])


def test_test_gives_3d_dice_per_scan_and_over_the_folder(run_and_scans, tmp_path):
    run, scans = run_and_scans
    code, output = hpcseg("test", run, "--data", scans, "--out", tmp_path / "t")
    assert code == 0, output
    assert "3D Dice" in output and "(2 scans)" in output
    out = tmp_path / "t"
    assert sorted(p.name for p in out.iterdir()) == ["per_subject.csv", "png", "predictions", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    rows = list(csv.DictReader((out / "per_subject.csv").open()))
    assert [r["scan"] for r in rows] == ["sub-01", "sub-02"]
    counts = np.zeros((4, 3))
    for row in rows:
        pred = np.asarray(nib.load(out / "predictions" / f"{row['scan']}_prediction.nii.gz").dataobj)
        label = np.asarray(nib.load(scans / f"{row['scan']}_T1w_tissue_segmentation.nii.gz").dataobj)
        mine = np.zeros((4, 3))
        for c in range(1, 4):
            mine[c] = [((pred == c) & (label == c)).sum(), ((pred == c) & (label != c)).sum(),
                       ((pred != c) & (label == c)).sum()]
        counts += mine
        by_hand = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in mine[1:]]
        assert [float(row[t]) for t in ("csf", "grey_matter", "white_matter")] == pytest.approx(by_hand, abs=1e-6)
    by_hand = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts[1:]]
    assert list(summary["dice_per_class"].values()) == pytest.approx(by_hand)
    assert summary["scans"] == 2 and set(summary["dice_per_scan"]) == {"sub-01", "sub-02"}
    for row in rows:  # each scan's PNG: its id and its own 3D Dice, the label above the prediction
        dice = ", ".join(f"{name} {float(row[t]):.3f}" for name, t in
                         zip(("CSF", "grey matter", "white matter"), ("csf", "grey_matter", "white_matter")))
        assert Image.open(out / "png" / f"{row['scan']}.png").text == {
            "Title": f"{row['scan']}   Dice {float(row['mean']):.3f}   ({dice})", "Views": "coronal, axial, sagittal",
            "Rows": "label, prediction"}


@pytest.mark.parametrize("with_label", [True, False])
def test_3d_views_have_a_title_view_and_row_names_and_a_legend(tmp_path, with_label):
    from hpcseg.views import COLOURS, save_views

    result, sliced, _ = cut(*P.RAS)
    predicted = np.where(sliced == 3, 2, sliced)  # white matter taken for grey: a Dice below 1
    truth = sliced if with_label else None
    described = save_views(tmp_path / "v.png", result.image, predicted, truth, "sub-07",
                           [1.0, 1.0, 0.0] if with_label else None)
    rows = ["label", "prediction"] if with_label else ["scan", "prediction"]
    title = "sub-07   Dice 0.667   (CSF 1.000, grey matter 1.000, white matter 0.000)" if with_label else "sub-07"
    assert described == {"title": title, "views": ["coronal", "axial", "sagittal"], "rows": rows,
                         "legend": ["CSF", "grey matter", "white matter"]}
    png = Image.open(tmp_path / "v.png")
    assert png.text == {"Title": title, "Views": "coronal, axial, sagittal", "Rows": ", ".join(rows)}
    pixels = np.asarray(png.convert("RGB")).astype(int)
    assert (pixels[:18] < 100).any()  # the title is drawn
    legend = pixels[-18:]
    for colour in (COLOURS[1:] * 255).round().astype(int):  # a swatch of each tissue's colour in the legend
        assert (legend == colour).all(axis=-1).sum() >= 90
    white_matter = (pixels == (COLOURS[3] * 255).round()).all(axis=-1)[:-18]  # its outline, legend left out
    assert white_matter.any() == with_label  # drawn in the label row only: the prediction has none


def test_predict_refuses_a_bad_scan_and_writes_nothing(run_and_scans, tmp_path):
    run, scans = run_and_scans
    bad = tmp_path / "bad"
    bad.mkdir()
    image, _ = P.scan(*P.RAS)
    nib.save(nib.Nifti1Image(image, P.RAS[0]), bad / "a_T1w.nii.gz")
    nib.save(nib.Nifti1Image(image + 2, P.RAS[0]), bad / "b_T1w.nii.gz")
    code, output = hpcseg("predict", run, "--data", bad, "--out", tmp_path / "out")
    assert code == 2 and output.strip().splitlines() == [
        f"hpcseg: error: {bad / 'b_T1w.nii.gz'}: scan does not look skull-stripped: 100% of the voxels on the "
        f"volume's faces are non-zero (a skull-stripped scan is 0 outside the brain); run a brain extraction first "
        f"(FSL bet, SynthStrip or HD-BET) and give hpcseg the extracted brain, 0 outside it"]
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("command", ["predict", "test"])
def test_a_full_disk_while_writing_predictions_of_scans_is_one_line_and_leaves_nothing(run_and_scans, tmp_path,
                                                                                       monkeypatch, command):
    import errno

    run, scans = run_and_scans
    real = nib.Nifti1Image.to_filename

    def half_written(self, filename, **kwargs):  # the second scan's volume meets a full disk half-way
        if "sub-02" in str(filename):
            Path(filename).write_bytes(b"\x1f\x8b half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, filename, **kwargs)

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", half_written)
    out = tmp_path / "out"
    code, output = hpcseg(command, run, "--data", scans, "--out", out)
    assert code == 2 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("hpcseg: error: ")]
    what = "predictions" if command == "predict" else "test output"
    assert errors == [f"hpcseg: error: {out}: no space left on device (filesystem {_mount(tmp_path)}; writing the "
                      f"{what}; nothing was written)"], output
    assert list(tmp_path.iterdir()) == []  # no half-written file, no temporary folder


def _mount(path):
    import os

    while not os.path.ismount(path):
        path = path.parent
    return path


def test_test_reads_other_label_names_and_codes_and_refuses_unmapped_ones(run_and_scans, tmp_path):
    run, scans = run_and_scans
    other = tmp_path / "fast"
    image, labels = P.scan(*P.PERMUTED)
    P.save(other, "sub-01", *P.PERMUTED, suffix="_seg")
    nib.save(nib.Nifti1Image(np.choose(labels, [0, 3, 1, 2]).astype(np.uint8), P.PERMUTED[0]),
             other / "sub-01_T1w_seg.nii.gz")  # another tool's codes: 1 GM, 2 WM, 3 CSF
    code, output = hpcseg("test", run, "--data", other, "--out", tmp_path / "a", "--label-suffix", "_seg",
                          "--map", "1=2,2=3,3=1")
    assert code == 0, output
    code, output = hpcseg("test", run, "--data", scans, "--out", tmp_path / "b")
    assert code == 0, output
    mapped, plain = (json.loads((tmp_path / d / "summary.json").read_text())["dice_per_scan"]["sub-01"] for d in "ab")
    assert mapped == plain
    code, output = hpcseg("test", run, "--data", other, "--out", tmp_path / "c", "--label-suffix", "_seg",
                          "--map", "1=2,2=3")
    assert code == 2 and output.strip().splitlines()[0].startswith(
        f"hpcseg: error: {other / 'sub-01_T1w_seg.nii.gz'}: label codes outside the mapping 0=0,1=2,2=3: 3 (")
    assert not (tmp_path / "c").exists()


def test_a_slice_among_scans_is_refused(tmp_path):
    P.save(tmp_path, "a", *P.RAS)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 1), np.float32), np.eye(4)), tmp_path / "b_T1w.nii.gz")
    with pytest.raises(DataError, match="b_T1w.nii.gz: a 2D slice \\(shape 8x8x1\\) among 3D scans"):
        V.check_scans(V.find_volumes(tmp_path, label_suffix=None))


# ------------------------------------------------------------------------------------ the run's normalisation rule


@pytest.fixture(scope="module")
def run_on_a_rule(run_and_scans, tmp_path_factory):
    """A run trained on scans prepared with a non-default rule (each scan / its 50th percentile over the brain)."""
    _, scans = run_and_scans
    root = tmp_path_factory.mktemp("rule")
    code, output = hpcseg("prepare", scans, "--out", root / "data", "--fractions", "0.5,0.5,0", "--percentile", "50")
    assert code == 0, output
    args = ["train", JOB, "--data", root / "data", "--out", root / "run", "--set", "train.epochs=1"]
    for s in [*TINY, "infer.roi=[176,176]"]:
        args += ["--set", s]
    code, output = hpcseg(*args)
    assert code == 0, output
    return root / "run", root / "data"


def _percentiles_cut_with(monkeypatch):
    """The percentile of every scan that predict or test cuts."""
    seen, real = [], V.cut_scan

    def cut_scan(path, scan, affine, percentile=V.PERCENTILE):
        seen.append(percentile)
        return real(path, scan, affine, percentile)

    monkeypatch.setattr(V, "cut_scan", cut_scan)
    return seen


def test_predict_and_test_apply_the_rule_the_run_was_trained_with(run_on_a_rule, run_and_scans, tmp_path,
                                                                 monkeypatch):
    import shutil

    run, data = run_on_a_rule
    _, scans = run_and_scans
    assert json.loads((data / "prepare.json").read_text())["normalisation"] == V.rule(50.0)
    assert json.loads((run / "train.json").read_text())["normalisation"] == V.rule(50.0)
    # as prepare cut the training slices: a prepared slice is the scan's plane divided by the 50th percentile
    manifest = list(csv.DictReader((data / "manifest.csv").open()))
    first = manifest[0]
    scan, img = V.read_volume(scans / f"{first['scan']}_T1w.nii.gz")
    cut = V.cut_scan(scans / "x", scan, img.affine, 50.0)
    j = int(first["id"].split("-cor")[1])
    np.testing.assert_array_equal(np.load(data / first["split"] / f"{first['id']}_T1w.npy"), cut.image[j])

    seen = _percentiles_cut_with(monkeypatch)
    code, output = hpcseg("predict", run, "--data", scans, "--out", tmp_path / "p")
    assert code == 0 and "note:" not in output, output
    assert json.loads((tmp_path / "p" / "predict.json").read_text())["normalisation"] == V.rule(50.0)
    code, output = hpcseg("test", run, "--data", scans, "--out", tmp_path / "t")
    assert code == 0 and "note:" not in output, output
    assert json.loads((tmp_path / "t" / "summary.json").read_text())["normalisation"] == V.rule(50.0)
    assert seen == [50.0] * 4  # two scans, predicted and tested

    # a collected run (best.pt alone) carries its rule in the checkpoint
    collected = tmp_path / "collected"
    collected.mkdir()
    shutil.copy(run / "checkpoints" / "best.pt", collected / "best.pt")
    seen.clear()
    assert hpcseg("predict", collected, "--data", scans, "--out", tmp_path / "c")[0] == 0
    assert seen == [50.0, 50.0]

    # a checkpoint from before hpcseg recorded the rule: the prepare.json of the data its train.json names
    old = tmp_path / "old"
    shutil.copytree(run, old)
    ckpt = torch.load(old / "checkpoints" / "best.pt", weights_only=True)
    del ckpt["normalisation"]
    torch.save(ckpt, old / "checkpoints" / "best.pt")
    seen.clear()
    code, output = hpcseg("predict", old, "--data", scans, "--out", tmp_path / "o")
    assert code == 0 and "note:" not in output and seen == [50.0, 50.0], output


def test_a_run_without_a_recorded_rule_gets_the_built_in_one_with_a_note(run_and_scans, tmp_path, monkeypatch):
    run, scans = run_and_scans  # trained on slices that hpcseg prepare did not make
    seen = _percentiles_cut_with(monkeypatch)
    code, output = hpcseg("predict", run, "--data", scans, "--out", tmp_path / "p")
    assert code == 0, output
    notes = [line for line in output.splitlines() if line.startswith("note:")]
    assert notes == [f"note: {run}: no normalisation rule recorded for its training data (not made by hpcseg "
                     f"prepare, or trained before hpcseg recorded it): scans are divided by their 99th percentile "
                     f"over the brain, prepare's default"]
    assert seen == [99.0, 99.0]
    assert json.loads((tmp_path / "p" / "predict.json").read_text())["normalisation"] == V.RULE


def test_a_rule_this_hpcseg_cannot_apply_is_refused(run_on_a_rule, run_and_scans, tmp_path):
    run, _ = run_on_a_rule
    _, scans = run_and_scans
    newer = tmp_path / "newer"
    newer.mkdir()
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    ckpt["normalisation"] = {**ckpt["normalisation"], "version": 2}
    torch.save(ckpt, newer / "best.pt")
    code, output = hpcseg("predict", newer, "--data", scans, "--out", tmp_path / "out")
    assert code == 2 and output.startswith(f"hpcseg: error: {newer / 'best.pt'}: normalisation rule ") and \
        "is not one this hpcseg applies (version 1, percentile in (0, 100])" in output, output
    assert not (tmp_path / "out").exists()


def test_3d_views_leave_room_for_the_name_of_a_narrow_view(tmp_path):
    """A scan a few voxels deep gives a sagittal view narrower than its name: the picture widens to show it whole."""
    from PIL import Image

    from hpcseg.views import _font, save_views

    image = np.zeros((3, 100, 100), np.float32)  # 3 coronal planes: the sagittal view is 3 pixels wide
    image[:, 10:90, 10:90] = 1.0
    save_views(tmp_path / "v.png", image, (image > 0).astype(np.uint8))
    with Image.open(tmp_path / "v.png") as png:
        width, pixels = png.width, np.asarray(png.convert("L"))
    # the right edge is not cut through text: its last columns are white background
    assert width >= _font().getlength("sagittal") and (pixels[:, -2:] == 255).all()
