/* Part 78: a transaction's page taking and commit with fewer calls (aiodbenv/txn/txn.py drives
   them; part 75's calls and the Python commit remain the ways every case these hand back is
   done, and what AIODBENV_MUTEX=abi runs).

     aiodb_txn_take     the fast path of tx.page: take the buffer's latch if it is free (as
                        aiodb_commit_latch), copy the page into the transaction's private copy
                        and write the page's commit descriptor (part 75's CD_* words), in one
                        call instead of a latch call, a Python copy and a list of addresses
                        (with aiodbenv._hot installed, called by its HotFile.txn_take right
                        after its pin, through this function's address: capi/txntake.c);
     aiodb_txn_prepare  aiodb_commit_build then aiodb_commit_mark (the record is built and the
                        buffers marked dirty and the latches committing, or the mark handed
                        back before anything is marked committing);
     aiodb_txn_finish   aiodb_commit_apply of every page, then every latch released (a plain
                        store of 0: only the owner writes a held latch, see txn/latch.py).

   The log append stays Python's (Log.put, compiled in part 60) between prepare and finish, so
   the crash tests' steps txn.committing and txn.logged still fall between these calls. */

enum { TXN_TAKE_LATCH = 1, TXN_TAKE_NEW = 2 };

/* The words of one page's descriptor array (what a private copy made outside this module,
   aiodbenv._hot's TxnCopy, must leave room for after it). */
#define AIODB_TXN_DESC_WORDS (CD_HEAD + CD_COUNT)

/* Mark failures of aiodb_txn_prepare: aiodb_commit_mark's result less this (below
   AIODB_CORRUPT, so the two never meet). */
#define AIODB_TXN_MARK_BASE (-2000000)

/* Take page `bh` (pinned by the caller) of cache region w for `owner`: with TXN_TAKE_LATCH in
   flags, its latch first, under the bucket mutex without waiting; then (the latch held) copy
   its `size` data bytes into `priv`, zero its LSN there for TXN_TAKE_NEW (a page made by this
   transaction has none), and fill the CD_HEAD + CD_COUNT words of D for a commit of this page
   alone (its file entry first in the blob). Returns 0 (done), the holder's latch word (> 0:
   busy, nothing done), the try-lock's -errno (-EBUSY: nothing done; -EOWNERDEAD: the mutex is
   HELD, nothing else done: repair and let go), or AIODB_CORRUPT. */
int64_t aiodb_txn_take(uint64_t *D, uint64_t *w, void **mutexes, const uint64_t *nowait_ws,
                       const uint64_t *bucket_ws, uint64_t b, uint64_t bh, uint64_t owner,
                       unsigned char *priv, uint64_t size, uint64_t lsn_off, uint64_t fkey,
                       uint64_t flen, uint64_t pgno, int flags) {
    uint64_t nbytes = region_bytes(w);
    void *mutex = mutexes[b];
    uint64_t nowait_w = nowait_ws[b], bucket_w = bucket_ws[b];
    if (!bh_ok(bh, nbytes) || nowait_w >= nbytes / 8 || bucket_w >= nbytes / 8 || !owner ||
        !priv || size < 8 || lsn_off > size - 8 || size > nbytes - bh - L[L_BH_DATA])
        return AIODB_CORRUPT;
    if (flags & TXN_TAKE_LATCH) {
        int64_t rc = try_lock(w, mutex, nowait_w);
        if (rc) return rc;
        uint64_t *latch = w + (bh >> 3) + L[L_H_LATCH];
        uint64_t cur = *latch;
        if (!cur) *latch = owner;
        unlock(mutex);
        if (cur) return (int64_t)cur;
    }
    memcpy(priv, (unsigned char *)w + bh + L[L_BH_DATA], size);
    if (flags & TXN_TAKE_NEW) memset(priv + lsn_off, 0, 8);
    uint64_t *d = D + CD_HEAD;
    D[CD_CHANGED] = D[CD_FULLS] = 0;
    d[CD_W] = (uint64_t)(uintptr_t)w;
    d[CD_MUTEX] = (uint64_t)(uintptr_t)mutex;
    d[CD_NOWAIT] = nowait_w;
    d[CD_BUCKET] = bucket_w;
    d[CD_BH] = bh;
    d[CD_PRIV] = (uint64_t)(uintptr_t)priv;
    d[CD_SIZE] = size;
    d[CD_LSNOFF] = lsn_off;
    d[CD_FKEY] = fkey;
    d[CD_FENT] = 0;
    d[CD_FLEN] = flen;
    d[CD_PGNO] = pgno;
    d[CD_KIND] = 0;
    return 0;
}

/* aiodb_commit_build, then (if a page changed) aiodb_commit_mark with `owner` and `flag`.
   Returns the record's length (built in out, pages marked), 0 (no page changed: nothing
   written or marked), build's AIODB_CORRUPT or -ENOSPC, or AIODB_TXN_MARK_BASE + mark's
   non-zero result (not every page marked dirty: the caller builds again and marks the slow
   way; marking a page dirty twice is harmless). */
int64_t aiodb_txn_prepare(uint64_t *D, int n, const unsigned char *files, uint64_t files_len,
                          uint64_t redo_start, unsigned char *out, uint64_t cap, uint64_t owner,
                          uint64_t flag) {
    int64_t len = aiodb_commit_build(D, n, files, files_len, redo_start, out, cap);
    if (len <= 0) return len;
    int64_t r = aiodb_commit_mark(D, n, owner, flag);
    if (r == AIODB_CORRUPT) return r;
    if (r) return AIODB_TXN_MARK_BASE + r;
    return len;
}

/* Copy every changed page of D into its buffer with the commit LSN stamped
   (aiodb_commit_apply), then release every latch of the n pages that `owner` holds (with or
   without `flag`). Returns the pages copied, or AIODB_CORRUPT (a descriptor failed its
   check: the latches are then left as they were). */
int64_t aiodb_txn_finish(uint64_t *D, int n, uint64_t lsn_word, uint64_t owner, uint64_t flag) {
    int64_t done = aiodb_commit_apply(D, 0, n, lsn_word);
    if (done < 0) return done;
    for (int i = 0; i < n; i++) {
        const uint64_t *d = D + CD_HEAD + (uint64_t)i * CD_COUNT;
        if (!commit_shared(d)) return AIODB_CORRUPT;
        uint64_t *latch = (uint64_t *)(uintptr_t)d[CD_W] + (d[CD_BH] >> 3) + L[L_H_LATCH];
        if ((*latch & ~flag) == owner) *latch = 0;
    }
    return done;
}
