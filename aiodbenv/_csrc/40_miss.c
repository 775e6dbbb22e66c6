/* A miss in one call (the Python side is aiodbenv/mpool/miss.py): for a page not cached,
   choose a clean victim with the policy of aiodbenv.mpool.alloc.PoolCore.find_victim, unlink
   it, link it again as the page (READING, pinned by this slot), read the page with
   preadv2(RWF_NOWAIT) and publish it. Every step runs under its bucket mutex, one at a time,
   through the same states as the Python path (alloc.unlink_victim, fget._insert,
   bhread._publish), so that a process killed anywhere inside leaves only what the reaper and
   reclaim_lost_buffers already clean up: an unlinked frame tagged with this pid, or a linked
   buffer READING with io_pid = this pid and this slot's pin.

   Whatever it cannot do alone it hands back at the step it reached (out[0]):
   AIODB_MISS_FALLBACK     nothing held: the Python path does the whole miss
                           (cache not full yet, page found in the chain, no clean victim of
                           this page size among the buckets searched, a busy mutex, ...);
   AIODB_MISS_FREE_FRAME   out[1] is a frame unlinked and tagged with this pid (the page was
                           linked meanwhile, or the bucket was busy): free it, then fall back;
   AIODB_MISS_FILL         out[1] is linked as the page, READING, pinned: the Python fill
                           path reads it (short read, EOF, an error, RWF_NOWAIT refused, a
                           busy mutex at publish);
   AIODB_MISS_FILL_DISK    the same, and RWF_NOWAIT said the page is not in the OS cache,
                           or was not tried (misses keep going to the disk: step 5).
   On success, out[0] is AIODB_MISS_DIRTY_MET when a dirty best was passed over for a clean
   frame (the caller then starts a batch of dirty victims), else AIODB_MISS_FALLBACK.
   out[2] is a bucket whose mutex is held because its holder died (-EOWNERDEAD) and must be
   repaired by the Python recovery call first, or AIODB_MISS_NONE.

   Mutexes are only tried (lock(..., 0)): this runs on the event loop, and the Python path
   waits for a held one asynchronously. */

#include <signal.h>
#include <sys/uio.h>
#include <unistd.h>

#define AIODB_MISS_FALLBACK 0
#define AIODB_MISS_FREE_FRAME 1
#define AIODB_MISS_FILL 2
#define AIODB_MISS_FILL_DISK 3
#define AIODB_MISS_DIRTY_MET 4
#define AIODB_MISS_NONE (~(uint64_t)0)

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008
#endif

/* Crash tests (tests/test_miss.py): the process SIGKILLs itself at step miss_kill_at of its
   first compiled miss that reaches it (0: never; set from AIODBENV_TEST_MISS_KILL by
   aiodbenv/mpool/miss.py). One compare per step when unset. */
static int miss_kill_at;

void aiodb_miss_test_kill(int step) { miss_kill_at = step; }

#define MISS_STEP(k) do { if (miss_kill_at == (k)) kill(getpid(), SIGKILL); } while (0)

/* Reads this process has at the disk through io_uring now (every ring's; 45_reader.c keeps
   it), and the misses in a row whose RWF_NOWAIT read found the page missing from the OS
   cache. See step 5 of aiodb_miss. Hints only: relaxed atomics, no lock. */
static int64_t reads_at_disk;
static uint32_t nowait_missed, nowait_passed;
static uint64_t nowait_skips; /* misses that skipped the attempt (aiodb_miss_nowait_skips) */

/* After this many RWF_NOWAIT reads in a row found the OS cache without the page, a miss with
   other reads at the disk skips the attempt; one in NOWAIT_PROBE of them tries anyway. */
#define NOWAIT_COLD_STREAK 4
#define NOWAIT_PROBE 16

/* Misses of this process that skipped their RWF_NOWAIT attempt so far (tests, diagnostics). */
uint64_t aiodb_miss_nowait_skips(void) { return __atomic_load_n(&nowait_skips, __ATOMIC_RELAXED); }

/* The counters a miss updates (pointers into region 0). */
enum { MISS_CTR_MISS, MISS_CTR_PAGE_IN, MISS_CTR_RO_EVICT, MISS_CTR_EXTRA, MISS_CTR_LONGEST };

/* Search the chain at w[head_w] for page pgno of file tag (caller holds its mutex). Returns
   its offset, 0 if absent, or AIODB_CORRUPT; *n is the number of buffers examined. */
