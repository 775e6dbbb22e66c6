/* aiodbenv._hot.TxnCopy, HotFile.txn_take, txn_prepare, txn_prepare_many and
 * HotFile.unpin_now: a transaction's page taking (tx.page of a cached page whose latch is free,
 * aiodbenv/txn/take.py) in one call, the commit's build of pages so taken, and the unpin of its
 * pages when it ends; included by hot.c (one extension module).
 *
 * Done from Python, that take cost a cffi pin with twelve arguments and a Page built in Python,
 * then a cffi allocation of the private copy, a cast, the cffi take with fifteen arguments and
 * a cffi buffer: about 4 of a nosync commit's 23 us, most of it marshalling. Here the pin is
 * hot.c's hit (the Page as `async with f.get(p)` makes it) and the take is part 78's
 * aiodb_txn_take, called through its address with the copy this module allocates.
 *
 * The private copy is a TxnCopy: a fixed-size, writable buffer of C memory (a bytearray could
 * be resized under the commit's descriptor, which holds the copy's address), followed by that
 * descriptor (part 75's CD_HEAD + CD_COUNT words), whose address `desc` the Python side hands
 * to the cffi commit calls. The copy lives as long as the TxnCopy, which the transaction's page
 * holds, and every view of it holds the TxnCopy.
 *
 * Everything but the plain case goes back to Python as it was: not cached (None), or the page
 * pinned but not taken (latch busy, bucket mutex busy or repaired, a failed check). */

/* aiodb_txn_take of aiodbenv/_csrc/78_txnfast.c. */
typedef int64_t (*txn_take_fn)(uint64_t *D, uint64_t *w, void **mutexes,
                               const uint64_t *nowait_ws, const uint64_t *bucket_ws, uint64_t b,
                               uint64_t bh, uint64_t owner, unsigned char *priv, uint64_t size,
                               uint64_t lsn_off, uint64_t fkey, uint64_t flen, uint64_t pgno,
                               int flags);

static txn_take_fn txn_take_call;     /* set by configure_txn; NULL: txn_take refuses */
static int txn_take_latch;            /* TXN_TAKE_LATCH */
static Py_ssize_t txn_desc_words;     /* AIODB_TXN_DESC_WORDS: CD_HEAD + CD_COUNT */

typedef struct {
    PyObject_HEAD
    unsigned char *mem;   /* size bytes of the copy, then (8-byte aligned) the descriptor */
    uint64_t *desc;
    Py_ssize_t size;
    Py_ssize_t exports;   /* live views (kept for debugging: a view holds the TxnCopy) */
} TxnCopy;

static PyTypeObject *TxnCopy_Type;

static void copy_dealloc(TxnCopy *self) {
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    /* A view holds a reference to its TxnCopy, so none is left here. */
    PyMem_Free(self->mem);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

/* A TxnCopy of size data bytes (uninitialised: the take fills them) and its descriptor. */
static TxnCopy *copy_make(Py_ssize_t size) {
    if (size <= 0 || size > (PY_SSIZE_T_MAX >> 1)) {
        PyErr_SetString(PyExc_ValueError, "TxnCopy: bad size");
        return NULL;
    }
    Py_ssize_t at = (size + 7) & ~(Py_ssize_t)7;
    allocfunc alloc = (allocfunc)PyType_GetSlot(TxnCopy_Type, Py_tp_alloc);
    TxnCopy *self = (TxnCopy *)alloc(TxnCopy_Type, 0);
    if (!self) return NULL;
    self->mem = PyMem_Malloc((size_t)at + 8 * (size_t)txn_desc_words);
    if (!self->mem) {
        Py_DECREF((PyObject *)self);
        return (TxnCopy *)PyErr_NoMemory();
    }
    self->desc = (uint64_t *)(self->mem + at);
    self->size = size;
    return self;
}

/* TxnCopy(size): a zero-filled copy (the tests; the takes make theirs in C). */
static PyObject *copy_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Py_ssize_t size;
    (void)type;
    (void)kwds;
    if (!txn_desc_words) {
        PyErr_SetString(PyExc_RuntimeError, "aiodbenv._hot: transactions are not configured");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "n", &size)) return NULL;
    TxnCopy *self = copy_make(size);
    if (self) memset(self->mem, 0, (size_t)((size + 7) & ~(Py_ssize_t)7) + 8 * txn_desc_words);
    return (PyObject *)self;
}

