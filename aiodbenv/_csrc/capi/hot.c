/* aiodbenv._hot: the hot pin/unpin of PoolFile.get() as CPython extension types.
 *
 * `async with f.get(p) as page` costs two cffi calls with many arguments, a Python context
 * class, two coroutine objects and a Page built in Python (perf-notes Q1: ~2.8 us). Here the
 * context is a C object that is its own already-completed awaitable (am_send returns the result
 * with PYGEN_RETURN: no coroutine, no StopIteration), its __aenter__ does the whole hit and its
 * __aexit__ the whole unpin.
 *
 * What a hit allocates is what the user gets: the Page (aiodbenv.Page itself, a final C type)
 * and its memoryview (with its managed buffer). The context and the page come from free lists,
 * the bound __aenter__/__aexit__ are embedded in the context and take vectorcalls, and the
 * pages of one cache share one buffer of its region (RegionHold). Per hot pin that took the
 * instructions from ~4,900 to ~3,200 (valgrind, 2,048 random pages); what is left is about a
 * third the memoryview (made, then dropped), a quarter the pin and unpin themselves (two
 * robust mutex lock/unlock pairs), a quarter the interpreter's loop and `async with` opcodes,
 * and the rest `f.get`'s lookup, the awaits and the Page.
 *
 * The bookkeeping itself is NOT compiled here: the region layout table, the known-regions table
 * and the lock wait are static state of the cffi accelerator (aiodbenv/_csrc/10_core.c,
 * 20_pin.c), so this module calls that module's aiodb_pin_one_cache (a pool of one cache),
 * aiodb_pin_hit (several) and aiodb_unpin_at through function pointers handed over once by
 * aiodbenv/mpool/hotpath.py (configure()). One copy of the code, one copy of its state.
 *
 * Python is called only off the hot path: a miss, contention, a dead mutex holder, a corrupt
 * chain, a closed, forked or mapped file, a panicked environment, a dirty unpin (to count dirty
 * bytes), a frame waiter to wake, and any unpin the C checks do not clear.
 *
 * Limited API (abi3) for CPython >= 3.11: the buffer protocol and am_send are stable there;
 * vectorcall is used through its 3.12 stable ABI, which 3.11 already honours (see BoundObj).
 */
#define Py_LIMITED_API 0x030B0000
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* Replace *ref with value (a new reference), dropping the old one after (Py_XSETREF is not in
   the limited API). */
#define SETREF(ref, value)              \
    do {                                \
        PyObject *old_ = (PyObject *)(ref); \
        (ref) = (value);                \
        Py_XDECREF(old_);               \
    } while (0)

typedef int64_t (*pin_one_fn)(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                              const uint64_t *bucket_w, uint64_t nb, uint64_t fidx, uint64_t pgno,
                              uint64_t *hits, uint64_t *extra, uint64_t *longest,
                              uint64_t *bucket, uint64_t slot);
typedef int64_t (*pin_hit_fn)(uint64_t *w, void *mutex, uint64_t nowait_w, uint64_t head_w,
                              uint64_t pgno, uint64_t tag, uint64_t *examined, uint64_t slot);
typedef int (*unpin_at_fn)(uint64_t *w, void **mutexes, const uint64_t *nowait_w,
                           const uint64_t *bucket_w, uint64_t b, uint64_t x, uint64_t hdr_w,
                           int flags, uint64_t slot);

/* aiodb_miss of aiodbenv/_csrc/40_miss.c (its context is struct aiodb_miss_ctx, opaque here). */
typedef int64_t (*miss_fn)(const void *ctx, uint64_t b, uint64_t pgno, int fd, uint64_t *out);

/* Set once by configure(); until then get() refuses (the Python side never uses an
   unconfigured module). */
static pin_one_fn pin_one;
static pin_hit_fn pin_hit;
static unpin_at_fn unpin_at;
static uint64_t b_head, hash_pgno, hash_file, hash_mask;
static int64_t corrupt_code;
static int64_t bh_data;
static long page_dirty, page_clean;
static int64_t max_pgno;
static PyTypeObject *page_type;    /* set by configure: aiodbenv.Page (this module's type) */
static PyObject *s_release;        /* "release" */
static PyObject *release_fn;       /* memoryview.release, called unbound (no method lookup) */
static PyObject *released_view;    /* a released memoryview: page.data after the unpin */
static char released_byte;
/* The compiled miss (configure_miss): aiodb_miss. */
static miss_fn miss_call;
static uint64_t miss_dirty_met; /* out[0] of a miss that passed a dirty best over */
static PyObject *s_closing, *s_waiters, *s_poll_delay; /* pool attributes */
static PyObject *poll_min;

static PyTypeObject *PageBase_Type; /* aiodbenv.Page */

/* The unpin flags of aiodbenv.mpool.page (PAGE_*), which checks at import that they agree. */
#define PAGE_DIRTY 1
#define PAGE_CLEAN 2
#define PAGE_DISCARD 4
static PyTypeObject *HotFile_Type;
static PyTypeObject *PinCtx_Type;

/* ---------------------------------------------------------------- RegionHold --------- */

/* A buffer of one cache's region (cache.buf), taken once per HotFile and cache and shared by
   the pages it pins: each page's view holds a reference to it, and the buffer is given back
   when the last of them and the HotFile's own reference (dropped at disable) are gone. Taking
   a buffer of cache.buf per pin cost about 5% of a hot pin. While it is held, cache.buf cannot
   be released, so the region cannot be unmapped under a page's view or a slice of it. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
} RegionHold;

static PyTypeObject *RegionHold_Type;

static void hold_dealloc(RegionHold *h) {
    PyTypeObject *tp = Py_TYPE((PyObject *)h);
    PyBuffer_Release(&h->view);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(h);
    Py_DECREF(tp);
}

static PyType_Slot hold_slots[] = {
    {Py_tp_doc, "A buffer of a cache's region, shared by the pages pinned from it."},
    {Py_tp_dealloc, hold_dealloc},
    {0, NULL},
};

static PyType_Spec hold_spec = {
    "aiodbenv._hot.RegionHold",
    sizeof(RegionHold),
    0,
    Py_TPFLAGS_DEFAULT,
    hold_slots,
};

/* A new hold of buf's buffer, or NULL with an error. */
static RegionHold *hold_new(PyObject *buf) {
    allocfunc alloc = (allocfunc)PyType_GetSlot(RegionHold_Type, Py_tp_alloc);
    RegionHold *h = (RegionHold *)alloc(RegionHold_Type, 0);
    if (!h) return NULL;
    if (PyObject_GetBuffer(buf, &h->view, PyBUF_SIMPLE) < 0) {
        h->view.obj = NULL; /* nothing to release */
        Py_DECREF(h);
        return NULL;
    }
    return h;
}

/* ---------------------------------------------------------------- Page --------------- */

/* aiodbenv.Page when this module is installed: a final C type, methods included (a Python
   subclass made every page a heap-type instance with subtype_dealloc, a tenth of a hot pin
   with its allocation). page.py holds the Python twin (the Python hot path, the docs, the
   types); the two must keep the same surface. A page pinned by this module exports its bytes
   itself: `data` is a memoryview of the page, and the page
   holds the region's buffer (a RegionHold) while that view lives, so the region cannot be
   unmapped under a view or a slice of it, exactly as with a slice of cache.buf. */
typedef struct PageObject_ {
    PyObject_HEAD
    long long pgno;
    PyObject *data;
    PyObject *file;
    PyObject *cache;
    long long bucket;
    long long bh;        /* the buffer's offset; -1 once unpinned; 0 for a mapped page */
    long long flags;     /* PAGE_* requested for the unpin */
    PyObject *weakrefs;
    RegionHold *hold;    /* the region's buffer, held until the page's view is gone */
    Py_ssize_t view_off, view_len;
    char exported;
    char readonly;       /* a page of a read-only handle: its view is read-only */
    /* Membership of a PinSet (its file's pins): an intrusive list, which costs a fifth of
       a hot pin less than a Python set's add and discard. */
    struct PinSet *pinset;
    struct PageObject_ *pprev, *pnext;
} PageObject;

static int page_traverse(PageObject *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE((PyObject *)self));
    Py_VISIT(self->data);
    Py_VISIT(self->file);
    Py_VISIT(self->cache);
    return 0;
}

static int page_clear(PageObject *self) {
    Py_CLEAR(self->data);
    Py_CLEAR(self->file);
    Py_CLEAR(self->cache);
    return 0;
}

/* Pages whose last reference went, kept for reuse (untracked by the GC, fields cleared,
   still holding their reference to the type): one is made and dropped per hot pin. Bounded;
   guarded by the GIL. */
#define PAGE_FREE_MAX 64
static PageObject *page_free_list;
static int page_nfree;
static allocfunc page_alloc_fn;
static freefunc page_free_fn;

/* A new page (all fields zero, tracked by the GC), from the free list if it has one. */
static PageObject *page_make(void) {
    PageObject *p = page_free_list;
    if (!p) return (PageObject *)page_alloc_fn(PageBase_Type, 0);
    page_free_list = p->pnext;
    page_nfree--;
    p->pnext = NULL;
    Py_SET_REFCNT((PyObject *)p, 1);
    PyObject_GC_Track((PyObject *)p);
    return p;
}

static void page_dealloc(PageObject *self) {
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    PyObject_GC_UnTrack(self);
    if (self->weakrefs) PyObject_ClearWeakRefs((PyObject *)self);
    page_clear(self);
    /* A live export holds a reference to the page, so only a never-exported buffer is left. */
    Py_CLEAR(self->hold);
    if (page_nfree < PAGE_FREE_MAX) {
        /* Zero every field after the header, as a fresh allocation is. */
        memset((char *)self + sizeof(PyObject), 0, sizeof(PageObject) - sizeof(PyObject));
        self->pnext = page_free_list;
        page_free_list = self;
        page_nfree++;
        return;
    }
    page_free_fn(self);
    Py_DECREF(tp);
}

