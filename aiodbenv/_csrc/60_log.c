/* Part 60: appending a record to the log buffer (aiodbenv/log/core.py's LogCore.append, whose
   Python twin runs under AIODBENV_MUTEX=abi and for every case this part hands back).

   The log header's word indexes and the handle's sizes come in a per-handle parameter array
   (LP_*), not the shared layout table: they are the log region's own, and one array
   argument keeps the call (paid per record) short. Only the common append is done here: a
   record that needs buffer space written out, the next file (of the ring, in memory), or a
   write straight to its file returns AIODB_LOG_PYTHON and the Python path does it. */

enum {
    LP_W,       /* the region's address (uint64_t *) */
    LP_MUTEX,   /* the log mutex's address (0: a private region, no mutex) */
    LP_B0,      /* byte offset of the buffer (ring) in the region */
    LP_BSIZE,   /* buffer (ring) bytes */
    LP_INMEM,   /* 1: in-memory ring of "files" */
    LP_NSLOTS,  /* in memory: "files" the ring holds */
    LP_FSIZE,   /* in memory: bytes of one "file" slot */
    LP_HALF,    /* fill above which the result carries AIODB_LOG_HALF */
    LP_NOWAIT,  /* word index of the log mutex's no-wait counter */
    LP_F_LSN,   /* word indexes of header fields */
    LP_TAIL,
    LP_CUR,
    LP_RECS,
    LP_BYTES,
    LP_RSV,     /* word index of rsv_total: in memory, bytes reserved for open transactions'
                   commit records (aiodbenv/log/reserve.py); while non-zero, every put is
                   checked against the reservations by the Python path */
    LP_COUNT
};

/* Not appended here: do it the Python way (full buffer, file switch, large record, a held
   mutex: the Python path waits for it, bounded). Below every -errno, above AIODB_CORRUPT. */
#define AIODB_LOG_PYTHON (-2000)
/* Set in a successful result when the buffer is now more than half full. */
#define AIODB_LOG_HALF (1LL << 62)

/* CRC-32 (the IEEE polynomial, reflected; what zlib.crc32 computes), eight bytes a step. */
static uint32_t log_crc_tab[8][256];
static pthread_once_t log_crc_once = PTHREAD_ONCE_INIT;

static void log_crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        log_crc_tab[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            log_crc_tab[t][i] = (log_crc_tab[t - 1][i] >> 8) ^ log_crc_tab[0][log_crc_tab[t - 1][i] & 0xFF];
}

