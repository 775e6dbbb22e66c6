"""The environment home: its checks, its creation, and the lock that tells live handles.

Berkeley DB checks and resolves the home in ``env_open.c`` (``__env_open``/``__db_appname``);
here the home is checked before anything is created in it, made like ``mkdir -p`` when a
creator asks, and locked with ``flock`` for as long as a handle is open: shared by every handle
of a shared environment, exclusive for a private handle and for remove. The kernel drops the lock
when a process dies, so whether the home is locked says whether a live handle exists, which the
handle count in region 1 (not decremented by a killed process) cannot.

Blocking (``open``, ``flock``, ``mkdir``): called from worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
import weakref

from ..errors import AiodbenvError, EnvNotFound, InvalidArgument, PermissionDenied

__all__ = ["POLL", "HomeLock", "check_home", "home_mode", "make_home"]

#: How often a wait for a lock held by another process looks again, in seconds.
POLL = 0.005

_home_locks: weakref.WeakSet[HomeLock] = weakref.WeakSet()


def _forget_home_locks_in_child() -> None:
    # A forked child inherits the locked descriptors; it cannot use the parent's handles, and
    # holding the locks would keep the environment "in use" after the parent closes it.
    for lock in list(_home_locks):
        lock.release()


os.register_at_fork(after_in_child=_forget_home_locks_in_child)


class HomeLock:
    """A ``flock`` on the home directory: shared per handle, exclusive for private handles and
    for remove. Released by the kernel when a process dies, so it tells the live from the dead.
    """

    __slots__ = ("__weakref__", "_fd")

    def __init__(self, home: str, *, exclusive: bool, wait: float) -> None:
        try:
            self._fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise _home_error(err, home) from err
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, op)
                _home_locks.add(self)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self._fd)
                    raise
                time.sleep(POLL)

    def release(self) -> None:
        """Unlock and close (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1


def _home_error(err: OSError, home: str) -> AiodbenvError | OSError:
    if err.errno == errno.ENOENT:
        return EnvNotFound(f"environment home {home} does not exist")
    if err.errno == errno.ENOTDIR:
        return InvalidArgument(f"environment home {home} is not a directory", errno=errno.ENOTDIR)
    if err.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"environment home {home}: permission denied")
    return err


def check_home(home: str, *, create: bool) -> None:
    """Typed errors for a home that does not exist, is not a directory, or is not writable."""
    try:
        st = os.stat(home)
    except OSError as err:
        raise _home_error(err, home) from err
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"environment home {home} is not a directory", errno=errno.ENOTDIR)
    if not os.access(home, os.R_OK | os.X_OK | (os.W_OK if create else 0)):
        raise PermissionDenied(
            f"environment home {home} is not " + ("writable" if create else "readable")
        )


def home_mode(mode: int) -> int:
    """The permission a home created by ``Env.open(create=True)`` gets, from the region ``mode``.

    Whoever may read or write the region files must be able to enter the directory, so each of
    the owner, group and other classes that has any bit of ``mode`` gets read and search (and
    write, if ``mode`` grants it) on the directory; the owner always gets all three, since the
    creating process must make files in it. 0o600 gives 0o700, 0o660 gives 0o770.
    """
    out = 0o700
    for shift in (3, 0):
        bits = (mode >> shift) & 0o7
        if bits:
            out |= (0o5 | (bits & 0o2)) << shift
    return out


def make_home(home: str, mode: int) -> None:
    """Create a missing ``home`` like ``mkdir -p``: missing parents get the default permission
    (0o777 less the umask), the home itself exactly :func:`home_mode` of ``mode``. An existing
    home is left exactly as it is. Typed errors as :func:`check_home`."""
    if os.path.lexists(home):
        return  # an existing path (or a dangling link) is judged by check_home, never changed
    parent = os.path.dirname(home)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        os.mkdir(home, 0o700)
    except FileExistsError:
        return  # another process made it first: its permission stands
    except OSError as err:
        raise _home_error(err, home) from err
    os.chmod(home, home_mode(mode))  # exact, as for region files: the umask does not apply
