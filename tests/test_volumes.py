"""3D scans cut into brain2d's coronal slices and mapped back: orientation, resampling, normalisation, refusals."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import volume_phantom as P

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
        V.check_same_grid(tmp_path / "l.nii.gz", nib.Nifti1Image(np.ones((4, 4, 4)), moved), tmp_path / "s.nii.gz", scan)


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
