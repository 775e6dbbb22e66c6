#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <time.h>

/* Word offsets and flag bits, set once from the Python layout definitions. */
@LAYOUT_ENUM@
static uint64_t L[L_COUNT];

/* 1 if n values were given, as many as the enum names; else 0 and nothing is set (a module
   built from another list of names: the Python side refuses to use it). */
int aiodb_set_layout(const uint64_t *values, int n) {
    if (n != L_COUNT) return 0;
    for (int i = 0; i < n; i++) L[i] = values[i];
    return 1;
}

/* Returned (as a result or a status) when an offset read from the region fails its bounds
   check, or a chain is longer than the region could hold: the Python side raises
   CorruptRegion and panics the environment. Far below every -errno. */
#define AIODB_CORRUPT (-1000000)

/* The size of every region the functions below may be handed, keyed by its base pointer, so
   that no offset read from shared memory is followed before it is checked, without a size
   argument on every call. A few regions per process; the lookup is one or two compares. */
#define MAX_KNOWN 256
static struct { uint64_t *w; uint64_t nbytes; } known[MAX_KNOWN];
static int nknown;
/* Writers (attach, detach; cffi drops the GIL) take turns; readers never lock. */
static pthread_mutex_t known_lock = PTHREAD_MUTEX_INITIALIZER;

/* Record (or update) the size of the region at w; 0 if the table is full. Attaching runs in
   worker threads while the loop thread looks sizes up: a slot's size is stored before its
   pointer (release), and the pointer is read with acquire, so a reader that finds a pointer
   finds its size. */
int aiodb_set_region(uint64_t *w, uint64_t nbytes) {
    pthread_mutex_lock(&known_lock);
    int free_slot = -1, n = nknown, ok = 1;
    for (int i = 0; i < n; i++) {
        if (known[i].w == w) {
            __atomic_store_n(&known[i].nbytes, nbytes, __ATOMIC_RELEASE);
            pthread_mutex_unlock(&known_lock);
            return 1;
        }
        if (!known[i].w && free_slot < 0) free_slot = i;
    }
    if (free_slot < 0 && n == MAX_KNOWN) ok = 0;
    else {
        if (free_slot < 0) free_slot = n;
        __atomic_store_n(&known[free_slot].nbytes, nbytes, __ATOMIC_RELEASE);
        __atomic_store_n(&known[free_slot].w, w, __ATOMIC_RELEASE);
        if (free_slot == n) __atomic_store_n(&nknown, n + 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&known_lock);
    return ok;
}

/* The region at w is about to be unmapped. */
void aiodb_forget_region(uint64_t *w) {
    pthread_mutex_lock(&known_lock);
    for (int i = 0; i < nknown; i++)
        if (known[i].w == w) __atomic_store_n(&known[i].w, (uint64_t *)NULL, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&known_lock);
}

/* Bytes in the region at w; 0 (every check fails) for one never recorded. */
static inline uint64_t region_bytes(const uint64_t *w) {
    int n = __atomic_load_n(&nknown, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++)
        if (__atomic_load_n(&known[i].w, __ATOMIC_ACQUIRE) == w)
            return __atomic_load_n(&known[i].nbytes, __ATOMIC_ACQUIRE);
    return 0;
}

/* A buffer header at byte offset off lies wholly inside a region of nbytes, word aligned,
   past the region header (offset 0 means "none" and is never followed). */
static inline int bh_ok(uint64_t off, uint64_t nbytes) {
    return off >= 64 && !(off & 7) && off <= nbytes && nbytes - off >= L[L_BH_DATA];
}

/* Lock without blocking; returns 0 with the mutex held, or -errno with it NOT held, except
   -EOWNERDEAD, where the mutex IS held and the caller must repair or panic. */
static int64_t try_lock(uint64_t *w, void *mutex, uint64_t nowait_w) {
    if (!mutex) return 0;
    int rc = pthread_mutex_trylock((pthread_mutex_t *)mutex);
    if (rc) return -(int64_t)rc;
    w[nowait_w]++;
    return 0;
}

static void unlock(void *mutex) {
    if (mutex) pthread_mutex_unlock((pthread_mutex_t *)mutex);
}

/* How long lock() waits for a held mutex before giving up with -ETIMEDOUT (nanoseconds). */
static int64_t lock_wait_ns = 1000000000;

void aiodb_set_lock_wait(int64_t ns) { lock_wait_ns = ns; }

/* Lock, waiting a bounded time if it is held (counted as a wait): a holder that is stopped
   must not freeze the caller. Returns 0 with the mutex held, or -errno: -EOWNERDEAD with it
   held (the caller must repair or panic), any other (-ETIMEDOUT: still held) without.
   wait == 0 is the try-lock mode of callers on an event loop: a held mutex gives -EBUSY at
   once (nothing waited for), and the Python side backs off asynchronously and retries. */
static int64_t lock(uint64_t *w, void *mutex, uint64_t nowait_w, int wait) {
    int64_t rc = try_lock(w, mutex, nowait_w);
    if (rc != -EBUSY || !wait) return rc;
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += lock_wait_ns / 1000000000;
    until.tv_nsec += lock_wait_ns % 1000000000;
    if (until.tv_nsec >= 1000000000) { until.tv_sec++; until.tv_nsec -= 1000000000; }
    int r = pthread_mutex_timedlock((pthread_mutex_t *)mutex, &until);
    if (r == 0 || r == EOWNERDEAD) w[nowait_w - L[L_WAITS_FROM_NOWAITS]]++;
    return r ? -(int64_t)r : 0;
}
