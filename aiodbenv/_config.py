"""Environment settings: defaults, arguments, and the ``DB_CONFIG`` file in the home.

Settings come from three places, later ones winning: defaults, the arguments of
:meth:`aiodbenv.Env.open`, then the lines of ``DB_CONFIG`` in the environment home, applied in
order (as in Berkeley DB, the file beats the program, so an operator can retune a deployed
application). A joiner does not use its own sizes at all: it inherits what the creator stored in
the environment.

``DB_CONFIG`` lines are ``name value...``; blank lines and lines starting with ``#`` are
ignored. The names aiodbenv acts on:

==============================  ==========================================================
``set_cachesize G B N``         cache of ``G`` GiB + ``B`` bytes in ``N`` caches (N >= 0)
``set_shm_key KEY``             base System V key (``KEY``, ``KEY+1``, ... per region)
``set_mp_mmapsize BYTES``       largest read-only file mapped instead of cached
``set_mp_pagesize BYTES``       default page size (power of two, 512..65536)
``set_open_flags FLAG [on|off]``  ``db_private`` or ``db_system_mem``
``set_flags FLAG [on|off]``     ``db_nommap``, ``db_txn_nosync``, ``db_txn_write_nosync``,
                                ``db_log_inmemory``
``set_lg_bsize BYTES``          log buffer size (the ring's size for an in-memory log)
``set_lg_max BYTES``            log file size
``set_lg_dir DIR``              directory of the log files (relative: to the home)
==============================  ==========================================================

``db_txn_nosync`` and ``db_txn_write_nosync`` exclude each other: turning one on turns the
other off; with an in-memory log neither may be on. The ``set_lg_*`` lines size the log of an
environment opened with one (``log=True`` or ``db_log_inmemory``) and are ignored otherwise, as
in Berkeley DB. Other Berkeley DB names that do not apply to aiodbenv (locking and transaction
sizing, other directories) are accepted, logged and ignored; any other name, a wrong
number of values or a bad value fails the open with the file name and line number.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_LOG_BUFFER",
    "DEFAULT_LOG_FILE_SIZE",
    "DEFAULT_MEM_LOG_BUFFER",
    "DEFAULT_MEM_LOG_FILE_SIZE",
    "DEFAULT_MMAP_SIZE",
    "DEFAULT_PAGE_SIZE",
    "FLAG_BITS",
    "MAX_CACHE_SIZE",
    "MAX_MMAP_SIZE",
    "MIN_CACHE_SIZE",
    "Settings",
    "apply_db_config",
    "check_log_arguments",
    "check_log_settings",
    "check_settings",
    "log_sizes",
    "log_wake_mode",
]

logger = logging.getLogger("aiodbenv")

#: Berkeley DB's default cache: 256 KiB.
DEFAULT_CACHE_SIZE = 256 * 1024
#: Berkeley DB's DB_CACHESIZE_MIN: 20 KiB per cache.
MIN_CACHE_SIZE = 20 * 1024
#: 1 TiB; beyond this a cache size is a typo, not a plan.
MAX_CACHE_SIZE = 1 << 40
#: Each cache is a region and region 1 is the environment's: at most MAX_REGIONS - 1.
MAX_NCACHE = 31
DEFAULT_PAGE_SIZE = 4096
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 65536
#: Berkeley DB's DB_MAXMMAPSIZE: 10 MiB.
DEFAULT_MMAP_SIZE = 10 * 1024 * 1024
#: System V keys are 32-bit signed; each region uses key + region_id - 1.
MAX_SHM_KEY = (1 << 31) - 1 - 64
#: The largest ``mmap_size``: far past any file that can be mapped, and it fits the header word.
MAX_MMAP_SIZE = 1 << 62

REGION_KINDS = ("file", "system", "private")

#: Berkeley DB's log sizes (dbinc/log.h): the buffer and file of a file log, and the ring and
#: "files" of an in-memory log.
DEFAULT_LOG_BUFFER = 32000
DEFAULT_LOG_FILE_SIZE = 10 * 1024 * 1024
DEFAULT_MEM_LOG_BUFFER = 1024 * 1024
DEFAULT_MEM_LOG_FILE_SIZE = 256 * 1024
MIN_LOG_BUFFER = 1024
MAX_LOG_BUFFER = 1 << 30
#: A log file holds at least a header and a small record; LSN offsets are 32 bits.
MIN_LOG_FILE_SIZE = 1024
MAX_LOG_FILE_SIZE = (1 << 31) - 1

#: Flag names and the bits that store them in the environment header.
FLAG_BITS = {
    "nommap": 1,
    "txn_nosync": 2,
    "txn_write_nosync": 4,
    "log_inmemory": 8,
}

# Berkeley DB settings that have no meaning for aiodbenv (yet): accepted and ignored, so a
# DB_CONFIG written for Berkeley DB still opens.
_IGNORED = frozenset(
    {
        "add_data_dir",
        "set_create_dir",
        "set_data_dir",
        "set_lg_filemode",
        "set_lg_regionmax",
        "set_lk_detect",
        "set_lk_max_lockers",
        "set_lk_max_locks",
        "set_lk_max_objects",
        "set_lk_partitions",
        "set_lock_timeout",
        "set_mp_max_openfd",
        "set_mp_max_write",
        "set_tmp_dir",
        "set_tx_max",
        "set_txn_timeout",
        "set_verbose",
        "mutex_set_align",
        "mutex_set_increment",
        "mutex_set_max",
        "mutex_set_tas_spins",
        "set_thread_count",
        "set_memory_max",
    }
)


@dataclass(frozen=True)
class Settings:
    """The settings an environment is created with (or that a joiner asked for).

    ``region`` is ``"file"``, ``"system"``, ``"private"`` or ``None`` (join whatever exists,
    create file-backed). ``None`` sizes mean "the default". ``mode`` is the exact permission of
    every region file and segment.
    """

    region: str | None = None
    cache_size: int | None = None
    ncache: int = 1
    shm_key: int | None = None
    page_size: int | None = None
    mmap_size: int | None = None
    mode: int = 0o600
    nommap: bool = False
    txn_nosync: bool = False
    txn_write_nosync: bool = False
    log_inmemory: bool = False
    log: bool = False
    log_dir: str | None = None
    log_buffer_size: int | None = None
    log_file_size: int | None = None

    @property
    def has_log(self) -> bool:
        """True if the environment keeps a log (``log`` or ``log_inmemory``)."""
        return self.log or self.log_inmemory

    @property
    def durability(self) -> Literal["sync", "write_nosync", "nosync"]:
        """The default durability of a commit these settings give (see ``Env.durability``)."""
        if self.txn_nosync:
            return "nosync"
        return "write_nosync" if self.txn_write_nosync else "sync"

    def flag_bits(self) -> int:
        """The boolean settings as the bit set stored in the environment header."""
        return sum(bit for name, bit in FLAG_BITS.items() if getattr(self, name))

    def flag_names(self) -> frozenset[str]:
        """The names of the boolean settings that are on."""
        return frozenset(name for name in FLAG_BITS if getattr(self, name))


def check_settings(s: Settings) -> Settings:
    """Validate ``s``; returns it. Raises :class:`ConfigError` naming the bad setting."""
    if s.region is not None and s.region not in REGION_KINDS:
        raise ConfigError(f"region must be one of {REGION_KINDS}, not {s.region!r}")
    for flag in ("nommap", "txn_nosync", "txn_write_nosync", "log_inmemory", "log"):
        # Only a real bool: "0" or 2 were taken as on, and "yes" failed deep inside.
        if not isinstance(getattr(s, flag), bool):
            raise ConfigError(f"{flag} must be True or False, not {getattr(s, flag)!r}")
    if s.cache_size is not None:
        _check_int("cache_size", s.cache_size)
        if s.cache_size < MIN_CACHE_SIZE * max(1, s.ncache):
            raise ConfigError(
                f"cache_size {s.cache_size} is impossibly small: at least "
                f"{MIN_CACHE_SIZE} bytes per cache"
            )
        if s.cache_size > MAX_CACHE_SIZE:
            raise ConfigError(f"cache_size {s.cache_size} is larger than 1 TiB")
    _check_int("ncache", s.ncache)
    if not 1 <= s.ncache <= MAX_NCACHE:
        raise ConfigError(f"ncache must be 1..{MAX_NCACHE}, not {s.ncache}")
    if s.shm_key is not None:
        _check_int("shm_key", s.shm_key)
        if not 1 <= s.shm_key <= MAX_SHM_KEY:
            raise ConfigError(f"shm_key must be 1..{MAX_SHM_KEY}, not {s.shm_key}")
    if s.page_size is not None:
        _check_int("page_size", s.page_size)
        if not (MIN_PAGE_SIZE <= s.page_size <= MAX_PAGE_SIZE) or s.page_size & (s.page_size - 1):
            raise ConfigError(
                f"page_size must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}, "
                f"not {s.page_size}"
            )
    if s.mmap_size is not None:
        _check_int("mmap_size", s.mmap_size)
        if not 0 <= s.mmap_size <= MAX_MMAP_SIZE:
            raise ConfigError(f"mmap_size must be 0..{MAX_MMAP_SIZE} (2**62), not {s.mmap_size}")
    _check_int("mode", s.mode)
    if not 0 <= s.mode <= 0o777:
        raise ConfigError(f"mode must be a permission in 0o000..0o777, not {s.mode:#o}")
    if s.txn_nosync and s.txn_write_nosync:
        raise ConfigError("txn_nosync and txn_write_nosync exclude each other")
    if s.log_buffer_size is not None:
        _check_int("log_buffer_size", s.log_buffer_size)
        if not MIN_LOG_BUFFER <= s.log_buffer_size <= MAX_LOG_BUFFER:
            raise ConfigError(
                f"log_buffer_size must be {MIN_LOG_BUFFER}..{MAX_LOG_BUFFER}, "
                f"not {s.log_buffer_size}"
            )
    if s.log_file_size is not None:
        _check_int("log_file_size", s.log_file_size)
        if not MIN_LOG_FILE_SIZE <= s.log_file_size <= MAX_LOG_FILE_SIZE:
            raise ConfigError(
                f"log_file_size must be {MIN_LOG_FILE_SIZE}..{MAX_LOG_FILE_SIZE}, "
                f"not {s.log_file_size}"
            )
    if s.log_dir is not None and (not isinstance(s.log_dir, str) or not s.log_dir):
        raise ConfigError(f"log_dir must be a non-empty path, not {s.log_dir!r}")
    return s


def check_log_arguments(s: Settings) -> Settings:
    """The log's sizes and directory as arguments need a log (as ``DB_CONFIG`` lines they are
    ignored without one, as in Berkeley DB); returns ``s``."""
    if not s.has_log and (
        s.log_dir is not None or s.log_buffer_size is not None or s.log_file_size is not None
    ):
        raise ConfigError("log_dir, log_buffer_size and log_file_size need log=True")
    return s


#: The values ``AIODBENV_LOG_WAKE`` may take ("" is the default: waiters sleep on sockets).
LOG_WAKE_MODES = ("", "socket", "futex", "poll")


def log_wake_mode() -> str:
    """How a log's flush waiters in other processes are woken: ``AIODBENV_LOG_WAKE``,
    lower-cased. Raises :class:`ConfigError` for a value it does not name."""
    mode = os.environ.get("AIODBENV_LOG_WAKE", "").lower()
    if mode not in LOG_WAKE_MODES:
        raise ConfigError(f"AIODBENV_LOG_WAKE must be one of socket, futex or poll, not {mode!r}")
    return mode


def check_log_settings(s: Settings) -> Settings:
    """Check how the log settings combine, once all of them are known (after ``DB_CONFIG``,
    whose lines may come in any order), and ``AIODBENV_LOG_WAKE`` for a log (before anything
    is created); returns ``s``. Raises :class:`ConfigError`."""
    if s.has_log:
        log_wake_mode()
    if s.log_inmemory:
        if s.txn_nosync or s.txn_write_nosync:
            # Berkeley DB silently drops the in-memory log here; nothing of a ring in memory
            # is ever written or synced, so the flags could only mislead.
            raise ConfigError(
                "txn_nosync and txn_write_nosync cannot be used with an in-memory log "
                "(log_inmemory): it is never written to disk"
            )
        if s.log_dir is not None:
            raise ConfigError("log_dir cannot be used with an in-memory log: it has no files")
        bsize, fsize = log_sizes(s)
        if bsize <= fsize:
            raise ConfigError(
                f"the in-memory log buffer ({bsize} bytes) must be larger than the log file "
                f"size ({fsize} bytes)"
            )
    return s


def log_sizes(s: Settings) -> tuple[int, int]:
    """``(buffer size, file size)`` of the log ``s`` asks for, defaults filled in."""
    if s.log_inmemory:
        bsize, fsize = DEFAULT_MEM_LOG_BUFFER, DEFAULT_MEM_LOG_FILE_SIZE
    else:
        bsize, fsize = DEFAULT_LOG_BUFFER, DEFAULT_LOG_FILE_SIZE
    return s.log_buffer_size or bsize, s.log_file_size or fsize


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, not {value!r}")


def apply_db_config(base: Settings, text: str, path: str) -> Settings:
    """Apply the lines of a ``DB_CONFIG`` file (``text``, read from ``path``) on top of ``base``.

    Returns the new settings; raises :class:`ConfigError` with the line number for a line it
    cannot understand or a value that is out of range.
    """
    s = base
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, *args = line.split()
        try:
            s = _apply_line(s, name.lower(), args)
            check_settings(s)
        except ConfigError as err:
            raise ConfigError(err.message, path=path, lineno=lineno) from None
    return s


def _ints(name: str, args: list[str], count: int) -> list[int]:
    if len(args) != count:
        raise ConfigError(f"{name} takes {count} value{'s' if count > 1 else ''}, got {len(args)}")
    values = []
    for a in args:
        try:
            v = int(a, 0)
        except ValueError:
            raise ConfigError(f"{name}: {a!r} is not an integer") from None
        if v < 0:
            raise ConfigError(f"{name}: {a} is negative")
        values.append(v)
    return values


def _switch(name: str, args: list[str]) -> tuple[str, bool]:
    if len(args) not in (1, 2):
        raise ConfigError(f"{name} takes a flag and optionally on/off, got {len(args)} values")
    state = args[1].lower() if len(args) == 2 else "on"
    if state not in ("on", "off"):
        raise ConfigError(f"{name}: expected on or off, got {args[1]!r}")
    return args[0].lower(), state == "on"


def _apply_line(s: Settings, name: str, args: list[str]) -> Settings:
    replace = dataclasses.replace
    if name == "set_cachesize":
        gbytes, nbytes, ncache = _ints(name, args, 3)
        total = (gbytes << 30) + nbytes
        return replace(s, cache_size=total or None, ncache=max(1, ncache))
    if name == "set_shm_key":
        (key,) = _ints(name, args, 1)
        return replace(s, shm_key=key)
    if name == "set_mp_mmapsize":
        (size,) = _ints(name, args, 1)
        return replace(s, mmap_size=size)
    if name == "set_mp_pagesize":
        (size,) = _ints(name, args, 1)
        return replace(s, page_size=size)
    if name == "set_open_flags":
        flag, on = _switch(name, args)
        kinds = {"db_private": "private", "db_system_mem": "system"}
        if flag not in kinds:
            raise ConfigError(f"set_open_flags: unknown flag {flag!r} (db_private, db_system_mem)")
        if on:
            return replace(s, region=kinds[flag])
        return replace(s, region=None) if s.region == kinds[flag] else s
    if name == "set_flags":
        flag, on = _switch(name, args)
        if flag == "db_txn_nosync":
            return replace(s, txn_nosync=on, txn_write_nosync=s.txn_write_nosync and not on)
        if flag == "db_txn_write_nosync":
            return replace(s, txn_write_nosync=on, txn_nosync=s.txn_nosync and not on)
        if flag == "db_nommap":
            return replace(s, nommap=on)
        if flag == "db_log_inmemory":
            return replace(s, log_inmemory=on)
        raise ConfigError(
            f"set_flags: unknown flag {flag!r} "
            "(db_nommap, db_txn_nosync, db_txn_write_nosync, db_log_inmemory)"
        )
    if name == "set_lg_bsize":
        (size,) = _ints(name, args, 1)
        return replace(s, log_buffer_size=size)
    if name == "set_lg_max":
        (size,) = _ints(name, args, 1)
        return replace(s, log_file_size=size)
    if name == "set_lg_dir":
        if len(args) != 1:
            raise ConfigError(f"{name} takes 1 value, got {len(args)}")
        return replace(s, log_dir=args[0])
    if name in _IGNORED:
        logger.info("DB_CONFIG: %s does not apply to aiodbenv; ignored", name)
        return s
    raise ConfigError(f"unknown setting {name!r}")
