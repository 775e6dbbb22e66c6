/* Page reads that must wait for the disk, through io_uring (the Python side is
   aiodbenv/mpool/uring.py).

   A read handed to a reader thread costs two thread wake-ups besides the disk's own (the
   thread, then the loop), 60-70 us each on a loaded two-CPU machine: more than the disk. An
   io_uring IORING_OP_READ of a regular file is issued by the loop thread itself: the kernel
   starts the disk read at once and waits for it asynchronously (for buffered reads, ext4 and
   the other filesystems with async buffered reads use the page's wait queue, not a worker
   thread), and the page is copied to the frame in the loop thread's own context when the disk
   is done. The only wake-up is the loop's, as when the disk answers a blocking pread. The loop
   watches the ring's descriptor (readable while completions wait: add_reader) and reaps every
   completion of a wake in one call.

   No thread is made here and the GIL is never needed by the kernel's side. A lone read is
   started at once (one io_uring_enter); the reads a loop's turn makes while others are at the
   disk are started together (aiodb_reader_submit_many): the kernel then hands them to the
   device in one plugged batch, one notification for all, where one per read cost 20-30 us
   of this thread's time each on a virtual disk.

   A read that stops short of what was asked (not at the end of the file) or is interrupted
   (-EINTR, -EAGAIN) is issued again for the rest, here, so the Python side sees what a blocking
   pread loop would: the bytes read (short only at the end of the file) or -errno. */

#include <fcntl.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* One read in flight: the slot index is the SQE's user_data. */
struct aiodb_reader_slot {
    uint64_t token; /* the caller's */
    char *buf;
    uint64_t len, off, got;
    int fd, next_free; /* next_free: the free list (-1 ends it); -2 while in use */
    int requeued;      /* issued again by the reap under way: its place in the ring (1, ...) */
};

struct aiodb_reader {
    int ring_fd, nslots, free_head, inflight;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *ring_map, *sqe_map;
    size_t ring_len, sqe_len;
    int64_t test_result; /* tests: the next completion's result (0: none) */
    int test_take, test_err; /* tests: the next enter takes test_take, then fails (-1: off) */
    struct aiodb_reader_slot slots[];
};

/* Queue one read of slot i (no syscall); 0, or -EBUSY when the submission ring is full. */
static int reader_queue(struct aiodb_reader *r, int i) {
    struct aiodb_reader_slot *s = &r->slots[i];
    unsigned tail = *r->sq_tail, k = tail & *r->sq_mask;
    struct io_uring_sqe *q = &r->sqes[k];
    memset(q, 0, sizeof *q);
    q->opcode = IORING_OP_READ;
    q->fd = s->fd;
    q->addr = (uint64_t)(uintptr_t)(s->buf + s->got);
    q->len = (uint32_t)(s->len - s->got);
    q->off = s->off + s->got;
    q->user_data = (uint64_t)i;
    r->sq_array[k] = k;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    return 0;
}

/* Hand the n entries queued last to the kernel. Returns how many it took -- the first ones,
   in the order they were queued; those it did not take are taken back from the ring -- or
   -errno when it took none. The kernel may take part of them and then fail (no memory for
   the rest): the part taken is in flight, and the count says so. */
static int reader_enter(struct aiodb_reader *r, unsigned n) {
    unsigned taken = 0;
    int err = 0;
    while (taken < n) {
        unsigned ask = n - taken;
        if (r->test_take >= 0 && taken + ask > (unsigned)r->test_take) {
            if (taken >= (unsigned)r->test_take) { /* the kernel out of memory, say */
                err = r->test_err;
                r->test_take = -1;
                break;
            }
            ask = (unsigned)r->test_take - taken;
        }
        long got = syscall(__NR_io_uring_enter, r->ring_fd, ask, 0, 0, NULL, 0);
        if (got > 0) {
            taken += (unsigned)got;
            continue;
        }
        if (got < 0 && errno == EINTR) continue;
        err = got < 0 ? errno : EAGAIN; /* none taken and no error: give up, never spin */
        break;
    }
    /* Without SQPOLL the kernel reads the ring only inside io_uring_enter: what it did not
       take is still ours to take back. */
    if (taken < n) __atomic_store_n(r->sq_tail, *r->sq_tail - (n - taken), __ATOMIC_RELEASE);
    return taken ? (int)taken : -err;
}

/* A ring for up to `depth` reads in flight: the reader, or NULL with *err = errno (ENOSYS,
   EPERM under a seccomp filter, ENOMEM...). */
