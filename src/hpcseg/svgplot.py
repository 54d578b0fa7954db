"""Plots of the report page as inline SVG: lines over epochs and one box per run. Written by hand rather than with
matplotlib because a page of 100 runs must be made in seconds (matplotlib's text layout alone took 7 s for
two figures here), and SVG text stays sharp at any zoom. Every label is HTML-escaped by the caller's `esc`.
"""

from __future__ import annotations

import colorsys
import html
import math
import statistics
from dataclasses import dataclass

#: matplotlib's tab10, for up to 10 runs; more get evenly spaced hues.
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf"]
FONT = 'font-family="system-ui,Helvetica,Arial,sans-serif"'


def colours(n: int) -> list[str]:
    if n <= len(TAB10):
        return TAB10[:n]
    out = []
    for i in range(n):  # hues around the circle, lightness alternating so that neighbours differ
        r, g, b = colorsys.hls_to_rgb(i / n, 0.42 if i % 2 else 0.55, 0.75)
        out.append(f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}")
    return out


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def nice_ticks(lo: float, hi: float, count: int = 7, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten."""
    if hi <= lo:
        hi = lo + (1 if integer else max(abs(lo) * 0.1, 1e-3))
    raw = (hi - lo) / max(count - 1, 1)
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)
                if m * 10 ** math.floor(math.log10(raw)) >= raw * (1 - 1e-9))  # the smallest round step of them
    if integer:
        step = max(1, round(step))
    start = math.ceil(lo / step - 1e-9) * step
    ticks, value = [], start
    while value <= hi + 1e-9 * step:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _tick_text(value: float) -> str:
    return f"{value:g}"


@dataclass
class Series:
    colour: str
    label: str
    xs: list[float]
    ys: list[float]
    bold: bool = False


def line_chart(series: list[Series], title: str, ylabel: str, ylim: tuple[float, float] | None = None,
               width: int = 540, height: int = 320, markers: bool = False,
               xlim: tuple[float, float] | None = None) -> str:
    """Lines of y over epochs, one per series (the bold one drawn last, thicker), in an SVG element."""
    left, right, top, bottom = 56, 12, 26, 40
    xs = [x for s in series for x in s.xs]
    ys = [y for s in series for y in s.ys]
    x_lo, x_hi = xlim or ((min(xs), max(xs)) if xs else (0, 1))
    if ylim:
        y_lo, y_hi = ylim
    else:
        y_lo, y_hi = (min(ys), max(ys)) if ys else (0, 1)
        pad = (y_hi - y_lo) * 0.05 or 0.05
        y_lo, y_hi = y_lo - pad, y_hi + pad
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h

    parts = [f'<svg class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(title)}" {FONT} font-size="11">',
             f'<text x="{left + plot_w / 2}" y="16" text-anchor="middle" font-size="13">{_esc(title)}</text>']
    for tick in nice_ticks(y_lo, y_hi):
        if y_lo - 1e-12 <= tick <= y_hi + 1e-12:
            y = py(tick)
            parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                         f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end" fill="#444">'
                         f"{_tick_text(tick)}</text>")
    for tick in nice_ticks(x_lo, x_hi, 8, integer=True):
        if x_lo <= tick <= x_hi:
            x = px(tick)
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#f0f0f0"/>'
                         f'<text x="{x:.1f}" y="{top + plot_h + 15}" text-anchor="middle" fill="#444">'
                         f"{_tick_text(tick)}</text>")
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">epoch</text>'
                 f'<text transform="translate(14 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                 f"{_esc(ylabel)}</text>")
    for s in sorted(series, key=lambda s: s.bold):
        if not s.xs:
            continue
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.xs, s.ys))
        width_px = 2.8 if s.bold else 1.4
        parts.append(f'<polyline points="{points}" fill="none" stroke="{s.colour}" stroke-width="{width_px}" '
                     f'stroke-linejoin="round"><title>{_esc(s.label)}</title></polyline>')
        if markers and len(s.xs) <= 60:
            radius = 2.2 if len(s.xs) > 1 else 4  # a lone validation point must still be seen
            parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{radius}" fill="{s.colour}"/>'
                      for x, y in zip(s.xs, s.ys)]
    parts.append("</svg>")
    return "".join(parts)


def box_chart(rows: list[tuple[str, str, list[float]]], xlabel: str, width: int = 900, label_w: int = 260) -> str:
    """One box per row (colour, label, values in [0, 1]): quartiles, median, whiskers to min and max, and each
    value as a tick."""
    row_h, top, bottom, right = 20, 10, 40, 16
    height = top + row_h * len(rows) + bottom
    plot_w = width - label_w - right

    def px(x: float) -> float:
        return label_w + max(0.0, min(1.0, x)) * plot_w

    parts = [f'<svg class="chart" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_esc(xlabel)}" {FONT} font-size="11">']
    bottom_y = top + row_h * len(rows)
    for tick in [i / 10 for i in range(11)]:
        x = px(tick)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom_y}" stroke="#eee"/>'
                     f'<text x="{x:.1f}" y="{bottom_y + 14}" text-anchor="middle" fill="#444">{tick:g}</text>')
    parts.append(f'<text x="{label_w + plot_w / 2}" y="{height - 6}" text-anchor="middle">{_esc(xlabel)}</text>')
    for i, (colour, label, values) in enumerate(rows):
        y = top + i * row_h + row_h / 2
        parts.append(f'<text x="{label_w - 8}" y="{y + 4:.1f}" text-anchor="end">{_esc(label)}</text>')
        if not values:
            continue
        ordered = sorted(values)
        q1, median, q3 = (statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1
                          else [ordered[0]] * 3)
        summary = (f"{label}: {len(ordered)} values, median {median:.3f}, quartiles {q1:.3f} to {q3:.3f}, "
                   f"min {ordered[0]:.3f}, max {ordered[-1]:.3f}")
        parts.append(f'<g><title>{_esc(summary)}</title>'
                     f'<line x1="{px(ordered[0]):.1f}" x2="{px(ordered[-1]):.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                     f'stroke="{colour}"/>'
                     f'<rect x="{px(q1):.1f}" y="{y - 6:.1f}" width="{max(px(q3) - px(q1), 1):.1f}" height="12" '
                     f'fill="{colour}" fill-opacity="0.3" stroke="{colour}"/>'
                     f'<line x1="{px(median):.1f}" x2="{px(median):.1f}" y1="{y - 6:.1f}" y2="{y + 6:.1f}" '
                     f'stroke="#222" stroke-width="2"/>')
        if len(ordered) <= 400:  # each value a tick; a big test folder is summed up by the box alone
            parts.append(f'<path d="{"".join(f"M{px(v):.1f} {y - 8:.1f}v4" for v in ordered)}" '
                         f'stroke="{colour}" stroke-opacity="0.7"/>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)