/* Page(file, pgno, data, cache, bucket, bh): a page pinned by the Python paths. */
static PyObject *page_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *file, *data, *cache;
    long long pgno, bucket, bh;
    static char *kwlist[] = {"file", "pgno", "data", "cache", "bucket", "bh", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OLOOLL", kwlist, &file, &pgno, &data, &cache,
                                     &bucket, &bh))
        return NULL;
    (void)type; /* final: always PageBase_Type */
    /* A read-only handle's page gets a read-only view of the cache, as the compiled hit
       gives it: a write through it would change the page for every process unmarked. */
    PyObject *ro = PyObject_GetAttrString(file, "readonly");
    int readonly = ro ? PyObject_IsTrue(ro) : 0;
    Py_XDECREF(ro);
    if (readonly < 0) return NULL;
    if (!ro) PyErr_Clear(); /* not a file handle of the pool (the tests' stand-ins) */
    if (readonly && PyMemoryView_Check(data))
        data = PyObject_CallMethod(data, "toreadonly", NULL);
    else
        Py_INCREF(data);
    if (!data) return NULL;
    PageObject *self = page_make();
    if (!self) {
        Py_DECREF(data);
        return NULL;
    }
    self->pgno = pgno;
    self->data = data;
    Py_INCREF(file);
    self->file = file;
    Py_INCREF(cache);
    self->cache = cache;
    self->bucket = bucket;
    self->bh = bh;
    return (PyObject *)self;
}

/* Only `data` is made from a page's buffer (once, when the page is pinned): a Page is not a
   bytes-like object for its users. */
static int page_getbuffer(PageObject *self, Py_buffer *view, int flags) {
    if (!self->hold || self->exported) {
        /* TypeError, as for the Python Page: not a bytes-like object. */
        PyErr_SetString(PyExc_TypeError, "a Page is not a bytes-like object: use page.data");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, (char *)self->hold->view.buf + self->view_off,
                          self->view_len, self->hold->view.readonly || self->readonly,
                          flags) < 0)
        return -1;
    self->exported = 1;
    return 0;
}

/* The view and every slice of it are gone: give the region's buffer back. */
static void page_releasebuffer(PageObject *self, Py_buffer *view) {
    (void)view;
    self->exported = 0;
    Py_CLEAR(self->hold);
}

/* T_OBJECT_EX (set from creation to the end; never NULL while a page is reachable): CPython
   3.11 specialises attribute loads of such members (LOAD_ATTR_SLOT), not of T_OBJECT ones. */
static PyMemberDef page_members[] = {
    {"pgno", T_LONGLONG, offsetof(PageObject, pgno), 0, "The page number (0-based)."},
    {"data", T_OBJECT_EX, offsetof(PageObject, data), READONLY,
     "The page's bytes, valid while the page is pinned."},
    {"_file", T_OBJECT_EX, offsetof(PageObject, file), READONLY, NULL},
    {"_cache", T_OBJECT_EX, offsetof(PageObject, cache), READONLY, NULL},
    {"_bucket", T_LONGLONG, offsetof(PageObject, bucket), 0, NULL},
    {"_bh", T_LONGLONG, offsetof(PageObject, bh), 0, NULL},
    {"_flags", T_LONGLONG, offsetof(PageObject, flags), 0, NULL},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(PageObject, weakrefs), READONLY, NULL},
    {NULL},
};

/* A flag set on a page already unpinned would apply to nothing: a change made after the
   unpin would silently never be written. Refused with aiodbenv.errors.InvalidArgument, which
   is looked up on this (rare) path only. Returns -1 with the error set, else 0. */
static int page_check_pinned(PageObject *self, const char *what) {
    if (self->bh >= 0) return 0;
    PyObject *errors = PyImport_ImportModule("aiodbenv.errors");
    if (!errors) return -1;
    PyObject *cls = PyObject_GetAttrString(errors, "InvalidArgument");
    Py_DECREF(errors);
    if (!cls) return -1;
    PyErr_Format(cls, "page %lld is not pinned: %s applies at its unpin, which was made already",
                 self->pgno, what);
    Py_DECREF(cls);
    return -1;
}

static PyObject *page_mark_dirty(PageObject *self, PyObject *unused) {
    (void)unused;
    if (page_check_pinned(self, "mark_dirty()")) return NULL;
    self->flags = (self->flags & ~PAGE_CLEAN) | PAGE_DIRTY;
    Py_RETURN_NONE;
}

static PyObject *page_mark_clean(PageObject *self, PyObject *unused) {
    (void)unused;
    if (page_check_pinned(self, "mark_clean()")) return NULL;
    self->flags = (self->flags & ~PAGE_DIRTY) | PAGE_CLEAN;
    Py_RETURN_NONE;
}

static PyObject *page_discard(PageObject *self, PyObject *unused) {
    (void)unused;
    if (page_check_pinned(self, "discard()")) return NULL;
    self->flags |= PAGE_DISCARD;
    Py_RETURN_NONE;
}

static PyObject *page_get_pinned(PageObject *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->bh >= 0);
}

static PyObject *page_repr(PageObject *self) {
    PyObject *path = self->file ? PyObject_GetAttrString(self->file, "_path") : NULL;
    if (!path) {
        PyErr_Clear();
        path = Py_NewRef(Py_None);
    }
    PyObject *r = PyUnicode_FromFormat("<Page %lld of %R %s>", self->pgno, path,
                                       self->bh >= 0 ? "pinned" : "unpinned");
    Py_DECREF(path);
    return r;
}

static PyMethodDef page_methods[] = {
    {"mark_dirty", (PyCFunction)page_mark_dirty, METH_NOARGS,
     "Write this page back before its buffer is reused (memp_fput DB_MPOOL_DIRTY), applied "
     "when the page is unpinned. Raises InvalidArgument once it is unpinned."},
    {"mark_clean", (PyCFunction)page_mark_clean, METH_NOARGS,
     "Forget earlier changes: the page need not be written (DB_MPOOL_CLEAN), applied when the "
     "page is unpinned. Raises InvalidArgument once it is unpinned."},
    {"discard", (PyCFunction)page_discard, METH_NOARGS,
     "Make this page the first to be evicted once unpinned (DB_MPOOL_DISCARD). Raises "
     "InvalidArgument once it is unpinned."},
    {NULL},
};

static PyGetSetDef page_getset[] = {
    {"pinned", (getter)page_get_pinned, NULL, "True until the page is unpinned.", NULL},
    {NULL},
};

static PyType_Slot page_slots[] = {
    {Py_tp_doc,
     "A pinned page: ``data`` is a memoryview of the page in the shared cache (no copy).\n\n"
     "Changes to ``data`` are seen by every process at once; call mark_dirty() so the page is "
     "written back before its buffer is reused. The view is released when the page is "
     "unpinned: using it afterwards raises ValueError instead of reading a buffer that may now "
     "hold another page. Pages of a memory-mapped read-only file have a read-only view."},
    {Py_tp_new, page_new},
    {Py_tp_dealloc, page_dealloc},
    {Py_tp_traverse, page_traverse},
    {Py_tp_clear, page_clear},
    {Py_tp_members, page_members},
    {Py_tp_methods, page_methods},
    {Py_tp_getset, page_getset},
    {Py_tp_repr, page_repr},
    {Py_bf_getbuffer, page_getbuffer},
    {Py_bf_releasebuffer, page_releasebuffer},
    {0, NULL},
};

/* Named for its public home (aiodbenv.Page), as docs, reprs and tracebacks show it. */
static PyType_Spec page_spec = {
    "aiodbenv.Page",
    sizeof(PageObject),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    page_slots,
};

/* ---------------------------------------------------------------- PinSet ------------- */

/* The pages a file handle holds pinned (PageAccess._pins): what close unpins and the fork
   disarm releases. A set-like container of Page objects, each linked into it through its own
   fields; it holds a reference to each. */
typedef struct PinSet {
    PyObject_HEAD
    PageObject *head;
    Py_ssize_t n;
} PinSet;

static PyTypeObject *PinSet_Type;

static void pins_link(PinSet *ps, PageObject *p) {
    Py_INCREF((PyObject *)p);
    p->pinset = ps;
    p->pprev = NULL;
    p->pnext = ps->head;
    if (ps->head) ps->head->pprev = p;
    ps->head = p;
    ps->n++;
}

/* Unlink p from its PinSet (if any) and drop the set's reference (last: p may go). */
static void pins_unlink(PageObject *p) {
    PinSet *ps = p->pinset;
    if (!ps) return;
    if (p->pprev) p->pprev->pnext = p->pnext;
    else ps->head = p->pnext;
    if (p->pnext) p->pnext->pprev = p->pprev;
    p->pinset = NULL;
    p->pprev = p->pnext = NULL;
    ps->n--;
    Py_DECREF((PyObject *)p);
}

static int is_page(PyObject *o) { return Py_TYPE(o) == PageBase_Type; }

static PyObject *pins_add(PinSet *self, PyObject *page) {
    if (!is_page(page)) {
        PyErr_SetString(PyExc_TypeError, "a PinSet holds pages only");
        return NULL;
    }
    PageObject *p = (PageObject *)page;
    if (p->pinset != self) {
        pins_unlink(p);
        pins_link(self, p);
    }
    Py_RETURN_NONE;
}

static PyObject *pins_discard(PinSet *self, PyObject *page) {
    if (is_page(page) && ((PageObject *)page)->pinset == self) pins_unlink((PageObject *)page);
    Py_RETURN_NONE;
}

static Py_ssize_t pins_len(PinSet *self) { return self->n; }

static int pins_contains(PinSet *self, PyObject *page) {
    return is_page(page) && ((PageObject *)page)->pinset == self;
}

/* Iterates over a snapshot: the caller may unpin (unlink) pages as it goes. */
static PyObject *pins_iter(PinSet *self) {
    PyObject *list = PyList_New(self->n);
    if (!list) return NULL;
    Py_ssize_t i = 0;
    for (PageObject *p = self->head; p && i < self->n; p = p->pnext, i++) {
        Py_INCREF((PyObject *)p);
        PyList_SetItem(list, i, (PyObject *)p);
    }
    PyObject *it = PyObject_GetIter(list);
    Py_DECREF(list);
    return it;
}

