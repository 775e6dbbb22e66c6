/* Part 65: a whole log round in one call without the GIL -- a flush's write, fdatasync and
   publish, then the further rounds that flush and write-through calls of any process
   registered meanwhile (group commit), then letting the writer role go -- and the wake of
   other processes' waiters straight to their event loops (aiodbenv/log/threadrounds.py's
   _behind_work and _thread_round are its Python twin, run under AIODBENV_MUTEX=abi, with the
   I/O seam's faults or crash points set, or with durable-log listeners).

   Why C: measured on a loaded 2-core machine, a lone put(flush=True) spent ~325 us of which
   the fdatasync took ~130; the Python steps in the writer's thread (publish, role, wakes,
   each taking the GIL back) were ~45 us of the rest. Here the thread does them all at once.

   Waking: a process whose flush waits for another process's writer registers, in its
   registry slot's words of the log header, the LSN word it waits for (plus 2; 1: any
   progress) and the name of a datagram socket in the abstract namespace its event loop
   reads (aiodbenv/log/wakesock.py). After each publish the writer sends one byte, without
   blocking, to every waiter whose LSN became durable (to every waiter when the role is let
   go) and clears its registration; a full or absent socket is ignored (a stopped or dead
   waiter never stalls the writer): the waiter re-checks on a bounded timeout anyway. */
#include <sys/socket.h>
#include <sys/un.h>
#include <stdio.h>
#include <signal.h>

enum {
    JX_SYNC = J_COUNT, /* 1: fdatasync after the write (a flush round) */
    JX_MORE,           /* further rounds allowed for requests registered meanwhile */
    JX_I_S_LSN, JX_I_FSYNCS, JX_I_FLUSHES, JX_I_MAXC, JX_I_MINC, JX_I_PENDING, JX_I_WANTW,
    JX_I_FREADY, JX_I_FERRNO, JX_I_FFILE, JX_I_WAKE_WANT, JX_I_WAKE_NAME,  /* word indexes */
    JX_NSLOTS,         /* waiter slots (the registry's MAX_PROCS) */
    JX_SOCK,           /* + 1: the handle's unbound datagram socket the wake-ups go out by */
    JX_ROUNDS,         /* out: rounds done by the last call */
    JX_SENT,           /* out: wake-ups sent by the last call */
    JX_GO,             /* the round thread's futex word: 1, a round to run (set by the loop) */
    JX_QUIT,           /* 1: the round thread ends */
    JX_ALIVE,          /* 1 while the round thread runs (it clears it last) */
    JX_PARGS,          /* the address of the handle's parameter array P */
    JX_NOTIFY,         /* 1: call aiodb_log_done_cb after each round (its handle closed) */
    JX_COUNT
};

/* Called (with the GIL, taken by cffi) when a round left the log mutex held with its holder
   dead: the Python side repairs as any locker does and lets go, in this thread, which owns
   the mutex now (aiodbenv/log/accel.py). */
static void aiodb_log_repair_cb(uint64_t *J);
/* Called (with the GIL) after a round when JX_NOTIFY is set: the handle closed while the
   round ran, and what it uses is kept until then (aiodbenv/log/orphan.py). */
static void aiodb_log_done_cb(uint64_t *J);
void aiodb_log_thread_go(uint64_t *J);

