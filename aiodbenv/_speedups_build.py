"""cffi builder for aiodbenv's compiled accelerator (out-of-line API mode).

One module, ``aiodbenv._speedups``, holds the pthread binding for the robust mutexes and the
hottest pieces of pool bookkeeping: pin a cached page, unpin a page, and the two per-page steps
of write-back (snapshot a batch of dirty pages, finish a batch of writes). Built by setup.py at
install time when a C compiler is available; without it (or with ``AIODBENV_MUTEX=abi``)
aiodbenv binds pthread through cffi's ABI mode and runs the same bookkeeping in Python.

The C functions take no layout from here: the word offsets of every field they touch are handed
to ``aiodb_set_layout`` once (by aiodbenv/mpool/accel.py), from the one definition in the
layout modules; the enum naming them is generated from aiodbenv/mpool/accel_layout.py.
"""

import os
import sys

import cffi

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "region"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "mpool"))
from accel_layout import c_enum
from pthread_cdef import CDEF

HOT_CDEF = """
#define AIODB_CORRUPT ...
int aiodb_set_layout(const uint64_t *values, int n);
int aiodb_set_region(uint64_t *w, uint64_t nbytes);
void aiodb_forget_region(uint64_t *w);
void aiodb_set_lock_wait(int64_t ns);
int64_t aiodb_pin_hit(uint64_t *w, void *mutex, uint64_t nowait_w, uint64_t head_w,
                      uint64_t pgno, uint64_t tag, uint64_t *examined, uint64_t slot);
int64_t aiodb_pin_one_cache(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                            const uint64_t *bucket_w, uint64_t nb, uint64_t fidx, uint64_t pgno,
                            uint64_t *hits, uint64_t *extra, uint64_t *longest,
                            uint64_t *bucket, uint64_t slot);
int aiodb_unpin_at(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                   const uint64_t *bucket_w, uint64_t b, uint64_t x, uint64_t hdr_w, int flags,
                   uint64_t slot);
int64_t aiodb_snapshot(uint64_t *w, char *base, void **mutexes, const uint64_t *nowait_w,
                       const uint64_t *bucket_w, uint64_t n, const uint64_t *bucket,
                       const uint64_t *bh, const uint64_t *tag, const uint64_t *pgno, char *dst,
                       const uint64_t *dst_off, uint64_t pid, int64_t *status, int wait);
int64_t aiodb_write_done(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                         const uint64_t *bucket_w, uint64_t n, const uint64_t *bucket,
                         const uint64_t *bh, const uint64_t *tag, const uint64_t *pgno,
                         uint64_t pid, const uint8_t *failed, int wait);
int64_t aiodb_collect(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                      const uint64_t *bucket_w, uint64_t first, uint64_t last, uint64_t max,
                      uint64_t *tag, uint64_t *pgno, uint64_t *bh, uint64_t *bucket,
                      uint64_t *prio, uint8_t *busy, uint64_t *stopped);
"""

