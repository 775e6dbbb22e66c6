/* Write-back in one worker-thread call per chunk (aiodbenv/mpool/csync.py drives it).

   Everything here runs in a worker thread with the GIL released: the event loop only awaits.
   Bucket locks are taken with lock()'s bounded wait (the same thread locks and unlocks, so
   robust mutexes are fine). The claim protocol is aiodb_snapshot's and aiodb_write_done's:
   a claimed buffer is flagged WRITING with io_pid = the writer and keeps DIRTY until its
   write is confirmed, so a writer killed anywhere in between leaves the page dirty with a
   claim the reaper or the next sync takes over (their _take_over_dead_claims/take_over_claim).

   Entries are 7 words (aiodb_sync_ent): file tag, pgno, buffer offset, bucket, priority, state
   and cache index. A cache is described by 5 pointers in a table (see SYNC_TAB_*). */
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

typedef struct {
    uint64_t tag, pgno, bh, bucket, prio, state, cache;
} aiodb_sync_ent;

enum { SYNC_TAB_W, SYNC_TAB_BASE, SYNC_TAB_MUTEXES, SYNC_TAB_NOWAIT, SYNC_TAB_BUCKET_W,
       SYNC_TAB_N };

/* Entry states. From collect: SYNC_FREE/PINNED/CLAIMED (the buffer as found). From claim:
   SYNC_TAKEN (claimed by us, copied), SYNC_BUSY (pinned, read or claimed meanwhile, or its
   bucket stayed locked), SYNC_GONE (evicted, reused or cleaned meanwhile). From write:
   SYNC_WRITTEN (its run's pwrite returned in full). */
enum { SYNC_FREE = 0, SYNC_PINNED = 1, SYNC_CLAIMED = 2, SYNC_TAKEN = 3, SYNC_BUSY = 4,
       SYNC_GONE = 5, SYNC_WRITTEN = 6 };

#define SYNC_TAB(tab, c, k) ((tab)[(c) * SYNC_TAB_N + (k)])

/* Collect the dirty buffers of buckets first..nb-1 of cache number `cache`: an entry for each.
   Those of files whose route[tag] is 1 and that are free (not pinned, read or claimed) are
   appended at out[*nfast...] (the compiled write path); every other dirty buffer of a file
   whose route is not 0 (including tags outside the route table: the caller checks them) at
   out[max - 1 - *nother] downward, for the Python path. Returns 0 when done; -errno for a
   lock that failed in bucket *stopped (-EOWNERDEAD: its mutex is held by this thread, the
   caller repairs and calls again from there; -ETIMEDOUT: held by someone who did not let go;
   -ENOBUFS: max entries were not enough). below != 0 leaves out buffers whose priority stamp
   is not below it (the recently used ones: eviction's batch of dirty victims).
   AIODB_CORRUPT for a bad offset, count or a looping chain (*stopped: the bucket). */
int64_t aiodb_sync_collect(void **tab, uint64_t cache, uint64_t first, uint64_t nb,
                           const uint8_t *route, uint64_t nroute, uint64_t below,
                           uint64_t *out, uint64_t max, uint64_t *nfast, uint64_t *nother,
                           uint64_t *stopped) {
    uint64_t *w = SYNC_TAB(tab, cache, SYNC_TAB_W);
    void **mutexes = SYNC_TAB(tab, cache, SYNC_TAB_MUTEXES);
    const uint64_t *nowait_w = SYNC_TAB(tab, cache, SYNC_TAB_NOWAIT);
    const uint64_t *bucket_w = SYNC_TAB(tab, cache, SYNC_TAB_BUCKET_W);
    aiodb_sync_ent *ent = (aiodb_sync_ent *)out;
    uint64_t nbytes = region_bytes(w), most = nbytes / L[L_BH_DATA] + 1;
    uint64_t nf = *nfast, no = *nother;
    for (uint64_t b = first; b < nb; b++) {
        uint64_t bw = bucket_w[b];
        if (bw + L[L_B_DIRTY] >= nbytes / 8 || w[bw + L[L_B_DIRTY]] > most) {
            *stopped = b;
            return AIODB_CORRUPT;
        }
        if (!w[bw + L[L_B_DIRTY]]) continue;
        int64_t rc = lock(w, mutexes[b], nowait_w[b], 1);
        if (rc) { *stopped = b; *nfast = nf; *nother = no; return rc; }
        uint64_t walked = 0;
        for (uint64_t off = w[bw + L[L_B_HEAD]]; off; ) {
            if (!bh_ok(off, nbytes) || ++walked > most) {
                unlock(mutexes[b]);
                *stopped = b;
                return AIODB_CORRUPT;
            }
            if (nf + no >= max) {  /* more dirty buffers than the caller made room for */
                unlock(mutexes[b]);
                *stopped = b;
                *nfast = nf;  /* the entries made so far are whole: a caller may use them */
                *nother = no;
                return -ENOBUFS;
            }
            uint64_t x = off >> 3, flags = w[x + L[L_H_FLAGS]];
            if (flags & L[L_BH_DIRTY]) {
                uint64_t tag = w[x + L[L_H_FILE]];
                uint8_t r = tag < nroute ? route[tag] : 2;
                if (below && w[x + L[L_H_PRIO]] >= below) r = 0;  /* used too recently */
                if (r) {
                    uint64_t latch;
                    uint64_t busy = (flags & L[L_BH_WRITING]) ? SYNC_CLAIMED
                        : wb_busy(w, x, flags, &latch) ? SYNC_PINNED
                        : SYNC_FREE;
                    aiodb_sync_ent *e = (r == 1 && busy == SYNC_FREE) ? &ent[nf++]
                                                                        : &ent[max - 1 - no++];
                    e->tag = tag;
                    e->pgno = w[x + L[L_H_PGNO]];
                    e->bh = off;
                    e->bucket = b;
                    e->prio = w[x + L[L_H_PRIO]];
                    e->state = busy;
                    e->cache = cache;
                }
            }
            off = w[x + L[L_H_NEXT]];
        }
        unlock(mutexes[b]);
    }
    *stopped = nb;
    *nfast = nf;
    *nother = no;
    return 0;
}

