/* A batch of dirty victims in ONE compiled call (aiodbenv/mpool/victims.py drives it).

   A batch used to be about ten compiled calls from a worker thread (collect, order, claim,
   write, release, per file, with Python between them); the thread waited for the GIL after
   each while the event loop ran misses, so 1.3 ms of work took 15-30 ms of wall time, and the
   misses waited for the clean frames it makes. aiodb_batch_run does all of it with the GIL
   released: collect the dirty buffers from the victim search's hand on (50_sync.c's
   aiodb_sync_collect, recently used ones left out), sort them by file and page, and per file
   claim and copy under the bucket locks, pwrite each run of adjacent pages, bump the file's
   written generation under the file mutex (before any page is marked clean: see
   aiodbenv/mpool/sync.py), release the claims (written pages not dirtied again are clean).
   The claim protocol and its crash safety are 50_sync.c's, step for step.

   What needs Python -- a mutex whose holder died (repaired the Python way), a corrupt
   region, a bucket lock that stays held at release -- stops the call at that step with the
   state kept in the struct; Python does its part and calls again, and the call goes on from
   there. Only files without a write-ahead log constraint come here (the WAL rule needs the
   loop between claim and write: victims.py takes the two-step path for those). */

/* 50_sync.c is a later part of this translation unit: its functions are declared here (the
   compiler checks these against its definitions), its entry layout and states mirrored. */
int64_t aiodb_sync_collect(void **tab, uint64_t cache, uint64_t first, uint64_t nb,
                           const uint8_t *route, uint64_t nroute, uint64_t below,
                           uint64_t *out, uint64_t max, uint64_t *nfast, uint64_t *nother,
                           uint64_t *stopped);
uint64_t aiodb_sync_order(uint64_t *out, uint64_t n, uint64_t limit);
int64_t aiodb_sync_claim(void **tab, uint64_t *out, uint64_t lo, uint64_t hi, uint64_t ps,
                         char *stage, uint64_t pid, int64_t lsn_off, uint64_t *max_lsn,
                         uint64_t *at);
int64_t aiodb_sync_write(uint64_t *out, uint64_t lo, uint64_t hi, uint64_t ps,
                         const char *stage, int fd, uint64_t max_run, uint64_t srf_every,
                         int64_t (*hook)(int, const char *, uint64_t, uint64_t),
                         uint64_t *counts);
int64_t aiodb_sync_release(void **tab, uint64_t *out, uint64_t lo, uint64_t hi, uint64_t pid,
                           int ok, uint64_t *at, uint64_t *cleaned);

/* Words per entry and the entry's fields (aiodb_sync_ent in 50_sync.c). */
enum { BATCH_E = 7, BATCH_TAG = 0, BATCH_BUCKET = 3, BATCH_STATE = 5, BATCH_CACHE = 6 };
/* 50_sync.c's SYNC_WRITTEN. */
enum { BATCH_WRITTEN = 6 };

/* The steps of a batch (aiodb_batch.phase). */
enum { BATCH_COLLECT = 0, BATCH_GROUP, BATCH_CLAIM, BATCH_WRITE, BATCH_NOTE, BATCH_RELEASE,
       BATCH_DONE };

/* Words per file in aiodb_batch.res: tag, lo, hi, written, calls, bytes, -errno of the first
   failed write (0: none), 1 if the file mutex stayed held (nothing of it marked clean). */
#define AIODB_BATCH_RES 8

/* Stops that Python handles before calling again (besides AIODB_CORRUPT and -errno). */
#define AIODB_BATCH_DEAD_BUCKET (-2000001) /* stop_cache's stop_bucket: holder died, held */
#define AIODB_BATCH_DEAD_FILE (-2000002)   /* the file mutex of entry `at`: holder died, held */
#define AIODB_BATCH_UNRELEASED (-2000003)  /* entry `at`'s bucket stayed held: still claimed */

struct aiodb_batch {
    /* Set by the caller. */
    void **tab;                   /* the caches (50_sync.c's SYNC_TAB_*) */
    uint64_t cache, nb, hand, below;
    const uint8_t *route;         /* per file tag: 1 written here, else not (50_sync.c) */
    uint64_t nroute;
    const int64_t *fd;            /* per file tag: this process's descriptor */
    const uint64_t *ps;           /* per file tag: page size */
    uint64_t *meta;               /* the meta region's words */
    void **fmutex;                /* per file tag: the file mutex */
    const uint64_t *fnowait;      /* per file tag: word of its no-wait counter */
    const uint64_t *fslot;        /* per file tag: word holding the file's entry index... */
    const uint64_t *fentry;       /* ...which must still be this one (else not noted) */
    const uint64_t *fgen;         /* per file tag: word of its written generation */
    uint64_t *ent;
    uint64_t cap;                 /* entries at most (a fuller cache stops the collect) */
    char *stage;                  /* cap pages of the largest page size */
    uint64_t pid, max_run, srf_every;
    int64_t (*hook)(int, const char *, uint64_t, uint64_t);
    uint64_t *res;                /* AIODB_BATCH_RES words per file written */
    /* State (zero to begin). */
    uint64_t phase, pos, seg, nf, no, n, full, lo, hi, ok, nres, lsn, cleaned;
    uint64_t counts[3];
    int64_t werr;
    uint64_t note_failed;
    /* Where a call stopped. */
    uint64_t at, stop_cache, stop_bucket;
};

