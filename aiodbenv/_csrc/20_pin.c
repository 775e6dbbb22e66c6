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
    /* The chain's first buffer is most often the page. Start fetching the lines a pin writes
       (the pin clock, this slot's count) and the page's first line (the caller reads the page
       next) now, so they arrive with the header line the search stalls on rather than one
       after another: with pages spread over more memory than the CPU caches hold, each is a
       trip to memory. Only an in-range offset is worth it (a prefetch never faults). */
    if (off >= 64 && off < nbytes && nbytes - off >= L[L_BH_DATA] + 64) {
        __builtin_prefetch(w + (off >> 3) + L[L_H_PINAT], 1, 3);
        __builtin_prefetch(slot_pins(w, off >> 3, slot), 1, 3);
        __builtin_prefetch((const char *)w + off + L[L_BH_DATA], 0, 3);
    }
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
