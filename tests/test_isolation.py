"""Every test runs away from the user's hpcseg state and the checkout's run folders (tests/conftest.py): the
quick start leaves ./hpcseg-scratch, ./demo and a line in ~/.local/state/hpcseg/scratch_dirs behind."""

import os
from pathlib import Path

from hpcseg.cluster.runs import scratches_to_search, state_dir

REPO = Path(__file__).resolve().parents[1]


def test_a_test_sees_neither_the_users_state_nor_the_checkouts_scratch():
    cwd = Path.cwd()
    assert cwd != REPO and REPO not in cwd.parents, cwd
    assert "HPCSEG_SCRATCH" not in os.environ
    assert state_dir() == Path(os.environ["XDG_STATE_HOME"]) / "hpcseg" and not state_dir().exists()
    assert state_dir() != Path.home() / ".local" / "state" / "hpcseg"
    # status/collect/cancel/logs without --scratch: only this test's (empty) working folder
    assert scratches_to_search(None) == [cwd / "hpcseg-scratch"]
