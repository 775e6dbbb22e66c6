/* Part 75: a transaction's commit, compiled (aiodbenv/txn/commit.py drives it; the Python
   commit in aiodbenv/txn/txn.py is its complete twin and runs under AIODBENV_MUTEX=abi and
   whenever this part hands a case back).

   A commit is three calls, so that the kill-at-each-step crash tests stop it at the same
   steps as the Python commit (txn.committing, txn.logged, txn.copied):
     aiodb_commit_build  diff every taken page against its buffer and write the batch record
                         (aiodbenv/txn/batch.py's layout, byte for byte) into a scratch buffer;
     aiodb_commit_mark   set LATCH_COMMITTING on every latch the transaction holds, then
                         mark the changed buffers dirty (under their bucket mutexes);
   then the record is appended with the log's own compiled put (part 60), and
     aiodb_commit_apply  copies the private images into the buffers and stamps the commit LSN.
   The caller holds every page's latch and pin throughout, so neither the buffers nor the
   private copies change under these calls.

   A page is described by CD_COUNT words of the array D (after the CD_HEAD words of the
   transaction's results); every address and offset in it is checked before it is used. */

enum {
    CD_W,       /* the page's cache region (uint64_t *) */
    CD_MUTEX,   /* its bucket's mutex (0: a private region) */
    CD_NOWAIT,  /* word index of that mutex's no-wait counter */
    CD_BUCKET,  /* word index of the bucket's first word */
    CD_BH,      /* byte offset of the buffer header in the region */
    CD_PRIV,    /* the private copy (unsigned char *), CD_SIZE bytes */
    CD_SIZE,    /* data bytes of the page (no checksum trailer) */
    CD_LSNOFF,  /* where the page LSN is (lsn_offset) */
    CD_FKEY,    /* the file's key (its slot): pages of one file share its batch entry */
    CD_FENT,    /* byte offset of the file's batch entry in the entries blob */
    CD_FLEN,    /* its length */
    CD_PGNO,
    CD_KIND,    /* out: 0 unchanged, 1 fragments, 2 full image */
    CD_COUNT
};
enum { CD_CHANGED, CD_FULLS, CD_HEAD };  /* out: changed pages, of them full images */

/* The layout as the Python side reads it (aiodbenv/txn/commit.py). */
#define AIODB_CD_HEAD CD_HEAD
#define AIODB_CD_COUNT CD_COUNT
#define AIODB_CD_FKEY CD_FKEY
#define AIODB_CD_FENT CD_FENT
#define AIODB_CD_FLEN CD_FLEN
#define AIODB_CD_KIND CD_KIND

#define AIODB_COMMIT_CHUNK 64  /* batch.FRAG_CHUNK */
#define AIODB_COMMIT_MAGIC "\0aiodbenv-txn1\0\0"

