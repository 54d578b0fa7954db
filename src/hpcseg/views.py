"""The PNGs `test` and `predict` write: a slice's overlays of label and prediction (2D), and three orthogonal views
of a 3D scan with its prediction (and its label, where known)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .metrics import nanmean

#: Overlay colours of CSF, grey matter, white matter, and their names in the legend.
COLOURS = np.array([[0.0, 0.0, 0.0], [0.2, 0.5, 1.0], [1.0, 0.3, 0.2], [1.0, 0.9, 0.2]])
LEGEND = ("CSF", "grey matter", "white matter")
#: Overlay panels of small slices are enlarged (by a whole factor, at most 8) towards this many pixels.
OVERLAY_SIZE = 160


def save_overlay(path: Path, image: np.ndarray, label: np.ndarray, pred: np.ndarray, slice_id: str = "",
                 dice: list[float] | None = None) -> None:
    """One PNG: a title with the slice id and its Dice (mean over tissues, then each), the image with the label
    (left) and with the prediction (right), each tissue a light fill with a solid outline so the T1 shows through,
    and a colour legend. Drawn with Pillow, not a matplotlib figure: `hpcseg test` writes one per slice."""
    from PIL import Image, ImageDraw, ImageFont
    from PIL.PngImagePlugin import PngInfo

    scale = max(1, min(8, -(-OVERLAY_SIZE // max(min(image.shape), 1))))  # small slices enlarged, pixels kept sharp
    lo, hi = np.percentile(image, [0.5, 99.5])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)
    grey = _enlarge(grey, scale)

    def overlay(classes: np.ndarray) -> np.ndarray:
        classes = _enlarge(np.clip(classes, 0, len(COLOURS) - 1), scale)
        padded = np.pad(classes, 1, mode="edge")
        edge = ((padded[1:-1, 1:-1] != padded[:-2, 1:-1]) | (padded[1:-1, 1:-1] != padded[2:, 1:-1])
                | (padded[1:-1, 1:-1] != padded[1:-1, :-2]) | (padded[1:-1, 1:-1] != padded[1:-1, 2:]))
        alpha = np.where(classes > 0, np.where(edge, 1.0, 0.25), 0.0)[..., None]
        return grey * (1 - alpha) + COLOURS[classes] * alpha

    font = ImageFont.load_default(size=13)
    line = 18
    title = slice_id
    if dice is not None:
        shown = ", ".join(f"{name} {'-' if d != d else f'{d:.3f}'}" for name, d in zip(LEGEND, dice))
        title += f"   Dice {nanmean(list(dice)):.3f}   ({shown})"
    left, right = (Image.fromarray((overlay(c) * 255).round().astype(np.uint8)) for c in (label, pred))
    gap = 6
    width = max(left.width + gap + right.width, int(font.getlength(title)) + 8, 330)
    canvas = Image.new("RGB", (width, 2 * line + left.height + line + 4), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black", font=font)
    draw.text((4, line + 2), "label", fill="black", font=font)
    draw.text((left.width + gap + 4, line + 2), "prediction", fill="black", font=font)
    canvas.paste(left, (0, 2 * line))
    canvas.paste(right, (left.width + gap, 2 * line))
    x, y = 4, 2 * line + left.height + 4
    for name, colour in zip(LEGEND, COLOURS[1:]):
        draw.rectangle((x, y + 2, x + 11, y + 13), fill=tuple(round(c * 255) for c in colour), outline="black")
        draw.text((x + 16, y), name, fill="black", font=font)
        x += 16 + int(font.getlength(name)) + 14
    info = PngInfo()
    info.add_text("Title", title)
    canvas.save(path, pnginfo=info)


def _enlarge(array: np.ndarray, scale: int) -> np.ndarray:
    return array.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else array


def save_views(path: Path, image: np.ndarray, classes: np.ndarray, truth: np.ndarray | None = None) -> None:
    """One PNG of three orthogonal views through the brain's centre (coronal, axial, sagittal) of slices (planes,
    rows, cols) with `classes` overlaid; with `truth`, a second row with it overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    centre = [int(np.mean(np.flatnonzero(image.any(axis=tuple(a for a in range(3) if a != k))))) for k in range(3)]
    lo, hi = np.percentile(image[image != 0], [0.5, 99.5]) if image.any() else (0, 1)

    def views(labels):
        cuts = [(image[centre[0]], labels[centre[0]]),  # coronal: top down, left to right
                (image[::-1, centre[1]], labels[::-1, centre[1]]),  # axial: anterior up, left to right
                (image[:, :, centre[2]].T, labels[:, :, centre[2]].T)]  # sagittal: top down, posterior to anterior
        height = max(c[0].shape[0] for c in cuts)
        panels = []
        for grey, lab in cuts:
            grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)
            alpha = np.where(lab > 0, 0.45, 0.0)[..., None]
            rgb = grey * (1 - alpha) + COLOURS[np.clip(lab, 0, len(COLOURS) - 1)] * alpha
            panels += [np.pad(rgb, ((0, height - rgb.shape[0]), (0, 0), (0, 0))), np.ones((height, 4, 3))]
        return np.concatenate(panels[:-1], axis=1)

    rows = [views(classes)]
    if truth is not None:
        rows += [np.ones((4, rows[0].shape[1], 3)), views(truth)]
    plt.imsave(path, np.concatenate(rows, axis=0))