/* The abstract socket name of a waiter's nonce (aiodbenv/log/wakesock.py makes the same). */
static socklen_t log_wake_addr(struct sockaddr_un *a, uint64_t nonce) {
    memset(a, 0, sizeof *a);
    a->sun_family = AF_UNIX;
    int n = snprintf(a->sun_path + 1, sizeof a->sun_path - 1, "aiodbenv-logwake-%016llx",
                     (unsigned long long)nonce);
    return (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

/* Wake other processes' waiters: the futex (aiodbenv/log/wake.py, the fallback's) and, by
   socket, each registered waiter whose LSN is durable now (every one if `all`). Returns the
   number of bytes sent. Called without the mutex. */
static uint64_t log_wake_waiters(uint64_t *w, const uint64_t *J, int all) {
    syscall(SYS_futex, (uint32_t *)&w[J[J_I_SEQ]], FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  /* the publish before the registrations' reads */
    uint64_t s_lsn = __atomic_load_n(&w[J[JX_I_S_LSN]], __ATOMIC_ACQUIRE), sent = 0;
    int sock = (int)J[JX_SOCK] - 1;
    for (uint64_t i = 0; i < J[JX_NSLOTS]; i++) {
        uint64_t *want = &w[J[JX_I_WAKE_WANT] + i];
        uint64_t v = __atomic_load_n(want, __ATOMIC_ACQUIRE);
        if (!v || !(all || v == 1 || s_lsn > v - 2)) continue;
        /* Whoever clears it sends: one byte per registration, however many writers look. */
        if (!__atomic_compare_exchange_n(want, &v, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue;
        uint64_t nonce = __atomic_load_n(&w[J[JX_I_WAKE_NAME] + i], __ATOMIC_ACQUIRE);
        if (!nonce) continue;
        if (sock < 0) continue;  /* none: the waiter's bounded re-check finds the change */
        struct sockaddr_un a;
        socklen_t len = log_wake_addr(&a, nonce);
        char one = 1;
        if (sendto(sock, &one, 1, MSG_DONTWAIT | MSG_NOSIGNAL, (struct sockaddr *)&a, len) == 1)
            sent++;
    }
    return sent;
}

/* Send the wake-ups a Python writer owes after a publish (all: the role was let go). The
   same index array as a round's job (only the wake words are read). */
int64_t aiodb_log_wake(const uint64_t *P, const uint64_t *J, int all) {
    uint64_t *w = (uint64_t *)(uintptr_t)P[LP_W];
    uint64_t nbytes = region_bytes(w);
    if (J[J_I_SEQ] >= nbytes / 8 || J[JX_I_S_LSN] >= nbytes / 8 ||
        J[JX_I_WAKE_WANT] + J[JX_NSLOTS] > nbytes / 8 || J[JX_I_WAKE_NAME] + J[JX_NSLOTS] > nbytes / 8)
        return AIODB_CORRUPT;
    return (int64_t)log_wake_waiters(w, J, all);
}

/* Record a failed write or fsync in the region (the first one), so that a process taking the
   role over after this one died never fsyncs again and calls the log durable. */
static void log_round_failed(uint64_t *w, void *mutex, const uint64_t *P, uint64_t *J,
                             uint64_t file, int err) {
    (void)P;
    (void)mutex;
    J[J_ERR] = (uint64_t)(err ? err : EIO);
    J[J_FILE] = file;
    /* Word stores without the mutex, as LogState.fail does: read unlocked by every process. */
    if (!__atomic_load_n(&w[J[JX_I_FERRNO]], __ATOMIC_ACQUIRE)) {
        w[J[JX_I_FFILE]] = file;
        __atomic_store_n(&w[J[JX_I_FERRNO]], J[J_ERR], __ATOMIC_RELEASE);
    }
    log_job_finish(J, LOG_JOB_FAILED);
}

/* Write buffer bytes [J_START, J_END) at J_FOFF of J_FD, fdatasync if JX_SYNC. 0 or errno. */
static int log_round_io(const uint64_t *P, uint64_t *w, const uint64_t *J) {
    const unsigned char *src = (const unsigned char *)w + P[LP_B0] + J[J_START];
    uint64_t left = J[J_END] - J[J_START], foff = J[J_FOFF];
    while (left) {
        ssize_t n = pwrite((int)J[J_FD], src, left, (off_t)foff);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return n < 0 ? errno : EIO;
        src += n; left -= (uint64_t)n; foff += (uint64_t)n;
    }
    /* Never retried: after a failed fdatasync Linux may have dropped the dirty pages. */
    if (J[JX_SYNC] && fdatasync((int)J[J_FD]) != 0) return errno ? errno : EIO;
    return 0;
}

/* end_write (aiodbenv/log/rounds.py) for the round in J, the mutex held. 0, or 1 if the
   region is not in the state the round was started from (nothing done). */
static int log_round_publish(const uint64_t *P, uint64_t *w, const uint64_t *J) {
    uint64_t f_lsn = w[P[LP_F_LSN]], tail = w[P[LP_TAIL]], fill = tail & 0xFFFFFFFFu;
    uint64_t start = J[J_START], to = J[J_END], file = J[J_FILE];
    if (fill > P[LP_BSIZE] || to > fill || start > to || (f_lsn >> 32) != file) return 1;
    uint64_t count = to - start;
    if (count) {
        w[J[J_I_WRITES]]++;
        w[J[J_I_FBYTES]] += count;
        uint64_t begin = (file << 32) | ((f_lsn & 0xFFFFFFFFu) + start);
        if (begin == w[J[J_I_LASTEND]] && (begin & 4095)) w[J[J_I_REWRITES]]++;
        w[J[J_I_LASTEND]] = begin + count;
    }
    uint64_t end = f_lsn + to;
    w[J[J_I_SEQ]]++;
    if (w[J[J_I_W_LSN]] < end) w[J[J_I_W_LSN]] = end;
    if (J[JX_SYNC]) {
        w[J[JX_I_FSYNCS]]++;
        if (end > w[J[JX_I_S_LSN]]) __atomic_store_n(&w[J[JX_I_S_LSN]], end, __ATOMIC_RELEASE);
        uint64_t commits = J[J_COMMITS];
        if (commits) {
            w[J[JX_I_FLUSHES]]++;
            if (commits > w[J[JX_I_MAXC]]) w[J[JX_I_MAXC]] = commits;
            if (!w[J[JX_I_MINC]] || commits < w[J[JX_I_MINC]]) w[J[JX_I_MINC]] = commits;
        }
    }
    if (to) {
        uint64_t rest = fill - to;
        unsigned char *b = (unsigned char *)w + P[LP_B0];
        if (rest) memmove(b, b + to, rest);
        w[P[LP_F_LSN]] = end;
        __atomic_store_n(&w[P[LP_TAIL]], (tail & ~0xFFFFFFFFull) | rest, __ATOMIC_RELEASE);
    }
    return 0;
}

/* _more_requests + begin_write, the mutex held: set J up for the next round and return 1, or
   0 if there is nothing another round here can serve (or it must not: a failure recorded, a
   file to start, a gap, another file than J_FD's). */
static int log_round_next(const uint64_t *P, uint64_t *w, uint64_t *J) {
    uint64_t f_lsn = w[P[LP_F_LSN]], file = f_lsn >> 32;
    uint64_t w_lsn = w[J[J_I_W_LSN]], fill = w[P[LP_TAIL]] & 0xFFFFFFFFu;
    if (w[J[JX_I_FERRNO]] || w[J[JX_I_FREADY]] < file || file != J[J_FILE] ||
        (w_lsn < f_lsn && (w_lsn >> 32) == file) || fill > P[LP_BSIZE])
        return 0;
    uint64_t sync;
    if (w[J[JX_I_PENDING]] > 0 && f_lsn + fill > w[J[JX_I_S_LSN]])
        sync = 1;
    else if (w[J[JX_I_WANTW]] >= w_lsn)
        sync = 0;
    else
        return 0;
    uint64_t start = w_lsn >= f_lsn ? w_lsn - f_lsn : 0;
    if (start > fill) return 0;
    J[JX_SYNC] = sync;
    J[J_START] = start;
    J[J_END] = fill;
    J[J_FOFF] = (f_lsn & 0xFFFFFFFFu) + start;
    J[J_COMMITS] = w[J[JX_I_PENDING]];
    w[J[JX_I_PENDING]] = 0;
    return 1;
}

/* Run the round described by J (started by begin_write, the role held by this handle) in the
   calling thread (a worker's, never the loop's), then up to JX_MORE further rounds, then let
   the role go and wake the waiters. Returns 0 with J_STATE set: DONE; FAILED (J_ERR, J_FILE:
   the failure is recorded in the region, the role still held: the loop panics the
   environment); STUCK (the round J now describes is written but not published, or J_START ==
   J_END and nothing is left but letting the role go: the loop does it). AIODB_CORRUPT:
   nothing done. -EOWNERDEAD: STUCK, the mutex HELD with its holder dead (the caller repairs
   and lets go). */
int64_t aiodb_log_round(const uint64_t *P, uint64_t *J) {
    uint64_t *w = (uint64_t *)(uintptr_t)P[LP_W];
    uint64_t nbytes = region_bytes(w);
    J[JX_ROUNDS] = J[JX_SENT] = 0;
    if (!nbytes || P[LP_B0] > nbytes || P[LP_BSIZE] > nbytes - P[LP_B0] ||
        J[J_START] > J[J_END] || J[J_END] > P[LP_BSIZE] || P[LP_F_LSN] >= nbytes / 8 ||
        P[LP_TAIL] >= nbytes / 8 || P[LP_NOWAIT] >= nbytes / 8 || J[JX_NSLOTS] > 4096)
        return log_job_finish(J, LOG_JOB_STUCK), AIODB_CORRUPT;
    for (int i = J_I_W_LSN; i <= J_I_FTOKEN; i++)
        if (J[i] >= nbytes / 8) return log_job_finish(J, LOG_JOB_STUCK), AIODB_CORRUPT;
    for (int i = JX_I_S_LSN; i <= JX_I_WAKE_NAME; i++)
        if (J[i] + J[JX_NSLOTS] >= nbytes / 8)
            return log_job_finish(J, LOG_JOB_STUCK), AIODB_CORRUPT;
    J[J_ERR] = 0;
    __atomic_store_n(&J[J_STATE], LOG_JOB_RUNNING, __ATOMIC_RELEASE);
    void *mutex = (void *)(uintptr_t)P[LP_MUTEX];
    uint64_t more = J[JX_MORE];
    for (;;) {
        int err = log_round_io(P, w, J);
        if (err) {
            log_round_failed(w, mutex, P, J, J[J_FILE], err);
            return 0;
        }
        J[JX_ROUNDS]++;
        int64_t rc = lock(w, mutex, P[LP_NOWAIT], 1);
        if (rc) {  /* written, not published: the loop publishes J's round */
            log_job_finish(J, LOG_JOB_STUCK);
            return rc == -EOWNERDEAD ? rc : 0;
        }
        if (log_round_publish(P, w, J)) {
            unlock(mutex);
            log_job_finish(J, LOG_JOB_STUCK);  /* not the state it started from: Python checks */
            return 0;
        }
        int again = more > 0 && log_round_next(P, w, J);
        if (!again) break;
        more--;
        unlock(mutex);
        J[JX_SENT] += log_wake_waiters(w, J, 0);
    }
    /* release_role, the mutex still held */
    if (w[J[J_I_FPID]] == J[J_PID] && w[J[J_I_FSTART]] == J[J_PSTART] &&
        w[J[J_I_FTOKEN]] == J[J_TOKEN]) {
        w[J[J_I_FPID]] = 0;
        w[J[J_I_FSTART]] = 0;
        w[J[J_I_FTOKEN]] = 0;
        w[J[J_I_SEQ]]++;
    }
    unlock(mutex);
    if (mutex) J[JX_SENT] += log_wake_waiters(w, J, 1);
    log_job_finish(J, LOG_JOB_DONE);
    return 0;
}

/* A flush (sync) or write-through call on the loop's thread, in one critical section:
   register it (a flush: pending_commits + 1; a write-through: want_write raised to `want`),
   and, when no process holds the writer role and the current log file is `file` (open here
   as `fd`), take the role, start the round (begin_write) and hand it to the round thread,
   which then runs as any write behind does (aiodb_log_round). threadrounds.py's
   _flush_word/_write_through steps (register_commit or register_write, take_role,
   begin_write, BehindJob.start) are its Python twin, which runs whenever this returns
   AIODB_LOG_PYTHON. The mutex is only tried: never a wait on the loop.

   Why: a lone put(flush=True) spent ~60 us of the loop thread's CPU against ~13 us for an
   event loop awaiting a bare C worker; three critical sections and the job set-up through
   cffi were a good part of it.

   Returns 1: the round started (J set up, J_STATE QUEUED, the thread woken); 0: registered
   only (another process writes, or the file moved on: the caller waits for progress);
   AIODB_LOG_PYTHON: nothing done (the mutex was busy, a bad state: the Python path decides);
   -EOWNERDEAD: nothing done, the mutex HELD with its holder dead (the caller repairs). */
int64_t aiodb_log_direct(const uint64_t *P, uint64_t *J, int sync, uint64_t want,
                         uint64_t file, uint64_t fd, uint64_t evfd, uint64_t more) {
    uint64_t *w = (uint64_t *)(uintptr_t)P[LP_W];
    uint64_t nbytes = region_bytes(w);
    if (!nbytes || P[LP_B0] > nbytes || P[LP_BSIZE] > nbytes - P[LP_B0] ||
        P[LP_F_LSN] >= nbytes / 8 || P[LP_TAIL] >= nbytes / 8 || P[LP_NOWAIT] >= nbytes / 8 ||
        J[JX_NSLOTS] > 4096)
        return AIODB_LOG_PYTHON;
    for (int i = J_I_W_LSN; i <= J_I_FTOKEN; i++)
        if (J[i] >= nbytes / 8) return AIODB_LOG_PYTHON;
    for (int i = JX_I_S_LSN; i <= JX_I_WAKE_NAME; i++)
        if (J[i] + J[JX_NSLOTS] >= nbytes / 8) return AIODB_LOG_PYTHON;
    void *mutex = (void *)(uintptr_t)P[LP_MUTEX];
    int64_t rc = try_lock(w, mutex, P[LP_NOWAIT]);
    if (rc == -EBUSY) return AIODB_LOG_PYTHON;
    if (rc) return rc;
    uint64_t f_lsn = w[P[LP_F_LSN]], w_lsn = w[J[J_I_W_LSN]];
    uint64_t fill = w[P[LP_TAIL]] & 0xFFFFFFFFu;
    uint64_t start = w_lsn >= f_lsn ? w_lsn - f_lsn : 0;
    /* begin_write's check (Python raises), and a failed write or fsync recorded by a writer
       whose process did not panic: no round may follow it (Python panics). */
    if (fill > P[LP_BSIZE] || start > fill || w[J[JX_I_FERRNO]]) {
        unlock(mutex);
        return AIODB_LOG_PYTHON;
    }
    if (sync)
        w[J[JX_I_PENDING]]++;
    else if (want > w[J[JX_I_WANTW]])
        w[J[JX_I_WANTW]] = want;
    if (w[J[J_I_FPID]] || (f_lsn >> 32) != file) {
        unlock(mutex);
        return 0;
    }
    w[J[J_I_FSTART]] = J[J_PSTART];
    w[J[J_I_FTOKEN]] = J[J_TOKEN];
    w[J[J_I_FPID]] = J[J_PID];
    J[J_FD] = fd;
    J[J_FILE] = file;
    J[J_FOFF] = (f_lsn & 0xFFFFFFFFu) + start;
    J[J_START] = start;
    J[J_END] = fill;
    J[J_COMMITS] = w[J[JX_I_PENDING]];
    w[J[JX_I_PENDING]] = 0;
    unlock(mutex);
    J[J_EVFD] = evfd + 1;
    J[JX_SYNC] = (uint64_t)(sync != 0);
    J[JX_MORE] = more;
    __atomic_store_n(&J[J_STATE], LOG_JOB_QUEUED, __ATOMIC_RELEASE);
    aiodb_log_thread_go(J);
    return 1;
}

/* ---- The round thread: one per log handle, started on its first round, that runs the
   rounds the loop hands it (aiodb_log_round) without ever taking the GIL.

   Why a thread of our own: handed to a Python worker thread, a round waited ~70 us (measured,
   loaded 2-core machine) before its pwrite: the thread's wake-up, then the GIL, which the
   loop's thread holds until it goes back to epoll. This one is woken by a futex and starts
   the write at once. P and J (owned by the Python handle) are kept alive until JX_ALIVE is
   0 (aiodbenv/log/accel.py). */
static void log_futex_wake(uint64_t *word) {
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

static void *log_round_thread(void *arg) {
    uint64_t *J = arg;
    const uint64_t *P = (const uint64_t *)(uintptr_t)J[JX_PARGS];
    for (;;) {
        if (__atomic_load_n(&J[JX_QUIT], __ATOMIC_ACQUIRE)) break;
        if (__atomic_load_n((uint32_t *)&J[JX_GO], __ATOMIC_ACQUIRE) == 1) {
            /* Cleared before the round: the loop hands the next one only once this one
               says it is done (J_STATE), and that GO = 1 must not be lost. */
            __atomic_store_n((uint32_t *)&J[JX_GO], 0, __ATOMIC_SEQ_CST);
            if (aiodb_log_round(P, J) == -EOWNERDEAD) aiodb_log_repair_cb(J);
            if (__atomic_load_n(&J[JX_NOTIFY], __ATOMIC_SEQ_CST)) aiodb_log_done_cb(J);
            continue;
        }
        /* A bounded sleep: a lost wake-up costs at most this, and JX_QUIT is seen. */
        struct timespec ts = {0, 200000000};
        syscall(SYS_futex, (uint32_t *)&J[JX_GO], FUTEX_WAIT, 0, &ts, NULL, 0);
    }
    __atomic_store_n(&J[JX_ALIVE], 0, __ATOMIC_RELEASE);
    log_futex_wake(&J[JX_ALIVE]);
    return NULL;
}

/* Start the round thread of the job J with parameter array P. 0, or -errno. */
int64_t aiodb_log_thread_start(const uint64_t *P, uint64_t *J) {
    pthread_t t;
    pthread_attr_t a;
    J[JX_PARGS] = (uint64_t)(uintptr_t)P;
    J[JX_QUIT] = 0;
    J[JX_GO] = 0;
    __atomic_store_n(&J[JX_ALIVE], 1, __ATOMIC_RELEASE);
    if (pthread_attr_init(&a)) return (J[JX_ALIVE] = 0), -ENOMEM;
    pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&a, 256 * 1024);
    /* Signals go to the loop's thread, never to this one. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&t, &a, log_round_thread, J);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&a);
    if (rc) {
        J[JX_ALIVE] = 0;
        return -rc;
    }
    return 0;
}

/* Hand the round set up in J to the round thread. */
void aiodb_log_thread_go(uint64_t *J) {
    __atomic_store_n((uint32_t *)&J[JX_GO], 1, __ATOMIC_RELEASE);
    log_futex_wake(&J[JX_GO]);
}

/* Ask the round thread to end once its round (if any) is done. */
void aiodb_log_thread_quit(uint64_t *J) {
    __atomic_store_n(&J[JX_QUIT], 1, __ATOMIC_RELEASE);
    log_futex_wake(&J[JX_GO]);
}

/* Ask for aiodb_log_done_cb after the round under way; returns J_STATE read after asking
   (a round already done when asked gets no call: the caller sees it done). */
uint64_t aiodb_log_thread_notify(uint64_t *J) {
    __atomic_store_n(&J[JX_NOTIFY], 1, __ATOMIC_SEQ_CST);
    return __atomic_load_n(&J[J_STATE], __ATOMIC_SEQ_CST);
}
