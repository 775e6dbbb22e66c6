"""The region layer: shared memory in three kinds of backing, addressed by offsets.

Internal to aiodbenv. :mod:`.layout` defines every shared structure, :mod:`.backing` maps
memory, :mod:`.mutex` binds the robust mutexes, :mod:`.alloc` hands out offsets, and
:mod:`.environment` creates, joins and removes environments.
"""
