"""The log region: its header (shared state and statistics), the log directory's name, and the
buffer (file log) or ring of "files" (in-memory log).

Every LSN in the header is one packed word (:func:`~aiodbenv.log.lsn.pack_word`), so another
process reads it whole without the mutex. The fill of the buffer and the offset of the last
record are packed into one word, ``tail`` (``last_off << 32 | fill``), so an append commits
with a single store: a process killed in the middle of an append leaves either the old tail or
the new one.
"""

from __future__ import annotations

from ..region.layout import MAX_PROCS, MUTEX_SLOT, REGION_HEADER, WORD, Layout

__all__ = ["DIR_BYTES", "LOG_HEADER", "LOG_REGION_MAGIC", "buffer_offset", "region_size"]

#: "aiodblog" in little-endian ASCII, written last when the region is formatted.
LOG_REGION_MAGIC = int.from_bytes(b"aiodblog", "little")

#: Room for the log directory's absolute path (UTF-8).
DIR_BYTES = 4096

LOG_HEADER = Layout(
    "log_header",
    [
        ("magic", 1),
        ("inmemory", 1),  # 1: the log is the ring in this region, no file is written
        ("bsize", 1),  # buffer (file log) or ring (in memory) bytes
        ("file_size", 1),  # size of new log files (in-memory "files")
        ("cur_file_size", 1),  # size of the current file (an older log may use another)
        ("dir_len", 1),  # bytes of the log directory's path that follow this header
        ("mode", 1),  # permission of new log files
        ("mutex", MUTEX_SLOT),
        # -- the log's state (under "mutex" unless said otherwise)
        ("f_lsn", 1),  # LSN of buffer byte 0 (in memory: LSN of the current file's start)
        ("tail", 1),  # last record's offset << 32 | buffer fill
        ("w_lsn", 1),  # everything before it was written to the files
        ("s_lsn", 1),  # everything before it is durable (flushed_lsn)
        ("file_ready", 1),  # the highest log file created and preallocated
        ("prev_file_end", 1),  # end of the data of the file before f_lsn's (after a switch)
        ("first_file", 1),  # in memory: the oldest "file" still in the ring
        ("flusher_pid", 1),  # the process that writes the files now (0: none)
        ("flusher_start", 1),  # and its start time (tells a recycled pid from it)
        ("flusher_token", 1),  # which handle of that process (two may share a process)
        ("pending_commits", 1),  # flush calls waiting since the last flush began
        ("flush_seq", 1),  # bumped when the writer progresses or lets go (a futex word)
        ("ckp_rec", 1),  # LSN of the last checkpoint record (0: none)
        ("ckp_lsn", 1),  # the ckp_lsn it carries
        ("failed_errno", 1),  # a write or fsync of the log failed (the env is panicked)
        ("failed_file", 1),  # in which log file
        ("last_write_end", 1),  # LSN where the last write to a file ended (flash figure)
        ("hole_prev", 1),  # offset of the record before a record written straight to a file
        # -- statistics (under "mutex": exact across processes)
        ("st_records", 1),
        ("st_bytes", 1),  # record bytes appended, headers included
        ("st_writes", 1),  # pwrite calls on log files
        ("st_fill_writes", 1),  # of which made because the buffer was full
        ("st_fsyncs", 1),
        ("st_file_bytes", 1),  # bytes written to log files
        ("st_block_rewrites", 1),  # writes that began inside a block an earlier write ended in
        ("st_flushes", 1),  # flushes that served at least one flush call
        ("st_max_commits", 1),
        ("st_min_commits", 1),
        ("st_switches", 1),  # new log files started
        ("st_checkpoints", 1),
        # -- (under "mutex") the highest LSN word a write-through call (write_nosync) of any
        # process waits to see written: the writer serves it with its next round
        ("want_write", 1),
        # -- in memory (under "mutex"): log bytes reserved for the commit records of open
        # transactions (aiodbenv.log.reserve), in total and per registry slot (so that the
        # reaper can drop a dead process's); always 0 for a file log
        ("rsv_total", 1),
        ("rsv", MAX_PROCS),
        # -- per registry slot, a flush waiter's wake-up (aiodbenv.log.wakesock): the LSN word
        # it waits for + 2 (1: any progress; 0: not waiting), cleared by the writer that wakes
        # it, and the nonce naming its socket (0: none)
        ("wake_want", MAX_PROCS),
        ("wake_name", MAX_PROCS),
    ],
)

_BASE = REGION_HEADER.size


def header_offset() -> int:
    """Byte offset of :data:`LOG_HEADER` in the log region."""
    return _BASE


def buffer_offset() -> int:
    """Byte offset of the buffer (or ring) in the log region."""
    return _BASE + LOG_HEADER.size + DIR_BYTES


def region_size(bsize: int) -> int:
    """Bytes the log region needs for a buffer (or ring) of ``bsize`` bytes, header excluded
    (the region layer adds its own header), plus a small arena for the allocator."""
    return LOG_HEADER.size + DIR_BYTES + (bsize + WORD - 1) // WORD * WORD + 4096