static int sync_by_page(const void *a, const void *b) {
    const aiodb_sync_ent *x = a, *y = b;
    if (x->tag != y->tag) return x->tag < y->tag ? -1 : 1;
    if (x->pgno != y->pgno) return x->pgno < y->pgno ? -1 : 1;
    return 0;
}

static int sync_by_prio(const void *a, const void *b) {
    const aiodb_sync_ent *x = a, *y = b;
    if (x->prio != y->prio) return x->prio < y->prio ? -1 : 1;
    return sync_by_page(a, b);
}

/* Order n entries for writing: by file and page; with limit > 0, only the `limit` least
   recently used (lowest priority stamps) are kept (trickle's rule). Returns the count kept. */
uint64_t aiodb_sync_order(uint64_t *out, uint64_t n, uint64_t limit) {
    aiodb_sync_ent *ent = (aiodb_sync_ent *)out;
    if (limit && limit < n) {
        qsort(ent, n, sizeof *ent, sync_by_prio);
        n = limit;
    }
    qsort(ent, n, sizeof *ent, sync_by_page);
    return n;
}

/* Claim entries lo..hi-1 (all of one file, pages of ps bytes): lock each bucket; a buffer
   still holding that page, dirty, unpinned and not under I/O is flagged WRITING by pid
   (REDIRTIED cleared, DIRTY kept), its page copied to stage + (i - lo) * ps: SYNC_TAKEN;
   pinned or busy, or a bucket that stayed locked: SYNC_BUSY; else SYNC_GONE. With
   lsn_off >= 0, *max_lsn is raised to the largest LSN (file << 32 | offset, the two
   little-endian u32 at lsn_off of a copy) among the pages taken. Returns 0 when done, or
   -EOWNERDEAD (mutex held by this thread: the caller repairs and calls again from *at) or
   AIODB_CORRUPT (entry *at: bad offset or page size; nothing changed for it). */
