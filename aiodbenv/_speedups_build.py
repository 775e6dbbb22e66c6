"""cffi builder for aiodbenv's compiled accelerator (out-of-line API mode).

One module, ``aiodbenv._speedups``, holds the pthread binding for the robust mutexes and the
two hottest pieces of pool bookkeeping (pin a cached page, unpin a page). Built by setup.py at
install time when a C compiler is available; without it (or with ``AIODBENV_MUTEX=abi``)
aiodbenv binds pthread through cffi's ABI mode and runs the same bookkeeping in Python.

The C functions take no layout from here: the word offsets of every field they touch are handed
to ``aiodb_set_layout`` once at import, from the one definition in the layout modules.
"""

import os
import sys

import cffi

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "region"))
from pthread_cdef import CDEF  # noqa: E402

HOT_CDEF = """
void aiodb_set_layout(const uint64_t *values, int n);
int64_t aiodb_pin_hit(uint64_t *w, void *mutex, uint64_t nowait_w, uint64_t head_w,
                      uint64_t pgno, uint64_t tag, uint64_t *examined);
int aiodb_unpin(uint64_t *w, void *mutex, uint64_t nowait_w, uint64_t x, uint64_t bucket_w,
                uint64_t hdr_w, int flags);
"""

HOT_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <errno.h>

/* Word offsets and flag bits, set once from the Python layout definitions. */
enum { L_H_NEXT, L_H_FILE, L_H_PGNO, L_H_REF, L_H_FLAGS, L_H_PRIO, L_B_HEAD, L_B_DIRTY,
       L_C_LRU, L_C_BUFFERS, L_BH_READING, L_BH_DIRTY, L_PAGE_DIRTY, L_PAGE_CLEAN,
       L_PAGE_DISCARD, L_COUNT };
static uint64_t L[L_COUNT];

void aiodb_set_layout(const uint64_t *values, int n) {
    for (int i = 0; i < n && i < L_COUNT; i++) L[i] = values[i];
}

/* Lock without blocking; returns 0 with the mutex held, or -errno with it NOT held, except
   -EOWNERDEAD, where the mutex IS held and the caller must repair or panic. */
static int64_t try_lock(uint64_t *w, void *mutex, uint64_t nowait_w) {
    if (!mutex) return 0;
    int rc = pthread_mutex_trylock((pthread_mutex_t *)mutex);
    if (rc) return -(int64_t)rc;
    w[nowait_w]++;
    return 0;
}

static void unlock(void *mutex) {
    if (mutex) pthread_mutex_unlock((pthread_mutex_t *)mutex);
}

/* Pin page `pgno` of file `tag` if it is in the chain at w[head_w] and not being read.
   Returns its buffer offset (> 0), 0 if absent or being read, or a negative lock result. */
int64_t aiodb_pin_hit(uint64_t *w, void *mutex, uint64_t nowait_w, uint64_t head_w,
                      uint64_t pgno, uint64_t tag, uint64_t *examined) {
    int64_t rc = try_lock(w, mutex, nowait_w);
    if (rc) return rc;
    uint64_t n = 1, off = w[head_w];
    while (off) {
        uint64_t x = off >> 3;
        if (w[x + L[L_H_PGNO]] == pgno && w[x + L[L_H_FILE]] == tag) {
            if (w[x + L[L_H_FLAGS]] & L[L_BH_READING]) off = 0;
            else w[x + L[L_H_REF]]++;
            break;
        }
        off = w[x + L[L_H_NEXT]];
        n++;
    }
    unlock(mutex);
    *examined = n;
    return (int64_t)off;
}

/* Unpin the buffer at word x with PAGE_* flags. Returns 1 if its last pin went, 0 if pins
   remain, 2 if it had no pin (an over-unpin), or a negative lock result (nothing done). */
int aiodb_unpin(uint64_t *w, void *mutex, uint64_t nowait_w, uint64_t x, uint64_t bucket_w,
                uint64_t hdr_w, int flags) {
    int64_t rc = try_lock(w, mutex, nowait_w);
    if (rc) return (int)rc;
    uint64_t bh = w[x + L[L_H_FLAGS]];
    if (flags & L[L_PAGE_DIRTY]) {
        if (!(bh & L[L_BH_DIRTY])) {
            w[x + L[L_H_FLAGS]] = bh | L[L_BH_DIRTY];
            w[bucket_w + L[L_B_DIRTY]]++;
        }
    } else if ((flags & L[L_PAGE_CLEAN]) && (bh & L[L_BH_DIRTY])) {
        w[x + L[L_H_FLAGS]] = bh & ~L[L_BH_DIRTY];
        w[bucket_w + L[L_B_DIRTY]]--;
    }
    int result;
    uint64_t ref = w[x + L[L_H_REF]];
    if (!ref) {
        result = 2;
    } else if (--ref) {
        w[x + L[L_H_REF]] = ref;
        result = 0;
    } else {
        w[x + L[L_H_REF]] = 0;
        uint64_t counter = w[hdr_w + L[L_C_LRU]] + 1;
        w[hdr_w + L[L_C_LRU]] = counter;
        if (flags & L[L_PAGE_DISCARD]) w[x + L[L_H_PRIO]] = 0;
        else if (w[x + L[L_H_FLAGS]] & L[L_BH_DIRTY])
            w[x + L[L_H_PRIO]] = counter + w[hdr_w + L[L_C_BUFFERS]] / 10 + 1;
        else w[x + L[L_H_PRIO]] = counter;
        result = 1;
    }
    unlock(mutex);
    return result;
}
"""

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
""" + HOT_SOURCE,
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
