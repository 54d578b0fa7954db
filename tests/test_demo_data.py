"""Demo data cut from the MNI152 2009 template in the nilearn wheel: counts, labels, disjoint splits, refusals."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest

from hpcseg import demo_data
from hpcseg.data import DataError, find_pairs, load_split
from hpcseg.demo_data import SPLITS, build_demo_data, plan_layout

pytest.importorskip("nilearn")


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    counts = build_demo_data(out)
    return out, counts


def _manifest(out):
    with open(out / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_counts_and_files(demo):
    out, counts = demo
    assert counts == {"training_data": 60, "validation_data": 20, "test_data": 20}
    assert sorted(p.name for p in out.iterdir()) == sorted([*SPLITS, "manifest.csv"])
    for split, n in counts.items():
        assert len(find_pairs(out / split)) == n
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_slices_look_like_brain2d(demo):
    out, counts = demo
    for split in SPLITS:
        data = load_split(out / split, 4)
        for image, label in zip(data.images, data.labels):
            assert image.shape == label.shape == (176, 176)
            assert set(np.unique(label)) <= {0, 1, 2, 3}
            assert (image[label == 0] == 0).all() and (image[label > 0] > 0).all()  # background exactly 0
            assert 0 < image.max() < 1.5
        images, labels, _ = data.stacked()
        # white matter is the brightest tissue, about 0.9-1.0 after dividing by the 99th percentile
        wm = images[labels == 3]
        csf = images[labels == 1]
        assert 0.8 < float(wm.median()) < 1.05
        assert float(csf.median()) < float(images[labels == 2].median()) < float(wm.median())


def test_orientation_top_down_left_right(demo):
    out, _ = demo
    data = load_split(out / "training_data", 4)
    rows = [r for r in _manifest(out) if r["split"] == "training_data"]
    mid = min(range(len(rows)), key=lambda k: abs(int(rows[k]["y_mm"]) + 17))
    label = data.labels[data.ids.index(rows[mid]["id"])]
    brain_rows = np.flatnonzero((label > 0).any(axis=1))
    # top of the head near the top of the frame, the cut through the brain stem / cerebellum reaching lower down
    assert brain_rows[0] < 40 and brain_rows[-1] > 110
    width_top = np.count_nonzero(label[brain_rows[0] + 5] > 0)
    width_mid = np.count_nonzero(label[brain_rows[0] + 50] > 0)
    assert width_top < width_mid
    # symmetric template: left and right halves nearly mirror each other, brain centred
    cols = np.flatnonzero((label > 0).any(axis=0))
    assert abs((cols[0] + cols[-1]) / 2 - 87.5) < 4


def test_splits_are_separated_blocks(demo):
    out, _ = demo
    rows = _manifest(out)
    assert len(rows) == 100 and len({r["id"] for r in rows}) == 100
    y = {split: sorted(int(r["y_mm"]) for r in rows if r["split"] == split) for split in SPLITS}
    for split in SPLITS:
        ids = [r["id"] for r in rows if r["split"] == split]
        assert sorted(ids) == [p.id for p in find_pairs(out / split)]
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not set(y[a]) & set(y[b])
                # no slice has a neighbour (within 2 mm) in another split
                assert min(abs(p - q) for p in y[a] for q in y[b]) > 2
    # several blocks per split spread along the whole brain, not one lump
    for split in SPLITS:
        runs = 1 + sum(1 for p, q in zip(y[split], y[split][1:]) if q != p + 1)
        assert runs == 4
    assert min(y["training_data"]) < -80 and max(y["test_data"]) > 40


def test_label_proportions(demo):
    out, _ = demo
    for r in _manifest(out):
        counts = np.array([int(r[k]) for k in ("background", "csf", "grey_matter", "white_matter")])
        assert counts.sum() == 176 * 176
        assert counts[2] >= 300 and counts[3] >= 300  # GM and WM in every slice
        assert counts[1] > 0
        assert 0.3 < counts[0] / counts.sum() < 0.97
    totals = {k: sum(int(r[k]) for r in _manifest(out)) for k in ("csf", "grey_matter", "white_matter")}
    assert totals["grey_matter"] > totals["white_matter"] > totals["csf"]


def test_deterministic_and_overwrite(demo, tmp_path):
    out, counts = demo
    again = tmp_path / "again"
    (again / "training_data").mkdir(parents=True)
    (again / "training_data" / "old_T1w.npy").write_bytes(b"stale")
    (again / "keep.txt").write_text("mine")
    with pytest.raises(DataError) as info:
        build_demo_data(again)
    assert info.value.problems == [
        f"{again}: folder exists and is not empty; choose another or pass --overwrite"
    ]
    assert build_demo_data(again, overwrite=True) == counts
    assert (again / "keep.txt").read_text() == "mine"  # only the demo's own products are replaced
    assert not (again / "training_data" / "old_T1w.npy").exists()
    assert (again / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()
    for split in SPLITS:
        names = sorted(p.name for p in (out / split).iterdir())
        assert names == sorted(p.name for p in (again / split).iterdir())
        for name in names:
            assert (out / split / name).read_bytes() == (again / split / name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_parameters_and_nifti(tmp_path):
    counts = build_demo_data(tmp_path / "small", n_train=6, n_val=2, n_test=2, blocks=2, fmt="nifti")
    assert counts == {"training_data": 6, "validation_data": 2, "test_data": 2}
    data = load_split(tmp_path / "small" / "training_data", 4)
    assert all(p.image.name.endswith(".nii.gz") for p in find_pairs(tmp_path / "small" / "training_data"))
    assert data.images[0].shape == (176, 176)
    assert build_demo_data(tmp_path / "notest", n_test=0)["test_data"] == 0


def test_refusals_leave_nothing(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="need .* coronal positions, the template has"):
        build_demo_data(tmp_path / "big", n_train=500)
    with pytest.raises(DataError, match="n_train must be a whole number >= 1"):
        build_demo_data(tmp_path / "zero", n_train=0)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DataError, match="exists and is not a folder"):
        build_demo_data(a_file, overwrite=True)
    with pytest.raises(DataError, match="cannot be created, .*/file is not a folder"):
        build_demo_data(a_file / "demo")

    calls = {"n": 0}
    real_save = demo_data.save_slice

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(demo_data, "save_slice", failing_save)
    with pytest.raises(OSError, match="disk full"):
        build_demo_data(tmp_path / "broken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_needs_nilearn(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else real(name, *a))
    with pytest.raises(DataError) as info:
        build_demo_data(tmp_path / "x")
    assert info.value.problems == ["demo data needs nilearn: pip install 'hpcseg[demo]'"]
    assert not (tmp_path / "x").exists()


def test_plan_layout_gaps():
    layout = plan_layout(list(range(100)), 12, 4, 4, 2, 3)
    flat = sorted((j, s) for s, js in layout.items() for j in js)
    assert [len(layout[s]) for s in SPLITS] == [12, 4, 4]
    changes = [(a, b) for a, b in zip(flat, flat[1:]) if a[1] != b[1]]
    assert len(changes) == 5 and all(b[0] - a[0] > 3 for a, b in changes)
    assert flat[0][0] == 0 and flat[-1][0] == 99
