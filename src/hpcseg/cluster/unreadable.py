"""What `status` says of a scheduler's answer it cannot read: a warning naming the command and what it printed,
shortened and printable (the answer may hold any byte), instead of a silent UNKNOWN."""

from __future__ import annotations

#: most characters of a scheduler's output quoted in one warning
SHOWN = 60


def shown(text: str, limit: int = SHOWN) -> str:
    """`text` quoted, in printable ASCII (other characters escaped), shortened to about `limit` characters."""
    pieces, used = [], 0
    for char in text.strip():
        piece = ascii(char)[1:-1]  # '\x07', '\ufffd': never cut in two
        if used + len(piece) > limit:
            return "'" + "".join(pieces) + "...'"
        pieces.append(piece)
        used += len(piece)
    return "'" + "".join(pieces) + "'"


def unknown_states(command: str, found: dict[str, list[str]]) -> list[str]:
    """One warning per state word hpcseg does not know ({word: the job ids it was printed for})."""
    out = []
    for raw, ids in found.items():
        jobs = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        out.append(f"{command} printed the state {shown(raw)} for job{'s' if len(ids) > 1 else ''} {jobs}, which "
                   "hpcseg does not know: shown as UNKNOWN")
    return out


def unreadable_lines(command: str, lines: list[str]) -> str:
    """The warning for lines of output that are no job's line (one quoted, the rest counted)."""
    more = f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else ""
    return (f"{command} printed what hpcseg cannot read: {shown(lines[0])}{more}; the jobs it leaves out show what "
            "their run folders say, else UNKNOWN")