int64_t aiodb_sync_claim(void **tab, uint64_t *out, uint64_t lo, uint64_t hi, uint64_t ps,
                         char *stage, uint64_t pid, int64_t lsn_off, uint64_t *max_lsn,
                         uint64_t *at) {
    aiodb_sync_ent *ent = (aiodb_sync_ent *)out;
    for (uint64_t i = lo; i < hi; i++) {
        aiodb_sync_ent *e = &ent[i];
        uint64_t *w = SYNC_TAB(tab, e->cache, SYNC_TAB_W);
        char *base = SYNC_TAB(tab, e->cache, SYNC_TAB_BASE);
        void **mutexes = SYNC_TAB(tab, e->cache, SYNC_TAB_MUTEXES);
        const uint64_t *nowait_w = SYNC_TAB(tab, e->cache, SYNC_TAB_NOWAIT);
        uint64_t nbytes = region_bytes(w);
        if (!bh_ok(e->bh, nbytes)) { *at = i; return AIODB_CORRUPT; }
        int64_t rc = lock(w, mutexes[e->bucket], nowait_w[e->bucket], 1);
        if (rc == -EOWNERDEAD) { *at = i; return rc; }
        if (rc) { e->state = SYNC_BUSY; continue; }  /* held past the bound: retried later */
        uint64_t x = e->bh >> 3, flags = w[x + L[L_H_FLAGS]], latch;
        if (w[x + L[L_H_FILE]] != e->tag || w[x + L[L_H_PGNO]] != e->pgno
                || !(flags & L[L_BH_DIRTY])) {
            e->state = SYNC_GONE;
        } else if (wb_busy(w, x, flags, &latch)) {
            e->state = SYNC_BUSY;
        } else {
            uint64_t size = w[x + L[L_H_SIZE]], was = w[x + L[L_H_IOPID]];
            if (size != ps || size > nbytes - e->bh - L[L_BH_DATA]) {
                unlock(mutexes[e->bucket]);
                *at = i;
                return AIODB_CORRUPT;
            }
            w[x + L[L_H_FLAGS]] = (flags & ~L[L_BH_REDIRTIED]) | L[L_BH_WRITING];
            w[x + L[L_H_IOPID]] = pid;
            char *dst = stage + (i - lo) * ps;
            memcpy(dst, base + e->bh + L[L_BH_DATA], size);
            e->state = SYNC_TAKEN;
            if (latch && !wb_latch_kept(w, x, latch)) {
                /* A commit began or ended during the copy (see wb_busy): not taken. */
                w[x + L[L_H_FLAGS]] = flags;
                w[x + L[L_H_IOPID]] = was;
                e->state = SYNC_BUSY;
            } else if (lsn_off >= 0 && (uint64_t)lsn_off + 8 <= ps) {
                const unsigned char *p = (const unsigned char *)dst + lsn_off;
                uint64_t file = p[0] | p[1] << 8 | p[2] << 16 | (uint64_t)p[3] << 24;
                uint64_t off = p[4] | p[5] << 8 | p[6] << 16 | (uint64_t)p[7] << 24;
                uint64_t lsn = file << 32 | off;
                if (lsn > *max_lsn) *max_lsn = lsn;
            }
        }
        unlock(mutexes[e->bucket]);
    }
    return 0;
}

/* The seam of the compiled writes: when set (aiodbenv/mpool/csync.py sets it while a test
   injects faults, records calls or plans crash signals through aiodbenv/_io.py), every write
   goes through hook(fd, buf, len, off) -- Python's _io.pwritev, returning the bytes written or
   -errno -- instead of pwrite, so the fault and crash suites exercise this path. */
typedef int64_t (*aiodb_sync_hook)(int fd, const char *buf, uint64_t len, uint64_t off);