static int pins_traverse(PinSet *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE((PyObject *)self));
    for (PageObject *p = self->head; p; p = p->pnext) Py_VISIT((PyObject *)p);
    return 0;
}

static int pins_clear(PinSet *self) {
    while (self->head) pins_unlink(self->head);
    return 0;
}

static void pins_dealloc(PinSet *self) {
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    PyObject_GC_UnTrack(self);
    pins_clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

static PyObject *pins_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_Size(args) || (kwds && PyDict_Size(kwds))) {
        PyErr_SetString(PyExc_TypeError, "PinSet() takes no arguments");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    return alloc(type, 0);
}

static PyObject *pins_repr(PinSet *self) {
    return PyUnicode_FromFormat("<PinSet of %zd page(s)>", self->n);
}

static PyMethodDef pins_methods[] = {
    {"add", (PyCFunction)pins_add, METH_O, "Record a pinned page."},
    {"discard", (PyCFunction)pins_discard, METH_O, "Forget a page, if recorded."},
    {NULL},
};

static PyType_Slot pins_slots[] = {
    {Py_tp_doc, "The pages a file handle holds pinned (set-like: add, discard, in, len, iter)."},
    {Py_tp_new, pins_new},
    {Py_tp_dealloc, pins_dealloc},
    {Py_tp_traverse, pins_traverse},
    {Py_tp_clear, pins_clear},
    {Py_tp_iter, pins_iter},
    {Py_tp_repr, pins_repr},
    {Py_tp_methods, pins_methods},
    {Py_sq_length, pins_len},
    {Py_sq_contains, pins_contains},
    {0, NULL},
};

static PyType_Spec pins_spec = {
    "aiodbenv._hot.PinSet",
    sizeof(PinSet),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    pins_slots,
};

/* ---------------------------------------------------------------- HotFile ------------ */

/* One cache (mpool region) as the compiled pin and unpin take it. */
typedef struct {
    PyObject *cache, *buf;   /* the Cache object, its region's buffer */
    RegionHold *hold;        /* buf's buffer while the file is hot (NULL after disable) */
    uint64_t *w;             /* the region's words */
    void **mptrs;            /* per bucket: its mutex (NULL in a private region) */
    const uint64_t *nowait_w, *bucket_w;
    uint64_t nb, hdr;
    Py_ssize_t region_len;
} CacheRef;

#define MAX_CACHES 64

/* The hot state of one PoolFile (not memory-mapped): each cache's addresses and word indexes
   the compiled pin and unpin take, and the Python callables of the slow paths. The addresses
   stay valid while `hot` is set: the Python side clears it (disable) when the file closes or
   a forked child disarms it, before any region goes away. */
typedef struct {
    PyObject_HEAD
    PyObject *file, *pins, *frame_queue;
    PyObject *note_dirty, *frame_released, *py_get, *enter_slow, *await_slow, *exit_slow;
    PyObject *after_unpin, *fail, *page_size_obj;
    uint64_t fidx, slot;
    uint64_t *hits, *extra, *longest;
    const volatile uint64_t *panic;
    Py_ssize_t data_size;
    int hot, readonly, ncache;
    CacheRef c[MAX_CACHES];
    /* The compiled miss (set_miss; miss_on 0: every miss goes to Python): per cache its
       struct aiodb_miss_ctx, the four words a call hands back, the file's page count (a word
       of region 0), its descriptor (and as an int object), the pool's __dict__, and the test hooks' and
       the reads' Python state it must look at (the armed faults, the descriptors that refuse
       RWF_NOWAIT). */
    int miss_on, miss_fd;
    const void *miss_ctx[MAX_CACHES];
    uint64_t *miss_out;
    const volatile uint64_t *miss_pages;
    PyObject *pool, *faults, *no_nowait, *fd_obj, *notify, *on_dirty;
    unsigned long long misses; /* served whole here: no Python ran */
} HotFile;

static int hf_traverse(HotFile *self, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE((PyObject *)self));
    Py_VISIT(self->file);
    Py_VISIT(self->pins);
    Py_VISIT(self->frame_queue);
    Py_VISIT(self->note_dirty);
    Py_VISIT(self->frame_released);
    Py_VISIT(self->py_get);
    Py_VISIT(self->enter_slow);
    Py_VISIT(self->await_slow);
    Py_VISIT(self->exit_slow);
    Py_VISIT(self->after_unpin);
    Py_VISIT(self->fail);
    Py_VISIT(self->page_size_obj);
    Py_VISIT(self->pool);
    Py_VISIT(self->faults);
    Py_VISIT(self->no_nowait);
    Py_VISIT(self->fd_obj);
    Py_VISIT(self->notify);
    Py_VISIT(self->on_dirty);
    for (int i = 0; i < self->ncache; i++) {
        Py_VISIT(self->c[i].cache);
        Py_VISIT(self->c[i].buf);
        Py_VISIT((PyObject *)self->c[i].hold);
    }
    return 0;
}

static int hf_clear(HotFile *self) {
    self->hot = 0; /* the callables are gone: never take the fast path again */
    Py_CLEAR(self->file);
    Py_CLEAR(self->pins);
    Py_CLEAR(self->frame_queue);
    Py_CLEAR(self->note_dirty);
    Py_CLEAR(self->frame_released);
    Py_CLEAR(self->py_get);
    Py_CLEAR(self->enter_slow);
    Py_CLEAR(self->await_slow);
    Py_CLEAR(self->exit_slow);
    Py_CLEAR(self->after_unpin);
    Py_CLEAR(self->fail);
    Py_CLEAR(self->page_size_obj);
    self->miss_on = 0;
    Py_CLEAR(self->pool);
    Py_CLEAR(self->faults);
    Py_CLEAR(self->no_nowait);
    Py_CLEAR(self->fd_obj);
    Py_CLEAR(self->notify);
    Py_CLEAR(self->on_dirty);
    for (int i = 0; i < self->ncache; i++) {
        Py_CLEAR(self->c[i].cache);
        Py_CLEAR(self->c[i].buf);
        Py_CLEAR(self->c[i].hold);
    }
    return 0;
}

static void hf_dealloc(HotFile *self) {
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    PyObject_GC_UnTrack(self);
    hf_clear(self);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(self);
    Py_DECREF(tp);
}

/* One cache's tuple: (cache, buf, words, mutexes, nowait_words, bucket_words, nbuckets,
   header_word, region_bytes), the addresses as ints. */
static int cache_ref(CacheRef *c, PyObject *t) {
    PyObject *cache, *buf;
    unsigned long long w, m, nw, bw, nb, hdr;
    Py_ssize_t len;
    if (!PyTuple_Check(t) ||
        !PyArg_ParseTuple(t, "OOKKKKKKn", &cache, &buf, &w, &m, &nw, &bw, &nb, &hdr, &len)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a cache must be a tuple");
        return -1;
    }
    if (!w || !m || !nw || !bw || !nb || len <= 0) {
        PyErr_SetString(PyExc_ValueError, "HotFile: a cache with a null address or no buckets");
        return -1;
    }
    Py_INCREF(cache);
    c->cache = cache;
    Py_INCREF(buf);
    c->buf = buf;
    c->hold = hold_new(buf);
    if (!c->hold) return -1;
    if (c->hold->view.len < len) {
        PyErr_SetString(PyExc_BufferError, "the cache's buffer is shorter than its region");
        return -1;
    }
    c->w = (uint64_t *)(uintptr_t)w;
    c->mptrs = (void **)(uintptr_t)m;
    c->nowait_w = (const uint64_t *)(uintptr_t)nw;
    c->bucket_w = (const uint64_t *)(uintptr_t)bw;
    c->nb = nb;
    c->hdr = hdr;
    c->region_len = len;
    return 0;
}

static PyObject *hf_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *o[11], *caches;
    unsigned long long fidx, slot, page_size, hits, extra, longest, panic;
    Py_ssize_t data_size;
    int readonly;
    if (kwds && PyDict_Size(kwds)) {
        PyErr_SetString(PyExc_TypeError, "HotFile takes positional arguments only");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOKKKKKKKnp", &o[0], &o[1], &o[2], &o[3], &o[4],
                          &o[5], &o[6], &o[7], &o[8], &o[9], &o[10], &caches, &fidx, &slot,
                          &page_size, &hits, &extra, &longest, &panic, &data_size, &readonly))
        return NULL;
    if (!pin_one || !pin_hit || !unpin_at || !page_type) {
        PyErr_SetString(PyExc_RuntimeError, "aiodbenv._hot is not configured");
        return NULL;
    }
    if (!PyObject_TypeCheck(o[1], PinSet_Type)) {
        PyErr_SetString(PyExc_TypeError, "pins must be a PinSet");
        return NULL;
    }
    Py_ssize_t ncache = PyTuple_Check(caches) ? PyTuple_Size(caches) : -1;
    if (ncache < 1 || ncache > MAX_CACHES) {
        PyErr_SetString(PyExc_ValueError, "HotFile: caches must be a tuple of 1..64 caches");
        return NULL;
    }
    if (!hits || !extra || !longest || !panic || data_size <= 0) {
        PyErr_SetString(PyExc_ValueError, "HotFile: a null address or an empty page");
        return NULL;
    }
    allocfunc alloc = (allocfunc)PyType_GetSlot(type, Py_tp_alloc);
    HotFile *self = (HotFile *)alloc(type, 0);
    if (!self) return NULL;
    PyObject **dst[11] = {&self->file,       &self->pins,       &self->frame_queue,
                          &self->note_dirty, &self->frame_released, &self->py_get,
                          &self->enter_slow, &self->await_slow, &self->exit_slow,
                          &self->after_unpin, &self->fail};
    for (int i = 0; i < 11; i++) {
        Py_INCREF(o[i]);
        *dst[i] = o[i];
    }
    for (Py_ssize_t i = 0; i < ncache; i++) {
        if (cache_ref(&self->c[i], PyTuple_GetItem(caches, i)) < 0) {
            Py_DECREF(self);
            return NULL;
        }
        self->ncache = (int)i + 1;
    }
    self->fidx = fidx;
    self->slot = slot;
    self->page_size_obj = PyLong_FromUnsignedLongLong(page_size); /* for note_dirty */
    self->hits = (uint64_t *)(uintptr_t)hits;
    self->extra = (uint64_t *)(uintptr_t)extra;
    self->longest = (uint64_t *)(uintptr_t)longest;
    self->panic = (const volatile uint64_t *)(uintptr_t)panic;
    self->data_size = data_size;
    self->readonly = readonly;
    if (!self->page_size_obj) {
        Py_DECREF(self);
        return NULL;
    }
    self->hot = 1;
    return (PyObject *)self;
}