static int copy_getbuffer(TxnCopy *self, Py_buffer *view, int flags) {
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->mem, self->size, 0, flags) < 0) return -1;
    self->exports++;
    return 0;
}

static void copy_releasebuffer(TxnCopy *self, Py_buffer *view) {
    (void)view;
    self->exports--;
}

static PyObject *copy_get_desc(TxnCopy *self, void *closure) {
    (void)closure;
    return PyLong_FromVoidPtr(self->desc);
}

static Py_ssize_t copy_len(TxnCopy *self) { return self->size; }

static PyObject *copy_repr(TxnCopy *self) {
    return PyUnicode_FromFormat("<TxnCopy %zd bytes>", self->size);
}

static PyGetSetDef copy_getset[] = {
    {"desc", (getter)copy_get_desc, NULL,
     "The address of the commit descriptor that follows the copy (for the cffi commit).", NULL},
    {NULL},
};

static PyType_Slot copy_slots[] = {
    {Py_tp_doc,
     "A transaction's private copy of a page: a fixed-size writable buffer, and after it the "
     "page's commit descriptor (aiodbenv.txn.take)."},
    {Py_tp_new, copy_new},
    {Py_tp_dealloc, copy_dealloc},
    {Py_tp_repr, copy_repr},
    {Py_tp_getset, copy_getset},
    {Py_sq_length, copy_len},
    {Py_bf_getbuffer, copy_getbuffer},
    {Py_bf_releasebuffer, copy_releasebuffer},
    {0, NULL},
};

static PyType_Spec copy_spec = {
    "aiodbenv._hot.TxnCopy",
    sizeof(TxnCopy),
    0,
    Py_TPFLAGS_DEFAULT,
    copy_slots,
};

static int u64_arg(PyObject *o, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

/* txn_take(pgno, owner, lsn_off, fkey, flen): take cached page pgno for transaction `owner`
   (its latch, if free; the private copy; the descriptor for a commit of it alone, with the
   file's key fkey and batch entry length flen). Returns (page, copy) when taken; the Page,
   pinned and not taken, when the latch or the bucket mutex was busy or a check failed (the
   Python take goes on from there); None when nothing was pinned (not cached, not hot). */
static PyObject *hf_txn_take(HotFile *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "txn_take(pgno, owner, lsn_off, fkey, flen)");
        return NULL;
    }
    if (!txn_take_call) Py_RETURN_NONE;
    uint64_t pgno, owner, lsn_off, fkey, flen;
    if (u64_arg(args[0], &pgno) < 0 || u64_arg(args[1], &owner) < 0 ||
        u64_arg(args[2], &lsn_off) < 0 || u64_arg(args[3], &fkey) < 0 ||
        u64_arg(args[4], &flen) < 0)
        return NULL;
    if (pgno >= (uint64_t)max_pgno) Py_RETURN_NONE; /* the Python take says why */
    PyObject *got = hit(self, (int64_t)pgno);
    if (!got) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    PageObject *page = (PageObject *)got;
    CacheRef *c = cache_of(self, page->cache);
    if (!c) return got; /* cannot be: hit() pinned it in one of ours */
    /* Both made before the take, so that nothing can fail once the latch is held. */
    TxnCopy *copy = copy_make(self->data_size);
    PyObject *pair = copy ? PyTuple_New(2) : NULL;
    if (!pair) {
        /* The Python take allocates its own copy, and raises with the page unpinned. */
        Py_XDECREF((PyObject *)copy);
        PyErr_Clear();
        return got;
    }
    uint64_t b = (uint64_t)page->bucket;
    int64_t r = txn_take_call(copy->desc, c->w, c->mptrs, c->nowait_w, c->bucket_w, b,
                              (uint64_t)page->bh, owner, copy->mem, (uint64_t)self->data_size,
                              lsn_off, fkey, flen, pgno, txn_take_latch);
    if (r == 0) {
        PyTuple_SetItem(pair, 0, got); /* steals; cannot fail on a fresh 2-tuple */
        PyTuple_SetItem(pair, 1, (PyObject *)copy);
        return pair;
    }
    Py_DECREF(pair);
    Py_DECREF((PyObject *)copy);
    if (r == -EOWNERDEAD) {
        /* The bucket mutex is held, its holder dead: repair it the usual way (or raise). */
        PyObject *x = PyObject_CallFunction(self->fail, "OLK", c->cache, (long long)r,
                                            (unsigned long long)b);
        if (!x) {
            /* Let the Python take meet the same state and raise with the page unpinned. */
            PyErr_Clear();
        }
        Py_XDECREF(x);
    }
    return got;
}

