"""cffi builder for aiodbenv's compiled accelerator (out-of-line API mode).

One module, ``aiodbenv._speedups``, holds the pthread binding for the robust mutexes and the
hottest pieces of pool bookkeeping: pin a cached page, unpin a page, and the two per-page steps
of write-back (snapshot a batch of dirty pages, finish a batch of writes). Built by setup.py at
install time when a C compiler is available; without it (or with ``AIODBENV_MUTEX=abi``)
aiodbenv binds pthread through cffi's ABI mode and runs the same bookkeeping in Python.

The C source is in aiodbenv/_csrc/: every ``NN_name.c`` there is one part of a single
translation unit, concatenated in file-name order (so a later part may use the static helpers of
``10_core.c``), and every ``NN_name.cdef`` declares to cffi what its ``.c`` part exports. A new
compiled path is a new pair of files; this script does not change.

The C functions take no layout from here: the word offsets of every field they touch are handed
to ``aiodb_set_layout`` once (by aiodbenv/mpool/accel.py), from the one definition in the
layout modules; the enum naming them is generated from aiodbenv/mpool/accel_layout.py.
"""

import os
import sys
from pathlib import Path

import cffi

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "region"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "mpool"))
from accel_layout import c_enum
from pthread_cdef import CDEF

CSRC = Path(__file__).resolve().parent / "_csrc"


def _parts(suffix: str) -> str:
    """Every ``_csrc/*<suffix>`` file, in name order, joined."""
    paths = sorted(CSRC.glob(f"*{suffix}"))
    if not paths:
        raise SystemExit(f"no {suffix} files in {CSRC}")
    return "\n".join(f"/* --- {p.name} --- */\n" + p.read_text() for p in paths)


HOT_CDEF = _parts(".cdef")
HOT_SOURCE = _parts(".c").replace("@LAYOUT_ENUM@", c_enum())

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF + HOT_CDEF)
ffibuilder.set_source(
    "aiodbenv._speedups",
    """
#include <pthread.h>
/* The Python side hands out opaque storage of these sizes; refuse to build if they are short. */
_Static_assert(sizeof(pthread_mutex_t) <= 64, "pthread_mutex_t larger than the region slot");
_Static_assert(sizeof(pthread_mutexattr_t) <= 64, "pthread_mutexattr_t larger than its storage");
_Static_assert(PTHREAD_PROCESS_SHARED == 1, "unexpected PTHREAD_PROCESS_SHARED");
_Static_assert(PTHREAD_MUTEX_ROBUST == 1, "unexpected PTHREAD_MUTEX_ROBUST");
#include <time.h>
_Static_assert(sizeof(struct timespec) == 16, "struct timespec is not two 64-bit words");
"""
    + HOT_SOURCE,
    libraries=["pthread"],
    # A function used but not defined must fail the build, not load and then fail to import.
    extra_compile_args=["-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
