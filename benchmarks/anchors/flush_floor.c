/* The floor of a log flush kept off the event loop, in C, with no Python.
 *
 * Berkeley DB's log_put(DB_FLUSH) writes and fdatasyncs in the calling thread. aiodbenv may
 * not block its event loop on an fdatasync, so its flush hands the write to a thread and is
 * woken when the thread is done. This program measures, on this machine, what that hand-off
 * costs at the least: the caller sleeps in epoll_wait on an eventfd (as an event loop does),
 * wakes a worker thread through a futex, the worker does the I/O and adds to the eventfd.
 *
 *   sync      pwrite(100 bytes) + fdatasync in the calling thread (Berkeley DB's shape)
 *   handoff   the same I/O in a worker thread: futex wake, I/O, eventfd, epoll_wait returns
 *   empty     the hand-off with no I/O: its cost alone
 *
 * Usage: flush_floor DIR SECONDS. Prints one JSON object: microseconds per operation (median
 * of five slices of each mode, interleaved). Built with -DFLOOR_LIB it is a shared library
 * instead (floor_start, floor_go, floor_stop), through which flush_floor.py has an asyncio
 * event loop wait for the same worker: the floor with an event loop but no library.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int fd, efd, ep __attribute__((unused));
static atomic_uint go_word;
static atomic_int quit, with_io;
static off_t off;
static char rec[100];

__attribute__((unused)) static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char *what) {
    printf("{\"ok\": false, \"error\": \"%s: %s\"}\n", what, strerror(errno));
    exit(1);
}

#define PREALLOC (16 << 20)

static void io(void) {
    if (pwrite(fd, rec, sizeof rec, off) != (ssize_t)sizeof rec) die("pwrite");
    off = (off + sizeof rec) % (PREALLOC - sizeof rec);
    if (fdatasync(fd)) die("fdatasync");
}

static void *worker(void *arg) {
    (void)arg;
    unsigned seen = 0;
    for (;;) {
        unsigned v;
        while ((v = atomic_load(&go_word)) == seen) {
            if (atomic_load(&quit)) return NULL;
            syscall(SYS_futex, &go_word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
        }
        seen = v;
        if (atomic_load(&quit)) return NULL;  /* the wake-up that stops it: no more I/O */
        if (atomic_load(&with_io)) io();
        uint64_t one = 1;
        if (write(efd, &one, 8) != 8) die("eventfd write");
    }
}

/* For flush_floor.py's asyncio row (built with -DFLOOR_LIB as a shared library, called
   through ctypes): the same worker, on the caller's file and eventfd; the caller's event
   loop watches the eventfd. */
static pthread_t lib_worker;

int floor_start(int file_fd, int event_fd) {
    fd = file_fd;
    efd = event_fd;
    memset(rec, 'x', sizeof rec);
    atomic_store(&quit, 0);
    atomic_store(&with_io, 1);
    return pthread_create(&lib_worker, NULL, worker, NULL) ? -1 : 0;
}

void floor_go(void) {
    atomic_fetch_add(&go_word, 1);
    syscall(SYS_futex, &go_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* Stop the worker and wait for it: it touches neither descriptor once this returns. */
void floor_stop(void) {
    atomic_store(&quit, 1);
    floor_go();
    pthread_join(lib_worker, NULL);
}

#ifndef FLOOR_LIB
static void handoff_once(void) {
    atomic_fetch_add(&go_word, 1);
    syscall(SYS_futex, &go_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    struct epoll_event ev;
    while (epoll_wait(ep, &ev, 1, -1) != 1)
        if (errno != EINTR) die("epoll_wait");
    uint64_t v;
    if (read(efd, &v, 8) != 8) die("eventfd read");
}

static double slice(int mode, double seconds) {
    long n = 0;
    double t0 = now(), end = t0 + seconds;
    atomic_store(&with_io, mode != 2);
    do {
        for (int i = 0; i < 50; i++) {
            if (mode == 0)
                io();
            else
                handoff_once();
        }
        n += 50;
    } while (now() < end);
    return (now() - t0) / n * 1e6;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: flush_floor DIR SECONDS\n");
        return 2;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/flush_floor.log", argv[1]);
    double seconds = atof(argv[2]) / 15;
    memset(rec, 'x', sizeof rec);
    fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (fd < 0) die("open");
    /* Preallocated and synced first, as log files are (Berkeley DB's and aiodbenv's): an
       fdatasync then has no file size to commit, only the data. */
    static char zeros[1 << 16];
    for (int i = 0; i < PREALLOC / (int)sizeof zeros; i++)
        if (write(fd, zeros, sizeof zeros) != (ssize_t)sizeof zeros) die("preallocate");
    if (fsync(fd)) die("fsync");
    efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = efd};
    if (efd < 0 || ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, efd, &ev)) die("eventfd/epoll");
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL)) die("pthread_create");
    double r[3][5];
    for (int rep = 0; rep < 5; rep++)
        for (int mode = 0; mode < 3; mode++) r[mode][rep] = slice(mode, seconds);
    atomic_store(&quit, 1);
    atomic_fetch_add(&go_word, 1);
    syscall(SYS_futex, &go_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    pthread_join(t, NULL);
    close(fd);
    unlink(path);
    for (int mode = 0; mode < 3; mode++) qsort(r[mode], 5, sizeof(double), cmp);
    printf("{\"ok\": true, \"sync_us\": %.1f, \"handoff_us\": %.1f, \"empty_us\": %.1f, "
           "\"handoff_over_sync\": %.2f}\n",
           r[0][2], r[1][2], r[2][2], r[1][2] / r[0][2]);
    return 0;
}
#endif