static int64_t sync_pwrite_all(int fd, const char *buf, uint64_t len, uint64_t off,
                               aiodb_sync_hook hook, uint64_t *calls) {
    while (len) {
        int64_t n = hook ? hook(fd, buf, len, off) : (int64_t)pwrite(fd, buf, len, (off_t)off);
        if (n < 0) {
            int64_t err = hook ? n : -(int64_t)errno;
            if (err == -EINTR) continue;
            return err;
        }
        (*calls)++;
        if (n == 0) return -EIO;  /* nothing written: a full disk answers the next call */
        if ((uint64_t)n > len) return -EIO;
        buf += n;
        off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

/* Write the SYNC_TAKEN entries of lo..hi-1 (one file, pages of ps bytes, copied in order at
   stage + (i - lo) * ps) through fd: each run of adjacent pages up to max_run pages with one
   pwrite (the copies of a run are contiguous in stage), and sync_file_range(WRITE) after every
   srf_every bytes (0: never) so the disk starts early. Written entries become SYNC_WRITTEN.
   counts[0..2] += pages written, write calls, bytes. Returns 0, or -errno of the first failed
   write: the entries not written keep SYNC_TAKEN (released as failed: they stay dirty). */
int64_t aiodb_sync_write(uint64_t *out, uint64_t lo, uint64_t hi, uint64_t ps,
                         const char *stage, int fd, uint64_t max_run, uint64_t srf_every,
                         aiodb_sync_hook hook, uint64_t *counts) {
    aiodb_sync_ent *ent = (aiodb_sync_ent *)out;
    uint64_t since = 0, srf_from = 0, srf_started = 0;
    for (uint64_t i = lo; i < hi; ) {
        if (ent[i].state != SYNC_TAKEN) { i++; continue; }
        uint64_t j = i + 1;
        while (j < hi && j - i < max_run && ent[j].state == SYNC_TAKEN
               && ent[j].pgno == ent[j - 1].pgno + 1)
            j++;
        uint64_t off = ent[i].pgno * ps, len = (j - i) * ps;
        int64_t rc = sync_pwrite_all(fd, stage + (i - lo) * ps, len, off, hook, &counts[1]);
        if (rc) return rc;
        for (uint64_t k = i; k < j; k++) ent[k].state = SYNC_WRITTEN;
        counts[0] += j - i;
        counts[2] += len;
        if (srf_every) {
            if (!srf_started) { srf_from = off; srf_started = 1; }
            since += len;
            if (since >= srf_every || off < srf_from) {
                /* A hint: its failure changes nothing (the fsync reports real errors). */
                uint64_t end = off + len;
                if (end > srf_from)
                    (void)sync_file_range(fd, (off_t)srf_from, (off_t)(end - srf_from),
                                          SYNC_FILE_RANGE_WRITE);
                srf_from = end;
                since = 0;
            }
        }
        i = j;
    }
    return 0;
}

/* Release this process's claims on entries lo..hi-1 that carry one (SYNC_TAKEN: not written,
   SYNC_WRITTEN: written): a page written (and ok: its file's written generation was bumped)
   and not dirtied again meanwhile is clean; every other stays dirty. A buffer that no longer
   carries this claim (taken over, reused) is left alone. *cleaned += pages made clean.
   Returns 0, or -EOWNERDEAD (the mutex is held by this thread: the caller repairs and calls
   again from *at), or AIODB_CORRUPT (entry *at: a dirty count already 0). A bucket that
   stays locked past the bound: -ETIMEDOUT at *at (the claim is still held; the caller
   releases the rest its own way). */
int64_t aiodb_sync_release(void **tab, uint64_t *out, uint64_t lo, uint64_t hi, uint64_t pid,
                           int ok, uint64_t *at, uint64_t *cleaned) {
    aiodb_sync_ent *ent = (aiodb_sync_ent *)out;
    for (uint64_t i = lo; i < hi; i++) {
        aiodb_sync_ent *e = &ent[i];
        if (e->state != SYNC_TAKEN && e->state != SYNC_WRITTEN) continue;
        uint64_t *w = SYNC_TAB(tab, e->cache, SYNC_TAB_W);
        void **mutexes = SYNC_TAB(tab, e->cache, SYNC_TAB_MUTEXES);
        const uint64_t *nowait_w = SYNC_TAB(tab, e->cache, SYNC_TAB_NOWAIT);
        const uint64_t *bucket_w = SYNC_TAB(tab, e->cache, SYNC_TAB_BUCKET_W);
        int64_t rc = lock(w, mutexes[e->bucket], nowait_w[e->bucket], 1);
        if (rc) { *at = i; return rc; }
        uint64_t x = e->bh >> 3, flags = w[x + L[L_H_FLAGS]];
        if ((flags & L[L_BH_WRITING]) && w[x + L[L_H_IOPID]] == pid
                && w[x + L[L_H_FILE]] == e->tag && w[x + L[L_H_PGNO]] == e->pgno) {
            if (ok && e->state == SYNC_WRITTEN && (flags & L[L_BH_DIRTY])
                    && !(flags & L[L_BH_REDIRTIED])) {
                uint64_t dw = bucket_w[e->bucket] + L[L_B_DIRTY];
                if (!w[dw]) {
                    unlock(mutexes[e->bucket]);
                    *at = i;
                    return AIODB_CORRUPT;
                }
                flags &= ~L[L_BH_DIRTY];
                w[dw]--;
                (*cleaned)++;
            }
            w[x + L[L_H_FLAGS]] = flags & ~(L[L_BH_WRITING] | L[L_BH_REDIRTIED]);
            w[x + L[L_H_IOPID]] = 0;
        }
        unlock(mutexes[e->bucket]);
    }
    return 0;
}

/* The (tag, pgno) of the entries of lo..hi-1 in `state`, as pairs at dst (room for max
   pairs); returns how many there are (those past max are counted, not stored). */
uint64_t aiodb_sync_pick(const uint64_t *out, uint64_t lo, uint64_t hi, uint64_t state,
                         uint64_t *dst, uint64_t max) {
    const aiodb_sync_ent *ent = (const aiodb_sync_ent *)out;
    uint64_t k = 0;
    for (uint64_t i = lo; i < hi; i++)
        if (ent[i].state == state) {
            if (k < max) { dst[2 * k] = ent[i].tag; dst[2 * k + 1] = ent[i].pgno; }
            k++;
        }
    return k;
}
