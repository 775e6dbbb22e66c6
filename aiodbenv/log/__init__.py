"""The log subsystem: LSNs, the log region, file and in-memory logs, group commit, cursors,
checkpoint records, archive and statistics (Berkeley DB's ``log_*`` calls).

Internal package; the public names are re-exported from :mod:`aiodbenv`.
"""

from .cursor import LogCursor
from .log import DurableListener, Log
from .lsn import LSN
from .record import CheckpointRecord
from .stat import LogStat

__all__ = ["LSN", "CheckpointRecord", "DurableListener", "Log", "LogCursor", "LogStat"]
