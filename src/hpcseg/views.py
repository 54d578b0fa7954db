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


#: The three views of a 3D scan, in the order they are drawn; the coronal one is a slice as the model sees it.
VIEWS = ("coronal", "axial", "sagittal")


def save_overlay(path: Path, image: np.ndarray, label: np.ndarray, pred: np.ndarray, slice_id: str = "",
                 dice: list[float] | None = None) -> None:
    """One PNG: a title with the slice id and its Dice (mean over tissues, then each), the image with the label
    (left) and with the prediction (right), each tissue a light fill with a solid outline so the T1 shows through,
    and a colour legend. Drawn with Pillow, not a matplotlib figure: `hpcseg test` writes one per slice."""
    from PIL import Image, ImageDraw

    scale = _scale(image.shape)
    lo, hi = np.percentile(image, [0.5, 99.5])
    grey = _enlarge(_grey(image, lo, hi), scale)
    font, line, gap = _font(), 18, 6
    title = _title(slice_id, dice)
    left, right = (Image.fromarray(_rgb8(_tint(grey, _enlarge(c, scale)))) for c in (label, pred))
    width = max(left.width + gap + right.width, int(font.getlength(title)) + 8, 330)
    canvas = Image.new("RGB", (width, 2 * line + left.height + line + 4), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black", font=font)
    draw.text((4, line + 2), "label", fill="black", font=font)
    draw.text((left.width + gap + 4, line + 2), "prediction", fill="black", font=font)
    canvas.paste(left, (0, 2 * line))
    canvas.paste(right, (left.width + gap, 2 * line))
    _legend(draw, font, 4, 2 * line + left.height + 4)
    _save(canvas, path, {"Title": title})


def save_views(path: Path, image: np.ndarray, classes: np.ndarray, truth: np.ndarray | None = None,
               scan_id: str = "", dice: list[float] | None = None) -> dict:
    """One PNG of a 3D scan's slices (planes, rows, cols) in three orthogonal views through the brain's centre
    (coronal, axial, sagittal; named above each column): a row with the label (`truth`) overlaid, or the plain scan
    where there is none, above a row with the prediction (`classes`), each row named on its left, tissues drawn as
    save_overlay draws them; a title with `scan_id` and its Dice where known, and the colour legend. Returns what
    it wrote in words (title, views, rows, legend), as the PNG's text chunks also hold it."""
    from PIL import Image, ImageDraw

    centre = [int(np.mean(np.flatnonzero(image.any(axis=tuple(a for a in range(3) if a != k))))) for k in range(3)]
    lo, hi = np.percentile(image[image != 0], [0.5, 99.5]) if image.any() else (0, 1)
    cuts = (lambda a: a[centre[0]],  # coronal: top down, left to right
            lambda a: a[::-1, centre[1]],  # axial: anterior up, left to right
            lambda a: a[:, :, centre[2]].T)  # sagittal: top down, posterior to anterior
    rows = [("label", truth) if truth is not None else ("scan", None), ("prediction", classes)]
    scale = _scale(image.shape[1:])  # as a slice's overlay is: the coronal view, the model's slice
    font, line, gap = _font(), 18, 6
    title = _title(scan_id, dice)
    greys = [_enlarge(_grey(cut(image), lo, hi), scale) for cut in cuts]

    def panel(grey: np.ndarray, cut, labels: np.ndarray | None):
        classes = np.zeros(grey.shape[:2], np.uint8) if labels is None else _enlarge(cut(labels), scale)
        return Image.fromarray(_rgb8(_tint(grey, classes)))

    panels = [[panel(grey, cut, labels) for grey, cut in zip(greys, cuts)] for _, labels in rows]
    margin = int(max(font.getlength(name) for name, _ in rows)) + 12  # the row names, left of the panels
    widths, height = [p.width for p in panels[0]], max(p.height for p in panels[0])
    columns = [margin + sum(widths[:i]) + gap * i for i in range(len(cuts))]
    legend_width = sum(16 + int(font.getlength(name)) + 14 for name in LEGEND)
    names_end = max(x + 8 + int(font.getlength(view)) for x, view in zip(columns, VIEWS))  # a narrow view's name
    width = max(columns[-1] + widths[-1] + 4, names_end, int(font.getlength(title)) + 8, legend_width + 8)
    canvas = Image.new("RGB", (width, 2 * line + len(rows) * (height + gap) + line), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), title, fill="black", font=font)
    for x, view in zip(columns, VIEWS):
        draw.text((x + 4, line + 2), view, fill="black", font=font)
    for r, ((name, _), row) in enumerate(zip(rows, panels)):
        y = 2 * line + r * (height + gap)
        draw.text((4, y + height // 2 - 8), name, fill="black", font=font)
        for x, panel in zip(columns, row):  # a shorter view centred in the row
            canvas.paste(panel, (x, y + (height - panel.height) // 2))
    _legend(draw, font, 4, 2 * line + len(rows) * (height + gap))
    described = {"title": title, "views": list(VIEWS), "rows": [name for name, _ in rows], "legend": list(LEGEND)}
    _save(canvas, path, {"Title": title, "Views": ", ".join(VIEWS), "Rows": ", ".join(described["rows"])})
    return described


def _scale(shape) -> int:
    """Small slices enlarged by a whole factor (at most 8) towards OVERLAY_SIZE pixels, pixels kept sharp."""
    return max(1, min(8, -(-OVERLAY_SIZE // max(min(shape), 1))))


def _grey(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The image as RGB in 0..1, `lo` black and `hi` white."""
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)[..., None].repeat(3, axis=-1)


def _tint(grey: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """`classes` over the RGB image `grey`: each tissue a light fill with a solid outline, so the T1 shows through."""
    classes = np.clip(classes, 0, len(COLOURS) - 1)
    padded = np.pad(classes, 1, mode="edge")
    edge = ((padded[1:-1, 1:-1] != padded[:-2, 1:-1]) | (padded[1:-1, 1:-1] != padded[2:, 1:-1])
            | (padded[1:-1, 1:-1] != padded[1:-1, :-2]) | (padded[1:-1, 1:-1] != padded[1:-1, 2:]))
    alpha = np.where(classes > 0, np.where(edge, 1.0, 0.25), 0.0)[..., None]
    return grey * (1 - alpha) + COLOURS[classes] * alpha


def _rgb8(rgb: np.ndarray) -> np.ndarray:
    return (rgb * 255).round().astype(np.uint8)


def _enlarge(array: np.ndarray, scale: int) -> np.ndarray:
    return array.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else array


def _title(name: str, dice: list[float] | None) -> str:
    """The id, and with `dice` (per tissue) its mean over the tissues, then each ("-" where a tissue is absent)."""
    if dice is None:
        return name
    shown = ", ".join(f"{tissue} {'-' if d != d else f'{d:.3f}'}" for tissue, d in zip(LEGEND, dice))
    return f"{name}   Dice {nanmean(list(dice)):.3f}   ({shown})"


def _font():
    from PIL import ImageFont

    return ImageFont.load_default(size=13)


def _legend(draw, font, x: int, y: int) -> None:
    """A swatch and the name of each tissue, in a row from (x, y)."""
    for name, colour in zip(LEGEND, COLOURS[1:]):
        draw.rectangle((x, y + 2, x + 11, y + 13), fill=tuple(round(c * 255) for c in colour), outline="black")
        draw.text((x + 16, y), name, fill="black", font=font)
        x += 16 + int(font.getlength(name)) + 14


def _save(canvas, path: Path, text: dict[str, str]) -> None:
    """The PNG, with `text` as its text chunks (what a viewer shows as its title, and what tests read)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    canvas.save(path, pnginfo=info)