/* unpin_now(page): drop a pin of `page` (pinned by this file, no flags) the way the context's
   __aexit__ does, for a transaction's release of its pages (aiodbenv/txn/txn.py). Returns
   True when done; False when nothing was done (closed or forked, not this file's page, not
   pinned, or its view is held elsewhere: the Python unpin, PageRelease._unpin, decides and
   raises what it must); else, when the compiled unpin could not finish (a busy or repaired
   bucket mutex, an over-unpin), what the Python release returns to await: its task, or
   aiodbenv.mpool.hotpath.FINISHED when it finished at once. */
static PyObject *hf_unpin_now(HotFile *self, PyObject *arg) {
    if (Py_TYPE(arg) != PageBase_Type) Py_RETURN_FALSE;
    PageObject *p = (PageObject *)arg;
    CacheRef *c = self->hot ? cache_of(self, p->cache) : NULL;
    if (!c || p->file != self->file || p->bh <= 0 || !p->data || !PyMemoryView_Check(p->data) ||
        Py_REFCNT(p->data) != 1)
        Py_RETURN_FALSE;
    long long bh = p->bh;
    p->bh = -1;
    pins_unlink(p);
    /* Only the page refers to its view (checked above): dropping it is its release. */
    SETREF(p->data, Py_NewRef(released_view));
    uint64_t b = (uint64_t)p->bucket;
    int r = unpin_at(c->w, c->mptrs, c->nowait_w, c->bucket_w, b, (uint64_t)bh >> 3, c->hdr, 0,
                     self->slot);
    if (r == 0 || r == 1) {
        if (r == 1 && wake_frame_waiter(self) < 0) return NULL;
        Py_RETURN_TRUE;
    }
    return PyObject_CallFunction(self->after_unpin, "OLKLLi", c->cache, p->pgno,
                                 (unsigned long long)b, bh, 0LL, r);
}

/* aiodb_txn_prepare of aiodbenv/_csrc/78_txnfast.c. */
typedef int64_t (*txn_prepare_fn)(uint64_t *D, int n, const unsigned char *files,
                                  uint64_t files_len, uint64_t redo_start, unsigned char *out,
                                  uint64_t cap, uint64_t owner, uint64_t flag);

static txn_prepare_fn txn_prepare_call; /* set by configure_txn */

/* The record is built here, then copied into its bytes object: a buffer of the worst case
   (more than a page) allocated per commit cost more than the build. Guarded by the GIL, which
   is held throughout (the build never waits: a busy bucket mutex is handed back). */
static unsigned char *prep_scratch;
static size_t prep_cap;

/* Make *buf (of *cap bytes) hold at least `want`: 0, or -1 with MemoryError set. */
static int scratch_room(unsigned char **buf, size_t *cap, size_t want) {
    if (want <= *cap) return 0;
    unsigned char *grown = PyMem_Realloc(*buf, want);
    if (!grown) {
        PyErr_NoMemory();
        return -1;
    }
    *buf = grown;
    *cap = want;
    return 0;
}

/* txn_prepare(copy, files, redo_start, worst, owner, flag): the commit of the one page whose
   private copy (and descriptor) is `copy`, taken by txn_take: aiodb_txn_prepare (the batch
   record built, the buffer marked dirty and the latch committing). Returns (record, fulls):
   the record's bytes and how many full images it holds (0 or 1); else the call's int result
   (0: the page did not change, nothing done; < 0: not every page marked dirty, see
   aiodbenv.txn.commit.prepare). */
