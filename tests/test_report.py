"""Comparing runs: `status` with a column per swept key and `--sort dice`, and `hpcseg report`'s page, on a real
local sweep (on its scratch and on what `collect` copied), loaded in headless Chromium: no console error, no
request but the file and its data: pictures, every run in the table, sorting on a click, and a screenshot."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from chromium import Browser, chromium
from sweep_runs import local_sweep, vary_copies  # noqa: F401 - local_sweep: the session's sweep fixture

pytestmark = pytest.mark.slow  # the sweep trains and tests two runs (about 20 s)


def hpcseg(*args, env: dict | None = None) -> tuple[int, str]:
    from hpcseg.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env)
    return result.exit_code, result.output


def _env(sweep) -> dict:
    return {"HPCSEG_SCRATCH": str(sweep.scratch)}


def test_status_has_a_column_per_swept_key_and_sorts_by_dice(local_sweep):
    code, out = hpcseg("status", "--sort", "dice", env=_env(local_sweep))
    assert code == 0, out
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["RUN", "EXPERIMENT", "optim.lr"], out
    rows = [line.split() for line in lines[1:3]]
    assert {row[2] for row in rows} == {"0.001", "0.003"}, out
    dice = {r["run_id"]: r["best_dice"] for r in json.loads(hpcseg("status", "--json", env=_env(local_sweep))[1])}
    assert [row[0] for row in rows] == sorted(dice, key=lambda run_id: -dice[run_id]), out


def _report(tmp_path: Path, *args, env: dict) -> str:
    out = tmp_path / "report.html"
    code, text = hpcseg("report", *args, "--out", out, env=env)
    assert code == 0, text
    assert re.fullmatch(rf"wrote {re.escape(str(out))}: \d+ runs\n", text), text
    return out.read_text()


def _self_contained(page: str) -> None:
    """No address the page could fetch: every src/href is a data: URI, no external script, style or font."""
    for attribute in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page):
        assert attribute.startswith("data:"), attribute[:80]
    assert "url(" not in page and "@import" not in page and "<link" not in page


def test_report_of_a_scratch_and_of_a_collected_folder(local_sweep, tmp_path):
    page = _report(tmp_path, "sweep", env=_env(local_sweep))
    _self_contained(page)
    for run in local_sweep.runs:
        assert run.name in page
    assert "optim.lr" in page and ">0.001<" in page and ">0.003<" in page
    assert page.count("&#9733;") == 2  # the best run's star, and the line saying what it marks
    assert "COMPLETED" in page and "Worst test slices" in page

    dest = tmp_path / "collected"
    code, out = hpcseg("collect", "sweep", "--dest", dest, env=_env(local_sweep))
    assert code == 0, out
    (tmp_path / "report.html").unlink()
    collected = _report(tmp_path, dest, env={"HPCSEG_SCRATCH": str(tmp_path / "none")})
    _self_contained(collected)
    for run in local_sweep.runs:
        assert run.name in collected
    assert "collected" in collected and ">0.003<" in collected
    test_cells = re.findall(r'<td class="num(?: top)?" data-v="([^"]+)">', collected)
    assert len(test_cells) > 10  # Dice per tissue of validation and test for both runs


def test_text_from_run_folders_is_escaped(local_sweep, tmp_path):
    """In the page as HTML; in the status table, a terminal's escape sequence shows as '?'."""
    hostile = '<img src=x onerror="alert(1)">&\x1b[2J'
    folder = tmp_path / "exp"
    for run in local_sweep.runs:
        shutil.copytree(run, folder / run.name, symlinks=True)
        record = json.loads((run / "run.json").read_text())
        record["sweep"] = {"model.act": hostile + run.name[-1]}
        (folder / run.name / "run.json").write_text(json.dumps(record))
    page = _report(tmp_path, folder, env={"HPCSEG_SCRATCH": str(tmp_path / "none")})
    assert hostile not in page and "onerror=\"alert" not in page
    assert html_escaped(hostile.replace("\x1b", "?")) in page and "\x1b" not in page
    _self_contained(page)
    code, out = hpcseg("status", "--scratch", tmp_path, env={})
    assert code == 0 and "\x1b" not in out and '<img src=x onerror="alert(1)">&?[2J' in out, out


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_cross_validation_folds_get_a_column_and_a_mean_per_setting(local_sweep, tmp_path):
    folder = tmp_path / "cv"
    for fold in range(3):
        for run in local_sweep.runs:
            dest = folder / f"{run.name}-f{fold}"
            shutil.copytree(run, dest, symlinks=True)
            record = json.loads((run / "run.json").read_text())
            record.update(fold=fold, run_id=dest.name)
            (dest / "run.json").write_text(json.dumps(record))
    page = _report(tmp_path, folder, env={"HPCSEG_SCRATCH": str(tmp_path / "none")})
    assert "<th title=\"sort by fold\">fold</th>" in page
    cv = page[page.index("<h2>Cross-validation</h2>"):]
    cv = cv[:cv.index("</table>")]
    assert cv.count("<tr>") == 3  # a header and a line per learning rate
    assert cv.count("3 (0, 1, 2)") == 2 and "±" in cv