static int64_t miss_find(const uint64_t *w, uint64_t nbytes, uint64_t head_w, uint64_t tag,
                         uint64_t pgno, uint64_t *n) {
    uint64_t most = nbytes / L[L_BH_DATA] + 1, off = w[head_w];
    *n = 1;
    while (off) {
        if (!bh_ok(off, nbytes) || *n > most) return AIODB_CORRUPT;
        uint64_t x = off >> 3;
        if (w[x + L[L_H_PGNO]] == pgno && w[x + L[L_H_FILE]] == tag) return (int64_t)off;
        off = w[x + L[L_H_NEXT]];
        (*n)++;
    }
    return 0;
}

/* Hand the step reached back to Python: status, frame, and the bucket held for a dead holder
   when rc (a failed lock) is -EOWNERDEAD. */
static int64_t miss_out(uint64_t *out, uint64_t status, uint64_t frame, int64_t rc, uint64_t b) {
    out[0] = status;
    out[1] = frame;
    out[2] = rc == -EOWNERDEAD ? b : AIODB_MISS_NONE;
    return 0;
}

/* What a handle's misses in one cache share, made once (aiodbenv/mpool/miss.py): the cache w
and its per-bucket arrays mutexes, nowait_w and bucket_w (nb buckets); whether the pool has
this one cache only (the call then hashes the page itself); the file's slot fidx and page size
ps; the handle's registry slot and pid; whether a dirty best is passed over for a clean
buffer (alloc.PoolCore.clean_first); ctr, its counters (see MISS_CTR_*). */
struct aiodb_miss_ctx {
    uint64_t *w;
    void **mutexes;
    const uint64_t *nowait_w;
    const uint64_t *bucket_w;
    uint64_t nb, one_cache, fidx, ps, slot, pid, clean_first;
    uint64_t **ctr;
};

/* The whole miss of page pgno of the context's file, read from fd, in bucket b (computed here
   when the pool has one cache: b is ignored). Returns the published buffer's offset (> 0:
   pinned once by the slot, the miss and the page-in counted), 0 with out[] saying what Python
   must do (see above), or AIODB_CORRUPT (out[1]: a frame held, if any). out[3] is the bucket. */
