"""``LogStat``: the log's statistics (Berkeley DB's ``DB_LOG_STAT``, ``db_stat -l``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .lsn import LSN, unpack_word
from .record import LOG_MAGIC, LOG_VERSION

__all__ = ["LogStat", "read_stat"]


@dataclass(frozen=True)
class LogStat:
    """The log's statistics, kept in the region and so exact across processes.

    Berkeley DB's names without ``st_``: ``magic``, ``version``, ``lg_bsize`` (buffer bytes),
    ``lg_size`` (log file size), ``records`` (records appended, file headers included),
    ``bytes`` (their bytes, headers included), ``wcount`` (writes to log files),
    ``wcount_fill`` (of which made because the buffer was full), ``scount`` (fsyncs),
    ``cur_file``/``cur_offset`` (the end of the log), ``disk_file``/``disk_offset``
    (everything before it is durable), ``maxcommitperflush``/``mincommitperflush`` (flush
    calls served by one fsync, over the flushes that served any), ``region_wait``/
    ``region_nowait`` (log mutex locks that had / had not to wait). aiodbenv adds:
    ``inmemory``; ``file_bytes`` (bytes written to log files: what flash wears);
    ``block_rewrites`` (writes that began inside a 4 KiB block the previous write ended in,
    i.e. a partly written block written again, which the seed's flash note is about);
    ``flushes`` (fsyncs that served a flush call); ``switches`` (log files started);
    ``checkpoints`` (checkpoint records); ``last_checkpoint`` (its LSN or None).
    """

    magic: int
    version: int
    inmemory: bool
    lg_bsize: int
    lg_size: int
    records: int
    bytes: int
    wcount: int
    wcount_fill: int
    scount: int
    cur_file: int
    cur_offset: int
    disk_file: int
    disk_offset: int
    maxcommitperflush: int
    mincommitperflush: int
    region_wait: int
    region_nowait: int
    file_bytes: int
    block_rewrites: int
    flushes: int
    switches: int
    checkpoints: int
    last_checkpoint: LSN | None


def read_stat(c: Any) -> LogStat:
    """Read the statistics of a :class:`~aiodbenv.log.core.LogCore`."""
    waits, nowaits, _ = c.mutex.stats()
    with c.mutex:
        end = unpack_word(c.end_word())
        disk = unpack_word(c.word("s_lsn"))
        vals = {
            name: c.word("st_" + name)
            for name in (
                "records",
                "bytes",
                "writes",
                "fill_writes",
                "fsyncs",
                "file_bytes",
                "block_rewrites",
                "flushes",
                "max_commits",
                "min_commits",
                "switches",
                "checkpoints",
            )
        }
        ckp = c.word("ckp_rec")
    return LogStat(
        magic=LOG_MAGIC,
        version=LOG_VERSION,
        inmemory=c.inmemory,
        lg_bsize=c.bsize,
        lg_size=c.file_size,
        records=vals["records"],
        bytes=vals["bytes"],
        wcount=vals["writes"],
        wcount_fill=vals["fill_writes"],
        scount=vals["fsyncs"],
        cur_file=end.file,
        cur_offset=end.offset,
        disk_file=disk.file,
        disk_offset=disk.offset,
        maxcommitperflush=vals["max_commits"],
        mincommitperflush=vals["min_commits"],
        region_wait=waits,
        region_nowait=nowaits,
        file_bytes=vals["file_bytes"],
        block_rewrites=vals["block_rewrites"],
        flushes=vals["flushes"],
        switches=vals["switches"],
        checkpoints=vals["checkpoints"],
        last_checkpoint=unpack_word(ckp) if ckp else None,
    )
