"""`collect` while the run trains: the training appends to metrics.jsonl (a line per epoch, written in pieces)
while collect copies it. Every collect succeeds without asking for a retry, and takes whole lines only, each the
source's own, in order: a prefix of what the file finally holds."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from hpcseg.cluster.collect import SUMS, copy_stable

#: a writer as the training's: appends one JSON line per "epoch", in two writes with a pause between them, so that
#: a reader often finds half a line at the end
WRITER = r"""
import json, sys, time
path, stop = sys.argv[1], sys.argv[2]
import os
epoch = 0
with open(path, "ab", buffering=0) as fh:
    while not os.path.exists(stop) and epoch < 200000:
        epoch += 1
        line = json.dumps({"epoch": epoch, "train_loss": 1.0 / epoch, "val_mean_dice": 0.5,
                           "val_dice": {"csf": 0.5}, "pad": "x" * (epoch % 97)}).encode() + b"\n"
        fh.write(line[: len(line) // 2])
        time.sleep(0.001)
        fh.write(line[len(line) // 2:])
        time.sleep(0.001)
"""


def _run_folder(scratch: Path) -> Path:
    run_dir = scratch / "exp" / "training"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"run_id": "training", "experiment": "exp", "executor": "local",
                                                  "job_id": "1", "epochs": 100000, "submit_time": time.time()}))
    (run_dir / "checkpoints" / "best.pt").write_bytes(b"weights")
    (run_dir / "job.toml").write_text('name = "exp"\n')
    (run_dir / "metrics.jsonl").write_bytes(b"")
    return run_dir


def _whole_lines_of(copied: bytes, final: bytes) -> int:
    """The number of lines `copied` holds, after checking that it is whole lines that begin `final`."""
    assert copied == b"" or copied.endswith(b"\n"), copied[-80:]
    assert final.startswith(copied), "the copy is not the beginning of the file"
    lines = copied.splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, len(lines) + 1))
    return len(lines)


def test_collect_copies_whole_lines_of_a_metrics_file_being_appended_to(cli, tmp_path):
    run_dir = _run_folder(cli.scratch)
    metrics, stop = run_dir / "metrics.jsonl", tmp_path / "stop"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(metrics), str(stop)])
    copies, collects = [], []
    try:
        deadline = time.monotonic() + 60
        while len(copies) < 120 and time.monotonic() < deadline:  # the copy itself, many rounds
            dest = tmp_path / "copies" / f"{len(copies)}.jsonl"
            sha, key = copy_stable(metrics, dest, append_only=True)
            data = dest.read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha and key[0] == len(data)
            copies.append((data, key, metrics.stat().st_size))
        dest = tmp_path / "collected"
        for _ in range(3):  # and `hpcseg collect` as the user runs it, SHA256SUMS verified
            code, out = cli("collect", "--dest", dest)
            assert code == 0 and "SHA256SUMS verified" in out and "try again" not in out, out
            collects.append((dest / "training" / "metrics.jsonl").read_bytes())
            sums = (dest / "training" / SUMS).read_text()
            assert f"{hashlib.sha256(collects[-1]).hexdigest()}  metrics.jsonl" in sums
    finally:
        stop.touch()
        writer.wait(timeout=30)
    final = metrics.read_bytes()
    counts = [_whole_lines_of(data, final) for data, _, _ in copies] + [_whole_lines_of(c, final) for c in collects]
    assert counts == sorted(counts) and counts[-1] > counts[0], counts  # the writer went on while collect copied
    # the race was there: in many rounds the file ended in half a line, and the copy left it out
    cut = sum(1 for data, key, size_after in copies if size_after > len(data))
    assert cut > len(copies) // 4, (cut, len(copies))