struct aiodb_reader *aiodb_reader_open(int depth, int *err) {
    if (depth < 1 || depth > 4096) {
        *err = EINVAL;
        return NULL;
    }
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    /* The completion ring is twice the submission ring (the kernel's default), and no more
       reads than it holds are ever in flight, so no completion overflows. */
    /* Not IORING_SETUP_COOP_TASKRUN: with it (completions finished only at the loop thread's
       next system call, no interrupt) the misses of a loop that also runs a 1 ms timer were
       slower here, 1 and 32 coroutines alike. */
    int fd = (int)syscall(__NR_io_uring_setup, (unsigned)depth, &p);
    if (fd < 0) {
        *err = errno;
        return NULL;
    }
    (void)fcntl(fd, F_SETFD, FD_CLOEXEC); /* io_uring_setup sets it already on new kernels */
    int nslots = (int)p.cq_entries < depth ? (int)p.cq_entries : depth;
    struct aiodb_reader *r = calloc(1, sizeof *r + (size_t)nslots * sizeof r->slots[0]);
    if (!r) {
        close(fd);
        *err = ENOMEM;
        return NULL;
    }
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (!(p.features & IORING_FEAT_SINGLE_MMAP)) {
        /* Kernels before 5.4: not worth a second mapping path. */
        free(r);
        close(fd);
        *err = ENOSYS;
        return NULL;
    }
    r->ring_len = sq_len > cq_len ? sq_len : cq_len;
    r->ring_map = mmap(NULL, r->ring_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                       fd, IORING_OFF_SQ_RING);
    if (r->ring_map == MAP_FAILED) {
        *err = errno;
        free(r);
        close(fd);
        return NULL;
    }
    r->sqe_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqe_map = mmap(NULL, r->sqe_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                      IORING_OFF_SQES);
    if (r->sqe_map == MAP_FAILED) {
        *err = errno;
        munmap(r->ring_map, r->ring_len);
        free(r);
        close(fd);
        return NULL;
    }
    char *m = r->ring_map;
    r->sq_tail = (unsigned *)(m + p.sq_off.tail);
    r->sq_mask = (unsigned *)(m + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(m + p.sq_off.array);
    r->cq_head = (unsigned *)(m + p.cq_off.head);
    r->cq_tail = (unsigned *)(m + p.cq_off.tail);
    r->cq_mask = (unsigned *)(m + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(m + p.cq_off.cqes);
    r->sqes = r->sqe_map;
    r->ring_fd = fd;
    r->nslots = nslots;
    for (int i = 0; i < nslots; i++) r->slots[i].next_free = i + 1 < nslots ? i + 1 : -1;
    r->free_head = 0;
    r->test_take = -1;
    return r;
}

/* The descriptor the loop watches: readable while completions wait to be reaped. */
int aiodb_reader_fd(const struct aiodb_reader *r) { return r->ring_fd; }

/* Reads submitted and not yet reaped. */
int aiodb_reader_inflight(const struct aiodb_reader *r) { return r->inflight; }

/* Start reads k = 0..n-1: lens[k] bytes of fds[k] at offs[k] into bufs[k]; tokens[k] comes
   back with its result from aiodb_reader_reap. One io_uring_enter for all. Returns how many
   were started -- the first ones; fewer than n when `depth` reads are in flight, or when the
   kernel took only part of them (the caller starts the rest later or elsewhere) -- or
   -errno of io_uring_enter when it took none. Each buffer must stay valid until its token is
   reaped (or the reader closed). A length of 0 or over 2 GiB is -EINVAL (nothing started). */
int aiodb_reader_submit_many(struct aiodb_reader *r, int n, const int *fds, char *const *bufs,
                             const uint64_t *lens, const uint64_t *offs,
                             const uint64_t *tokens) {
    for (int k = 0; k < n; k++)
        if (lens[k] == 0 || lens[k] > 0x7fffffffULL) return -EINVAL;
    int m = 0, first = r->free_head;
    for (int i = first; m < n && i >= 0; i = r->slots[i].next_free, m++) {
        struct aiodb_reader_slot *s = &r->slots[i];
        s->token = tokens[m];
        s->buf = bufs[m];
        s->len = lens[m];
        s->off = offs[m];
        s->got = 0;
        s->fd = fds[m];
        reader_queue(r, i);
    }
    if (m == 0) return 0;
    int taken = reader_enter(r, (unsigned)m);
    if (taken < 0) return taken; /* none taken: every slot stays free */
    for (int k = 0; k < taken; k++) { /* the first `taken` queued: the free list's first */
        int i = r->free_head;
        r->free_head = r->slots[i].next_free;
        r->slots[i].next_free = -2;
    }
    r->inflight += taken;
    __atomic_add_fetch(&reads_at_disk, taken, __ATOMIC_RELAXED);
    return taken;
}

/* aiodb_reader_submit_many of one read, from its fields: a lone miss's read, started without
   the caller filling arrays first. */
int aiodb_reader_submit_one(struct aiodb_reader *r, int fd, char *buf, uint64_t len,
                            uint64_t off, uint64_t token) {
    return aiodb_reader_submit_many(r, 1, &fd, &buf, &len, &off, &token);
}

/* Reap up to max completed reads: tokens[k] and results[k] (the bytes read -- short only at
   the end of the file -- or -errno). Returns how many, or -errno if a read that stopped short
   could not be issued again (its token is then reaped with that error). Completions past max
   stay for the next call (the ring's descriptor stays readable). */
int aiodb_reader_reap(struct aiodb_reader *r, uint64_t *tokens, int64_t *results, int max) {
    unsigned head = *r->cq_head, tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
    unsigned again = 0;
    int n = 0;
    while (head != tail && n + (int)again < max) { /* room left for a failed re-issue */
        struct io_uring_cqe *c = &r->cqes[head & *r->cq_mask];
        uint64_t i = c->user_data;
        int64_t res = c->res;
        head++;
        if (i >= (uint64_t)r->nslots || r->slots[i].next_free != -2) continue; /* not ours */
        if (r->test_result) {
            res = r->test_result;
            r->test_result = 0;
        }
        struct aiodb_reader_slot *s = &r->slots[i];
        if (res == -EINTR || res == -EAGAIN || (res > 0 && s->got + (uint64_t)res < s->len)) {
            /* Interrupted, or short before the end of the file: read the rest. */
            if (res > 0) s->got += (uint64_t)res;
            reader_queue(r, (int)i);
            s->requeued = (int)++again; /* its place in the ring: 1, 2, ... */
            continue;
        }
        tokens[n] = s->token;
        results[n] = res < 0 ? res : (int64_t)(s->got + (uint64_t)res);
        n++;
        s->next_free = r->free_head;
        r->free_head = (int)i;
        r->inflight--;
    }
    __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    if (again) {
        int rc = reader_enter(r, again);
        int taken = rc > 0 ? rc : 0, err = rc < 0 ? rc : -EAGAIN;
        for (int i = 0; i < r->nslots; i++) {
            struct aiodb_reader_slot *s = &r->slots[i];
            if (!s->requeued) continue;
            int place = s->requeued;
            s->requeued = 0;
            if (place <= taken) continue; /* in flight again */
            /* Not in the kernel any more: the read fails with the error. */
            tokens[n] = s->token;
            results[n] = err;
            n++;
            s->next_free = r->free_head;
            r->free_head = i;
            r->inflight--;
        }
    }
    __atomic_sub_fetch(&reads_at_disk, n, __ATOMIC_RELAXED);
    return n;
}

/* Wait up to timeout_ms for a completion to reap (poll on the ring's descriptor; completions
   are posted by the kernel when this process's submitting thread runs, which a sleeping
   poll lets it do). 1: one is ready, 0: none within the bound, -errno. Used only to drain the
   reads left in flight when the reader closes. */
int aiodb_reader_wait(struct aiodb_reader *r, int timeout_ms) {
    struct pollfd pf = {.fd = r->ring_fd, .events = POLLIN};
    int rc = poll(&pf, 1, timeout_ms);
    if (rc < 0) return -errno;
    return rc > 0;
}

/* Close the ring and free the reader. In the process that made it, the kernel cancels the
   reads still in flight (none is copied into its buffer afterwards); in a forked child only
   this process's mappings and descriptor go (the parent's ring is untouched). */
void aiodb_reader_close(struct aiodb_reader *r) {
    __atomic_sub_fetch(&reads_at_disk, r->inflight, __ATOMIC_RELAXED);
    munmap(r->sqe_map, r->sqe_len);
    munmap(r->ring_map, r->ring_len);
    close(r->ring_fd);
    free(r);
}

/* Tests: the next completion reaped reports `res` instead of its own (-EIO, a short count,
   -EINTR to see the read issued again). 0 clears it. */
void aiodb_reader_test_result(struct aiodb_reader *r, int64_t res) { r->test_result = res; }

/* Tests: the next io_uring_enter takes at most `take` of the entries it is given, then fails
   with -err (as the kernel does when it runs out of memory part way). */
void aiodb_reader_test_enter(struct aiodb_reader *r, int take, int err) {
    r->test_take = take;
    r->test_err = err;
}
