"""Shared pytest set-up: fixtures live in one module per concern and are loaded here; every test runs isolated
from the user's hpcseg state and the checkout's run folders."""

import os

import pytest

# Tests run many small torch models; more threads than cores only adds contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["fixtures_slurm", "fixtures_lsf", "fixtures_sge", "fixtures_cluster", "fixtures_commands", "fixtures_ssh"]


@pytest.fixture(autouse=True)
def isolated_from_the_user(tmp_path_factory, monkeypatch):
    """Each test gets its own hpcseg state folder (XDG_STATE_HOME: the remembered scratch folders), no
    HPCSEG_SCRATCH, and an empty working folder, so that the quick start's ./hpcseg-scratch and ./demo, and its
    line in ~/.local/state/hpcseg/scratch_dirs, are never read. Tests that need a scratch set one themselves."""
    home = tmp_path_factory.mktemp("user")
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    monkeypatch.delenv("HPCSEG_SCRATCH", raising=False)
    (home / "cwd").mkdir()
    monkeypatch.chdir(home / "cwd")
    return home