int64_t aiodb_miss(const struct aiodb_miss_ctx *ctx, uint64_t b, uint64_t pgno, int fd,
                   uint64_t *out) {
    uint64_t *w = ctx->w, nb = ctx->nb, ps = ctx->ps, slot = ctx->slot, pid = ctx->pid;
    uint64_t tag = ctx->fidx + 1, **ctr = ctx->ctr;
    void **mutexes = ctx->mutexes;
    const uint64_t *nowait_w = ctx->nowait_w, *bucket_w = ctx->bucket_w;
    /* The C twin of aiodbenv.mpool.cache.bucket_hash (as aiodb_pin_one_cache). */
    if (ctx->one_cache) b = ((pgno * 0x9E3779B1ULL + ctx->fidx * 509ULL) & 0xFFFFFFFFFFFFULL) % nb;
    out[3] = b;
    uint64_t nbytes = region_bytes(w), hdr = L[L_CACHE_HDR], limit_w = nbytes / 8;
    out[1] = 0;
    out[2] = AIODB_MISS_NONE;
    out[0] = AIODB_MISS_FALLBACK;
    if (b >= nb || hdr + L[L_C_PAGE_BYTES_USED] >= limit_w) return AIODB_CORRUPT;
    /* Free space in the cache's share: the Python path allocates (alloc_buffer). A hint read
       without the allocator mutex; a stale one only picks the other, equally correct path. */
    if (w[hdr + L[L_C_PAGE_BYTES_USED]] + ps <= w[hdr + L[L_C_PAGE_BYTES]]) return 0;
    uint64_t head_w = bucket_w[b] + L[L_B_HEAD];
    if (bucket_w[b] + L[L_B_COUNT] >= limit_w) return AIODB_CORRUPT;

    /* 1. Not cached? (fget._lookup_pin finds it otherwise: a page being read, say.) */
    int64_t rc = lock(w, mutexes[b], nowait_w[b], 0);
    if (rc) return miss_out(out, AIODB_MISS_FALLBACK, 0, rc, b);
    uint64_t examined;
    int64_t found = miss_find(w, nbytes, head_w, tag, pgno, &examined);
    unlock(mutexes[b]);
    if (found) return found < 0 ? found : 0;
    if (examined > 1) {
        *ctr[MISS_CTR_EXTRA] += examined - 1;
        if (examined > *ctr[MISS_CTR_LONGEST]) *ctr[MISS_CTR_LONGEST] = examined;
    }

    /* 2. The victim: alloc.find_victim, not aggressive. The lowest priority stamp among the
       unpinned buffers not under I/O of SEARCH_BUCKETS non-empty buckets from the hand,
       skipping the most recently used tenth. A dirty best goes to the Python path (which
       writes it), as does one of another page size (freed and allocated again there). */
    uint64_t hand_w = hdr + L[L_C_HAND];
    uint64_t start = w[hand_w] % nb, counter = w[hdr + L[L_C_LRU]];
    uint64_t tenth = w[hdr + L[L_C_BUFFERS]] / 10;
    if (tenth < 1) tenth = 1;
    /* Python's counter - tenth may be negative: then no stamp is old enough. */
    if (counter < tenth) return 0;
    uint64_t recent = counter - tenth, most = nbytes / L[L_BH_DATA] + 1;
    uint64_t best = 0, best_prio = 0, best_b = 0, best_tag = 0, best_pgno = 0, seen = 0;
    /* The best clean one too: taken instead of a dirty best (see step 2's comment). */
    uint64_t clean = 0, clean_prio = 0, clean_b = 0, clean_tag = 0, clean_pgno = 0;
    uint64_t stop = nb;
    for (uint64_t i = 0; i < nb; i++) {
        uint64_t vb = start + i;
        if (vb >= nb) vb -= nb;
        uint64_t bw = bucket_w[vb];
        if (bw + L[L_B_COUNT] >= limit_w) return AIODB_CORRUPT;
        if (!w[bw + L[L_B_COUNT]]) continue;
        seen++;
        rc = lock(w, mutexes[vb], nowait_w[vb], 0);
        if (rc) return miss_out(out, AIODB_MISS_FALLBACK, 0, rc, vb);
        uint64_t off = w[bw + L[L_B_HEAD]], walked = 0;
        while (off) {
            if (!bh_ok(off, nbytes) || ++walked > most) {
                unlock(mutexes[vb]);
                return AIODB_CORRUPT;
            }
            uint64_t h = off >> 3;
            if (!w[h + L[L_H_REF]]
                    && !(w[h + L[L_H_FLAGS]] & (L[L_BH_READING] | L[L_BH_WRITING]))) {
                uint64_t prio = w[h + L[L_H_PRIO]];
                if (prio < recent && (!best || prio < best_prio)) {
                    best = off;
                    best_prio = prio;
                    best_b = vb;
                    best_tag = w[h + L[L_H_FILE]];
                    best_pgno = w[h + L[L_H_PGNO]];
                }
                if (prio < recent && !(w[h + L[L_H_FLAGS]] & L[L_BH_DIRTY])
                        && (!clean || prio < clean_prio)) {
                    clean = off;
                    clean_prio = prio;
                    clean_b = vb;
                    clean_tag = w[h + L[L_H_FILE]];
                    clean_pgno = w[h + L[L_H_PGNO]];
                }
            }
            off = w[h + L[L_H_NEXT]];
        }
        unlock(mutexes[vb]);
        if (seen >= L[L_SEARCH_BUCKETS] && best) { stop = vb; break; }
    }
    if (!best) return 0; /* the Python path searches again, aggressively if need be */
    /* A dirty best with a clean one among the buckets searched: evict the clean one now and
       tell the caller (out[0] = AIODB_MISS_DIRTY_MET on success), who starts a batch that
       writes the dirty ones in a worker thread (aiodbenv/mpool/victims.py): a miss waits for
       a write only when the buckets it searched hold no clean page at all
       (alloc.PoolCore.find_victim chooses the same way). */
    uint64_t dirty_met = 0;
    if (best != clean && clean && ctx->clean_first) {
        dirty_met = 1;
        best = clean;
        best_b = clean_b;
        best_tag = clean_tag;
        best_pgno = clean_pgno;
    }

    /* 3. Unlink it (alloc.unlink_victim): re-checked under its mutex; tagged with this pid
       before it leaves the chain, so that if this process dies before linking it again,
       reclaim_lost_buffers frees it. */
    uint64_t bw = bucket_w[best_b], h = best >> 3;
    rc = lock(w, mutexes[best_b], nowait_w[best_b], 0);
    if (rc) return miss_out(out, AIODB_MISS_FALLBACK, 0, rc, best_b);
    uint64_t vflags = w[h + L[L_H_FLAGS]];
    if (w[h + L[L_H_REF]] || w[h + L[L_H_SIZE]] != ps
            || (vflags & (L[L_BH_READING] | L[L_BH_WRITING] | L[L_BH_DIRTY]))
            || w[h + L[L_H_FILE]] != best_tag || w[h + L[L_H_PGNO]] != best_pgno) {
        /* Dirty (Python writes it first), another page size, or changed meanwhile. */
        unlock(mutexes[best_b]);
        return 0;
    }
    if (ps > nbytes - best - L[L_BH_DATA]) {
        unlock(mutexes[best_b]);
        return AIODB_CORRUPT;
    }
    uint64_t prev = 0, cur = w[bw + L[L_B_HEAD]], walked = 0;
    while (cur && cur != best) {
        if (!bh_ok(cur, nbytes) || ++walked > most) {
            unlock(mutexes[best_b]);
            return AIODB_CORRUPT;
        }
        prev = cur;
        cur = w[(cur >> 3) + L[L_H_NEXT]];
    }
    if (!cur || !w[bw + L[L_B_COUNT]]) {
        unlock(mutexes[best_b]);
        return cur ? AIODB_CORRUPT : 0;
    }
    w[h - L[L_CHUNK_TAG]] = pid;
    MISS_STEP(1); /* tagged, still linked, mutex held */
    if (prev) w[(prev >> 3) + L[L_H_NEXT]] = w[h + L[L_H_NEXT]];
    else w[bw + L[L_B_HEAD]] = w[h + L[L_H_NEXT]];
    w[bw + L[L_B_COUNT]]--;
    w[h + L[L_H_FILE]] = 0;
    uint64_t next_hand = (stop == nb ? start : stop) + 1;
    w[hand_w] = next_hand == nb ? 0 : next_hand;
    unlock(mutexes[best_b]);
    (*ctr[MISS_CTR_RO_EVICT])++;
    MISS_STEP(2); /* unlinked, tagged: in no chain */

    /* 4. Link it as the page (fget._insert): READING, pinned once by this slot, io_pid = pid;
       one store of the head publishes the complete header. */
    rc = lock(w, mutexes[b], nowait_w[b], 0);
    if (rc) return miss_out(out, AIODB_MISS_FREE_FRAME, best, rc, b);
    found = miss_find(w, nbytes, head_w, tag, pgno, &examined);
    if (found) {
        unlock(mutexes[b]);
        out[0] = AIODB_MISS_FREE_FRAME;
        out[1] = best;
        return found < 0 ? found : 0;
    }
    memset(slot_pins(w, h, 0), 0, L[L_MAX_PROCS] * 2); /* a recycled frame keeps old counts */
    *slot_pins(w, h, slot) = 1;
    w[h + L[L_H_FILE]] = tag;
    w[h + L[L_H_PGNO]] = pgno;
    w[h + L[L_H_REF]] = 1;
    w[h + L[L_H_PINAT]] = pin_clock();
    w[h + L[L_H_LATCH]] = 0;
    w[h + L[L_H_FLAGS]] = L[L_BH_READING];
    w[h + L[L_H_PRIO]] = 0;
    w[h + L[L_H_SIZE]] = ps;
    w[h + L[L_H_IOPID]] = pid;
    w[h + L[L_H_NEXT]] = w[head_w];
    w[head_w] = best;
    MISS_STEP(3); /* linked, the count and the tag not yet, mutex held */
    w[bucket_w[b] + L[L_B_COUNT]]++;
    w[h - L[L_CHUNK_TAG]] = 0; /* alloc.settle_buffer: the chain owns it now */
    unlock(mutexes[b]);
    (*ctr[MISS_CTR_MISS])++;
    MISS_STEP(4); /* linked, READING, pinned, nothing read */

    /* 5. Read it, if the OS page cache has it. A RWF_NOWAIT read of a page the cache lacks
       still starts the disk read (readahead) before it says EAGAIN: a device notification
       of its own, in this thread, for every such miss (20-30 us on a virtual disk). While
       misses keep going to the disk and other io_uring reads of this process are at the
       disk already, the attempt is skipped: the io_uring reader then starts this read
       together with the others of the loop's turn, one notification for all
       (aiodbenv/mpool/uring.py). With no such read at the disk the miss still tries: its
       disk read starts now and overlaps the Python that hands it to the reader. The count
       is the process's, not the loop's: a miss of another loop (or of a pool reading
       through threads) may skip too while this one's reads are out, and then reads through
       its own reader -- slower by a hop for a page the OS had, never wrong. One skipped
       miss in NOWAIT_PROBE tries anyway, so a file back in the OS cache is read at once
       again. */
    if (__atomic_load_n(&nowait_missed, __ATOMIC_RELAXED) >= NOWAIT_COLD_STREAK &&
        __atomic_load_n(&reads_at_disk, __ATOMIC_RELAXED) > 0 &&
        __atomic_add_fetch(&nowait_passed, 1, __ATOMIC_RELAXED) % NOWAIT_PROBE) {
        __atomic_add_fetch(&nowait_skips, 1, __ATOMIC_RELAXED);
        out[0] = AIODB_MISS_FILL_DISK;
        out[1] = best;
        return 0;
    }
    struct iovec iov = { (char *)w + best + L[L_BH_DATA], ps };
    ssize_t got = preadv2(fd, &iov, 1, (off_t)(pgno * ps), RWF_NOWAIT);
    int cold = got < 0 && errno == EAGAIN;
    uint32_t streak = __atomic_load_n(&nowait_missed, __ATOMIC_RELAXED);
    streak = !cold ? 0 : streak < NOWAIT_COLD_STREAK ? streak + 1 : streak;
    __atomic_store_n(&nowait_missed, streak, __ATOMIC_RELAXED);
    if (got != (ssize_t)ps) {
        out[0] = cold ? AIODB_MISS_FILL_DISK : AIODB_MISS_FILL;
        out[1] = best;
        return 0;
    }

    MISS_STEP(5); /* read, still READING */

    /* 6. Publish (bhread._publish; a page read whole was not created: not dirty). */
    rc = lock(w, mutexes[b], nowait_w[b], 0);
    if (rc) return miss_out(out, AIODB_MISS_FILL, best, rc, b);
    w[h + L[L_H_FLAGS]] &= ~L[L_BH_READING];
    MISS_STEP(6); /* READING cleared, io_pid not yet, mutex held */
    w[h + L[L_H_IOPID]] = 0;
    unlock(mutexes[b]);
    (*ctr[MISS_CTR_PAGE_IN])++;
    MISS_STEP(7); /* published, pinned */
    if (dirty_met) out[0] = AIODB_MISS_DIRTY_MET;
    return (int64_t)best;
}