HOT_SOURCE = r"""
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <time.h>

/* Word offsets and flag bits, set once from the Python layout definitions. */
@LAYOUT_ENUM@
static uint64_t L[L_COUNT];

/* 1 if n values were given, as many as the enum names; else 0 and nothing is set (a module
   built from another list of names: the Python side refuses to use it). */
int aiodb_set_layout(const uint64_t *values, int n) {
    if (n != L_COUNT) return 0;
    for (int i = 0; i < n; i++) L[i] = values[i];
    return 1;
}

/* Returned (as a result or a status) when an offset read from the region fails its bounds
   check, or a chain is longer than the region could hold: the Python side raises
   CorruptRegion and panics the environment. Far below every -errno. */
#define AIODB_CORRUPT (-1000000)

/* The size of every region the functions below may be handed, keyed by its base pointer, so
   that no offset read from shared memory is followed before it is checked, without a size
   argument on every call. A few regions per process; the lookup is one or two compares. */
#define MAX_KNOWN 256
static struct { uint64_t *w; uint64_t nbytes; } known[MAX_KNOWN];
static int nknown;
/* Writers (attach, detach; cffi drops the GIL) take turns; readers never lock. */
static pthread_mutex_t known_lock = PTHREAD_MUTEX_INITIALIZER;

/* Record (or update) the size of the region at w; 0 if the table is full. Attaching runs in
   worker threads while the loop thread looks sizes up: a slot's size is stored before its
   pointer (release), and the pointer is read with acquire, so a reader that finds a pointer
   finds its size. */
int aiodb_set_region(uint64_t *w, uint64_t nbytes) {
    pthread_mutex_lock(&known_lock);
    int free_slot = -1, n = nknown, ok = 1;
    for (int i = 0; i < n; i++) {
        if (known[i].w == w) {
            __atomic_store_n(&known[i].nbytes, nbytes, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&known_lock);
            return 1;
        }
        if (!known[i].w && free_slot < 0) free_slot = i;
    }
    if (free_slot < 0 && n == MAX_KNOWN) ok = 0;
    else {
        if (free_slot < 0) free_slot = n;
        __atomic_store_n(&known[free_slot].nbytes, nbytes, __ATOMIC_RELEASE);
        __atomic_store_n(&known[free_slot].w, w, __ATOMIC_RELEASE);
        if (free_slot == n) __atomic_store_n(&nknown, n + 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&known_lock);
    return ok;
}

/* The region at w is about to be unmapped. */
void aiodb_forget_region(uint64_t *w) {
    pthread_mutex_lock(&known_lock);
    for (int i = 0; i < nknown; i++)
        if (known[i].w == w) __atomic_store_n(&known[i].w, (uint64_t *)NULL, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&known_lock);
}

/* Bytes in the region at w; 0 (every check fails) for one never recorded. */
static inline uint64_t region_bytes(const uint64_t *w) {
    int n = __atomic_load_n(&nknown, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++)
        if (__atomic_load_n(&known[i].w, __ATOMIC_ACQUIRE) == w)
            return __atomic_load_n(&known[i].nbytes, __ATOMIC_ACQUIRE);
    return 0;
}

/* A buffer header at byte offset off lies wholly inside a region of nbytes, word aligned,
   past the region header (offset 0 means "none" and is never followed). */
static inline int bh_ok(uint64_t off, uint64_t nbytes) {
    return off >= 64 && !(off & 7) && off <= nbytes && nbytes - off >= L[L_BH_DATA];
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

/* How long lock() waits for a held mutex before giving up with -ETIMEDOUT (nanoseconds). */
static int64_t lock_wait_ns = 1000000000;

void aiodb_set_lock_wait(int64_t ns) { lock_wait_ns = ns; }

/* Lock, waiting a bounded time if it is held (counted as a wait): a holder that is stopped
   must not freeze the caller. Returns 0 with the mutex held, or -errno: -EOWNERDEAD with it
   held (the caller must repair or panic), any other (-ETIMEDOUT: still held) without.
   wait == 0 is the try-lock mode of callers on an event loop: a held mutex gives -EBUSY at
   once (nothing waited for), and the Python side backs off asynchronously and retries. */
static int64_t lock(uint64_t *w, void *mutex, uint64_t nowait_w, int wait) {
    int64_t rc = try_lock(w, mutex, nowait_w);
    if (rc != -EBUSY || !wait) return rc;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += lock_wait_ns / 1000000000;
    until.tv_nsec += lock_wait_ns % 1000000000;
    if (until.tv_nsec >= 1000000000) { until.tv_sec++; until.tv_nsec -= 1000000000; }
    int r = pthread_mutex_timedlock((pthread_mutex_t *)mutex, &until);
    if (r == 0 || r == EOWNERDEAD) w[nowait_w - L[L_WAITS_FROM_NOWAITS]]++;
    return r ? -(int64_t)r : 0;
}

/* When a buffer's first pin was taken: CLOCK_MONOTONIC_COARSE (system-wide, so comparable
   across processes; a vDSO read of a few ns, where CLOCK_MONOTONIC costs more). */
static uint64_t pin_clock(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* The pin count of registry slot `slot` in the buffer at word x (16 bits per slot). */
static inline uint16_t *slot_pins(uint64_t *w, uint64_t x, uint64_t slot) {
    return (uint16_t *)(w + x + L[L_H_PINS]) + slot;
}

/* Pin page `pgno` of file `tag` if it is in the chain at w[head_w] and not being read,
   counting the pin in registry slot `slot` too (ref is the sum of the slots' counts; both
   change under the bucket mutex, so a holder killed between them is repaired by recounting).
   Returns its buffer offset (> 0), 0 if absent, being read or the slot's count is full, or a
   negative lock result. */
int64_t aiodb_pin_hit(uint64_t *w, void *mutex, uint64_t nowait_w, uint64_t head_w,
                      uint64_t pgno, uint64_t tag, uint64_t *examined, uint64_t slot) {
    uint64_t nbytes = region_bytes(w);
    if (head_w >= nbytes / 8) return AIODB_CORRUPT;
    int64_t rc = try_lock(w, mutex, nowait_w);
    if (rc) return rc;
    uint64_t n = 1, off = w[head_w];
    /* A chain longer than the region has room for buffers loops. */
    uint64_t most = nbytes / L[L_BH_DATA] + 1;
    while (off) {
        if (!bh_ok(off, nbytes) || n > most) { off = (uint64_t)AIODB_CORRUPT; break; }
        uint64_t x = off >> 3;
        if (w[x + L[L_H_PGNO]] == pgno && w[x + L[L_H_FILE]] == tag) {
            uint64_t size = w[x + L[L_H_SIZE]];
            uint16_t *mine = slot_pins(w, x, slot);
            if (size > nbytes - off - L[L_BH_DATA]) off = (uint64_t)AIODB_CORRUPT;
            else if ((w[x + L[L_H_FLAGS]] & L[L_BH_READING]) || *mine == 0xFFFF) off = 0;
            else {
                if (w[x + L[L_H_REF]]++ == 0) w[x + L[L_H_PINAT]] = pin_clock();
                (*mine)++;
            }
            break;
        }
        off = w[x + L[L_H_NEXT]];
        n++;
    }
    unlock(mutex);
    *examined = n;
    return (int64_t)off;
}

/* Unpin the buffer at word x with PAGE_* flags, as registry slot `slot`. Returns 1 if its
   last pin went, 0 if pins remain, 2 if it had no pin of that slot (an over-unpin), or a
   negative lock result (nothing done). */
static int unpin(uint64_t *w, void *mutex, uint64_t nowait_w, uint64_t x, uint64_t bucket_w,
                 uint64_t hdr_w, int flags, uint64_t slot) {
    int64_t rc = try_lock(w, mutex, nowait_w);
    if (rc) return (int)rc;
    uint64_t bh = w[x + L[L_H_FLAGS]];
    if (flags & L[L_PAGE_DIRTY]) {
        /* Dirtied while a copy is being written: that copy is stale, its write must not
           clean the page (REDIRTIED). DIRTY itself stays set during a write. */
        uint64_t nf = bh | L[L_BH_DIRTY] | ((bh & L[L_BH_WRITING]) ? L[L_BH_REDIRTIED] : 0);
        if (!(bh & L[L_BH_DIRTY])) w[bucket_w + L[L_B_DIRTY]]++;
        if (nf != bh) w[x + L[L_H_FLAGS]] = nf;
    } else if ((flags & L[L_PAGE_CLEAN]) && (bh & L[L_BH_DIRTY])) {
        w[x + L[L_H_FLAGS]] = bh & ~(L[L_BH_DIRTY] | L[L_BH_REDIRTIED]);
        w[bucket_w + L[L_B_DIRTY]]--;
    }
    int result;
    uint64_t ref = w[x + L[L_H_REF]];
    uint16_t *mine = slot_pins(w, x, slot);
    if (!ref || !*mine) {
        result = 2;
    } else if (--ref) {
        w[x + L[L_H_REF]] = ref;
        (*mine)--;
        result = 0;
    } else {
        w[x + L[L_H_REF]] = 0;
        (*mine)--;
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

/* The per-cache arrays mutexes[], nowait_w[] and bucket_w[] are indexed by bucket number;
   mutexes[b] is NULL in a private region. */

/* The hit path of a pool with one cache, whole: hash (fidx, pgno) to its bucket (the C twin
   of aiodbenv.mpool.cache.bucket_hash, with its HASH_PGNO, HASH_FILE and HASH_MASK), search
   and pin (aiodb_pin_hit), and count the hit in the handle's statistics: *hits is the file's
   hit counter, *extra the handle's "examined beyond the first" counter, *longest its longest
   chain (all in region 0). *bucket gets the bucket. Returns as aiodb_pin_hit. */
int64_t aiodb_pin_one_cache(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                            const uint64_t *bucket_w, uint64_t nb, uint64_t fidx, uint64_t pgno,
                            uint64_t *hits, uint64_t *extra, uint64_t *longest,
                            uint64_t *bucket, uint64_t slot) {
    uint64_t h = (pgno * 0x9E3779B1ULL + fidx * 509ULL) & 0xFFFFFFFFFFFFULL;
    uint64_t b = h % nb, examined;
    *bucket = b;
    int64_t off = aiodb_pin_hit(w, mutexes[b], nowait_w[b], bucket_w[b] + L[L_B_HEAD], pgno,
                                fidx + 1, &examined, slot);
    if (off > 0) {
        (*hits)++;
        if (examined > 1) {
            *extra += examined - 1;
            if (examined > *longest) *longest = examined;
        }
    }
    return off;
}

/* Unpin the buffer at word x of bucket b (see unpin), taking the per-cache arrays. */
int aiodb_unpin_at(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                   const uint64_t *bucket_w, uint64_t b, uint64_t x, uint64_t hdr_w, int flags,
                   uint64_t slot) {
    return unpin(w, mutexes[b], nowait_w[b], x, bucket_w[b], hdr_w, flags, slot);
}

/* Write-back, step 1, for a batch of n buffers (bucket[i], bh[i]): lock the bucket; if the
   buffer still holds page pgno[i] of file tag[i], is dirty, unpinned and not under I/O, claim
   it: WRITING by `pid` (DIRTY stays set; REDIRTIED cleared) and copy its page to
   dst + dst_off[i]: status[i] = 1. A pinned or busy one: status 2; one evicted, reused or
   cleaned meanwhile: 0. Returns n, or the index of an item whose lock failed, with status
   -errno (for -EOWNERDEAD its mutex is held), or of an item whose offset or recorded page
   size fails its check, with status AIODB_CORRUPT (unlocked, nothing changed). On entry
   status[i] holds the size of item i's slot in dst: a buffer whose page size differs is
   corrupt (copying it would overrun the slot). wait: 0 only tries each bucket's lock (a held
   one returns its index with status -EBUSY, nothing changed: the event loop's mode), else
   waits the bounded lock_wait_ns. */
int64_t aiodb_snapshot(uint64_t *w, char *base, void **mutexes, const uint64_t *nowait_w,
                       const uint64_t *bucket_w, uint64_t n, const uint64_t *bucket,
                       const uint64_t *bh, const uint64_t *tag, const uint64_t *pgno, char *dst,
                       const uint64_t *dst_off, uint64_t pid, int64_t *status, int wait) {
    uint64_t nbytes = region_bytes(w);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t b = bucket[i];
        int64_t rc = lock(w, mutexes[b], nowait_w[b], wait);
        if (rc) { status[i] = rc; return (int64_t)i; }
        uint64_t x = bh[i] >> 3, slot = (uint64_t)status[i];
        if (!bh_ok(bh[i], nbytes)) {
            unlock(mutexes[b]);
            status[i] = AIODB_CORRUPT;
            return (int64_t)i;
        }
        uint64_t flags = w[x + L[L_H_FLAGS]];
        if (w[x + L[L_H_FILE]] != tag[i] || w[x + L[L_H_PGNO]] != pgno[i]
                || !(flags & L[L_BH_DIRTY])) {
            status[i] = 0;
        } else if (w[x + L[L_H_REF]] || (flags & (L[L_BH_READING] | L[L_BH_WRITING]))) {
            status[i] = 2;
        } else {
            uint64_t size = w[x + L[L_H_SIZE]];
            if (size != slot || size > nbytes - bh[i] - L[L_BH_DATA]) {
                /* Checked before anything changes: the Python twin reports it. */
                unlock(mutexes[b]);
                status[i] = AIODB_CORRUPT;
                return (int64_t)i;
            }
            w[x + L[L_H_FLAGS]] = (flags & ~L[L_BH_REDIRTIED]) | L[L_BH_WRITING];
            w[x + L[L_H_IOPID]] = pid;
            memcpy(dst + dst_off[i], base + bh[i] + L[L_BH_DATA], size);
            status[i] = 1;
        }
        unlock(mutexes[b]);
    }
    return (int64_t)n;
}

/* Write-back, step 2: release the claims `pid` holds on n buffers. A buffer whose write
   succeeded (!failed[i]) and that was not dirtied again meanwhile (no REDIRTIED) is clean; any
   other stays dirty. A buffer that no longer carries this claim (taken over, or holding
   another page) is left alone. Returns n, or the index of an item whose lock failed
   (-EOWNERDEAD: its mutex is held). wait: as for aiodb_snapshot. */
int64_t aiodb_write_done(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                         const uint64_t *bucket_w, uint64_t n, const uint64_t *bucket,
                         const uint64_t *bh, const uint64_t *tag, const uint64_t *pgno,
                         uint64_t pid, const uint8_t *failed, int wait) {
    for (uint64_t i = 0; i < n; i++) {
        uint64_t b = bucket[i];
        if (lock(w, mutexes[b], nowait_w[b], wait)) return (int64_t)i;
        uint64_t x = bh[i] >> 3;
        uint64_t flags = w[x + L[L_H_FLAGS]];
        if ((flags & L[L_BH_WRITING]) && w[x + L[L_H_IOPID]] == pid
                && w[x + L[L_H_FILE]] == tag[i] && w[x + L[L_H_PGNO]] == pgno[i]) {
            if (!failed[i] && (flags & L[L_BH_DIRTY]) && !(flags & L[L_BH_REDIRTIED])) {
                flags &= ~L[L_BH_DIRTY];
                w[bucket_w[b] + L[L_B_DIRTY]]--;
            }
            w[x + L[L_H_FLAGS]] = flags & ~(L[L_BH_WRITING] | L[L_BH_REDIRTIED]);
            w[x + L[L_H_IOPID]] = 0;
        }
        unlock(mutexes[b]);
    }
    return (int64_t)n;
}

/* Collect the dirty buffers of buckets first..last-1 (skipping buckets whose dirty count is
   0 without locking them): file tag, pgno, buffer offset, bucket, priority, and whether it is
   busy: 2 if a writer claims it (WRITING), 1 if pinned or being read, else 0. Stops early
   when max entries are out or a lock fails; *stopped is the bucket to resume from. Returns
   the entries written, or -errno for a failed lock of bucket *stopped (-EOWNERDEAD: its
   mutex is held). */
int64_t aiodb_collect(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                      const uint64_t *bucket_w, uint64_t first, uint64_t last, uint64_t max,
                      uint64_t *tag, uint64_t *pgno, uint64_t *bh, uint64_t *bucket,
                      uint64_t *prio, uint8_t *busy, uint64_t *stopped) {
    uint64_t n = 0, nbytes = region_bytes(w), most = nbytes / L[L_BH_DATA] + 1;
    for (uint64_t b = first; b < last; b++) {
        uint64_t bw = bucket_w[b];
        if (bw + L[L_B_DIRTY] >= nbytes / 8 || w[bw + L[L_B_DIRTY]] > most) {
            *stopped = b;
            return AIODB_CORRUPT;
        }
        if (!w[bw + L[L_B_DIRTY]]) continue;
        if (n + w[bw + L[L_B_DIRTY]] + 8 > max) { *stopped = b; return (int64_t)n; }
        /* Never wait here: the caller runs on the event loop and waits for a held bucket
           asynchronously (-EBUSY), then calls again from that bucket. */
        int64_t rc = try_lock(w, mutexes[b], nowait_w[b]);
        if (rc) { *stopped = b; return rc; }
        uint64_t walked = 0;
        for (uint64_t off = w[bw + L[L_B_HEAD]]; off && n < max; ) {
            if (!bh_ok(off, nbytes) || ++walked > most) {
                unlock(mutexes[b]);
                *stopped = b;
                return AIODB_CORRUPT;
            }
            uint64_t x = off >> 3;
            uint64_t flags = w[x + L[L_H_FLAGS]];
            if (flags & L[L_BH_DIRTY]) {
                tag[n] = w[x + L[L_H_FILE]];
                pgno[n] = w[x + L[L_H_PGNO]];
                bh[n] = off;
                bucket[n] = b;
                prio[n] = w[x + L[L_H_PRIO]];
                /* 2: claimed by a writer (maybe dead: the caller looks); 1: pinned or read */
                busy[n] = (flags & L[L_BH_WRITING]) ? 2
                          : (w[x + L[L_H_REF]] || (flags & L[L_BH_READING])) ? 1 : 0;
                n++;
            }
            off = w[x + L[L_H_NEXT]];
        }
        unlock(mutexes[b]);
    }
    *stopped = last;
    return (int64_t)n;
}
""".replace("@LAYOUT_ENUM@", c_enum())

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