static PyObject *txn_prepare(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 6 || Py_TYPE(args[0]) != TxnCopy_Type || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError,
                        "txn_prepare(copy, files: bytes, redo_start, worst, owner, flag)");
        return NULL;
    }
    if (!txn_prepare_call) {
        PyErr_SetString(PyExc_RuntimeError, "aiodbenv._hot: transactions are not configured");
        return NULL;
    }
    TxnCopy *copy = (TxnCopy *)args[0];
    char *files;
    Py_ssize_t flen;
    uint64_t redo_start, worst, owner, flag;
    if (PyBytes_AsStringAndSize(args[1], &files, &flen) < 0 || u64_arg(args[2], &redo_start) < 0 ||
        u64_arg(args[3], &worst) < 0 || u64_arg(args[4], &owner) < 0 ||
        u64_arg(args[5], &flag) < 0)
        return NULL;
    if (worst > (uint64_t)PY_SSIZE_T_MAX) return PyErr_NoMemory();
    if (scratch_room(&prep_scratch, &prep_cap, (size_t)worst) < 0) return NULL;
    int64_t r = txn_prepare_call(copy->desc, 1, (const unsigned char *)files, (uint64_t)flen,
                                 redo_start, prep_scratch, worst, owner, flag);
    if (r <= 0) return PyLong_FromLongLong(r);
    /* Marked. A failure from here (out of memory) makes the caller abort, as for a failure
       of the cffi form: nothing was logged, the latch (committing or not) is released, and
       the page marked dirty costs a write at most. */
    PyObject *record = PyBytes_FromStringAndSize((const char *)prep_scratch, (Py_ssize_t)r);
    if (!record) return NULL;
    PyObject *fulls = PyLong_FromUnsignedLongLong(copy->desc[1]); /* CD_FULLS */
    if (!fulls) {
        Py_DECREF(record);
        return NULL;
    }
    PyObject *pair = PyTuple_New(2);
    if (!pair) {
        Py_DECREF(record);
        Py_DECREF(fulls);
        return NULL;
    }
    PyTuple_SetItem(pair, 0, record);
    PyTuple_SetItem(pair, 1, fulls);
    return pair;
}

/* Part 75's descriptor layout (its AIODB_CD_* constants, handed over by configure_txn): the
   words before the pages' (CD_HEAD), per page (CD_COUNT), and the page words this module
   writes or reads: the file's key, its entry's offset and length in the blob, what the build
   found. */
static Py_ssize_t cd_head, cd_count, cd_fkey, cd_fent, cd_flen, cd_kind;

/* The files blob of a commit of several pages, built here for the call (see prep_scratch). */
static unsigned char *files_scratch;
static size_t files_cap;

/* txn_prepare_many(copies, entries, redo_start, worst, owner, flag): txn_prepare for the
   commit of several pages, each taken by txn_take (copies[i] its TxnCopy, entries[i] its
   file's batch entry), in the transaction's order: their descriptors are gathered into one
   array (aiodbenv.txn.commit.descriptor's work: each file's entry once in the blob), then
   aiodb_txn_prepare. Returns (record, fulls, changed, array): the changed pages' indexes (a
   tuple) and a TxnCopy holding the array, which the commit's finish reads; else the call's int
   result (0: nothing changed, nothing done; < 0: not every page marked dirty). */