def test_bad_selector_is_one_line(tmp_path):
    code, out = hpcseg("report", "nosuch", "--out", tmp_path / "r.html", env={"HPCSEG_SCRATCH": str(tmp_path)})
    assert code == 2 and out.startswith("hpcseg: error: nosuch: no run or experiment") and out.count("\n") == 1, out
    assert not (tmp_path / "r.html").exists()


def _rows(page) -> list[str]:
    return page.evaluate("Array.from(document.querySelectorAll('#runs tbody tr')).map(r => r.cells[0].dataset.v)")


def _column(page, header: str) -> list[float]:
    index = page.evaluate(f"Array.from(document.querySelectorAll('#runs th')).map(h => h.textContent)"
                          f".indexOf({json.dumps(header)})")
    assert index >= 0, header
    return page.evaluate(f"Array.from(document.querySelectorAll('#runs tbody tr'))"
                         f".map(r => Number(r.cells[{index}].dataset.v))"), index


def _keep(shot: Path) -> None:
    print(f"screenshot: {shot}")
    if os.environ.get("HPCSEG_TEST_ARTEFACTS"):
        target = Path(os.environ["HPCSEG_TEST_ARTEFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, target / shot.name)


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("runs", [2, 40])
def test_report_in_chromium(local_sweep, tmp_path, runs):
    if runs == 2:
        folder, ids = local_sweep.runs[0].parent, [p.name for p in local_sweep.runs]
        env = _env(local_sweep)
        args = ["sweep"]
    else:
        folder = tmp_path / "big"
        ids = [p.name for p in vary_copies(local_sweep.runs[1], folder, runs)]
        env, args = {"HPCSEG_SCRATCH": str(tmp_path / "none")}, [folder]
    _report(tmp_path, *args, env=env)
    url = (tmp_path / "report.html").absolute().as_uri()
    with Browser(tmp_path / "profile") as browser:
        page = browser.open(url)
        assert page.errors == []
        assert page.requests and page.requests[0] == url
        assert all(u == url or u.startswith("data:") for u in page.requests), page.requests
        assert sorted(_rows(page)) == sorted(ids)
        assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")

        values, index = _column(page, "val mean")
        page.click(f"#runs th:nth-child({index + 1})")
        ascending, _ = _column(page, "val mean")
        assert ascending == sorted(values) and sorted(_rows(page)) == sorted(ids)
        page.click(f"#runs th:nth-child({index + 1})")
        descending, _ = _column(page, "val mean")
        assert descending == sorted(values, reverse=True)
        page.click("#runs th:nth-child(1)")  # back to run ids, as the page opened
        assert _rows(page) == sorted(ids)
        assert page.errors == []
        shot = page.screenshot(tmp_path / f"report-{runs}-runs.png")
    assert shot.stat().st_size > 20_000
    _keep(shot)