static inline void commit_put16(unsigned char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void commit_put64(unsigned char *p, uint64_t v) { memcpy(p, &v, 8); }

/* The next differing range of a[from:n] and b[from:n] in whole chunks: 1 and [*s, *e), or 0. */
static int commit_next_range(const unsigned char *a, const unsigned char *b, uint64_t n,
                             uint64_t from, uint64_t *s, uint64_t *e) {
    uint64_t i = from;
    while (i < n) {
        uint64_t len = n - i < AIODB_COMMIT_CHUNK ? n - i : AIODB_COMMIT_CHUNK;
        if (memcmp(a + i, b + i, len)) break;
        i += len;
    }
    if (i >= n) return 0;
    *s = i;
    while (i < n) {
        uint64_t len = n - i < AIODB_COMMIT_CHUNK ? n - i : AIODB_COMMIT_CHUNK;
        if (!memcmp(a + i, b + i, len)) break;
        i += len;
    }
    *e = i;
    return 1;
}

/* The page's data in its region, or NULL if its descriptor fails a bounds check. */
static unsigned char *commit_shared(const uint64_t *d) {
    uint64_t *w = (uint64_t *)(uintptr_t)d[CD_W];
    uint64_t nbytes = region_bytes(w);
    uint64_t off = d[CD_BH];
    if (!bh_ok(off, nbytes) || d[CD_SIZE] < 8 || d[CD_LSNOFF] > d[CD_SIZE] - 8 ||
        d[CD_SIZE] > nbytes - off - L[L_BH_DATA] || d[CD_BUCKET] >= nbytes / 8 ||
        d[CD_NOWAIT] >= nbytes / 8 || !d[CD_PRIV])
        return NULL;
    return (unsigned char *)w + off + L[L_BH_DATA];
}

/* Write the batch record of the n pages of D into out (cap bytes): the files blob holds each
   file's entry (batch._FILE and its path), the pages' CD_FENT/CD_FLEN point into it.
   redo_start is the LSN word (file << 32 | offset) before which a page's first change is a
   full image. Copies each buffer's LSN into its private copy first (those bytes are the
   library's). Returns the record's length, 0 if no page changed (nothing written), or
   AIODB_CORRUPT (a descriptor failed its check) or -ENOSPC (cap too small; cannot happen
   when cap is the transaction's worst case). Sets CD_KIND of each page and the head words. */
int64_t aiodb_commit_build(uint64_t *D, int n, const unsigned char *files, uint64_t files_len,
                           uint64_t redo_start, unsigned char *out, uint64_t cap) {
    uint64_t keys[64], fpos[64];
    uint32_t nfiles = 0, npages = 0;
    uint64_t size = 24, fulls = 0;
    if (n < 0 || n > 64) return AIODB_CORRUPT;
    /* Pass 1: what changed, how, and the record's size. */
    for (int i = 0; i < n; i++) {
        uint64_t *d = D + CD_HEAD + (uint64_t)i * CD_COUNT;
        unsigned char *shared = commit_shared(d);
        if (!shared || d[CD_FENT] > files_len || d[CD_FLEN] > files_len - d[CD_FENT] ||
            d[CD_FLEN] < 34)
            return AIODB_CORRUPT;
        unsigned char *priv = (unsigned char *)(uintptr_t)d[CD_PRIV];
        uint64_t ds = d[CD_SIZE], lo = d[CD_LSNOFF], s, e, pos = 0, changed = 0, nr = 0;
        memcpy(priv + lo, shared + lo, 8);
        while (commit_next_range(shared, priv, ds, pos, &s, &e)) {
            changed += e - s;
            nr++;
            pos = e;
        }
        d[CD_KIND] = 0;
        if (!nr) continue;
        uint32_t pf, pl;
        memcpy(&pf, shared + lo, 4);
        memcpy(&pl, shared + lo + 4, 4);
        uint64_t page_lsn = ((uint64_t)pf << 32) | pl;
        int full = page_lsn == 0 || page_lsn < redo_start || 2 * changed > ds;
        d[CD_KIND] = full ? 2 : 1;
        size += 11 + (full ? ds : 4 + nr * 8 + changed);
        fulls += full;
        npages++;
        uint32_t f = 0;
        while (f < nfiles && keys[f] != d[CD_FKEY]) f++;
        if (f == nfiles) {
            keys[nfiles] = d[CD_FKEY];
            fpos[nfiles++] = i;
            size += d[CD_FLEN];
        }
    }
    D[CD_CHANGED] = npages;
    D[CD_FULLS] = fulls;
    if (!npages) return 0;
    if (size > cap) return -ENOSPC;
    /* Pass 2: write it. */
    unsigned char *p = out;
    memcpy(p, AIODB_COMMIT_MAGIC, 16);
    log_put32(p + 16, nfiles);
    log_put32(p + 20, npages);
    p += 24;
    for (uint32_t f = 0; f < nfiles; f++) {
        const uint64_t *d = D + CD_HEAD + fpos[f] * CD_COUNT;
        memcpy(p, files + d[CD_FENT], d[CD_FLEN]);
        p += d[CD_FLEN];
    }
    for (int i = 0; i < n; i++) {
        const uint64_t *d = D + CD_HEAD + (uint64_t)i * CD_COUNT;
        if (!d[CD_KIND]) continue;
        const unsigned char *shared = commit_shared(d);
        const unsigned char *priv = (const unsigned char *)(uintptr_t)d[CD_PRIV];
        uint64_t ds = d[CD_SIZE], s, e, pos = 0;
        uint16_t f = 0;
        while (keys[f] != d[CD_FKEY]) f++;
        commit_put16(p, f);
        commit_put64(p + 2, d[CD_PGNO]);
        p[10] = d[CD_KIND] == 2 ? 1 : 0;  /* batch.FULL, batch.FRAGS */
        p += 11;
        if (d[CD_KIND] == 2) {
            memcpy(p, priv, ds);
            p += ds;
            continue;
        }
        unsigned char *count = p;
        uint32_t nr = 0;
        p += 4;
        while (commit_next_range(shared, priv, ds, pos, &s, &e)) {
            log_put32(p, (uint32_t)s);
            log_put32(p + 4, (uint32_t)(e - s));
            memcpy(p + 8, priv + s, e - s);
            p += 8 + (e - s);
            nr++;
            pos = e;
        }
        log_put32(count, nr);
    }
    return (int64_t)(p - out);
}

/* Set `flag` in every page's latch word of D, which must hold `owner`, then mark every changed
   page dirty (as an unpin with PAGE_DIRTY does), each under its bucket mutex. Flagged first:
   write-back copies a pinned page whose latch a transaction holds outside a commit
   (30_writeback.c, wb_busy), so a page marked dirty before its latch reads committing could be
   claimed clean-to-be in between, and the copy-in that follows would be left on a buffer the
   finished write marks clean (lost). Flagged first, a claim either precedes the flag (the
   mark then sees the page WRITING and sets REDIRTIED) or sees it (busy). Returns 0, or for
   page i: -(i + 1) * 1000 + rc where rc is the failed try-lock's -errno (-EBUSY: nothing more
   done, go the Python way; -EOWNERDEAD: that mutex is HELD, repair and let go), or
   AIODB_CORRUPT (a descriptor failed its check, or a latch is not the owner's: nothing done).
   The latches stay flagged on a failure: the caller marks again the Python way (marking a
   page dirty twice is harmless) or aborts, and the release clears the flag. */
int64_t aiodb_commit_mark(uint64_t *D, int n, uint64_t owner, uint64_t flag) {
    if (n < 0 || n > 64) return AIODB_CORRUPT;
    for (int i = 0; i < n; i++) {
        uint64_t *d = D + CD_HEAD + (uint64_t)i * CD_COUNT;
        if (!commit_shared(d)) return AIODB_CORRUPT;
        const uint64_t *w = (const uint64_t *)(uintptr_t)d[CD_W];
        if ((w[(d[CD_BH] >> 3) + L[L_H_LATCH]] & ~flag) != owner) return AIODB_CORRUPT;
    }
    for (int i = 0; i < n; i++) {
        const uint64_t *d = D + CD_HEAD + (uint64_t)i * CD_COUNT;
        uint64_t *w = (uint64_t *)(uintptr_t)d[CD_W];
        __atomic_store_n(&w[(d[CD_BH] >> 3) + L[L_H_LATCH]], owner | flag, __ATOMIC_RELAXED);
    }
    /* The flags are visible before any mark (and so before any copy-in) is. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (int i = 0; i < n; i++) {
        uint64_t *d = D + CD_HEAD + (uint64_t)i * CD_COUNT;
        if (!d[CD_KIND]) continue;
        uint64_t *w = (uint64_t *)(uintptr_t)d[CD_W];
        uint64_t x = d[CD_BH] >> 3;
        void *mutex = (void *)(uintptr_t)d[CD_MUTEX];
        int64_t rc = try_lock(w, mutex, d[CD_NOWAIT]);
        if (rc) return -(int64_t)(i + 1) * 1000 + rc;
        uint64_t bh = w[x + L[L_H_FLAGS]];
        uint64_t nf = bh | L[L_BH_DIRTY] | ((bh & L[L_BH_WRITING]) ? L[L_BH_REDIRTIED] : 0);
        if (!(bh & L[L_BH_DIRTY])) w[d[CD_BUCKET] + L[L_B_DIRTY]]++;
        if (nf != bh) w[x + L[L_H_FLAGS]] = nf;
        unlock(mutex);
    }
    return 0;
}

/* Copy the private images of the changed pages lo..hi-1 of D into their buffers and stamp
   the commit LSN (file, offset: two little-endian u32) at each page's lsn_offset. Returns the
   pages copied, or AIODB_CORRUPT (nothing copied from that page on). */
int64_t aiodb_commit_apply(uint64_t *D, int lo, int hi, uint64_t lsn_word) {
    int64_t done = 0;
    if (lo < 0 || hi > 64) return AIODB_CORRUPT;
    for (int i = lo; i < hi; i++) {
        const uint64_t *d = D + CD_HEAD + (uint64_t)i * CD_COUNT;
        if (!d[CD_KIND]) continue;
        unsigned char *shared = commit_shared(d);
        if (!shared) return AIODB_CORRUPT;
        memcpy(shared, (const unsigned char *)(uintptr_t)d[CD_PRIV], d[CD_SIZE]);
        log_put32(shared + d[CD_LSNOFF], (uint32_t)(lsn_word >> 32));
        log_put32(shared + d[CD_LSNOFF] + 4, (uint32_t)lsn_word);
        done++;
    }
    return done;
}

/* Take the latch of the buffer at byte offset bh of the cache region w for `owner` if it is
   free (latch.try_latch, compiled): under the bucket mutex, without waiting for it. Returns 0
   (taken), the holder's latch word (> 0), the try-lock's -errno (-EBUSY: nothing done;
   -EOWNERDEAD: the mutex is HELD, nothing else done: repair and let go), or AIODB_CORRUPT. */
int64_t aiodb_commit_latch(uint64_t *w, void *mutex, uint64_t nowait_w, uint64_t bh,
                           uint64_t owner) {
    uint64_t nbytes = region_bytes(w);
    if (!bh_ok(bh, nbytes) || nowait_w >= nbytes / 8 || !owner) return AIODB_CORRUPT;
    int64_t rc = try_lock(w, mutex, nowait_w);
    if (rc) return rc;
    uint64_t *latch = w + (bh >> 3) + L[L_H_LATCH];
    uint64_t cur = *latch;
    if (!cur) *latch = owner;
    unlock(mutex);
    return (int64_t)cur;
}
