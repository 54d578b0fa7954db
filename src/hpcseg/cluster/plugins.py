"""hpcseg's submitit plugin entry points (group ``submitit`` in pyproject.toml).

submitit 1.5.4 (core/plugins.py) loads only the entry points named ``executor`` and ``job_environment``, and a
distribution cannot give one name twice, so hpcseg registers one of each for its two schedulers of its own:
``executor`` is LSF's executor class (``submitit.AutoExecutor(cluster="lsf")``; hpcseg builds its SGE executor
itself, see sge.build_executor), and ``job_environment`` is :func:`job_environment`, which submitit calls once per
process: inside a job it returns the environment of the scheduler whose job script set ``SUBMITIT_EXECUTOR``.
"""

from __future__ import annotations

import os


def job_environment():
    """SGE's job environment inside an SGE job (its script exports SUBMITIT_EXECUTOR=sge), else LSF's."""
    if os.environ.get("SUBMITIT_EXECUTOR") == "sge":
        from .sge import SgeJobEnvironment

        return SgeJobEnvironment()
    from .lsf import LsfJobEnvironment

    return LsfJobEnvironment()
