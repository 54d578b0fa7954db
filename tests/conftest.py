"""Shared pytest set-up: fixtures live in one module per concern and are loaded here."""

import os

# Tests run many small torch models; more threads than cores only adds contention.
os.environ.setdefault("OMP_NUM_THREADS", "1")

pytest_plugins = ["fixtures_slurm", "fixtures_lsf", "fixtures_cluster"]
