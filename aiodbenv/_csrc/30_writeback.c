/* Write-back's view of a dirty buffer (the Python twin: layout.quiet_latch and its callers):
   busy if being read or written, or pinned -- unless a transaction holds its latch outside a
   commit. Such a buffer holds the last commit's bytes: nobody may change a buffer under a
   transaction's latch, and the transaction changes it only in its commit, which first flags
   the latch committing and then marks the buffer dirty under its bucket mutex (a claim made
   before the flag is then seen by the mark, which sets REDIRTIED); so a copy taken under the
   bucket mutex is whole, and not the last of the page, when the latch word reads the same
   after it (wb_latch_kept). Without this, transactions that keep hot pages latched would keep them
   out of every checkpoint. *latch: that word, 0 for an unpinned buffer. */
static inline int wb_busy(const uint64_t *w, uint64_t x, uint64_t flags, uint64_t *latch) {
    *latch = 0;
    if (flags & (L[L_BH_READING] | L[L_BH_WRITING])) return 1;
    if (!w[x + L[L_H_REF]]) return 0;
    uint64_t cur = __atomic_load_n(&w[x + L[L_H_LATCH]], __ATOMIC_ACQUIRE);
    if (!cur || (cur & (L[L_LATCH_COMMITTING] | L[L_LATCH_READER]))) return 1;
    *latch = cur;
    return 0;
}

/* After the copy of a buffer wb_busy let through on its latch word `latch`: is the copy whole
   (no commit began or ended meanwhile)? The fence orders the copy's loads before this one. */
static inline int wb_latch_kept(const uint64_t *w, uint64_t x, uint64_t latch) {
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    return __atomic_load_n(&w[x + L[L_H_LATCH]], __ATOMIC_RELAXED) == latch;
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
        uint64_t flags = w[x + L[L_H_FLAGS]], latch;
        if (w[x + L[L_H_FILE]] != tag[i] || w[x + L[L_H_PGNO]] != pgno[i]
                || !(flags & L[L_BH_DIRTY])) {
            status[i] = 0;
        } else if (wb_busy(w, x, flags, &latch)) {
            status[i] = 2;
        } else {
            uint64_t size = w[x + L[L_H_SIZE]], was = w[x + L[L_H_IOPID]];
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
            if (latch && !wb_latch_kept(w, x, latch)) {
                /* A commit began or ended during the copy: not taken (the flags are as
                   found: changing them needs this mutex). */
                w[x + L[L_H_FLAGS]] = flags;
                w[x + L[L_H_IOPID]] = was;
                status[i] = 2;
            }
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
                uint64_t latch;
                busy[n] = (flags & L[L_BH_WRITING]) ? 2 : wb_busy(w, x, flags, &latch);
                n++;
            }
            off = w[x + L[L_H_NEXT]];
        }
        unlock(mutexes[b]);
    }
    *stopped = last;
    return (int64_t)n;
}
