"""`hpcseg report`: one self-contained HTML page comparing an experiment's runs.

The page holds a table of the runs (swept values, state, epochs, best validation and test Dice per tissue, wall
time, GPU hours, requeues; the best run starred; sorted by a click on any header), the runs' curves overlaid, the
distribution of each run's per-slice test Dice, the three worst test slices of each run, and a mean ± sd per
setting where the runs are folds of a cross-validation. Styles, the sorting script and every picture are inline
(plots as SVG, the test's overlay PNGs as data: URIs): it opens offline, from a laptop or an e-mail, and asks the
network for nothing. Everything read from run folders (run ids, experiment names, job values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import io
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_text
from .cluster.runs import (MAX_RECORD_BYTES, RUN_RECORD, ClusterError, NotTrusted, find_runs, folder_problem,
                           load_run, read_owned)
from .cluster.status import collect_status, printable, sweep_value
from .results import RunResult, differing_keys, load_result, tissue_names
from .svgplot import Series, box_chart, colours as run_colours, line_chart

#: The worst test slices shown per run.
WORST = 3
#: Runs open in the page's section of worst slices; the others are one click away.
OPEN_SECTIONS = 6
#: The largest overlay PNG inlined (a bigger one is named, not embedded).
MAX_PNG_BYTES = 4 * MAX_RECORD_BYTES
SHORT = {"csf": "CSF", "grey_matter": "GM", "white_matter": "WM", "mean": "mean"}


@dataclass
class ReportRun:
    """A run as the report shows it: its results and the state `status` gives it (or the folder's outcome)."""

    result: RunResult
    state: str


def _esc(value) -> str:
    """Text from a run folder as HTML: escaped, and a control character shown as '?'."""
    return html.escape(printable(str(value)), quote=True)


def _value_text(value) -> str:
    """A setting as `status` shows it (0.001, true, [4, 8]); `-` for none."""
    return "-" if value is None else sweep_value(value)


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def labeller(runs: list[RunResult], keys: list[str]):
    """The short name of each run in legends: its run id past what all the page's ids share, and its values."""
    prefix = _common_prefix([r.run_id for r in runs])

    def label(run: RunResult) -> str:
        values = " ".join(f"{k.split('.')[-1]}={_value_text(run.setting(k))}" for k in keys)
        return f"{run.run_id[len(prefix):] or run.run_id} {values}".strip()

    return label


def _common_prefix(ids: list[str]) -> str:
    """What the ids share up to the last '-' of their common start ('20261201-213733-7fdd-' for a sweep)."""
    prefix = os.path.commonprefix(ids) if len(ids) > 1 else ""
    return prefix[: prefix.rfind("-") + 1]


def curves(runs: list[RunResult], colours: list[str], label) -> str:
    """Training loss and validation mean Dice of every run, overlaid, one colour per run (the best run bold), and
    a legend of the runs below them."""
    best = _best_index(runs)
    loss, dice = [], []
    for i, (run, colour) in enumerate(zip(runs, colours)):
        name = label(run) + (" (best)" if i == best else "")
        loss.append(Series(colour, name, [m["epoch"] for m in run.metrics], [m["train_loss"] for m in run.metrics],
                           bold=i == best))
        val = [m for m in run.metrics if "val_mean_dice" in m]
        dice.append(Series(colour, name, [m["epoch"] for m in val], [m["val_mean_dice"] for m in val], bold=i == best))
    legend = "".join(f'<li><span class="swatch" style="background:{c}"></span>{_esc(label(r))}'
                     f'{" <b>(best)</b>" if i == best else ""}</li>'
                     for i, (r, c) in enumerate(zip(runs, colours)))
    epochs = [m["epoch"] for r in runs for m in r.metrics] or [1]
    xlim = (min(epochs), max(epochs))  # both charts over the same epochs, though validation is every N-th
    return (f'<div class="charts">{line_chart(loss, "training loss", "loss", xlim=xlim)}'
            f'{line_chart(dice, "validation mean Dice", "Dice", ylim=(0, 1), markers=True, xlim=xlim)}</div>'
            f'<ul class="legend">{legend}</ul>')


def per_item_dice(run: RunResult) -> tuple[str, list[tuple[str, float]], Path | None]:
    """(what an item is, [(id, mean Dice)], test folder) of the run's first test: per slice (per_slice.csv) or
    per scan (per_subject.csv); NaN rows (no tissue in the slice) left out."""
    for folder in run.test_dirs.values():
        for name, kind, key in (("per_slice.csv", "slice", "id"), ("per_subject.csv", "scan", "scan")):
            try:
                text = read_owned(folder / name, 64 * MAX_RECORD_BYTES).decode(errors="replace")
            except (FileNotFoundError, NotTrusted, OSError):
                continue
            rows = []
            for row in csv.DictReader(io.StringIO(text)):
                try:
                    value = float(row.get("mean") or "nan")
                except ValueError:
                    continue
                if math.isfinite(value) and row.get(key):
                    rows.append((row[key], value))
            return kind, rows, folder
    return "slice", [], None


def distribution(runs: list[RunResult], items: list[list[float]], colours: list[str], label, kind: str) -> str:
    """One box per run of its per-slice (or per-scan) test Dice, in the table's first order."""
    rows = [(colour, label(run), values) for run, values, colour in zip(runs, items, colours) if values]
    return box_chart(rows, f"test mean Dice per {kind}") if rows else ""


def _cell(value, digits: int = 3, best: bool = False) -> str:
    """A table cell; numbers carry their value in data-v, which the sorting script compares."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return '<td class="num" data-v="">-</td>'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        strong = ' class="num top"' if best else ' class="num"'
        return f'<td{strong} data-v="{value!r}">{text}</td>'
    return f"<td>{_esc(_value_text(value))}</td>"


def _setting_cell(value) -> str:
    """A swept value as written (0.001, 1e-05, [4, 8]); numbers sort by value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return f'<td class="num" data-v="{value!r}">{_esc(_value_text(value))}</td>'
    return f"<td>{_esc(_value_text(value))}</td>"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return '<td class="num" data-v="">-</td>'
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    text = f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
    return f'<td class="num" data-v="{seconds:.1f}">{text}</td>'


def _best_index(runs: list[RunResult]) -> int | None:
    scored = [(r.best_dice.get("mean"), i) for i, r in enumerate(runs) if r.best_dice.get("mean") is not None]
    return max(scored)[1] if scored else None


def runs_table(runs: list[ReportRun], keys: list[str], tissues: list[str], colours: list[str]) -> str:
    results = [r.result for r in runs]
    experiments = len({r.experiment for r in results}) > 1
    folds = any(r.fold is not None for r in results)
    best = _best_index(results)
    dice_columns = [*tissues, "mean"]
    header = ["run", *(["experiment"] if experiments else []), *(["fold"] if folds else []), *keys, "state",
              "epochs", *(f"val {SHORT.get(t, t)}" for t in dice_columns), *(f"test {SHORT.get(t, t)}" for t in
                                                                            dice_columns),
              "wall time", "GPU h", "requeues"]
    tops = {}
    for prefix, read in (("val", lambda r: r.best_dice), ("test", lambda r: r.test_dice)):
        for t in dice_columns:
            values = [v for r in results if (v := read(r).get(t)) is not None and v == v]  # NaN: no such tissue
            tops[(prefix, t)] = max(values) if values else None
    head = "".join(f'<th title="sort by {_esc(h)}">{_esc(h)}</th>' for h in header)
    rows = []
    for i, (run, r, colour) in enumerate(zip(runs, results, colours)):
        star = ' <span class="star" title="best validation mean Dice">&#9733;</span>' if i == best else ""
        cells = [f'<td class="run" data-v="{_esc(r.run_id)}"><span class="swatch" style="background:{colour}">'
                 f"</span>{_esc(r.run_id)}{star}</td>"]
        if experiments:
            cells.append(f"<td>{_esc(r.experiment)}</td>")
        if folds:
            cells.append(_cell(r.fold))
        cells += [_setting_cell(r.setting(k)) for k in keys]
        cells.append(f'<td class="state {_esc(run.state.lower())}">{_esc(run.state)}</td>')
        cells.append(_cell(r.epochs_done))
        for prefix, dice in (("val", r.best_dice), ("test", r.test_dice)):
            cells += [_cell(dice.get(t), best=dice.get(t) is not None and dice.get(t) == tops[(prefix, t)])
                      for t in dice_columns]
        cells += [_duration(r.wall_s), _cell(r.gpu_hours, 3), _cell(r.requeues)]
        rows.append(f'<tr class="{"best" if i == best else ""}">{"".join(cells)}</tr>')
    return (f'<table id="runs" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def cv_table(results: list[RunResult], keys: list[str]) -> str:
    """Mean ± sd over the folds of each setting (the differing keys but the fold)."""
    groups: dict[tuple, list[RunResult]] = {}
    fold_keys = {r.fold_key for r in results}
    setting_keys = [k for k in keys if k not in fold_keys and k != "fold"]
    for r in results:
        if r.fold is not None:
            groups.setdefault(tuple(_value_text(r.setting(k)) for k in setting_keys), []).append(r)
    if not groups:
        return ""

    def mean_sd(values: list[float]) -> str:
        values = [v for v in values if v is not None and v == v]
        if not values:
            return "-"
        sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.3f}{sd}"

    head = "".join(f"<th>{_esc(k)}</th>" for k in setting_keys) + "<th>folds</th><th>val mean Dice</th>" \
                                                                  "<th>test mean Dice</th>"
    rows = []
    for values, group in groups.items():
        folds = ", ".join(sorted(_value_text(r.fold) for r in group))
        rows.append("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in values)
                    + f"<td>{len(group)} ({_esc(folds)})</td>"
                    + f'<td class="num">{mean_sd([r.best_dice.get("mean") for r in group])}</td>'
                    + f'<td class="num">{mean_sd([r.test_dice.get("mean") for r in group])}</td></tr>')
    return ('<h2>Cross-validation</h2><p class="note">mean ± sd over the folds of each setting</p>'
            f'<table class="cv"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')


def worst_section(run: RunResult, rows: list[tuple[str, float]], folder: Path | None, kind: str, colour: str,
                  label, open_: bool = True) -> str:
    """The WORST test slices (or scans) of a run, their overlay PNGs inline."""
    if folder is None or not rows:
        return ""
    figures = []
    for item, value in sorted(rows, key=lambda row: row[1])[:WORST]:
        png = folder / "png" / f"{item}.png"
        try:
            if "/" in item or item.startswith("."):  # an id from the CSV names a file of png/, nothing else
                raise ValueError(item)
            uri = _png_uri(read_owned(png, MAX_PNG_BYTES))
            picture = f'<img src="{uri}" alt="{_esc(item)}">'
        except (FileNotFoundError, NotTrusted, OSError, ValueError):
            picture = f'<div class="missing">no overlay {_esc(png.name)}</div>'
        figures.append(f"<figure>{picture}<figcaption>{_esc(item)}: Dice {value:.3f}</figcaption></figure>")
    values = [v for _, v in rows]
    line = (f"{len(values)} test {kind}s, mean Dice per {kind}: median {statistics.median(values):.3f}, "
            f"min {min(values):.3f}, max {max(values):.3f}")
    return (f'<details class="run"{" open" if open_ else ""}><summary><span class="swatch" '
            f'style="background:{colour}"></span><b>{_esc(label(run))}</b> <span class="id">'
            f'{_esc(run.run_id)} &middot; median {statistics.median(values):.3f}</span></summary>'
            f'<p class="note">{line}; the {min(WORST, len(values))} worst:</p>'
            f'<div class="worst">{"".join(figures)}</div></details>')


STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;
background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
details.run{margin:10px 0}details.run summary{cursor:pointer;font-size:14px}
.note{color:#555;margin:2px 0 8px}.id{color:#777;font-weight:normal;font-size:12px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:12.5px;white-space:nowrap}
th,td{padding:3px 8px;border-bottom:1px solid #e3e3e3;text-align:left}
th{background:#f3f4f6;position:sticky;top:0;cursor:pointer;user-select:none;border-bottom:2px solid #ccc}
th:hover{background:#e5e7eb}
th.asc::after{content:" \\25B2";font-size:9px}th.desc::after{content:" \\25BC";font-size:9px}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.top{font-weight:700}
tr.best td{background:#fff7d6}.star{color:#d4a000}
tbody tr:hover td{background:#eef4ff}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:baseline}
.state.completed{color:#18794e}.state.failed,.state.timeout{color:#c0262d}.state.running{color:#0b62c4}
.charts{display:flex;flex-wrap:wrap;gap:16px}svg.chart{max-width:100%;height:auto}
ul.legend{list-style:none;padding:0;margin:6px 0;columns:4 260px;font-size:12px}ul.legend li{break-inside:avoid}
.worst{display:flex;gap:12px;flex-wrap:wrap}.worst figure{margin:0}
.worst img{max-height:260px;max-width:100%;width:auto;display:block}
figcaption{font-size:12px;color:#444}.missing{color:#999;font-size:12px}
"""

SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var desc = th.classList.contains('asc');
      table.querySelectorAll('th').forEach(function (h) { h.classList.remove('asc', 'desc'); });
      th.classList.add(desc ? 'desc' : 'asc');
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) {
        var cell = row.cells[col], v = cell.hasAttribute('data-v') ? cell.getAttribute('data-v') : cell.textContent;
        return v;
      }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === '' || y === '') { return (x === '') - (y === ''); }
        var nx = Number(x), ny = Number(y), c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return desc ? -c : c;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def render(runs: list[ReportRun], title: str, notes: list[str] = ()) -> str:
    """The report page for `runs` (in the order given) as one HTML text."""
    results = [r.result for r in runs]
    keys = [k for k in differing_keys(results) if not (k == "fold" or k.endswith(".fold"))]
    label = labeller(results, keys)
    tissues = tissue_names(results)
    colours = run_colours(len(results))
    kinds_rows = [per_item_dice(r) for r in results]
    kind = next((k for k, rows, _ in kinds_rows if rows), "slice")
    boxes = distribution(results, [[v for _, v in rows] for _, rows, _ in kinds_rows], colours, label, kind)
    charts = curves(results, colours, label) if any(r.metrics for r in results) else ""
    swept = ", ".join(keys) if keys else "none (the runs' job keys are the same)"
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"<h1>{_esc(title)}</h1>",
             f'<p class="note">{len(runs)} runs; differing settings: {_esc(swept)}; report made {stamp}. '
             "Click a column's header to sort by it; &#9733; marks the best validation mean Dice "
             "(the highest value of each Dice column in bold).</p>"]
    parts += [f'<p class="note">{_esc(note)}</p>' for note in notes]
    parts.append(f'<div class="scroll">{runs_table(runs, keys, tissues, colours)}</div>')
    parts.append(cv_table(results, keys))
    if charts:
        parts.append(f"<h2>Curves</h2>{charts}")
    if boxes:
        parts.append(f'<h2>Test Dice per {kind}</h2><p class="note">one box per run: quartiles, the median as a bar, '
                     f'whiskers to the lowest and highest, each {kind} a tick</p><div class="scroll">{boxes}</div>')
        sections = [worst_section(r, rows, folder, k, c, label, open_=i < OPEN_SECTIONS)
                    for i, (r, (k, rows, folder), c) in enumerate(zip(results, kinds_rows, colours))]
        hidden = f"; the runs after the first {OPEN_SECTIONS} open on a click" if len(results) > OPEN_SECTIONS else ""
        parts.append(f'<h2>Worst test {kind}s of each run</h2><p class="note">in the table\'s first order{hidden}'
                     "</p>" + "".join(sections))
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_esc(title)}</title>\n<style>{STYLE}</style></head>\n<body>\n{body}\n"
            f"<script>{SCRIPT}</script>\n</body></html>\n")


# ---------------------------------------------------------------- finding the runs


def _run_folders(folder: Path) -> list[Path]:
    """A run folder itself, or the run folders in it (an experiment folder, or a folder `collect` wrote)."""
    def is_run(path: Path) -> bool:
        return (path / RUN_RECORD).is_file() or (path / "metrics.jsonl").is_file()

    if is_run(folder):
        return [folder]
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and not p.is_symlink()
                      and p.is_dir() and is_run(p))
    except OSError as err:
        raise ClusterError(f"{folder}: {err.strerror or err}") from None


def gather(selectors: list[str], scratches: list[Path]) -> tuple[list[ReportRun], list[str]]:
    """The runs the arguments name, with their state, and notes on runs left out. An argument is a folder (a run,
    an experiment folder, or a folder `collect` wrote), else an experiment, run or sweep id under `scratches`."""
    folders: list[tuple[Path, bool]] = []  # (run folder, whether it sits in a scratch's <experiment>/ folder)
    named = []
    for selector in selectors:
        found = _run_folders(Path(selector)) if Path(selector).is_dir() else []
        if found:
            folders += [(f, False) for f in found]
        else:  # a name (a folder of the same name without runs, `demo` of the quick start's data, is no run)
            named.append(selector)
    if named:
        folders += [(r.path, True) for r in find_runs(named, scratches)]
    runs, notes, seen = [], [], set()
    in_scratch = []
    for folder, from_scratch in folders:
        if folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        problem = folder_problem(folder)
        if problem:
            notes.append(f"{folder}: {problem}; not read")
            continue
        result = load_result(folder)
        notes += [f"{result.run_id}: damaged: {d}" for d in result.damage]
        run = load_run(folder) if (from_scratch or result.experiment == folder.parent.name) else None
        if run is not None and run.trusted and not run.damage:
            in_scratch.append((len(runs), run))
        state = (result.outcome or {}).get("state") or ("collected" if (folder / "best.pt").exists() else "-")
        runs.append(ReportRun(result=result, state=str(state)))
    if in_scratch:  # the scheduler's word, as `status` gives it (one query per backend)
        statuses, warnings = collect_status([run for _, run in in_scratch])
        notes += [f"warning: {w}" for w in warnings]
        for (index, _), status in zip(in_scratch, statuses):
            runs[index].state = status.state
    return runs, notes


def write_report(selectors: list[str], scratches: list[Path], out: Path) -> tuple[Path, int]:
    """Write the report of the runs `selectors` name to `out`; returns (out, number of runs)."""
    runs, notes = gather(selectors, scratches)
    if not runs:
        raise ClusterError("no runs to report")
    runs.sort(key=lambda r: (r.result.experiment, r.result.run_id))
    experiments = list(dict.fromkeys(r.result.experiment for r in runs))
    title = "hpcseg report: " + ", ".join(experiments)
    html_text = render(runs, title, notes)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), html_text)
    return out, len(runs)