static void batch_row(struct aiodb_batch *b) {
    uint64_t *r = &b->res[b->nres++ * AIODB_BATCH_RES];
    r[0] = b->ent[b->lo * BATCH_E + BATCH_TAG];
    r[1] = b->lo;
    r[2] = b->hi;
    r[3] = b->ok ? b->counts[0] : 0;
    r[4] = b->counts[1];
    r[5] = b->counts[2];
    r[6] = (uint64_t)b->werr;
    r[7] = b->note_failed;
}

/* Run (or go on with) the batch b describes. Returns 0 when it is done (b->nres rows in
   b->res; b->full is 1 + the bucket where the collect filled up, or 0), or a stop:
   AIODB_BATCH_DEAD_BUCKET, AIODB_BATCH_DEAD_FILE, AIODB_BATCH_UNRELEASED (see above),
   AIODB_CORRUPT (in the collect: stop_bucket; in a claim: entry `at`, the claims of entries
   lo..at-1 still held; at release: entry `at`), or another -errno from the collect (a bucket
   held past the bound: nothing was claimed, the batch is over). */
int64_t aiodb_batch_run(struct aiodb_batch *b) {
    for (;;) {
        switch (b->phase) {
        case BATCH_COLLECT: {
            uint64_t hand = b->hand % b->nb;
            uint64_t last = b->seg ? hand : b->nb;
            if (b->seg == 0 && b->pos < hand) b->pos = hand;
            uint64_t stopped = 0;
            int64_t rc = b->pos < last
                ? aiodb_sync_collect(b->tab, b->cache, b->pos, last, b->route, b->nroute,
                                     b->below, b->ent, b->cap, &b->nf, &b->no, &stopped)
                : 0;
            if (rc == -ENOBUFS) {
                b->full = stopped + 1;
            } else if (rc) {
                b->stop_cache = b->cache;
                b->stop_bucket = b->pos = stopped;
                return rc == -EOWNERDEAD ? AIODB_BATCH_DEAD_BUCKET : rc;
            } else if (b->seg == 0) {
                b->seg = 1;
                b->pos = 0;
                continue;
            }
            b->n = aiodb_sync_order(b->ent, b->nf, 0);
            b->lo = 0;
            b->phase = BATCH_GROUP;
            continue;
        }
        case BATCH_GROUP: {
            if (b->lo >= b->n) { b->phase = BATCH_DONE; return 0; }
            uint64_t tag = b->ent[b->lo * BATCH_E + BATCH_TAG], hi = b->lo + 1;
            while (hi < b->n && b->ent[hi * BATCH_E + BATCH_TAG] == tag) hi++;
            b->hi = hi;
            b->pos = b->lo;
            b->counts[0] = b->counts[1] = b->counts[2] = 0;
            b->werr = 0;
            b->note_failed = 0;
            b->ok = 1;
            b->phase = BATCH_CLAIM;
            continue;
        }
        case BATCH_CLAIM: {
            uint64_t tag = b->ent[b->lo * BATCH_E + BATCH_TAG], ps = b->ps[tag];
            int64_t rc = aiodb_sync_claim(b->tab, b->ent, b->pos, b->hi, ps,
                                          b->stage + (b->pos - b->lo) * ps, b->pid, -1,
                                          &b->lsn, &b->at);
            if (rc) {
                uint64_t *e = &b->ent[b->at * BATCH_E];
                b->stop_cache = e[BATCH_CACHE];
                b->stop_bucket = e[BATCH_BUCKET];
                b->pos = b->at;
                return rc == -EOWNERDEAD ? AIODB_BATCH_DEAD_BUCKET : rc;
            }
            b->phase = BATCH_WRITE;
            continue;
        }
        case BATCH_WRITE: {
            uint64_t tag = b->ent[b->lo * BATCH_E + BATCH_TAG];
            b->werr = aiodb_sync_write(b->ent, b->lo, b->hi, b->ps[tag], b->stage,
                                       (int)b->fd[tag], b->max_run, b->srf_every, b->hook,
                                       b->counts);
            b->phase = b->counts[0] ? BATCH_NOTE : BATCH_RELEASE;
            b->pos = b->lo;
            continue;
        }
        case BATCH_NOTE: {
            /* Before any page is marked clean: every later sync (any process) must know the
               file has writes to fsync. A file closed for good meanwhile is not noted. */
            uint64_t tag = b->ent[b->lo * BATCH_E + BATCH_TAG];
            if (b->meta[b->fslot[tag]] == b->fentry[tag]) {
                int64_t rc = lock(b->meta, b->fmutex[tag], b->fnowait[tag], 1);
                if (rc == -EOWNERDEAD) { b->at = b->lo; return AIODB_BATCH_DEAD_FILE; }
                if (rc) {
                    b->ok = 0;  /* written, but no sync would know: nothing is clean */
                    b->note_failed = 1;
                } else {
                    b->meta[b->fgen[tag]]++;
                    unlock(b->fmutex[tag]);
                }
            }
            b->phase = BATCH_RELEASE;
            continue;
        }
        case BATCH_RELEASE: {
            int64_t rc = aiodb_sync_release(b->tab, b->ent, b->pos, b->hi, b->pid, (int)b->ok,
                                            &b->at, &b->cleaned);
            if (rc) {
                uint64_t *e = &b->ent[b->at * BATCH_E];
                b->stop_cache = e[BATCH_CACHE];
                b->stop_bucket = e[BATCH_BUCKET];
                b->pos = b->at;
                if (rc == -EOWNERDEAD) return AIODB_BATCH_DEAD_BUCKET;
                return rc == AIODB_CORRUPT ? rc : AIODB_BATCH_UNRELEASED;
            }
            batch_row(b);
            b->lo = b->hi;
            b->phase = BATCH_GROUP;
            continue;
        }
        default:
            return 0;
        }
    }
}
