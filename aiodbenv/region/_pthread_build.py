"""cffi builder for the compiled pthread binding (out-of-line API mode).

Run by setup.py at install time when a C compiler is available; the build is optional and
aiodbenv falls back to ABI mode over libc without it (see :mod:`aiodbenv.region.mutex`).
"""

import os
import sys

import cffi

sys.path.insert(0, os.path.dirname(__file__))
from _pthread_cdef import CDEF  # noqa: E402

ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "aiodbenv.region._pthread_c",
    """
#include <pthread.h>
#include <assert.h>
/* The Python side hands out opaque storage of these sizes; refuse to build if they are short. */
_Static_assert(sizeof(pthread_mutex_t) <= 64, "pthread_mutex_t larger than the region slot");
_Static_assert(sizeof(pthread_mutexattr_t) <= 64, "pthread_mutexattr_t larger than its storage");
_Static_assert(PTHREAD_PROCESS_SHARED == 1, "unexpected PTHREAD_PROCESS_SHARED");
_Static_assert(PTHREAD_MUTEX_ROBUST == 1, "unexpected PTHREAD_MUTEX_ROBUST");
""",
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