/* The cache of a page, or NULL if it is none of this file's (a mapped page: cache None). */
static CacheRef *cache_of(HotFile *hf, PyObject *cache) {
    for (int i = 0; i < hf->ncache; i++)
        if (hf->c[i].cache == cache) return &hf->c[i];
    return NULL;
}

/* What get() returns: `async with` pins in __aenter__ and unpins in __aexit__, `await` pins.
   Each of them returns the context itself, already completed: am_send hands `result` back at
   once (PYGEN_RETURN), so a hit makes no coroutine and raises no StopIteration. */
struct PinCtx_;

/* The bound __aenter__ or __aexit__ of one context, embedded in the context itself: `async
   with` looks both up on every entry, and a bound builtin method per lookup (an allocation and
   a free each, twice per pin) is a tenth of a hot pin. A BoundObj with no reference is idle
   (refcount 0, not freed); handing it out revives it and takes a reference to its context,
   which its dealloc drops, so a context outlives its bound methods. */
/* PEP 590's vectorcall: calling a BoundObj through tp_call builds an argument tuple per call
   (a tenth of what is left of a hot pin's own work). The protocol joined the limited API in
   3.12; its ABI (this type flag, the __vectorcalloffset__ member of a type spec, the function
   type) has been the same since 3.8, and CPython 3.11 honours it for types made from a spec,
   so this module names the three itself. */
#define AIODB_TPFLAGS_HAVE_VECTORCALL (1UL << 11)
typedef PyObject *(*aiodb_vectorcallfunc)(PyObject *callable, PyObject *const *args,
                                          size_t nargsf, PyObject *kwnames);
/* The argument count of nargsf (PY_VECTORCALL_ARGUMENTS_OFFSET is its top bit). */
#define AIODB_VC_NARGS(n) ((Py_ssize_t)((n) & ~((size_t)1 << (8 * sizeof(size_t) - 1))))

typedef struct {
    PyObject_HEAD
    aiodb_vectorcallfunc vectorcall;
    struct PinCtx_ *ctx;
    int kind; /* CTX_AENTER or CTX_AEXIT */
} BoundObj;

static PyObject *bound_vectorcall(PyObject *b, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames);

#define CTX_AENTER 0
#define CTX_AEXIT 1

typedef struct PinCtx_ {
    PyObject_HEAD
    HotFile *hf;
    long long pgno;
    PyObject *page;    /* the page pinned by __aenter__, for __aexit__ */
    PyObject *result;  /* what the pending await returns (NULL: no await pending) */
    BoundObj bound[2]; /* __aenter__, __aexit__ */
    struct PinCtx_ *next_free;
} PinCtx;

static PyTypeObject *Bound_Type;
static allocfunc ctx_alloc_fn;
static freefunc ctx_free_fn;

/* Contexts whose last reference went, kept for reuse: one is made and dropped per pin, and
   the allocator's malloc and free are a tenth of a hot pin. Bounded; guarded by the GIL. */
#define CTX_FREE_MAX 64
static PinCtx *ctx_free_list;
static int ctx_nfree;

static PinCtx *ctx_make(HotFile *hf, long long pgno) {
    PinCtx *c = ctx_free_list;
    if (c) {
        ctx_free_list = c->next_free;
        ctx_nfree--;
        c->next_free = NULL;
        Py_SET_REFCNT((PyObject *)c, 1);
    } else {
        c = (PinCtx *)ctx_alloc_fn(PinCtx_Type, 0); /* zeroed; holds a reference to its type */
        if (!c) return NULL;
        for (int k = 0; k < 2; k++) {
            /* Each embedded object holds a reference to Bound_Type until c is freed. */
            PyObject_Init((PyObject *)&c->bound[k], Bound_Type);
            Py_SET_REFCNT((PyObject *)&c->bound[k], 0);
            c->bound[k].vectorcall = bound_vectorcall;
            c->bound[k].ctx = c;
            c->bound[k].kind = k;
        }
    }
    Py_INCREF((PyObject *)hf);
    c->hf = hf;
    c->pgno = pgno;
    return c;
}

/* An unpin released a frame (aiodb_unpin_at returned 1): it may be evictable now, so wake a
   frame waiter, if any waits. 0, or -1 with an error set. */
static int wake_frame_waiter(HotFile *hf) {
    Py_ssize_t waiting = PyObject_Length(hf->frame_queue);
    if (waiting <= 0) return (int)waiting; /* -1: error set */
    PyObject *x = PyObject_CallNoArgs(hf->frame_released);
    if (!x) return -1;
    Py_DECREF(x);
    return 0;
}

/* Undo a pin this module just took, when building its Page failed (out of memory). */
static void undo_pin(HotFile *hf, CacheRef *c, uint64_t b, int64_t off) {
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    int r = unpin_at(c->w, c->mptrs, c->nowait_w, c->bucket_w, b, (uint64_t)off >> 3, c->hdr, 0,
                     hf->slot);
    if (r != 0 && r != 1) {
        /* Contended or odd: let the Python release (which waits without blocking) finish. */
        PyObject *res = PyObject_CallFunction(hf->after_unpin, "OLKLii", c->cache, (long long)-1,
                                              (unsigned long long)b, (long long)off, 0, r);
        if (res) {
            /* A coroutine: nobody will await it here; close it so it does not warn. */
            PyObject *x = PyObject_CallMethod(res, "close", NULL);
            Py_XDECREF(x);
            Py_DECREF(res);
        }
        PyErr_Clear();
    }
    PyErr_Restore(et, ev, tb);
}

/* The Page of the buffer at off (bucket b of cache c), just pinned for pgno by a hit or a
   compiled miss. NULL with an error set: the pin is undone first. */
static PyObject *page_of(HotFile *hf, CacheRef *c, uint64_t b, int64_t off, int64_t pgno) {
    Py_ssize_t start = (Py_ssize_t)(off + bh_data);
    if (start > c->region_len - hf->data_size) {
        /* The buffer's page ends past the region: corrupt (the pin no longer matters). */
        PyObject *r = PyObject_CallFunction(hf->fail, "OLK", c->cache, (long long)0,
                                            (unsigned long long)b);
        Py_XDECREF(r);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError, "page ends past the region");
        return NULL;
    }
    PageObject *p = page_make();
    if (!p) goto fail;
    p->pgno = pgno;
    Py_INCREF(hf->file);
    p->file = hf->file;
    Py_INCREF(c->cache);
    p->cache = c->cache;
    p->bucket = (long long)b;
    p->bh = off;
    Py_INCREF((PyObject *)c->hold); /* set while hot (checked on entry) */
    p->hold = c->hold;
    p->view_off = start;
    p->view_len = hf->data_size;
    p->readonly = (char)hf->readonly;
    p->data = PyMemoryView_FromObject((PyObject *)p);
    if (!p->data) goto fail_page;
    pins_link((PinSet *)hf->pins, p);
    return (PyObject *)p;
fail_page:
    p->bh = -1;
    Py_DECREF(p);
fail:
    undo_pin(hf, c, b, off);
    return NULL;
}

/* The hit: pin page pgno in C and build its Page. NULL with no error set: not a hit (go the
   slow way). NULL with an error: raise it. */
static PyObject *hit(HotFile *hf, int64_t pgno) {
    if (!hf->hot || *hf->panic) return NULL;
    uint64_t b = 0;
    int64_t off;
    CacheRef *c;
    if (hf->ncache == 1) {
        /* Hash, search, pin and statistics in one call. */
        c = &hf->c[0];
        off = pin_one(c->w, c->mptrs, c->nowait_w, c->bucket_w, c->nb, hf->fidx,
                      (uint64_t)pgno, hf->hits, hf->extra, hf->longest, &b, hf->slot);
    } else {
        /* The cache and bucket as aiodbenv.mpool.cache.bucket_hash and PageAccess._pin_hit_c
           choose them. */
        uint64_t h = ((uint64_t)pgno * hash_pgno + hf->fidx * hash_file) & hash_mask;
        uint64_t n = (uint64_t)hf->ncache, examined = 1;
        c = &hf->c[h % n];
        b = (h / n) % c->nb;
        off = pin_hit(c->w, c->mptrs[b], c->nowait_w[b], c->bucket_w[b] + b_head, (uint64_t)pgno,
                      hf->fidx + 1, &examined, hf->slot);
        if (off > 0) {
            (*hf->hits)++;
            if (examined > 1) {
                *hf->extra += examined - 1;
                if (examined > *hf->longest) *hf->longest = examined;
            }
        }
    }
    if (off <= 0) {
        if (off == -EOWNERDEAD || off == corrupt_code) {
            /* Repair the bucket (or raise CorruptRegion), then the slow path. */
            PyObject *r = PyObject_CallFunction(hf->fail, "OLK", c->cache, (long long)off,
                                                (unsigned long long)b);
            if (!r) return NULL;
            Py_DECREF(r);
        }
        return NULL;
    }
    return page_of(hf, c, b, off, pgno);
}

/* ---------------------------------------------------------------- the miss --------- */

