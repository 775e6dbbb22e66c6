"""aiodbenv: Berkeley DB's environment regions and shared buffer pool, asyncio-native.

The public names are re-exported here; everything in underscore modules, and the
:mod:`aiodbenv.region` package, is internal and may change between releases.
"""

from . import errors
from ._config import Settings
from ._env import Env, EnvOpener
from ._workers import (
    CheckpointSettings,
    CheckpointWorker,
    Health,
    SharedWorkerStatus,
    TrickleSettings,
    TrickleWorker,
    WorkerStatus,
)
from .errors import (
    AiodbenvError,
    Busy,
    CacheFull,
    CommitNotDurable,
    ConfigError,
    CorruptRegion,
    Deadlock,
    EnvNotFound,
    ForkedProcessError,
    Incomplete,
    InvalidArgument,
    LockTimeout,
    LogBufferFull,
    LogCorrupt,
    NoSpace,
    NotFound,
    PageCorrupt,
    PageNotFound,
    PermissionDenied,
    RunRecovery,
    ShmKeyInUse,
    TryAgain,
    TxnTooLarge,
    VersionMismatch,
)
from .log import LSN, CheckpointRecord, Log, LogCursor, LogStat
from .mpool.file import PoolFile
from .mpool.page import Page, PinContext
from .mpool.pool import FileOpener, Pool
from .mpool.stat import FileStat, PoolStat
from .mpool.sync import SyncResult
from .region.alloc import AllocStats
from .region.environment import EnvStat, RegionStat
from .txn.stat import TxnStat
from .txn.txn import CommitInfo, Txn, TxnPage

__version__ = "0.1.0"

__all__ = [
    "LSN",
    "AiodbenvError",
    "AllocStats",
    "Busy",
    "CacheFull",
    "CheckpointRecord",
    "CheckpointSettings",
    "CheckpointWorker",
    "CommitInfo",
    "CommitNotDurable",
    "ConfigError",
    "CorruptRegion",
    "Deadlock",
    "Env",
    "EnvNotFound",
    "EnvOpener",
    "EnvStat",
    "FileOpener",
    "FileStat",
    "ForkedProcessError",
    "Health",
    "Incomplete",
    "InvalidArgument",
    "LockTimeout",
    "Log",
    "LogBufferFull",
    "LogCorrupt",
    "LogCursor",
    "LogStat",
    "NoSpace",
    "NotFound",
    "Page",
    "PageCorrupt",
    "PageNotFound",
    "PermissionDenied",
    "PinContext",
    "Pool",
    "PoolFile",
    "PoolStat",
    "RegionStat",
    "RunRecovery",
    "Settings",
    "SharedWorkerStatus",
    "ShmKeyInUse",
    "SyncResult",
    "TrickleSettings",
    "TrickleWorker",
    "TryAgain",
    "Txn",
    "TxnPage",
    "TxnStat",
    "TxnTooLarge",
    "VersionMismatch",
    "WorkerStatus",
    "errors",
]

# Public names report this package as their home, so docs and reprs do not leak private paths.
for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type):
        _obj.__module__ = __name__
del _name, _obj
