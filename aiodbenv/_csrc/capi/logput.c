/* aiodbenv._hot.LogPutter: the compiled put of one log handle (aiodbenv/log/log.py, Log.put),
 * included by hot.c (one extension module).
 *
 * The cffi append (aiodbenv/_csrc/60_log.c, aiodb_log_put) is called through its address, as
 * hot.c calls the pin; what this adds is the rest of a put without Python: the bytes check and
 * the LSN, made here as an instance of aiodbenv.LSN (a tuple subclass) instead of a Python
 * tuple.__new__ call, which cost as much as the append itself (~0.4 us measured). Anything but
 * the plain case is handed back as the append's int result (or None: not bytes) and done by the
 * Python side, which owns every rare case. */

#include <sched.h>

typedef int64_t (*log_put_fn)(const uint64_t *P, uint32_t rtype, const char *data, uint64_t n);

typedef struct {
    PyObject_HEAD
    log_put_fn fn;
    const uint64_t *P;   /* the handle's parameter array (kept alive by keep) */
    PyObject *keep;      /* the cffi array holding P */
    PyObject *lsn_type;  /* aiodbenv.LSN */
    allocfunc lsn_alloc;
    uint32_t rtype;
    int64_t half;        /* the append's "more than half full" bit */
    const uint64_t *job; /* the handle's write-behind job array (aiodbenv/_csrc/60_log.c J_*),
                            its first word the state; NULL: none */
    PyObject *job_keep;  /* the cffi array holding it */
} LogPutter;

/* The write-behind job states this reads (60_log.c's LOG_JOB_*, aiodbenv/log/accel.py). */
#define LP_JOB_RUNNING 0
#define LP_JOB_QUEUED 4

static PyTypeObject *LogPutter_Type;

static void lp_dealloc(LogPutter *self) {
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    Py_XDECREF(self->keep);
    Py_XDECREF(self->lsn_type);
    Py_XDECREF(self->job_keep);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

/* LogPutter(append_address, params_address, keep, lsn_type, rtype, half) */
static PyObject *lp_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    unsigned long long fn, params, rtype;
    long long half;
    PyObject *keep, *lsn_type;
    (void)kwds;
    if (!PyArg_ParseTuple(args, "KKOOKL", &fn, &params, &keep, &lsn_type, &rtype, &half))
        return NULL;
    if (!fn || !params || !PyType_Check(lsn_type) ||
        !PyType_IsSubtype((PyTypeObject *)lsn_type, &PyTuple_Type) || rtype > 255) {
        PyErr_SetString(PyExc_ValueError, "LogPutter: a null address, or not a tuple type");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    LogPutter *self = (LogPutter *)alloc(type, 0);
    if (!self) return NULL;
    self->fn = (log_put_fn)(uintptr_t)fn;
    self->P = (const uint64_t *)(uintptr_t)params;
    Py_INCREF(keep);
    self->keep = keep;
    Py_INCREF(lsn_type);
    self->lsn_type = lsn_type;
    self->lsn_alloc = (allocfunc)PyType_GetSlot((PyTypeObject *)lsn_type, Py_tp_alloc);
    self->rtype = (uint32_t)rtype;
    self->half = half;
    return (PyObject *)self;
}

/* An aiodbenv.LSN (file, offset) of an LSN word. */
static PyObject *lp_lsn(LogPutter *self, uint64_t word) {
    PyObject *lsn = self->lsn_alloc((PyTypeObject *)self->lsn_type, 2);
    if (!lsn) return NULL;
    PyObject *file = PyLong_FromUnsignedLongLong(word >> 32);
    PyObject *off = PyLong_FromUnsignedLongLong(word & 0xFFFFFFFFu);
    if (!file || !off) {
        Py_XDECREF(file);
        Py_XDECREF(off);
        Py_DECREF(lsn);
        return NULL;
    }
    PyTuple_SetItem(lsn, 0, file);  /* steal; cannot fail on a fresh 2-tuple */
    PyTuple_SetItem(lsn, 1, off);
    return lsn;
}

/* put(data): the record appended, its LSN; else the append's int result (the record appended
   with the buffer now more than half full, or why nothing was appended), or None if data is
   not bytes: the caller does the rest. */
static PyObject *lp_put(LogPutter *self, PyObject *data) {
    if (!PyBytes_CheckExact(data)) Py_RETURN_NONE;
    char *p;
    Py_ssize_t n;
    if (PyBytes_AsStringAndSize(data, &p, &n) < 0) return NULL;
    /* With the GIL held: the append never waits (a held mutex is handed back). */
    int64_t r = self->fn(self->P, self->rtype, p, (uint64_t)n);
    if (r >= 0 && !(r & self->half)) return lp_lsn(self, (uint64_t)r);
    if (r >= 0 && self->job) {
        /* Past half with a write behind under way: nothing for the Python side to do. */
        uint64_t state = __atomic_load_n(&self->job[0], __ATOMIC_ACQUIRE);
        if (state == LP_JOB_QUEUED) {
            /* The writer's thread has not started it: it waits for the GIL, which this
               thread holds as long as puts do not suspend. Let it go for a moment, so that
               the write does not wait for the interpreter's switch interval meanwhile the
               buffer fills. */
            Py_BEGIN_ALLOW_THREADS
            sched_yield();
            Py_END_ALLOW_THREADS
        }
        if (state == LP_JOB_QUEUED || state == LP_JOB_RUNNING)
            return lp_lsn(self, (uint64_t)(r & ~self->half));
    }
    return PyLong_FromLongLong(r);
}

/* set_job(address, keep): the handle's write-behind job array (0: none). */
static PyObject *lp_set_job(LogPutter *self, PyObject *args) {
    unsigned long long addr;
    PyObject *keep;
    if (!PyArg_ParseTuple(args, "KO", &addr, &keep)) return NULL;
    Py_INCREF(keep);
    SETREF(self->job_keep, keep);
    self->job = (const uint64_t *)(uintptr_t)addr;
    Py_RETURN_NONE;
}

/* lsn(word): the LSN of a word (for the Python side's slow path). */
static PyObject *lp_make(LogPutter *self, PyObject *word) {
    unsigned long long w = PyLong_AsUnsignedLongLong(word);
    if (w == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return lp_lsn(self, w);
}

static PyMethodDef lp_methods[] = {
    {"put", (PyCFunction)lp_put, METH_O,
     "put(data): append data (bytes) as a record; its LSN, else the append's int result, or "
     "None if data is not bytes."},
    {"lsn", (PyCFunction)lp_make, METH_O, "lsn(word): the aiodbenv.LSN of an LSN word."},
    {"set_job", (PyCFunction)lp_set_job, METH_VARARGS,
     "set_job(address, keep): the write-behind job array whose state put() reads."},
    {NULL},
};

static PyType_Slot lp_slots[] = {
    {Py_tp_doc, "The compiled put of one log handle (aiodbenv.log.accel)."},
    {Py_tp_new, lp_new},
    {Py_tp_dealloc, lp_dealloc},
    {Py_tp_methods, lp_methods},
    {0, NULL},
};

static PyType_Spec lp_spec = {
    "aiodbenv._hot.LogPutter",
    sizeof(LogPutter),
    0,
    Py_TPFLAGS_DEFAULT,
    lp_slots,
};