/* A run of compiled misses never awaits, so it would hold the event loop as long as it lasts.
   The loop gets a turn every millisecond of them (or MISS_RUN misses, or MISS_RUN_MIN and a
   millisecond since the last turn, for misses among hits): the miss that finds the budget
   spent asks for a mark at the end of the loop's ready queue (loop_turned, through
   schedule_turn) and yields before it pins anything; so does every compiled miss until the
   mark has run (the loop went round once), whichever coroutine makes it -- as many coroutines
   missing at once share the budget of PoolBase._breathe. A mark that never runs (its loop
   closed) expires after MISS_TURN_LOST. Process-wide: several loops only yield more often. */
#define MISS_RUN 512
#define MISS_RUN_MIN 16
#define MISS_BUDGET_NS 1000000ULL
#define MISS_TURN_LOST_NS 10000000ULL
static unsigned miss_run;
static uint64_t miss_run_t0, miss_pending_since;
static int miss_pending;
static PyObject *schedule_turn; /* Python: call_soon(loop_turned) on the running loop */

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Whether this miss must let the loop run first (see MISS_RUN). -1: an error is set. */
static int miss_breathe(void) {
    uint64_t now;
    if (miss_pending) {
        now = mono_ns();
        if (now - miss_pending_since < MISS_TURN_LOST_NS) return 1;
        miss_pending = 0; /* lost: start a new budget */
        miss_run = 0;
        miss_run_t0 = now;
    }
    if (++miss_run < MISS_RUN_MIN) return 0;
    now = mono_ns();
    if (miss_run < MISS_RUN && now - miss_run_t0 < MISS_BUDGET_NS) return 0;
    PyObject *r = PyObject_CallNoArgs(schedule_turn);
    if (!r) return -1;
    Py_DECREF(r);
    miss_pending = 1;
    miss_pending_since = now;
    return 1;
}

static PyObject *loop_turned(PyObject *mod, PyObject *unused) {
    (void)mod;
    (void)unused;
    miss_pending = 0;
    miss_run = 0;
    miss_run_t0 = mono_ns();
    Py_RETURN_NONE;
}

/* The miss of page pgno done whole in C when it can be (aiodb_miss: a clean victim, the page
   read from the OS page cache with RWF_NOWAIT), as miss.try_miss does it for the Python slow
   path, and its Page. NULL with an error set: raise it. NULL without: the Python path goes on,
   from the start (*missed NULL) or from what aiodb_miss handed back (*missed, a new tuple
   (result, status, frame, dead bucket): see miss.finish_miss); *later: nothing was tried, the
   loop must run first (miss_breathe). */
static PyObject *miss(HotFile *hf, int64_t pgno, PyObject **missed, int *later) {
    *missed = NULL;
    *later = 0;
    if (!hf->miss_on || !hf->hot || *hf->panic || (uint64_t)pgno >= *hf->miss_pages)
        return NULL;
    /* What try_miss checks that may change: fault injection armed (its steps are Python's),
       a descriptor that refused RWF_NOWAIT, frame waiters (queue behind them), closing. */
    Py_ssize_t n = PyList_Size(hf->faults);
    if (n) return NULL; /* -1 has an error set: raised */
    if (PySet_Size(hf->no_nowait) > 0) {
        int r = PySet_Contains(hf->no_nowait, hf->fd_obj);
        if (r) return NULL;
    }
    n = PyObject_Length(hf->frame_queue);
    if (n) return NULL;
    /* The pool's attributes straight from its __dict__ (plain instance attributes: no
       descriptor to honour), a third of the cost of getattr. */
    PyObject *closing = PyDict_GetItemWithError(hf->pool, s_closing);
    if (closing != Py_False) return NULL; /* closing, or an error set */
    int br = miss_breathe();
    if (br) {
        *later = br > 0;
        return NULL;
    }
    CacheRef *c;
    const void *ctx;
    uint64_t b = 0;
    if (hf->ncache == 1) {
        c = &hf->c[0];
        ctx = hf->miss_ctx[0];
    } else {
        /* As hit(): the cache and bucket of aiodbenv.mpool.cache.bucket_hash. */
        uint64_t h = ((uint64_t)pgno * hash_pgno + hf->fidx * hash_file) & hash_mask;
        uint64_t k = h % (uint64_t)hf->ncache;
        c = &hf->c[k];
        ctx = hf->miss_ctx[k];
        b = (h / (uint64_t)hf->ncache) % c->nb;
    }
    uint64_t *out = hf->miss_out;
    int64_t off;
    /* Without the GIL, as a cffi call is made: a worker thread waiting for it (a batch of
       dirty victims being written, a read) gets it now rather than after the switch
       interval (5 ms) -- a loop of compiled misses would otherwise hold it that long. The
       call touches no Python object (out is this file's, used on the loop thread only). */
    Py_BEGIN_ALLOW_THREADS
    off = miss_call(ctx, b, (uint64_t)pgno, hf->miss_fd, out);
    Py_END_ALLOW_THREADS
    if (off <= 0) {
        /* Something may be held (a frame, a buffer READING): the Python path must go on. */
        *missed = Py_BuildValue("(LKKK)", (long long)off, (unsigned long long)out[0],
                                (unsigned long long)out[1], (unsigned long long)out[2]);
        return NULL;
    }
    b = out[3];
    hf->misses++;
    /* As try_miss: frames come free again (the poll restarts at its shortest step), and a
       coroutine waiting for the pool to change is woken. */
    if (PyDict_SetItem(hf->pool, s_poll_delay, poll_min) < 0) goto undo;
    PyObject *waiters = PyDict_GetItemWithError(hf->pool, s_waiters);
    if (!waiters) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_AttributeError, "pool._waiters");
        goto undo;
    }
    int wt = PyObject_IsTrue(waiters);
    if (wt < 0) goto undo;
    if (wt) {
        PyObject *r = PyObject_CallNoArgs(hf->notify);
        if (!r) goto undo;
        Py_DECREF(r);
    }
    if (out[0] == miss_dirty_met) {
        /* A dirty best was passed over: start writing such pages (victims.dirty_met). */
        PyObject *r = PyObject_CallFunctionObjArgs(hf->on_dirty, c->cache, NULL);
        if (!r) goto undo;
        Py_DECREF(r);
    }
    return page_of(hf, c, b, off, pgno);
undo:
    undo_pin(hf, c, b, off);
    return NULL;
}

/* set_miss(contexts, out, pages, fd, pool, faults, no_nowait, notify, on_dirty): turn the
   compiled miss on (see miss.miss_context for the addresses; pool is the pool handle's __dict__). */
static PyObject *hf_set_miss(HotFile *self, PyObject *args) {
    PyObject *ctxs, *pool, *faults, *no_nowait, *notify, *on_dirty;
    unsigned long long out, pages;
    int fd;
    if (!PyArg_ParseTuple(args, "OKKiOOOOO", &ctxs, &out, &pages, &fd, &pool, &faults,
                          &no_nowait, &notify, &on_dirty))
        return NULL;
    if (!miss_call) {
        PyErr_SetString(PyExc_RuntimeError, "aiodbenv._hot: the miss is not configured");
        return NULL;
    }
    if (!PyTuple_Check(ctxs) || PyTuple_Size(ctxs) != self->ncache || !out || !pages || fd < 0
            || !PyDict_Check(pool) || !PyList_Check(faults) || !PySet_Check(no_nowait) || !PyCallable_Check(notify)
            || !PyCallable_Check(on_dirty)) {
        PyErr_SetString(PyExc_ValueError, "set_miss: bad contexts, address, descriptor or state");
        return NULL;
    }
    for (int i = 0; i < self->ncache; i++) {
        unsigned long long a = PyLong_AsUnsignedLongLong(PyTuple_GetItem(ctxs, i));
        if (PyErr_Occurred()) return NULL;
        if (!a) {
            PyErr_SetString(PyExc_ValueError, "set_miss: a null context");
            return NULL;
        }
        self->miss_ctx[i] = (const void *)(uintptr_t)a;
    }
    PyObject *fd_obj = PyLong_FromLong(fd);
    if (!fd_obj) return NULL;
    self->miss_out = (uint64_t *)(uintptr_t)out;
    self->miss_pages = (const volatile uint64_t *)(uintptr_t)pages;
    self->miss_fd = fd;
    SETREF(self->fd_obj, fd_obj);
    SETREF(self->pool, Py_NewRef(pool));
    SETREF(self->faults, Py_NewRef(faults));
    SETREF(self->no_nowait, Py_NewRef(no_nowait));
    SETREF(self->notify, Py_NewRef(notify));
    SETREF(self->on_dirty, Py_NewRef(on_dirty));
    self->miss_on = 1;
    Py_RETURN_NONE;
}

static PyObject *hf_get_misses(HotFile *self, void *closure) {
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->misses);
}

/* Start fetching the lines of pgno's bucket that the pin takes first: its mutex and its chain
   head. Entering the context comes a few hundred instructions later, so with the buckets
   spread over more memory than the CPU caches hold, the two trips to memory overlap the
   interpreter's work instead of stalling the pin. Only the process's own arrays are read here
   (the addresses stay valid while hot); a prefetch never faults. */
static void prefetch_bucket(HotFile *hf, uint64_t pgno) {
    uint64_t h = (pgno * hash_pgno + hf->fidx * hash_file) & hash_mask;
    uint64_t n = (uint64_t)hf->ncache;
    CacheRef *c = &hf->c[h % n];
    uint64_t b = (h / n) % c->nb;
    if (c->mptrs[b]) __builtin_prefetch(c->mptrs[b], 1, 3);
    __builtin_prefetch(c->w + c->bucket_w[b] + b_head, 0, 3);
}

/* get(pgno): the context of `async with f.get(pgno)` / `await f.get(pgno)`. Anything but one
   plain int page number in range goes to PoolFile.get (keywords, latch, checks, errors). */
