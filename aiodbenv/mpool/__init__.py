"""The shared buffer pool (Berkeley DB's mpool), living in the environment's regions.

:mod:`.layout` defines its shared structures, :mod:`.table` the synchronous bookkeeping
(buckets, buffers, files, replacement), :mod:`.page` pinned pages, :mod:`.file` page access on
one file, :mod:`.pool` the per-handle pool (frames, reads, waits), :mod:`.sync` write-back and
:mod:`.stat` statistics.
"""