static PyObject *txn_prepare_many(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 6 || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "txn_prepare_many(copies: tuple, entries: tuple, "
                                         "redo_start, worst, owner, flag)");
        return NULL;
    }
    if (!txn_prepare_call || !cd_count) {
        PyErr_SetString(PyExc_RuntimeError, "aiodbenv._hot: transactions are not configured");
        return NULL;
    }
    Py_ssize_t n = PyTuple_Size(args[0]);
    if (n < 1 || n > 64 || PyTuple_Size(args[1]) != n) {
        PyErr_SetString(PyExc_ValueError, "txn_prepare_many: 1 to 64 pages, an entry each");
        return NULL;
    }
    uint64_t redo_start, worst, owner, flag;
    if (u64_arg(args[2], &redo_start) < 0 || u64_arg(args[3], &worst) < 0 ||
        u64_arg(args[4], &owner) < 0 || u64_arg(args[5], &flag) < 0)
        return NULL;
    if (worst > (uint64_t)PY_SSIZE_T_MAX) return PyErr_NoMemory();
    size_t blob = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *c = PyTuple_GetItem(args[0], i), *e = PyTuple_GetItem(args[1], i);
        if (!c || !e || Py_TYPE(c) != TxnCopy_Type || !PyBytes_Check(e)) {
            PyErr_SetString(PyExc_TypeError, "txn_prepare_many: TxnCopy pages, bytes entries");
            return NULL;
        }
        blob += (size_t)PyBytes_Size(e);
    }
    if (scratch_room(&files_scratch, &files_cap, blob) < 0) return NULL;
    if (scratch_room(&prep_scratch, &prep_cap, (size_t)worst) < 0) return NULL;
    /* The array outlives this call (the finish reads it after the log put): its own memory. */
    TxnCopy *array = copy_make(8 * (cd_head + n * cd_count));
    if (!array) return NULL;
    uint64_t *D = (uint64_t *)array->mem;
    memset(D, 0, 8 * (size_t)cd_head);
    size_t pos = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        TxnCopy *c = (TxnCopy *)PyTuple_GetItem(args[0], i);
        uint64_t *d = D + cd_head + i * cd_count;
        memcpy(d, c->desc + cd_head, 8 * (size_t)cd_count);
        Py_ssize_t j = 0;
        while (j < i && D[cd_head + j * cd_count + cd_fkey] != d[cd_fkey]) j++;
        if (j < i) {
            /* The file's entry, once: the first page's, offset and length (another handle of
               the file, opened by another path, has an entry of another length). */
            d[cd_fent] = D[cd_head + j * cd_count + cd_fent];
            d[cd_flen] = D[cd_head + j * cd_count + cd_flen];
            continue;
        }
        char *e;
        Py_ssize_t elen;
        if (PyBytes_AsStringAndSize(PyTuple_GetItem(args[1], i), &e, &elen) < 0) {
            Py_DECREF((PyObject *)array);
            return NULL;
        }
        memcpy(files_scratch + pos, e, (size_t)elen);
        d[cd_fent] = pos;
        pos += (size_t)elen;
    }
    int64_t r = txn_prepare_call(D, (int)n, files_scratch, pos, redo_start, prep_scratch, worst,
                                 owner, flag);
    if (r <= 0) {
        Py_DECREF((PyObject *)array);
        return PyLong_FromLongLong(r);
    }
    /* Marked: a failure from here aborts, as txn_prepare's does. The record is copied out
       first: making a tracked object (a tuple) can run the garbage collector, and with it
       Python code (finalizers, gc callbacks) that commits itself or lets another thread do
       so, which would overwrite the scratch buffer. A bytes object is not tracked. */
    PyObject *record = PyBytes_FromStringAndSize((const char *)prep_scratch, (Py_ssize_t)r);
    if (!record) {
        Py_DECREF((PyObject *)array);
        return NULL;
    }
    Py_ssize_t nchanged = 0;
    for (Py_ssize_t i = 0; i < n; i++) nchanged += D[cd_head + i * cd_count + cd_kind] != 0;
    PyObject *changed = PyTuple_New(nchanged);
    PyObject *fulls = PyLong_FromUnsignedLongLong(D[1]); /* CD_FULLS */
    PyObject *out = PyTuple_New(4);
    if (!changed || !fulls || !out) goto fail;
    for (Py_ssize_t i = 0, k = 0; i < n; i++) {
        if (!D[cd_head + i * cd_count + cd_kind]) continue;
        PyObject *ix = PyLong_FromSsize_t(i);
        if (!ix) goto fail;
        PyTuple_SetItem(changed, k++, ix);
    }
    PyTuple_SetItem(out, 0, record);
    PyTuple_SetItem(out, 1, fulls);
    PyTuple_SetItem(out, 2, changed);
    PyTuple_SetItem(out, 3, (PyObject *)array);
    return out;
fail:
    Py_XDECREF(changed);
    Py_XDECREF(record);
    Py_XDECREF(fulls);
    Py_XDECREF(out);
    Py_DECREF((PyObject *)array);
    return NULL;
}