/* Publish buffer bh of bucket b, which a reader (io_uring or a reader thread) filled with its
   page read whole (bhread._publish for a page that was not created, as step 6 above): the
   completion of a miss that went to the disk, in one call instead of a Python critical
   section. 0 on success (the page-in counted); otherwise nothing is changed and the mutex is
   not held, except for -EOWNERDEAD, where it is held for a dead holder and the caller repairs
   it (cache.release_dead_holder) before publishing the Python way; -EBUSY when it is held;
   -EAGAIN when bh is not READING by this process (then the Python publish does what it
   did before this call existed); AIODB_CORRUPT when b or bh fails its check. */
int64_t aiodb_miss_publish(const struct aiodb_miss_ctx *ctx, uint64_t b, uint64_t bh) {
    uint64_t *w = ctx->w;
    uint64_t nbytes = region_bytes(w);
    if (b >= ctx->nb || !bh_ok(bh, nbytes)) return AIODB_CORRUPT;
    uint64_t h = bh >> 3;
    int64_t rc = lock(w, ctx->mutexes[b], ctx->nowait_w[b], 0);
    if (rc) return rc;
    if (!(w[h + L[L_H_FLAGS]] & L[L_BH_READING]) || w[h + L[L_H_IOPID]] != ctx->pid) {
        unlock(ctx->mutexes[b]);
        return -EAGAIN;
    }
    w[h + L[L_H_FLAGS]] &= ~L[L_BH_READING];
    w[h + L[L_H_IOPID]] = 0;
    unlock(ctx->mutexes[b]);
    (*ctx->ctr[MISS_CTR_PAGE_IN])++;
    return 0;
}