static PyObject *hf_get(HotFile *self, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames) {
    if (nargs == 1 && !kwnames && PyLong_CheckExact(args[0])) {
        int overflow = 0;
        long long pgno = PyLong_AsLongLongAndOverflow(args[0], &overflow);
        if (!overflow && pgno >= 0 && pgno < max_pgno) {
            if (self->hot) prefetch_bucket(self, (uint64_t)pgno);
            return (PyObject *)ctx_make(self, pgno);
        }
    }
    /* The general case: rebuild the call for PoolFile.get. */
    Py_ssize_t nkw = kwnames ? PyTuple_Size(kwnames) : 0;
    PyObject *t = PyTuple_New(nargs);
    if (!t) return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SetItem(t, i, args[i]);
    }
    PyObject *d = NULL;
    if (nkw) {
        d = PyDict_New();
        if (!d) {
            Py_DECREF(t);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < nkw; i++)
            if (PyDict_SetItem(d, PyTuple_GetItem(kwnames, i), args[nargs + i]) < 0) {
                Py_DECREF(t);
                Py_DECREF(d);
                return NULL;
            }
    }
    PyObject *r = PyObject_Call(self->py_get, t, d);
    Py_DECREF(t);
    Py_XDECREF(d);
    return r;
}

static PyObject *hf_disable(HotFile *self, PyObject *unused) {
    (void)unused;
    self->hot = 0;
    /* Let the regions go once no page view holds them (closing the region releases buf). */
    for (int i = 0; i < self->ncache; i++) Py_CLEAR(self->c[i].hold);
    Py_RETURN_NONE;
}

static PyObject *hf_get_hot(HotFile *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->hot);
}

/* A transaction's page taking (a part of this module: see that file). */
#include "txntake.c"

static PyMethodDef hf_methods[] = {
    {"txn_take", (PyCFunction)(void (*)(void))hf_txn_take, METH_FASTCALL,
     "txn_take(pgno, owner, lsn_off, fkey, flen): take a cached page for a transaction: "
     "(page, TxnCopy), else the page pinned and not taken, or None (aiodbenv.txn.take)."},
    {"unpin_now", (PyCFunction)hf_unpin_now, METH_O,
     "unpin_now(page): drop a pin of page: True when done, False when nothing was done (use "
     "the Python unpin), else what to await to finish it (aiodbenv.txn.txn)."},
    {"get", (PyCFunction)(void (*)(void))hf_get, METH_FASTCALL | METH_KEYWORDS,
     "get(pgno, *, create=False, latch=False): the context that pins page pgno (see "
     "PoolFile.get)."},
    {"disable", (PyCFunction)hf_disable, METH_NOARGS,
     "Never take the compiled path again (the file closed, or a forked child disarmed it)."},
    {"set_miss", (PyCFunction)hf_set_miss, METH_VARARGS,
     "set_miss(contexts, out, pages, fd, vars(pool), faults, no_nowait, notify, on_dirty): serve "
     "misses from the OS page cache in C (aiodbenv.mpool.hotpath.attach)."},
    {NULL},
};

static PyGetSetDef hf_getset[] = {
    {"hot", (getter)hf_get_hot, NULL, "True while the compiled path may run.", NULL},
    {"misses", (getter)hf_get_misses, NULL,
     "Misses the compiled context served whole (no Python ran for them).", NULL},
    {NULL},
};

static PyType_Slot hf_slots[] = {
    {Py_tp_doc, "The compiled hot path of one PoolFile (aiodbenv.mpool.hotpath)."},
    {Py_tp_new, hf_new},
    {Py_tp_dealloc, hf_dealloc},
    {Py_tp_traverse, hf_traverse},
    {Py_tp_clear, hf_clear},
    {Py_tp_methods, hf_methods},
    {Py_tp_getset, hf_getset},
    {0, NULL},
};

static PyType_Spec hf_spec = {
    "aiodbenv._hot.HotFile",
    sizeof(HotFile),
    0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    hf_slots,
};

/* ---------------------------------------------------------------- PinCtx ------------- */


static void ctx_dealloc(PinCtx *self) {
    PyTypeObject *tp = Py_TYPE((PyObject *)self);
    Py_CLEAR(self->hf);
    Py_CLEAR(self->page);
    Py_CLEAR(self->result);
    /* No bound method can be alive: each holds a reference to self. */
    if (ctx_nfree < CTX_FREE_MAX) {
        self->next_free = ctx_free_list;
        ctx_free_list = self;
        ctx_nfree++;
        return; /* keeps its references to its type and Bound_Type */
    }
    ctx_free_fn(self);
    Py_DECREF(Bound_Type);
    Py_DECREF(Bound_Type);
    Py_DECREF(tp);
}

/* Return self as the completed awaitable of `value` (stolen). */
static PyObject *completed(PinCtx *self, PyObject *value) {
    SETREF(self->result, value);
    Py_INCREF((PyObject *)self);
    return (PyObject *)self;
}

/* The slow path's awaitable r, after dropping the tuple handed to it. */
static PyObject *slow_after(PyObject *r, PyObject *missed) {
    Py_DECREF(missed);
    return r;
}

static PyObject *ctx_aenter(PinCtx *self) {
    if (self->page) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this page context is already entered: exit it before entering again");
        return NULL;
    }
    PyObject *page = hit(self->hf, self->pgno);
    if (page) {
        Py_INCREF(page);
        self->page = page;
        return completed(self, page);
    }
    if (PyErr_Occurred()) return NULL;
    PyObject *missed;
    int later;
    page = miss(self->hf, self->pgno, &missed, &later);
    if (page) {
        Py_INCREF(page);
        self->page = page;
        return completed(self, page);
    }
    if (missed)
        return slow_after(PyObject_CallFunction(self->hf->enter_slow, "OLO", (PyObject *)self,
                                                self->pgno, missed), missed);
    if (PyErr_Occurred()) return NULL;
    if (later) /* yield, then __aenter__ again: nothing is held meanwhile */
        return PyObject_CallFunction(self->hf->enter_slow, "OLOO", (PyObject *)self,
                                     self->pgno, Py_None, (PyObject *)self);
    /* The slow path: a coroutine of the file that pins and records the page in _page. */
    return PyObject_CallFunction(self->hf->enter_slow, "OL", (PyObject *)self, self->pgno);
}

/* r of the Python after_unpin: the view could not be released (aiodbenv.mpool.hotpath). */
#define UNPIN_EXPORTED 3

static PyObject *ctx_aexit(PinCtx *self) {
    PageObject *p = (PageObject *)self->page;
    if (!p) return completed(self, Py_NewRef(Py_None));
    self->page = NULL; /* ours now: every way out below drops it */
    HotFile *hf = self->hf;
    long long flags = p->flags;
    CacheRef *c = cache_of(hf, p->cache);
    if (!hf->hot || !c || p->file != hf->file || p->bh <= 0 ||
        ((flags & page_dirty) && ((flags & page_clean) || hf->readonly))) {
        /* Closed, forked, not a page of this cache, already unpinned, or a bad flag: the
           Python unpin decides (and raises what it must). */
        PyObject *r = PyObject_CallFunctionObjArgs(hf->exit_slow, (PyObject *)p, NULL);
        Py_DECREF(p);
        return r;
    }
    if (flags & page_dirty) {
        PyObject *r = PyObject_CallFunctionObjArgs(hf->note_dirty, hf->page_size_obj, NULL);
        if (!r) {
            Py_DECREF(p);
            return NULL;
        }
        Py_DECREF(r);
    }
    long long bh = p->bh;
    p->bh = -1;
    pins_unlink(p); /* ctx's reference (p) keeps it alive */
    /* A view exported further (a buffer taken from page.data) cannot be released: as the
       Python unpin does, the pin is released all the same (the Python way, which also logs
       the warning: UNPIN_EXPORTED), or the frame would stay pinned for good. */
    if (Py_REFCNT(p->data) == 1 && PyMemoryView_Check(p->data)) {
        /* Only the page refers to its view, so nothing holds a buffer of it either (a
           buffer holds a reference): dropping it is its release, without a method call.
           page.data becomes an already-released view, so using it raises ValueError. */
        SETREF(p->data, Py_NewRef(released_view));
    } else {
        PyObject *rel = PyMemoryView_Check(p->data)
                            ? PyObject_CallFunctionObjArgs(release_fn, p->data, NULL)
                            : PyObject_CallMethodObjArgs(p->data, s_release, NULL);
        if (!rel) {
            if (!PyErr_ExceptionMatches(PyExc_BufferError)) {
                Py_DECREF(p);
                return NULL;
            }
            PyErr_Clear();
            PyObject *res = PyObject_CallFunction(hf->after_unpin, "OLKLLi", c->cache, p->pgno,
                                                  (unsigned long long)p->bucket, bh, flags,
                                                  UNPIN_EXPORTED);
            Py_DECREF(p);
            return res;
        }
        Py_DECREF(rel);
    }
    uint64_t b = (uint64_t)p->bucket;
    int r = unpin_at(c->w, c->mptrs, c->nowait_w, c->bucket_w, b, (uint64_t)bh >> 3, c->hdr,
                     (int)flags, hf->slot);
    if (r == 0 || r == 1) {
        Py_DECREF(p);
        if (r == 1 && wake_frame_waiter(hf) < 0) return NULL;
        return completed(self, Py_NewRef(Py_None));
    }
    /* Contended, a dead holder, or an over-unpin: the Python release finishes it. */
    PyObject *res = PyObject_CallFunction(hf->after_unpin, "OLKLLi", c->cache, p->pgno,
                                          (unsigned long long)b, bh, flags, r);
    Py_DECREF(p);
    return res;
}

