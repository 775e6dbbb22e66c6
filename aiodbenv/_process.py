"""Is a process alive? For taking over work a dead process left (reads, worker leases)."""

from __future__ import annotations

import os

__all__ = ["is_alive"]


def is_alive(pid: int) -> bool:
    """True if ``pid`` is a running process. A zombie (dead, not yet reaped by its parent)
    counts as dead: ``kill(pid, 0)`` alone would call it alive, and whoever waits for it
    would wait until it is reaped, which may be never."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    except OSError:
        return _kill_probe(pid)  # no /proc here: the signal probe is all there is
    # The state letter follows the command name, which is in parentheses and may contain any
    # character, including ')': look after the last one.
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"x")


def _kill_probe(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
