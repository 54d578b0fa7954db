"""Durations as hpcseg shows them: one formatter for seconds (ETAs, time left) and one for walltimes in minutes."""

from __future__ import annotations


def clock(seconds: float | None) -> str:
    """`1:02:05`, `2:05` (minutes and seconds), or `?` when unknown."""
    if seconds is None or seconds != seconds:  # NaN: no estimate yet
        return "?"
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def hours_minutes(minutes: int, hour_digits: int = 2) -> str:
    """A walltime as schedulers write it: `02:30` (`2:30` with hour_digits=1, as bsub -W)."""
    return f"{minutes // 60:0{hour_digits}d}:{minutes % 60:02d}"