static PyObject *ctx_await(PinCtx *self) {
    if (self->result) {
        Py_INCREF((PyObject *)self);
        return (PyObject *)self;
    }
    /* `await f.get(p)`: pin, and leave the unpin to the caller. */
    PyObject *page = hit(self->hf, self->pgno);
    if (page) return completed(self, page);
    if (PyErr_Occurred()) return NULL;
    PyObject *missed;
    int later;
    page = miss(self->hf, self->pgno, &missed, &later);
    if (page) return completed(self, page);
    if (missed)
        return slow_after(PyObject_CallFunction(self->hf->await_slow, "LOO", self->pgno, missed,
                                                Py_None), missed);
    if (PyErr_Occurred()) return NULL;
    if (later) /* yield, then await this context again */
        return PyObject_CallFunction(self->hf->await_slow, "LOO", self->pgno, Py_None,
                                     (PyObject *)self);
    return PyObject_CallFunction(self->hf->await_slow, "L", self->pgno);
}

static PySendResult ctx_send(PinCtx *self, PyObject *arg, PyObject **presult) {
    (void)arg;
    PyObject *r = self->result;
    if (!r) {
        PyErr_SetString(PyExc_RuntimeError, "page context awaited without a pending result");
        *presult = NULL;
        return PYGEN_ERROR;
    }
    self->result = NULL;
    *presult = r;
    return PYGEN_RETURN;
}

/* For callers that iterate rather than send: the result as StopIteration. */
static PyObject *ctx_iternext(PinCtx *self) {
    PyObject *r = self->result;
    if (!r) {
        PyErr_SetString(PyExc_RuntimeError, "page context awaited without a pending result");
        return NULL;
    }
    self->result = NULL;
    if (r == Py_None) PyErr_SetNone(PyExc_StopIteration);
    else {
        PyObject *e = PyObject_CallFunctionObjArgs(PyExc_StopIteration, r, NULL);
        if (e) {
            PyErr_SetObject(PyExc_StopIteration, e);
            Py_DECREF(e);
        }
    }
    Py_DECREF(r);
    return NULL;
}

static PyObject *ctx_iter(PyObject *self) { return Py_NewRef(self); }

static PyObject *ctx_get_page(PinCtx *self, void *closure) {
    (void)closure;
    return Py_NewRef(self->page ? self->page : Py_None);
}

static int ctx_set_page(PinCtx *self, PyObject *value, void *closure) {
    (void)closure;
    if (value == Py_None) value = NULL;
    Py_XINCREF(value);
    SETREF(self->page, value);
    return 0;
}

/* ------------------------------------------- __aenter__ / __aexit__ without allocation --- */

static const char aenter_doc[] =
    "Pin the page; the awaitable's result is the Page. A cached page is pinned at once (the "
    "awaitable is already complete); otherwise PoolFile.get's slow path runs. Cancellation: "
    "a pin cancelled while it waits (a miss, a held mutex) leaves no pin held.";
static const char aexit_doc[] =
    "Unpin the page with the flags set on it (as PoolFile.unpin). Cancellation: the page is "
    "unpinned for the caller at once; a release still waiting for the bucket mutex finishes "
    "in the background.";

/* Call __aenter__ (no arguments) or __aexit__ (exc_type, exc, tb) of c; the arguments are
   args[start:]. */
static PyObject *ctx_call(PinCtx *c, int kind, PyObject *args, Py_ssize_t start,
                          PyObject *kwargs) {
    Py_ssize_t n = PyTuple_Size(args) - start;
    if (kwargs && PyDict_Size(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "PinContext's __aenter__/__aexit__ take no keywords");
        return NULL;
    }
    if (kind == CTX_AENTER) {
        if (n != 0) {
            PyErr_Format(PyExc_TypeError, "__aenter__() takes no arguments (%zd given)", n);
            return NULL;
        }
        return ctx_aenter(c);
    }
    if (n != 3) {
        PyErr_Format(PyExc_TypeError, "__aexit__() takes 3 arguments (%zd given)", n);
        return NULL;
    }
    return ctx_aexit(c);
}

static PyObject *bound_call(BoundObj *b, PyObject *args, PyObject *kwargs) {
    return ctx_call(b->ctx, b->kind, args, 0, kwargs);
}

/* What `async with` calls: __aenter__() and __aexit__(exc_type, exc, tb), no tuple. */
static PyObject *bound_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames) {
    (void)args;
    BoundObj *b = (BoundObj *)self;
    Py_ssize_t n = AIODB_VC_NARGS(nargsf);
    if (kwnames && PyTuple_Size(kwnames)) {
        PyErr_SetString(PyExc_TypeError, "PinContext's __aenter__/__aexit__ take no keywords");
        return NULL;
    }
    if (b->kind == CTX_AENTER) {
        if (n != 0) {
            PyErr_Format(PyExc_TypeError, "__aenter__() takes no arguments (%zd given)", n);
            return NULL;
        }
        return ctx_aenter(b->ctx);
    }
    if (n != 3) {
        PyErr_Format(PyExc_TypeError, "__aexit__() takes 3 arguments (%zd given)", n);
        return NULL;
    }
    return ctx_aexit(b->ctx);
}

static PyMemberDef bound_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(BoundObj, vectorcall), READONLY, NULL},
    {NULL},
};

/* The last reference went: the object goes idle (not freed: it is part of its context). */
static void bound_dealloc(BoundObj *b) { Py_DECREF((PyObject *)b->ctx); }

static PyObject *bound_repr(BoundObj *b) {
    return PyUnicode_FromFormat("<bound method PinContext.%s of page %lld>",
                                b->kind == CTX_AENTER ? "__aenter__" : "__aexit__",
                                b->ctx->pgno);
}

static PyObject *bound_get_doc(BoundObj *b, void *closure) {
    (void)closure;
    return PyUnicode_FromString(b->kind == CTX_AENTER ? aenter_doc : aexit_doc);
}

static PyGetSetDef bound_getset[] = {
    {"__doc__", (getter)bound_get_doc, NULL, NULL, NULL},
    {NULL},
};

static PyType_Slot bound_slots[] = {
    /* No tp_doc: it would shadow the __doc__ getter (the method's own docstring). */
    {Py_tp_dealloc, bound_dealloc},
    {Py_tp_call, bound_call},
    {Py_tp_repr, bound_repr},
    {Py_tp_getset, bound_getset},
    {Py_tp_members, bound_members},
    {0, NULL},
};

static PyType_Spec bound_spec = {
    "aiodbenv._hot.PinContextMethod",
    sizeof(BoundObj),
    0,
    Py_TPFLAGS_DEFAULT | AIODB_TPFLAGS_HAVE_VECTORCALL,
    bound_slots,
};

/* The class attribute __aenter__ / __aexit__ of PinContext: a descriptor handing out the
   context's embedded bound method; called on the class (`type(cm).__aenter__(cm)`, as
   contextlib.AsyncExitStack does) it takes the context as its first argument. */
typedef struct {
    PyObject_HEAD
    int kind;
    PyObject *doc, *name;
} CtxMethDescr;

static PyTypeObject *CtxMethDescr_Type;

static PyObject *cmd_get(CtxMethDescr *d, PyObject *obj, PyObject *type) {
    (void)type;
    if (!obj || obj == Py_None) return Py_NewRef((PyObject *)d);
    if (Py_TYPE(obj) != PinCtx_Type) {
        PyErr_SetString(PyExc_TypeError, "not a PinContext");
        return NULL;
    }
    BoundObj *b = &((PinCtx *)obj)->bound[d->kind];
    if (Py_REFCNT((PyObject *)b) == 0) {
        Py_SET_REFCNT((PyObject *)b, 1);
        Py_INCREF(obj);
    } else {
        Py_INCREF((PyObject *)b);
    }
    return (PyObject *)b;
}

static PyObject *cmd_call(CtxMethDescr *d, PyObject *args, PyObject *kwargs) {
    PyObject *self = PyTuple_Size(args) > 0 ? PyTuple_GetItem(args, 0) : NULL;
    if (!self || Py_TYPE(self) != PinCtx_Type) {
        PyErr_SetString(PyExc_TypeError, "PinContext method called without a PinContext");
        return NULL;
    }
    return ctx_call((PinCtx *)self, d->kind, args, 1, kwargs);
}

static void cmd_dealloc(CtxMethDescr *d) {
    PyTypeObject *tp = Py_TYPE((PyObject *)d);
    Py_CLEAR(d->doc);
    Py_CLEAR(d->name);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    tp_free(d);
    Py_DECREF(tp);
}

static PyMemberDef cmd_members[] = {
    {"__doc__", T_OBJECT, offsetof(CtxMethDescr, doc), READONLY, NULL},
    {"__name__", T_OBJECT, offsetof(CtxMethDescr, name), READONLY, NULL},
    {NULL},
};

static PyType_Slot cmd_slots[] = {
    {Py_tp_dealloc, cmd_dealloc},
    {Py_tp_descr_get, cmd_get},
    {Py_tp_call, cmd_call},
    {Py_tp_members, cmd_members},
    {0, NULL},
};

static PyType_Spec cmd_spec = {
    "aiodbenv._hot.PinContextMethodDescriptor",
    sizeof(CtxMethDescr),
    0,
    Py_TPFLAGS_DEFAULT,
    cmd_slots,
};

/* Put the descriptor of __aenter__ or __aexit__ into PinContext's class dict. */
static int add_ctx_method(int kind, const char *name, const char *doc) {
    allocfunc alloc = (allocfunc)PyType_GetSlot(CtxMethDescr_Type, Py_tp_alloc);
    CtxMethDescr *d = (CtxMethDescr *)alloc(CtxMethDescr_Type, 0);
    if (!d) return -1;
    d->kind = kind;
    d->doc = PyUnicode_FromString(doc);
    d->name = PyUnicode_FromString(name);
    int r = (d->doc && d->name) ? PyObject_SetAttrString((PyObject *)PinCtx_Type, name,
                                                         (PyObject *)d)
                                : -1;
    Py_DECREF(d);
    return r;
}

static PyGetSetDef ctx_getset[] = {
    {"_page", (getter)ctx_get_page, (setter)ctx_set_page,
     "The page pinned by __aenter__ (None when not entered).", NULL},
    {NULL},
};