/* zlib.crc32(p[:n], crc) */
static uint32_t log_crc32(uint32_t crc, const unsigned char *p, uint64_t n) {
    crc = ~crc;
    while (n >= 8) {
        uint32_t a, b;
        memcpy(&a, p, 4);
        memcpy(&b, p + 4, 4);
        a ^= crc;  /* little-endian hosts only (the region format is little-endian too) */
        crc = log_crc_tab[7][a & 0xFF] ^ log_crc_tab[6][(a >> 8) & 0xFF] ^
              log_crc_tab[5][(a >> 16) & 0xFF] ^ log_crc_tab[4][a >> 24] ^
              log_crc_tab[3][b & 0xFF] ^ log_crc_tab[2][(b >> 8) & 0xFF] ^
              log_crc_tab[1][(b >> 16) & 0xFF] ^ log_crc_tab[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) crc = log_crc_tab[0][(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* zlib.crc32(data[:n]): exported so the tests can compare it with zlib's. */
uint32_t aiodb_log_crc32(const char *data, uint64_t n) {
    pthread_once(&log_crc_once, log_crc_init);
    return log_crc32(0, (const unsigned char *)data, n);
}

static inline void log_put32(unsigned char *p, uint32_t v) { memcpy(p, &v, 4); }

/* Append a record of type rtype with payload data[:n] to the log buffer (the ring's current
   "file", in memory) of the log region at P[LP_W], its mutex at P[LP_MUTEX] (0: private).
   Returns its LSN word (file << 32 | offset; | AIODB_LOG_HALF if the buffer is now more than
   half full), AIODB_LOG_PYTHON (nothing done), AIODB_CORRUPT (a header word failed its
   check; nothing done), or -EOWNERDEAD with the mutex HELD and nothing done (the caller
   repairs, lets go and goes the Python way). Never waits for the mutex. */
int64_t aiodb_log_put(const uint64_t *P, uint32_t rtype, const char *data, uint64_t n) {
    uint64_t *w = (uint64_t *)(uintptr_t)P[LP_W];
    void *mutex = (void *)(uintptr_t)P[LP_MUTEX];
    uint64_t nbytes = region_bytes(w);
    uint64_t total = 16 + n;
    if (n > 0xFFFFFFFFu || P[LP_B0] > nbytes || P[LP_BSIZE] > nbytes - P[LP_B0])
        return n > 0xFFFFFFFFu ? AIODB_LOG_PYTHON : AIODB_CORRUPT;
    if (P[LP_NOWAIT] >= nbytes / 8 || P[LP_TAIL] >= nbytes / 8 || P[LP_F_LSN] >= nbytes / 8 ||
        P[LP_CUR] >= nbytes / 8 || P[LP_RECS] >= nbytes / 8 || P[LP_BYTES] >= nbytes / 8 ||
        P[LP_RSV] >= nbytes / 8)
        return AIODB_CORRUPT;
    pthread_once(&log_crc_once, log_crc_init);
    /* The payload's CRC is taken before the mutex, as the Python path does. */
    uint32_t pcrc = log_crc32(0, (const unsigned char *)data, n);
    int64_t rc = try_lock(w, mutex, P[LP_NOWAIT]);
    if (rc == -EBUSY) return AIODB_LOG_PYTHON;
    if (rc) return rc;
    int64_t result = AIODB_LOG_PYTHON;
    uint64_t f_lsn = w[P[LP_F_LSN]], tail = w[P[LP_TAIL]];
    uint64_t fill = tail & 0xFFFFFFFFu, file = f_lsn >> 32, cur = w[P[LP_CUR]];
    uint64_t off = (f_lsn & 0xFFFFFFFFu) + fill;
    uint64_t at;
    if (file == 0 || file >= (1ULL << 30) || cur >= (1ULL << 32) ||
        fill > (P[LP_INMEM] ? P[LP_FSIZE] : P[LP_BSIZE])) {
        result = file == 0 || fill > P[LP_BSIZE] ? AIODB_CORRUPT : AIODB_LOG_PYTHON;
        goto out;
    }
    if (off + total > cur) goto out;  /* the next file (of the ring) */
    if (P[LP_INMEM] && w[P[LP_RSV]]) goto out;  /* reservations open: Python checks the bound */
    if (P[LP_INMEM]) {
        if (!P[LP_NSLOTS]) { result = AIODB_CORRUPT; goto out; }
        uint64_t slot = ((file - 1) % P[LP_NSLOTS]) * P[LP_FSIZE];
        if (slot + off + total > P[LP_BSIZE]) { result = AIODB_CORRUPT; goto out; }
        at = P[LP_B0] + slot + off;
    } else {
        if (fill + total > P[LP_BSIZE]) goto out;  /* write out first, or direct */
        at = P[LP_B0] + fill;
    }
    {
        unsigned char *dst = (unsigned char *)w + at;
        uint32_t prev = (uint32_t)(tail >> 32);
        unsigned char sum[17];
        log_put32(sum, (uint32_t)file);
        log_put32(sum + 4, (uint32_t)off);
        log_put32(sum + 8, prev);
        log_put32(sum + 12, (uint32_t)n);
        sum[16] = (unsigned char)rtype;
        uint32_t crc = log_crc32(pcrc, sum, 17);
        log_put32(dst, prev);
        log_put32(dst + 4, (uint32_t)n);
        log_put32(dst + 8, crc);
        dst[12] = (unsigned char)rtype;
        dst[13] = dst[14] = dst[15] = 0;
        memcpy(dst + 16, data, n);
        /* The commit point: other processes read the tail word whole, without the mutex. */
        __atomic_store_n(&w[P[LP_TAIL]], (off << 32) | (fill + total), __ATOMIC_RELEASE);
        w[P[LP_RECS]]++;
        w[P[LP_BYTES]] += total;
        result = (int64_t)((file << 32) | off);
        if (fill + total > P[LP_HALF]) result |= AIODB_LOG_HALF;
    }
out:
    unlock(mutex);
    return result;
}

/* ---- The job array of a round the writer's thread runs in one compiled call
   (aiodb_log_round, _csrc/65_logflush.c; its Python twin, threadrounds.py, runs under
   AIODBENV_MUTEX=abi and with the I/O seam's faults or crash points set).

   The round was started (begin_write) and the role taken by the loop's thread; the job array
   J (owned by the handle, kept alive until J_STATE leaves LOG_JOB_RUNNING) says what to write
   and where the header words are; log_job_finish publishes the job's end to the loop. */
#include <sys/syscall.h>
#include <linux/futex.h>
#include <unistd.h>
#include <limits.h>

enum {
    J_STATE,    /* LOG_JOB_* (written last, with release order) */
    J_ERR,      /* errno of a failed or short write */
    J_FD, J_FILE, J_FOFF, J_START, J_END, J_COMMITS,  /* the round (begin_write's result) */
    J_PID, J_PSTART, J_TOKEN,  /* this handle's writer-role identity */
    J_I_W_LSN, J_I_SEQ, J_I_WRITES, J_I_FBYTES, J_I_LASTEND, J_I_REWRITES,  /* word indexes */
    J_I_FPID, J_I_FSTART, J_I_FTOKEN,
    J_EVFD,     /* an eventfd the loop reads (its waiters wake when the thread is done), + 1 */
    J_COUNT
};
#define LOG_JOB_RUNNING 0
#define LOG_JOB_DONE 1     /* written, published, role let go */
#define LOG_JOB_STUCK 2    /* written, not published (the mutex stayed held, or its holder
                              died: the loop publishes it, and repairs, as the Python way) */
#define LOG_JOB_FAILED 3   /* the write failed (J_ERR): nothing published, role still held */
#define LOG_JOB_QUEUED 4   /* handed to the writer's thread, not started (set by Python) */

static void log_job_finish(uint64_t *J, uint64_t state) {
    __atomic_store_n(&J[J_STATE], state, __ATOMIC_RELEASE);
    if (J[J_EVFD]) {
        uint64_t one = 1;
        ssize_t r = write((int)(J[J_EVFD] - 1), &one, sizeof one);
        (void)r;  /* a full counter (never, at 2^64 - 2) is still readable: the loop wakes */
    }
}
