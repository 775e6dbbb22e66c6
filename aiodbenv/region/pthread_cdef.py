"""The pthread calls aiodbenv binds, shared by the compiled accelerator and the ABI fallback.

Mutexes and attributes are passed as ``void *`` to opaque storage, so no C struct layout is
written down here: the compiled module checks the real sizes at build time, the ABI fallback
relies on :data:`aiodbenv.region.layout.MUTEX_STORAGE_BYTES` being generous.
"""

CDEF = """
int pthread_mutexattr_init(void *attr);
int pthread_mutexattr_destroy(void *attr);
int pthread_mutexattr_setpshared(void *attr, int pshared);
int pthread_mutexattr_setrobust(void *attr, int robust);
int pthread_mutex_init(void *mutex, const void *attr);
int pthread_mutex_lock(void *mutex);
int pthread_mutex_trylock(void *mutex);
int pthread_mutex_timedlock(void *mutex, const void *abstime);
int pthread_mutex_unlock(void *mutex);
int pthread_mutex_consistent(void *mutex);
"""

#: ``abstime`` of pthread_mutex_timedlock is a ``struct timespec``, passed as ``int64_t[2]``
#: (seconds, nanoseconds; CLOCK_REALTIME): its layout on 64-bit Linux, asserted at build time.
#: glibc's values for Linux; the compiled module asserts them at build time.
PTHREAD_PROCESS_SHARED = 1
PTHREAD_MUTEX_ROBUST = 1
#: Bytes of attribute storage handed to pthread_mutexattr_init (glibc needs 4).
MUTEXATTR_STORAGE_BYTES = 64