static PyType_Slot ctx_slots[] = {
    {Py_tp_doc, "The result of PoolFile.get() when the compiled hot path is in use."},
    {Py_tp_dealloc, ctx_dealloc},
    {Py_tp_getset, ctx_getset},
    {Py_tp_iter, ctx_iter},
    {Py_tp_iternext, ctx_iternext},
    {Py_am_await, ctx_await},
    {Py_am_send, ctx_send},
    {0, NULL},
};

static PyType_Spec ctx_spec = {
    "aiodbenv._hot.PinContext",
    sizeof(PinCtx),
    0,
    Py_TPFLAGS_DEFAULT,
    ctx_slots,
};

/* The log's compiled put (a part of this module: see that file). */
#include "logput.c"

/* ---------------------------------------------------------------- module ------------- */

static PyObject *configure(PyObject *mod, PyObject *args) {
    (void)mod;
    unsigned long long pin_one_addr, pin_hit_addr, unpin_addr, bhead, hp, hfile, hmask;
    long long corrupt, bhd, mp;
    long dirty, clean;
    PyObject *ptype;
    if (!PyArg_ParseTuple(args, "KKKLLLllKKKKO", &pin_one_addr, &pin_hit_addr, &unpin_addr,
                          &corrupt, &bhd, &mp, &dirty, &clean, &bhead, &hp, &hfile, &hmask,
                          &ptype))
        return NULL;
    if (!pin_one_addr || !pin_hit_addr || !unpin_addr || bhd <= 0 || mp <= 0 || !hmask) {
        PyErr_SetString(PyExc_ValueError, "configure: a null function or a bad constant");
        return NULL;
    }
    if (ptype != (PyObject *)PageBase_Type) {
        PyErr_SetString(PyExc_TypeError, "configure: the page type must be aiodbenv._hot.Page");
        return NULL;
    }
    pin_one = (pin_one_fn)(uintptr_t)pin_one_addr;
    pin_hit = (pin_hit_fn)(uintptr_t)pin_hit_addr;
    unpin_at = (unpin_at_fn)(uintptr_t)unpin_addr;
    corrupt_code = corrupt;
    bh_data = bhd;
    max_pgno = mp;
    page_dirty = dirty;
    page_clean = clean;
    b_head = bhead;
    hash_pgno = hp;
    hash_file = hfile;
    hash_mask = hmask;
    Py_INCREF(ptype);
    SETREF(page_type, (PyTypeObject *)ptype);
    Py_RETURN_NONE;
}

static PyObject *configure_miss(PyObject *mod, PyObject *args) {
    (void)mod;
    unsigned long long addr, dmet;
    PyObject *pmin, *sched;
    if (!PyArg_ParseTuple(args, "KKOO", &addr, &dmet, &pmin, &sched)) return NULL;
    if (!addr || !PyFloat_Check(pmin) || !PyCallable_Check(sched)) {
        PyErr_SetString(PyExc_ValueError, "configure_miss: a null function or a bad argument");
        return NULL;
    }
    miss_call = (miss_fn)(uintptr_t)addr;
    miss_dirty_met = dmet;
    SETREF(schedule_turn, Py_NewRef(sched));
    SETREF(poll_min, Py_NewRef(pmin));
    Py_RETURN_NONE;
}

static PyObject *configure_txn(PyObject *mod, PyObject *args) {
    (void)mod;
    unsigned long long addr, prep_addr;
    int latch_flag;
    Py_ssize_t words, head, count, fkey, fent, flen, kind;
    if (!PyArg_ParseTuple(args, "KinK(nnnnnn)", &addr, &latch_flag, &words, &prep_addr, &head,
                          &count, &fkey, &fent, &flen, &kind))
        return NULL;
    if (!addr || !latch_flag || words <= 0 || !prep_addr || head < 2 || count <= 0 ||
        head + count != words || fkey < 0 || fkey >= count || fent < 0 || fent >= count ||
        flen < 0 || flen >= count || kind < 0 || kind >= count) {
        PyErr_SetString(PyExc_ValueError, "configure_txn: a null function or a bad constant");
        return NULL;
    }
    txn_take_call = (txn_take_fn)(uintptr_t)addr;
    txn_prepare_call = (txn_prepare_fn)(uintptr_t)prep_addr;
    cd_head = head;
    cd_count = count;
    cd_fkey = fkey;
    cd_fent = fent;
    cd_flen = flen;
    cd_kind = kind;
    txn_take_latch = latch_flag;
    txn_desc_words = words;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure_txn", configure_txn, METH_VARARGS,
     "configure_txn(aiodb_txn_take, TXN_TAKE_LATCH, descriptor words, aiodb_txn_prepare, "
     "(CD_HEAD, CD_COUNT, CD_FKEY, CD_FENT, CD_FLEN, CD_KIND)): the cffi accelerator's one-call "
     "take of "
     "a transaction's page and its commit's build, and the descriptor's layout "
     "(aiodbenv.txn.commit)."},
    {"txn_prepare_many", (PyCFunction)(void (*)(void))txn_prepare_many, METH_FASTCALL,
     "txn_prepare_many(copies, entries, redo_start, worst, owner, flag): txn_prepare for a "
     "commit of several pages taken by txn_take: (record, fulls, changed, array), else the "
     "call's int result."},
    {"txn_prepare", (PyCFunction)(void (*)(void))txn_prepare, METH_FASTCALL,
     "txn_prepare(copy, files, redo_start, worst, owner, flag): build and mark the commit of "
     "one page taken by txn_take: (record, fulls), else the call's int result."},
    {"configure_miss", configure_miss, METH_VARARGS,
     "configure_miss(aiodb_miss, MISS_DIRTY_MET, POLL_MIN, schedule_turn): the cffi "
     "accelerator's one-call miss, what it says when it passed a dirty victim over, the "
     "shortest frame poll, and what calls loop_turned soon on the running loop "
     "(aiodbenv.mpool.hotpath)."},
    {"loop_turned", loop_turned, METH_NOARGS,
     "The event loop went round since a run of compiled misses spent its budget: misses may "
     "run in C again."},
    {"configure", configure, METH_VARARGS,
     "configure(pin_one_cache, pin_hit, unpin_at, corrupt, bh_data, max_pgno, PAGE_DIRTY, "
     "PAGE_CLEAN, B_HEAD, HASH_PGNO, HASH_FILE, HASH_MASK, page_type): the addresses of the cffi "
     "accelerator's functions and the constants."},
    {NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "aiodbenv._hot",
    "The hot pin/unpin as CPython extension types (see aiodbenv.mpool.hot).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hot(void) {
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    s_release = PyUnicode_InternFromString("release");
    s_closing = PyUnicode_InternFromString("_closing");
    s_waiters = PyUnicode_InternFromString("_waiters");
    s_poll_delay = PyUnicode_InternFromString("_frame_poll_delay");
    if (!s_closing || !s_waiters || !s_poll_delay) goto fail;
    PageBase_Type = (PyTypeObject *)PyType_FromSpec(&page_spec);
    HotFile_Type = (PyTypeObject *)PyType_FromSpec(&hf_spec);
    PinCtx_Type = (PyTypeObject *)PyType_FromSpec(&ctx_spec);
    PinSet_Type = (PyTypeObject *)PyType_FromSpec(&pins_spec);
    RegionHold_Type = (PyTypeObject *)PyType_FromSpec(&hold_spec);
    if (!RegionHold_Type) goto fail;
    Bound_Type = (PyTypeObject *)PyType_FromSpec(&bound_spec);
    CtxMethDescr_Type = (PyTypeObject *)PyType_FromSpec(&cmd_spec);
    if (!PinCtx_Type || !Bound_Type || !CtxMethDescr_Type) goto fail;
    ctx_alloc_fn = (allocfunc)PyType_GetSlot(PinCtx_Type, Py_tp_alloc);
    ctx_free_fn = (freefunc)PyType_GetSlot(PinCtx_Type, Py_tp_free);
    if (add_ctx_method(CTX_AENTER, "__aenter__", aenter_doc) < 0 ||
        add_ctx_method(CTX_AEXIT, "__aexit__", aexit_doc) < 0)
        goto fail;
    release_fn = PyObject_GetAttrString((PyObject *)&PyMemoryView_Type, "release");
    released_view = PyMemoryView_FromMemory(&released_byte, 1, PyBUF_READ);
    if (!release_fn || !released_view) goto fail;
    PyObject *rel = PyObject_CallFunctionObjArgs(release_fn, released_view, NULL);
    if (!rel) goto fail;
    Py_DECREF(rel);
    if (!s_release || !PageBase_Type || !HotFile_Type || !PinCtx_Type || !PinSet_Type ||
        !release_fn)
        goto fail;
    if (PyModule_AddObjectRef(m, "PinSet", (PyObject *)PinSet_Type) < 0) goto fail;
    if (PyModule_AddObjectRef(m, "Page", (PyObject *)PageBase_Type) < 0) goto fail;
    page_alloc_fn = (allocfunc)PyType_GetSlot(PageBase_Type, Py_tp_alloc);
    page_free_fn = (freefunc)PyType_GetSlot(PageBase_Type, Py_tp_free);
    if (PyModule_AddIntConstant(m, "PAGE_DIRTY", PAGE_DIRTY) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_CLEAN", PAGE_CLEAN) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_DISCARD", PAGE_DISCARD) < 0)
        goto fail;
    if (PyModule_AddObjectRef(m, "HotFile", (PyObject *)HotFile_Type) < 0) goto fail;
    if (PyModule_AddObjectRef(m, "PinContext", (PyObject *)PinCtx_Type) < 0) goto fail;
    TxnCopy_Type = (PyTypeObject *)PyType_FromSpec(&copy_spec);
    if (!TxnCopy_Type || PyModule_AddObjectRef(m, "TxnCopy", (PyObject *)TxnCopy_Type) < 0)
        goto fail;
    LogPutter_Type = (PyTypeObject *)PyType_FromSpec(&lp_spec);
    if (!LogPutter_Type || PyModule_AddObjectRef(m, "LogPutter", (PyObject *)LogPutter_Type) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
