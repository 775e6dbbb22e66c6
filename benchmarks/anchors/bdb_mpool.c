/*
 * bdb_mpool.c -- speed anchor: Berkeley DB 5.3's own mpool (DB_MPOOLFILE API)
 * measured with the same workloads as aiodbenv's buffer pool benchmarks.
 *
 * One run = one subcommand = ONE JSON object on stdout (errors included:
 * {"ok": false, "error": ...} and a non-zero exit status).  Diagnostics
 * from Berkeley DB itself go to stderr.
 *
 *   hot      --region file|system|private --cache-mb N --file-mb M --ops K
 *            --pattern random|seq [--procs P] [--repeat R]
 *   miss     --cache-mb 8 --file-mb 256 --ops K [--drop-caches] [--warmup N]
 *   sync     --cache-mb 128 --dirty-mb 64
 *   trickle  --cache-mb 128 --dirty-mb 64 --pct 50
 *   hitratio --cache-pages C --trace FILE [--warmup N] [--cache-bytes B]
 *   memory   --cache-mb N   (fill the cache; region bytes per page, RSS)
 *
 * Common: --dir DIR (required), --region (default file), --seed S,
 *         --shm-key K (system region; default derived from the pid),
 *         --thread (open the env with DB_THREAD), --keep-file.
 *
 * Written for aiodbenv; uses only the public db.h API.
 * Build: gcc -O2 -o bdb_mpool bdb_mpool.c -ldb-5.3
 */
#define _GNU_SOURCE
#include <db.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGESIZE 4096u
#define MIB (1024.0 * 1024.0)
#define SHM_KEY_SPAN 64 /* keys key..key+SHM_KEY_SPAN-1 are checked for leftovers */

/* ------------------------------------------------------------------ */
/* Options                                                             */
/* ------------------------------------------------------------------ */

struct opts {
	const char *cmd;
	const char *dir;
	const char *region;   /* file | system | private */
	const char *pattern;  /* random | seq */
	const char *trace;
	double cache_mb;
	double file_mb;
	double dirty_mb;
	long long cache_bytes; /* hitratio: explicit, skips calibration */
	long long cache_pages; /* hitratio target */
	long long ops;
	long long warmup;      /* -1: default */
	int procs;
	int repeat;
	int pct;
	int drop_caches;
	int thread;
	int keep_file;
	long shm_key;
	uint64_t seed;
};

static struct opts O = {
	.region = "file", .pattern = "random", .cache_mb = -1, .file_mb = -1,
	.dirty_mb = -1, .cache_bytes = -1, .cache_pages = -1, .ops = -1,
	.warmup = -1, .procs = 1, .repeat = 1, .pct = 50, .shm_key = -1,
	.seed = 0x9e3779b97f4a7c15ULL,
};

/* Cleanup state. */
static int g_dir_created;
static int g_dir_ready;   /* ensure_dir() ran: cleanup may touch O.dir */
static int g_is_child;
static char g_files[8][4096];
static int g_nfiles;
static char g_subdirs[4][4096];
static int g_nsubdirs;

/* ------------------------------------------------------------------ */
/* Tiny JSON writer (one object, built in memory, printed at the end)  */
/* ------------------------------------------------------------------ */

static char *jbuf;
static size_t jlen, jcap;
static int jfirst[32];
static int jdepth;

static void
jraw(const char *fmt, ...)
{
	va_list ap;
	int n;

	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(jbuf + jlen, jcap - jlen, fmt, ap);
		va_end(ap);
		if (n >= 0 && (size_t)n < jcap - jlen) {
			jlen += (size_t)n;
			return;
		}
		jcap = jcap ? jcap * 2 : 4096;
		if ((jbuf = realloc(jbuf, jcap)) == NULL)
			abort();
	}
}

static void
jsep(void)
{
	if (!jfirst[jdepth])
		jraw(",");
	jfirst[jdepth] = 0;
}

static void
jstrval(const char *s)
{
	jraw("\"");
	for (; s != NULL && *s; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\')
			jraw("\\%c", c);
		else if (c < 0x20)
			jraw("\\u%04x", c);
		else
			jraw("%c", c);
	}
	jraw("\"");
}

static void
jkey(const char *k)
{
	jsep();
	if (k != NULL) {
		jstrval(k);
		jraw(":");
	}
}

static void jbegin(const char *k) { jkey(k); jraw("{"); jfirst[++jdepth] = 1; }
static void jend(void) { jraw("}"); jdepth--; }
static void jabegin(const char *k) { jkey(k); jraw("["); jfirst[++jdepth] = 1; }
static void jaend(void) { jraw("]"); jdepth--; }
static void jstr(const char *k, const char *v) { jkey(k); if (v) jstrval(v); else jraw("null"); }
static void jint(const char *k, long long v) { jkey(k); jraw("%lld", v); }
static void juint(const char *k, unsigned long long v) { jkey(k); jraw("%llu", v); }
static void jbool(const char *k, int v) { jkey(k); jraw(v ? "true" : "false"); }

static void
jdbl(const char *k, double v)
{
	jkey(k);
	if (v != v || v > 1e300 || v < -1e300)
		jraw("null");
	else
		jraw("%.6g", v);
}

static void
jreset(void)
{
	jlen = 0;
	jdepth = 0;
	jfirst[0] = 1;
	if (jbuf == NULL)
		jraw("%s", "");
}

/* ------------------------------------------------------------------ */
/* Errors and cleanup                                                  */
/* ------------------------------------------------------------------ */

static void cleanup_all(int *shm_leftover);

static void
die(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;
	int left = 0;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (g_is_child) {
		fprintf(stderr, "bdb_mpool child %d: %s\n", (int)getpid(), msg);
		_exit(2);
	}
	cleanup_all(&left);
	jreset();
	jraw("{");
	jfirst[++jdepth] = 1;
	jbool("ok", 0);
	jstr("workload", O.cmd);
	jstr("error", msg);
	jint("shm_segments_left", left);
	jend();
	printf("%.*s\n", (int)jlen, jbuf);
	fflush(stdout);
	exit(1);
}

#define CHECK(call, what) do {						\
	int ret_ = (call);						\
	if (ret_ != 0)							\
		die("%s: %s", (what), db_strerror(ret_));		\
} while (0)

/* ------------------------------------------------------------------ */
/* Helpers                                                             */
/* ------------------------------------------------------------------ */

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* xorshift64: fast, good enough to scatter page numbers. */
static inline uint64_t
rng_next(uint64_t *s)
{
	uint64_t x = *s;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

/* Uniform in [0, n) without a division: multiply-high of the top 32 bits. */
static inline db_pgno_t
rng_below(uint64_t *s, uint32_t n)
{
	return (db_pgno_t)(((rng_next(s) >> 32) * (uint64_t)n) >> 32);
}

static int
region_flag(void)
{
	if (strcmp(O.region, "private") == 0)
		return DB_PRIVATE;
	if (strcmp(O.region, "system") == 0)
		return DB_SYSTEM_MEM;
	return 0;
}

static int is_system(void) { return strcmp(O.region, "system") == 0; }

static void
path_in_dir(char *out, size_t n, const char *name)
{
	if ((size_t)snprintf(out, n, "%s/%s", O.dir, name) >= n)
		die("path too long");
}

static void
remember_file(const char *path)
{
	if (g_nfiles < 8)
		snprintf(g_files[g_nfiles++], sizeof(g_files[0]), "%s", path);
}

/* Does any SysV segment exist in [key, key+span)?  Remove them if asked. */
static int
shm_scan(long key, int remove_them)
{
	int found = 0, i, id;

	if (key <= 0)
		return 0;
	for (i = 0; i < SHM_KEY_SPAN; i++) {
		id = shmget((key_t)(key + i), 0, 0);
		if (id >= 0) {
			found++;
			if (remove_them)
				(void)shmctl(id, IPC_RMID, NULL);
		}
	}
	return found;
}

static void
choose_shm_key(void)
{
	long k;
	int tries;

	if (!is_system())
		return;
	if (O.shm_key > 0) {
		if (shm_scan(O.shm_key, 0))
			die("--shm-key 0x%lx: segments already exist in "
			    "[key, key+%d)", O.shm_key, SHM_KEY_SPAN);
		return;
	}
	k = 0x5db00000L + ((long)(getpid() & 0x3fff) << 6);
	for (tries = 0; tries < 256; tries++, k += SHM_KEY_SPAN) {
		if (k + SHM_KEY_SPAN >= 0x5dc00000L)
			k = 0x5db00000L;
		if (!shm_scan(k, 0)) {
			O.shm_key = k;
			return;
		}
	}
	die("could not find a free SysV key range");
}

/* env->remove(DB_FORCE) on a fresh handle for home `home`. */
static void
env_remove_dir(const char *home)
{
	DB_ENV *e;

	if (db_env_create(&e, 0) != 0)
		return;
	if (is_system() && O.shm_key > 0)
		(void)e->set_shm_key(e, O.shm_key);
	(void)e->remove(e, home, DB_FORCE); /* frees the handle */
}

static void
cleanup_all(int *shm_leftover)
{
	char probe[4096];
	int i;

	*shm_leftover = 0;
	if (O.dir == NULL || !g_dir_ready)
		return;
	for (i = 0; i < g_nsubdirs; i++) {
		env_remove_dir(g_subdirs[i]);
		snprintf(probe, sizeof(probe), "%.4000s/probe.dat", g_subdirs[i]);
		(void)unlink(probe);
		(void)rmdir(g_subdirs[i]);
	}
	g_nsubdirs = 0;
	env_remove_dir(O.dir);
	*shm_leftover = is_system() ? shm_scan(O.shm_key, 1) : 0;
	if (!O.keep_file)
		for (i = 0; i < g_nfiles; i++)
			(void)unlink(g_files[i]);
	g_nfiles = 0;
	if (g_dir_created)
		(void)rmdir(O.dir); /* only succeeds if empty */
}

/* ------------------------------------------------------------------ */
/* Berkeley DB wrappers                                                */
/* ------------------------------------------------------------------ */

static DB_ENV *
env_open_at(const char *home, unsigned long long cache_bytes, int create)
{
	DB_ENV *env;
	u_int32_t flags;
	int ret;

	CHECK(db_env_create(&env, 0), "db_env_create");
	env->set_errfile(env, stderr);
	env->set_errpfx(env, "bdb_mpool");
	if (cache_bytes > 0)
		CHECK(env->set_cachesize(env,
		    (u_int32_t)(cache_bytes >> 30),
		    (u_int32_t)(cache_bytes & ((1ull << 30) - 1)), 1),
		    "set_cachesize");
	if (is_system())
		CHECK(env->set_shm_key(env, O.shm_key), "set_shm_key");
	flags = DB_INIT_MPOOL | (u_int32_t)region_flag();
	if (create)
		flags |= DB_CREATE;
	if (O.thread)
		flags |= DB_THREAD;
	if ((ret = env->open(env, home, flags, 0600)) != 0) {
		(void)env->close(env, 0);
		die("DB_ENV->open(%s, region=%s): %s", home, O.region,
		    db_strerror(ret));
	}
	return env;
}

static DB_ENV *
env_open(unsigned long long cache_bytes, int create)
{
	return env_open_at(O.dir, cache_bytes, create);
}

static DB_MPOOLFILE *
mpf_open(DB_ENV *env, const char *path, int create)
{
	DB_MPOOLFILE *mpf;
	int ret;

	CHECK(env->memp_fcreate(env, &mpf, 0), "memp_fcreate");
	if ((ret = mpf->open(mpf, path, create ? DB_CREATE : 0, 0600,
	    PAGESIZE)) != 0)
		die("DB_MPOOLFILE->open(%s): %s", path, db_strerror(ret));
	return mpf;
}

static DB_MPOOL_STAT *
mstat(DB_ENV *env)
{
	DB_MPOOL_STAT *sp;

	CHECK(env->memp_stat(env, &sp, NULL, 0), "memp_stat");
	return sp;
}

static inline void
getput(DB_MPOOLFILE *mpf, db_pgno_t pgno, u_int32_t flags, unsigned *sink)
{
	void *p;
	int ret;

	if ((ret = mpf->get(mpf, &pgno, NULL, flags, &p)) != 0)
		die("DB_MPOOLFILE->get(%u): %s", (unsigned)pgno,
		    db_strerror(ret));
	*sink += *(volatile unsigned char *)p;
	if ((ret = mpf->put(mpf, p, DB_PRIORITY_UNCHANGED, 0)) != 0)
		die("DB_MPOOLFILE->put(%u): %s", (unsigned)pgno,
		    db_strerror(ret));
}

/* Prefill a file with `npages` pages, page i starting with its number. */
static void
prefill_file(const char *path, uint32_t npages, int do_fsync)
{
	unsigned char *buf;
	uint32_t chunk = 256, i, j, n; /* 1 MiB per write */
	int fd;

	if ((fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600)) < 0)
		die("open %s: %s", path, strerror(errno));
	remember_file(path);
	if ((buf = calloc(chunk, PAGESIZE)) == NULL)
		die("out of memory");
	for (i = 0; i < npages; i += n) {
		n = npages - i < chunk ? npages - i : chunk;
		for (j = 0; j < n; j++) {
			uint32_t pg = i + j;
			memcpy(buf + (size_t)j * PAGESIZE, &pg, sizeof(pg));
			buf[(size_t)j * PAGESIZE + 100] = (unsigned char)pg;
		}
		if (pwrite(fd, buf, (size_t)n * PAGESIZE,
		    (off_t)i * PAGESIZE) != (ssize_t)((size_t)n * PAGESIZE))
			die("write %s: %s", path, strerror(errno));
	}
	if (do_fsync && fsync(fd) != 0)
		die("fsync %s: %s", path, strerror(errno));
	free(buf);
	close(fd);
}

/* Read a file once, sequentially (brings it into the OS page cache). */
static void
read_file_once(const char *path)
{
	char *buf;
	int fd;
	ssize_t n;

	if ((fd = open(path, O_RDONLY)) < 0)
		die("open %s: %s", path, strerror(errno));
	if ((buf = malloc(1 << 20)) == NULL)
		die("out of memory");
	while ((n = read(fd, buf, 1 << 20)) > 0)
		;
	free(buf);
	close(fd);
}

/* How many of the file's pages are resident in the OS page cache. */
static long long
os_resident_pages(const char *path)
{
	struct stat st;
	unsigned char *vec;
	void *m;
	long long n = 0;
	size_t len, i, np;
	long ps = sysconf(_SC_PAGESIZE);
	int fd;

	if ((fd = open(path, O_RDONLY)) < 0)
		return -1;
	if (fstat(fd, &st) != 0 || st.st_size == 0) {
		close(fd);
		return -1;
	}
	len = (size_t)st.st_size;
	m = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
	close(fd);
	if (m == MAP_FAILED)
		return -1;
	np = (len + (size_t)ps - 1) / (size_t)ps;
	if ((vec = malloc(np)) != NULL && mincore(m, len, vec) == 0)
		for (i = 0; i < np; i++)
			n += vec[i] & 1;
	else
		n = -1;
	free(vec);
	munmap(m, len);
	return n;
}

static void
ensure_dir(void)
{
	struct stat st;

	if (O.dir == NULL)
		die("--dir DIR is required");
	if (stat(O.dir, &st) == 0) {
		if (!S_ISDIR(st.st_mode))
			die("--dir %s: not a directory", O.dir);
	} else if (mkdir(O.dir, 0700) == 0)
		g_dir_created = 1;
	else
		die("mkdir %s: %s", O.dir, strerror(errno));
	g_dir_ready = 1;
	/* A stale environment left by a crashed run must not be joined. */
	env_remove_dir(O.dir);
}

static void
json_header(void)
{
	int maj, min, pat;

	jreset();
	jraw("{");
	jfirst[++jdepth] = 1;
	jbool("ok", 1);
	jstr("workload", O.cmd);
	jstr("region", O.region);
	jstr("bdb_version", db_version(&maj, &min, &pat));
	jint("pagesize", PAGESIZE);
	if (is_system())
		jint("shm_key", O.shm_key);
	jbool("db_thread", O.thread);
}

static void
json_cache(const DB_MPOOL_STAT *sp, unsigned long long requested)
{
	jbegin("cache");
	juint("requested_bytes", requested);
	juint("st_bytes", (unsigned long long)sp->st_gbytes * (1ull << 30) +
	    sp->st_bytes);
	juint("st_regsize", (unsigned long long)sp->st_regsize);
	juint("st_pages", sp->st_pages);
	juint("st_hash_buckets", sp->st_hash_buckets);
	jend();
}

static void
json_finish(void)
{
	int left = 0;

	cleanup_all(&left);
	jint("shm_segments_left", left);
	jend();
	printf("%.*s\n", (int)jlen, jbuf);
	fflush(stdout);
}

static void
need(int cond, const char *what)
{
	if (!cond)
		die("%s: missing or invalid %s", O.cmd, what);
}

/* ------------------------------------------------------------------ */
/* hot                                                                 */
/* ------------------------------------------------------------------ */

struct child_result {
	int idx;
	int ok;
	uint64_t ns;
	unsigned sink;
};

static uint64_t
hot_loop(DB_MPOOLFILE *mpf, uint32_t npages, long long ops, int random,
    uint64_t seed, uint32_t start, unsigned *sink)
{
	uint64_t s = seed ? seed : 1, t0, t1;
	uint32_t pg = start % npages;
	long long i;

	t0 = now_ns();
	if (random) {
		for (i = 0; i < ops; i++)
			getput(mpf, rng_below(&s, npages), 0, sink);
	} else {
		for (i = 0; i < ops; i++) {
			getput(mpf, pg, 0, sink);
			if (++pg == npages)
				pg = 0;
		}
	}
	t1 = now_ns();
	return t1 - t0;
}

static void
warm_all(DB_MPOOLFILE *mpf, uint32_t npages, unsigned *sink)
{
	uint32_t pg;

	for (pg = 0; pg < npages; pg++)
		getput(mpf, pg, 0, sink);
}

static void
cmd_hot(void)
{
	char path[4096];
	DB_ENV *env;
	DB_MPOOLFILE *mpf;
	DB_MPOOL_STAT *s0, *s1;
	unsigned long long cache_bytes;
	uint32_t npages;
	unsigned sink = 0;
	int random;

	need(O.cache_mb > 0, "--cache-mb");
	need(O.file_mb > 0, "--file-mb");
	need(O.ops > 0, "--ops");
	need(O.procs >= 1, "--procs");
	need(O.repeat >= 1 && O.repeat <= 64, "--repeat (1..64)");
	random = strcmp(O.pattern, "random") == 0;
	if (!random && strcmp(O.pattern, "seq") != 0)
		die("--pattern must be random or seq");
	if (O.procs > 1 && region_flag() == DB_PRIVATE)
		die("--procs > 1 needs --region file or system");
	cache_bytes = (unsigned long long)(O.cache_mb * MIB);
	npages = (uint32_t)(O.file_mb * MIB / PAGESIZE);
	need(npages > 0, "--file-mb (less than a page)");

	ensure_dir();
	choose_shm_key();
	path_in_dir(path, sizeof(path), "hot.dat");
	prefill_file(path, npages, 1);

	json_header();
	jstr("pattern", O.pattern);
	jdbl("file_mb", O.file_mb);
	juint("file_pages", npages);
	jint("ops_per_proc", O.ops);
	jint("procs", O.procs);

	env = env_open(cache_bytes, 1);
	mpf = mpf_open(env, path, 0);
	warm_all(mpf, npages, &sink);
	s0 = mstat(env);
	json_cache(s0, cache_bytes);
	if (s0->st_pages < npages)
		die("cache too small: %u of %u file pages resident after "
		    "warm-up (raise --cache-mb)", s0->st_pages, npages);

	if (O.procs == 1) {
		uint64_t ns[64], tmp;
		double nsop;
		int r, a, b;

		/* --repeat R: R timed passes; report the median (and all). */
		for (r = 0; r < O.repeat; r++)
			ns[r] = hot_loop(mpf, npages, O.ops, random,
			    O.seed + 0x51ed27ull * (uint64_t)r, 0, &sink);
		s1 = mstat(env);
		jabegin("runs_ns_per_op");
		for (r = 0; r < O.repeat; r++) {
			jsep();
			jraw("%.6g", (double)ns[r] / (double)O.ops);
		}
		jaend();
		for (a = 1; a < O.repeat; a++)
			for (b = a; b > 0 && ns[b - 1] > ns[b]; b--) {
				tmp = ns[b];
				ns[b] = ns[b - 1];
				ns[b - 1] = tmp;
			}
		nsop = (double)ns[O.repeat / 2] / (double)O.ops;
		jint("repeat", O.repeat);
		jdbl("seconds", (double)ns[O.repeat / 2] / 1e9);
		jdbl("ns_per_op", nsop);
		jdbl("ops_per_sec", 1e9 / nsop);
		jdbl("ns_per_op_min", (double)ns[0] / (double)O.ops);
		juint("timed_cache_hit", s1->st_cache_hit - s0->st_cache_hit);
		juint("timed_cache_miss",
		    s1->st_cache_miss - s0->st_cache_miss);
		free(s1);
		free(s0);
		CHECK(mpf->close(mpf, 0), "mpf close");
		CHECK(env->close(env, 0), "env close");
	} else {
		struct child_result res, *all;
		pid_t *pids;
		int ready[2], go[2], out[2], i, status, failed = 0;
		uint64_t t0, t1, maxns = 0;
		double sum_rate = 0, sum_nsop = 0;
		char c;
		ssize_t n;

		free(s0);
		/*
		 * The parent created the env and warmed the cache; it closes
		 * every handle before forking, so nothing crosses the fork.
		 */
		CHECK(mpf->close(mpf, 0), "mpf close");
		CHECK(env->close(env, 0), "env close");
		if (pipe(ready) || pipe(go) || pipe(out))
			die("pipe: %s", strerror(errno));
		pids = calloc((size_t)O.procs, sizeof(*pids));
		all = calloc((size_t)O.procs, sizeof(*all));
		fflush(stdout);
		fflush(stderr);
		for (i = 0; i < O.procs; i++) {
			if ((pids[i] = fork()) < 0)
				die("fork: %s", strerror(errno));
			if (pids[i] == 0) {
				g_is_child = 1;
				close(ready[0]);
				close(go[1]);
				close(out[0]);
				env = env_open(0, 0);
				mpf = mpf_open(env, path, 0);
				warm_all(mpf, npages, &sink);
				if (write(ready[1], "r", 1) != 1)
					_exit(3);
				/* Blocks until the parent closes go[1]. */
				while ((n = read(go[0], &c, 1)) < 0 &&
				    errno == EINTR)
					;
				memset(&res, 0, sizeof(res));
				res.idx = i;
				res.ns = hot_loop(mpf, npages, O.ops, random,
				    O.seed + 0x1234567ull * (uint64_t)(i + 1),
				    (uint32_t)((uint64_t)npages * (uint64_t)i /
				    (uint64_t)O.procs), &sink);
				res.sink = sink;
				res.ok = 1;
				(void)mpf->close(mpf, 0);
				(void)env->close(env, 0);
				if (write(out[1], &res, sizeof(res)) !=
				    (ssize_t)sizeof(res))
					_exit(3);
				_exit(0);
			}
		}
		close(ready[1]);
		close(go[0]);
		close(out[1]);
		for (i = 0; i < O.procs; i++)
			if (read(ready[0], &c, 1) != 1) {
				failed = 1;
				break;
			}
		t0 = now_ns();
		close(go[1]); /* start everyone at once */
		for (i = 0; !failed && i < O.procs; i++) {
			if (read(out[0], &res, sizeof(res)) !=
			    (ssize_t)sizeof(res)) {
				failed = 1;
				break;
			}
			if (res.idx >= 0 && res.idx < O.procs)
				all[res.idx] = res;
		}
		t1 = now_ns();
		for (i = 0; i < O.procs; i++) {
			if (waitpid(pids[i], &status, 0) < 0 ||
			    !WIFEXITED(status) || WEXITSTATUS(status) != 0)
				failed = 1;
		}
		close(ready[0]);
		close(out[0]);
		if (failed)
			die("a child process failed (see stderr)");
		jabegin("per_proc");
		for (i = 0; i < O.procs; i++) {
			double nsop = (double)all[i].ns / (double)O.ops;
			jbegin(NULL);
			jint("proc", i);
			jdbl("seconds", (double)all[i].ns / 1e9);
			jdbl("ns_per_op", nsop);
			jdbl("ops_per_sec", 1e9 / nsop);
			jend();
			sum_rate += 1e9 / nsop;
			sum_nsop += nsop;
			if (all[i].ns > maxns)
				maxns = all[i].ns;
		}
		jaend();
		/* Wall clock from the start signal to the last result. */
		jdbl("wall_seconds", (double)(t1 - t0) / 1e9);
		jdbl("total_ops_per_sec",
		    (double)O.ops * O.procs / ((double)(t1 - t0) / 1e9));
		jdbl("sum_proc_ops_per_sec", sum_rate);
		jdbl("ns_per_op", sum_nsop / O.procs);
		jdbl("ops_per_sec", sum_rate);
		/* Misses after the children ran: all must be warm-up ones. */
		env = env_open(0, 0);
		s1 = mstat(env);
		juint("total_cache_miss_incl_warmup", s1->st_cache_miss);
		free(s1);
		(void)env->close(env, 0);
		free(pids);
		free(all);
	}
	jint("checksum", sink);
	json_finish();
}

/* ------------------------------------------------------------------ */
/* miss                                                                */
/* ------------------------------------------------------------------ */

static void
drop_os_cache(const char *path)
{
	int fd, done = 0, fadv = 0;
	char err[256] = "";

	sync();
	if ((fd = open("/proc/sys/vm/drop_caches", O_WRONLY)) >= 0) {
		if (write(fd, "3\n", 2) == 2)
			done = 1;
		else
			snprintf(err, sizeof(err), "write drop_caches: %s",
			    strerror(errno));
		close(fd);
	} else
		snprintf(err, sizeof(err), "open drop_caches: %s",
		    strerror(errno));
	if (!done) {
		/* Fallback without privileges: evict this file's pages. */
		if ((fd = open(path, O_RDONLY)) >= 0) {
			if (posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0)
				fadv = 1;
			close(fd);
		}
	}
	jbegin("drop_caches");
	jbool("requested", 1);
	jbool("done", done);
	jbool("fadvise_dontneed_fallback", fadv);
	if (err[0])
		jstr("error", err);
	jend();
}

static void
cmd_miss(void)
{
	char path[4096];
	DB_ENV *env;
	DB_MPOOLFILE *mpf;
	DB_MPOOL_STAT *s0, *s1;
	unsigned long long cache_bytes;
	uint32_t npages;
	unsigned sink = 0;
	uint64_t s, t0, t1;
	long long i, warm;
	double nsop;

	if (O.cache_mb <= 0)
		O.cache_mb = 8;
	if (O.file_mb <= 0)
		O.file_mb = 256;
	need(O.ops > 0, "--ops");
	cache_bytes = (unsigned long long)(O.cache_mb * MIB);
	npages = (uint32_t)(O.file_mb * MIB / PAGESIZE);
	need(npages > 0, "--file-mb");
	if ((unsigned long long)npages * PAGESIZE <= cache_bytes * 2)
		die("miss: the file must be much larger than the cache");

	ensure_dir();
	choose_shm_key();
	path_in_dir(path, sizeof(path), "miss.dat");
	prefill_file(path, npages, 1);
	read_file_once(path);

	json_header();
	jdbl("file_mb", O.file_mb);
	juint("file_pages", npages);
	jint("ops", O.ops);

	env = env_open(cache_bytes, 1);
	mpf = mpf_open(env, path, 0);
	/* Fill the pool first so that every timed miss also evicts. */
	warm = O.warmup >= 0 ? O.warmup :
	    (long long)(3 * cache_bytes / PAGESIZE);
	s = O.seed ^ 0xabcdefull;
	for (i = 0; i < warm; i++)
		getput(mpf, rng_below(&s, npages), 0, &sink);
	jint("warmup_ops", warm);
	if (O.drop_caches)
		drop_os_cache(path);
	else {
		jbegin("drop_caches");
		jbool("requested", 0);
		jend();
	}
	jint("os_resident_pages_before", os_resident_pages(path));
	s0 = mstat(env);
	json_cache(s0, cache_bytes);
	t0 = now_ns();
	for (i = 0; i < O.ops; i++)
		getput(mpf, rng_below(&s, npages), 0, &sink);
	t1 = now_ns();
	s1 = mstat(env);
	nsop = (double)(t1 - t0) / (double)O.ops;
	jdbl("seconds", (double)(t1 - t0) / 1e9);
	jdbl("ns_per_op", nsop);
	jdbl("us_per_op", nsop / 1000.0);
	jdbl("ops_per_sec", 1e9 / nsop);
	juint("st_cache_miss", s1->st_cache_miss - s0->st_cache_miss);
	juint("st_cache_hit", s1->st_cache_hit - s0->st_cache_hit);
	juint("st_page_in", s1->st_page_in - s0->st_page_in);
	juint("st_ro_evict", s1->st_ro_evict - s0->st_ro_evict);
	jdbl("miss_ratio", (double)(s1->st_cache_miss - s0->st_cache_miss) /
	    (double)O.ops);
	jint("os_resident_pages_after", os_resident_pages(path));
	jint("checksum", sink);
	free(s0);
	free(s1);
	CHECK(mpf->close(mpf, 0), "mpf close");
	CHECK(env->close(env, 0), "env close");
	json_finish();
}

/* ------------------------------------------------------------------ */
/* sync / trickle                                                      */
/* ------------------------------------------------------------------ */

/*
 * Make `n` pages dirty in the cache.
 *
 * Berkeley DB 5.3.28's DB_MPOOLFILE->get drops DB_MPOOL_DIRTY and
 * DB_MPOOL_EDIT before the real get runs (its argument check clears them
 * from the flags it passes on), so a page that already exists in the file
 * is NOT dirtied through the public API.  Pages that extend the file are:
 * a get with DB_MPOOL_CREATE past the last page marks the buffer dirty.
 * So we start from an empty file and create pages 1..n (page 0 of an empty
 * file counts as existing, so it would come back clean; we leave it out,
 * and the file keeps a hole there).  DB_MPOOL_DIRTY is passed anyway, as
 * the API intends.
 */
static uint32_t
dirty_pages(DB_MPOOLFILE *mpf, uint32_t n)
{
	void *p;
	db_pgno_t pg, want;
	int ret;

	for (pg = 1; pg <= n; pg++) {
		want = pg;
		if ((ret = mpf->get(mpf, &want, NULL,
		    DB_MPOOL_CREATE | DB_MPOOL_DIRTY, &p)) != 0)
			die("get(%u, CREATE|DIRTY): %s", (unsigned)pg,
			    db_strerror(ret));
		memset(p, (int)(pg & 0xff), PAGESIZE);
		memcpy(p, &pg, sizeof(pg));
		if ((ret = mpf->put(mpf, p, DB_PRIORITY_UNCHANGED, 0)) != 0)
			die("put(%u): %s", (unsigned)pg, db_strerror(ret));
	}
	return n;
}

static void
cmd_sync_or_trickle(int trickle)
{
	char path[4096];
	DB_ENV *env;
	DB_MPOOLFILE *mpf;
	DB_MPOOL_STAT *s0, *s1;
	unsigned long long cache_bytes;
	uint32_t npages;
	uint64_t t0, t1;
	int nwrote = 0;

	if (O.cache_mb <= 0)
		O.cache_mb = 128;
	if (O.dirty_mb <= 0)
		O.dirty_mb = 64;
	if (trickle)
		need(O.pct >= 1 && O.pct <= 100, "--pct (1..100)");
	cache_bytes = (unsigned long long)(O.cache_mb * MIB);
	npages = (uint32_t)(O.dirty_mb * MIB / PAGESIZE);
	need(npages > 0, "--dirty-mb");

	ensure_dir();
	choose_shm_key();
	path_in_dir(path, sizeof(path), trickle ? "trickle.dat" : "sync.dat");
	{
		/* Empty file: see dirty_pages() for why. */
		int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
		if (fd < 0)
			die("create %s: %s", path, strerror(errno));
		remember_file(path);
		close(fd);
	}

	json_header();
	jdbl("dirty_mb", O.dirty_mb);
	juint("dirty_pages_requested", npages);
	jstr("dirtied_by", "get(DB_MPOOL_CREATE|DB_MPOOL_DIRTY) of pages "
	    "1..n extending an empty file");

	env = env_open(cache_bytes, 1);
	mpf = mpf_open(env, path, 1);
	dirty_pages(mpf, npages);
	s0 = mstat(env);
	json_cache(s0, cache_bytes);
	juint("st_page_dirty_before", s0->st_page_dirty);
	if (s0->st_page_dirty < npages)
		die("only %u of %u pages dirty in the cache (raise "
		    "--cache-mb)", s0->st_page_dirty, npages);

	t0 = now_ns();
	if (trickle)
		CHECK(env->memp_trickle(env, O.pct, &nwrote), "memp_trickle");
	else
		CHECK(env->memp_sync(env, NULL), "memp_sync");
	t1 = now_ns();
	s1 = mstat(env);

	jdbl("seconds", (double)(t1 - t0) / 1e9);
	jdbl("ms", (double)(t1 - t0) / 1e6);
	juint("st_page_out", s1->st_page_out - s0->st_page_out);
	juint("st_page_dirty_after", s1->st_page_dirty);
	if (trickle) {
		jint("pct", O.pct);
		jint("pages_written", nwrote);
		juint("st_page_trickle",
		    s1->st_page_trickle - s0->st_page_trickle);
		jdbl("mib_per_sec", (double)nwrote * PAGESIZE / MIB /
		    ((double)(t1 - t0) / 1e9));
	} else {
		uint64_t w = s1->st_page_out - s0->st_page_out;
		jint("pages_written", (long long)w);
		jdbl("mib_per_sec", (double)w * PAGESIZE / MIB /
		    ((double)(t1 - t0) / 1e9));
	}
	free(s0);
	free(s1);
	CHECK(mpf->close(mpf, 0), "mpf close");
	CHECK(env->close(env, 0), "env close");
	json_finish();
}

/* ------------------------------------------------------------------ */
/* hitratio                                                            */
/* ------------------------------------------------------------------ */

static void
make_sparse(const char *path, uint32_t npages)
{
	int fd;

	if ((fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600)) < 0)
		die("create %s: %s", path, strerror(errno));
	if (ftruncate(fd, (off_t)npages * PAGESIZE) != 0)
		die("ftruncate %s: %s", path, strerror(errno));
	close(fd);
}

/*
 * How many 4 KiB buffers does a cache of `bytes` hold?  Open a throw-away
 * env of the same region kind, touch more distinct pages than can fit and
 * read st_pages.
 */
static uint32_t
probe_capacity(const char *pdir, const char *ppath, uint32_t ppages,
    unsigned long long bytes)
{
	DB_ENV *env;
	DB_MPOOLFILE *mpf;
	DB_MPOOL_STAT *sp;
	uint32_t pg, cap;
	unsigned sink = 0;

	env_remove_dir(pdir);
	env = env_open_at(pdir, bytes, 1);
	mpf = mpf_open(env, ppath, 0);
	for (pg = 0; pg < ppages; pg++)
		getput(mpf, pg, 0, &sink);
	sp = mstat(env);
	cap = sp->st_pages;
	free(sp);
	(void)mpf->close(mpf, 0);
	(void)env->close(env, 0);
	env_remove_dir(pdir);
	return cap;
}

static void
cmd_hitratio(void)
{
	char path[4096], pdir[4096], ppath[4096];
	DB_ENV *env;
	DB_MPOOLFILE *mpf;
	DB_MPOOL_STAT *s0, *s1, *sw;
	uint32_t *trace, maxpg = 0, cap = 0, target;
	unsigned long long bytes;
	unsigned sink = 0;
	long long nrefs, i, warm;
	uint64_t t0, t1, hits, misses;
	struct stat st;
	FILE *fp;
	int iter = 0, calibrated = 0;

	need(O.trace != NULL, "--trace");
	need(O.cache_pages > 0 || O.cache_bytes > 0, "--cache-pages");
	if ((fp = fopen(O.trace, "rb")) == NULL)
		die("open trace %s: %s", O.trace, strerror(errno));
	if (fstat(fileno(fp), &st) != 0 || st.st_size < 4 || st.st_size % 4)
		die("trace %s: size must be a positive multiple of 4",
		    O.trace);
	nrefs = (long long)(st.st_size / 4);
	if ((trace = malloc((size_t)st.st_size)) == NULL)
		die("out of memory");
	if (fread(trace, 4, (size_t)nrefs, fp) != (size_t)nrefs)
		die("read trace %s: short read", O.trace);
	fclose(fp);
	for (i = 0; i < nrefs; i++) {
		const unsigned char *b = (const unsigned char *)&trace[i];
		trace[i] = (uint32_t)b[0] | (uint32_t)b[1] << 8 |
		    (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
		if (trace[i] > maxpg)
			maxpg = trace[i];
	}
	if (maxpg >= 0xfffffffeu)
		die("trace page number too large");
	warm = O.warmup >= 0 ? O.warmup : 0;
	if (warm >= nrefs)
		die("--warmup %lld >= trace length %lld", warm, nrefs);

	ensure_dir();
	choose_shm_key();
	path_in_dir(path, sizeof(path), "hitratio.dat");
	make_sparse(path, maxpg + 1);
	remember_file(path);

	json_header();
	jstr("trace", O.trace);
	jint("refs", nrefs);
	jint("warmup_refs", warm);
	juint("file_pages", (unsigned long long)maxpg + 1);

	/* Calibrate: cache bytes such that BDB holds ~cache_pages buffers. */
	target = (uint32_t)(O.cache_pages > 0 ? O.cache_pages : 0);
	if (O.cache_bytes > 0)
		bytes = (unsigned long long)O.cache_bytes;
	else {
		uint32_t ppages = target * 2 + 1000, best_cap = 0;
		unsigned long long lo = 0, hi = 0, best = 0;
		uint32_t tol = target / 1000 > 1 ? target / 1000 : 1;

		path_in_dir(pdir, sizeof(pdir), "probe");
		if (mkdir(pdir, 0700) != 0 && errno != EEXIST)
			die("mkdir %s: %s", pdir, strerror(errno));
		snprintf(g_subdirs[g_nsubdirs++], sizeof(g_subdirs[0]), "%s",
		    pdir);
		path_in_dir(ppath, sizeof(ppath), "probe/probe.dat");
		make_sparse(ppath, ppages);
		/*
		 * Start from pages * 4 KiB (BDB adds 25% below 500 MB); then
		 * secant steps, then bisection between bracketing sizes.
		 */
		bytes = (unsigned long long)target * PAGESIZE;
		for (iter = 0; iter < 24; iter++) {
			uint32_t d;

			if (bytes < 20 * 1024)
				bytes = 20 * 1024;
			cap = probe_capacity(pdir, ppath, ppages, bytes);
			d = cap > target ? cap - target : target - cap;
			if (best == 0 || d < (best_cap > target ?
			    best_cap - target : target - best_cap)) {
				best = bytes;
				best_cap = cap;
			}
			if (d <= tol) {
				calibrated = 1;
				break;
			}
			if (cap < target)
				lo = bytes;
			else
				hi = bytes;
			if (lo && hi) {
				if (hi - lo <= 512)
					break;
				bytes = (lo + hi) / 2;
			} else
				bytes = (unsigned long long)((double)bytes *
				    (double)target / (double)(cap ? cap : 1));
		}
		bytes = best;
		cap = best_cap;
		(void)unlink(ppath);
	}
	jbegin("calibration");
	jint("target_pages", target);
	juint("cache_bytes", bytes);
	jint("probe_st_pages", cap);
	jint("iterations", iter + 1);
	jbool("within_0.1pct", calibrated);
	jend();

	env = env_open(bytes, 1);
	mpf = mpf_open(env, path, 0);
	s0 = mstat(env);
	t0 = now_ns();
	for (i = 0; i < warm; i++)
		getput(mpf, trace[i], 0, &sink);
	sw = mstat(env);
	for (; i < nrefs; i++)
		getput(mpf, trace[i], 0, &sink);
	t1 = now_ns();
	s1 = mstat(env);
	json_cache(s1, bytes);
	hits = s1->st_cache_hit - sw->st_cache_hit;
	misses = s1->st_cache_miss - sw->st_cache_miss;
	juint("st_pages_after_warmup", sw->st_pages);
	juint("hits", hits);
	juint("misses", misses);
	jdbl("hit_ratio", (double)hits / (double)(hits + misses));
	juint("warmup_hits", sw->st_cache_hit - s0->st_cache_hit);
	juint("warmup_misses", sw->st_cache_miss - s0->st_cache_miss);
	juint("st_ro_evict", s1->st_ro_evict - s0->st_ro_evict);
	jdbl("seconds", (double)(t1 - t0) / 1e9);
	jdbl("ns_per_ref", (double)(t1 - t0) / (double)nrefs);
	jint("checksum", sink);
	free(s0);
	free(sw);
	free(s1);
	free(trace);
	CHECK(mpf->close(mpf, 0), "mpf close");
	CHECK(env->close(env, 0), "env close");
	json_finish();
}

/* ------------------------------------------------------------------ */
/* memory                                                              */
/* ------------------------------------------------------------------ */

/* This process's resident memory, from /proc/self/status, in KiB. */
static void
json_rss(const char *key)
{
	static const char *names[] = {
		"VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", NULL };
	char line[256], k[32];
	FILE *fp;
	size_t n;
	int i;

	jbegin(key);
	if ((fp = fopen("/proc/self/status", "r")) != NULL) {
		while (fgets(line, sizeof(line), fp) != NULL)
			for (i = 0; names[i] != NULL; i++) {
				n = strlen(names[i]);
				if (strncmp(line, names[i], n) == 0 &&
				    line[n] == ':') {
					snprintf(k, sizeof(k), "%s_kb", names[i]);
					jint(k, strtoll(line + n + 1, NULL, 10));
				}
			}
		fclose(fp);
	}
	jend();
}

/* The __db.* region files in DIR: sizes and allocated bytes. */
static unsigned long long
json_region_files(const char *dir)
{
	char p[4096];
	struct dirent *e;
	struct stat st;
	unsigned long long total = 0, alloc = 0;
	DIR *d;

	jabegin("region_files");
	if ((d = opendir(dir)) != NULL) {
		while ((e = readdir(d)) != NULL) {
			if (strncmp(e->d_name, "__db.", 5) != 0)
				continue;
			snprintf(p, sizeof(p), "%.3800s/%s", dir, e->d_name);
			if (stat(p, &st) != 0)
				continue;
			jbegin(NULL);
			jstr("name", e->d_name);
			juint("bytes", (unsigned long long)st.st_size);
			juint("allocated", (unsigned long long)st.st_blocks * 512ull);
			jend();
			total += (unsigned long long)st.st_size;
			alloc += (unsigned long long)st.st_blocks * 512ull;
		}
		closedir(d);
	}
	jaend();
	juint("region_bytes", total);
	juint("region_allocated_bytes", alloc);
	return total;
}

/*
 * Fill a cache of --cache-mb with distinct pages (of a sparse file larger
 * than the cache can hold), then report the region files, st_pages, the
 * region bytes per cached page and this process's RSS.
 */
static void
cmd_memory(void)
{
	char path[4096];
	DB_ENV *env;
	DB_MPOOLFILE *mpf;
	DB_MPOOL_STAT *sp;
	unsigned long long cache_bytes, total = 0;
	uint32_t npages, pg;
	unsigned sink = 0;

	need(O.cache_mb > 0, "--cache-mb");
	cache_bytes = (unsigned long long)(O.cache_mb * MIB);
	/* BDB adds 25% below 500 MB: touch well over what it can hold. */
	npages = (uint32_t)(cache_bytes * 2 / PAGESIZE) + 1000;

	ensure_dir();
	choose_shm_key();
	path_in_dir(path, sizeof(path), "memory.dat");
	make_sparse(path, npages);
	remember_file(path);

	json_header();
	jdbl("cache_mb", O.cache_mb);
	juint("touched_pages", npages);
	json_rss("rss_before_open");
	env = env_open(cache_bytes, 1);
	mpf = mpf_open(env, path, 0);
	for (pg = 0; pg < npages; pg++)
		getput(mpf, pg, 0, &sink);
	sp = mstat(env);
	json_cache(sp, cache_bytes);
	if (strcmp(O.region, "file") == 0) {
		total = json_region_files(O.dir);
		jdbl("region_bytes_per_cached_page",
		    sp->st_pages ? (double)total / (double)sp->st_pages : 0.0);
	}
	jdbl("st_bytes_per_cached_page", sp->st_pages ?
	    ((double)sp->st_gbytes * (1ull << 30) + (double)sp->st_bytes) /
	    (double)sp->st_pages : 0.0);
	json_rss("rss");
	jint("checksum", sink);
	free(sp);
	CHECK(mpf->close(mpf, 0), "mpf close");
	CHECK(env->close(env, 0), "env close");
	json_finish();
}

/* ------------------------------------------------------------------ */
/* main                                                                */
/* ------------------------------------------------------------------ */

static void
usage(void)
{
	fprintf(stderr,
"usage: bdb_mpool hot|miss|sync|trickle|hitratio --dir DIR [options]\n"
"  hot      --region file|system|private --cache-mb N --file-mb M --ops K\n"
"           --pattern random|seq [--procs P] [--repeat R]\n"
"  miss     --cache-mb 8 --file-mb 256 --ops K [--drop-caches] [--warmup N]\n"
"  sync     --cache-mb 128 --dirty-mb 64\n"
"  trickle  --cache-mb 128 --dirty-mb 64 --pct 50\n"
"  hitratio --cache-pages C --trace FILE [--warmup N] [--cache-bytes B]\n"
"  memory   --cache-mb N\n"
"  common   --region file|system|private (default file) --seed S\n"
"           --shm-key K --thread --keep-file\n");
}

static const char *
argval(int argc, char **argv, int *i)
{
	if (*i + 1 >= argc)
		die("%s needs a value", argv[*i]);
	return argv[++*i];
}

static long long
numval(int argc, char **argv, int *i)
{
	const char *name = argv[*i], *v = argval(argc, argv, i);
	char *end;
	long long n;

	errno = 0;
	n = strtoll(v, &end, 0);
	if (errno || *end || end == v)
		die("%s: not an integer: %s", name, v);
	return n;
}

static double
dblval(int argc, char **argv, int *i)
{
	const char *name = argv[*i], *v = argval(argc, argv, i);
	char *end;
	double d;

	errno = 0;
	d = strtod(v, &end);
	if (errno || *end || end == v)
		die("%s: not a number: %s", name, v);
	return d;
}

int
main(int argc, char **argv)
{
	int i;

	if (argc < 2 || strcmp(argv[1], "-h") == 0 ||
	    strcmp(argv[1], "--help") == 0) {
		usage();
		return argc < 2 ? 2 : 0;
	}
	O.cmd = argv[1];
	for (i = 2; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--dir"))
			O.dir = argval(argc, argv, &i);
		else if (!strcmp(a, "--region"))
			O.region = argval(argc, argv, &i);
		else if (!strcmp(a, "--pattern"))
			O.pattern = argval(argc, argv, &i);
		else if (!strcmp(a, "--trace"))
			O.trace = argval(argc, argv, &i);
		else if (!strcmp(a, "--cache-mb"))
			O.cache_mb = dblval(argc, argv, &i);
		else if (!strcmp(a, "--file-mb"))
			O.file_mb = dblval(argc, argv, &i);
		else if (!strcmp(a, "--dirty-mb"))
			O.dirty_mb = dblval(argc, argv, &i);
		else if (!strcmp(a, "--cache-bytes"))
			O.cache_bytes = numval(argc, argv, &i);
		else if (!strcmp(a, "--cache-pages"))
			O.cache_pages = numval(argc, argv, &i);
		else if (!strcmp(a, "--ops"))
			O.ops = numval(argc, argv, &i);
		else if (!strcmp(a, "--warmup"))
			O.warmup = numval(argc, argv, &i);
		else if (!strcmp(a, "--procs"))
			O.procs = (int)numval(argc, argv, &i);
		else if (!strcmp(a, "--repeat"))
			O.repeat = (int)numval(argc, argv, &i);
		else if (!strcmp(a, "--pct"))
			O.pct = (int)numval(argc, argv, &i);
		else if (!strcmp(a, "--seed"))
			O.seed = (uint64_t)numval(argc, argv, &i);
		else if (!strcmp(a, "--shm-key"))
			O.shm_key = (long)numval(argc, argv, &i);
		else if (!strcmp(a, "--drop-caches"))
			O.drop_caches = 1;
		else if (!strcmp(a, "--thread"))
			O.thread = 1;
		else if (!strcmp(a, "--keep-file"))
			O.keep_file = 1;
		else
			die("unknown option %s", a);
	}
	if (strcmp(O.region, "file") && strcmp(O.region, "system") &&
	    strcmp(O.region, "private"))
		die("--region must be file, system or private");

	if (!strcmp(O.cmd, "hot"))
		cmd_hot();
	else if (!strcmp(O.cmd, "miss"))
		cmd_miss();
	else if (!strcmp(O.cmd, "sync"))
		cmd_sync_or_trickle(0);
	else if (!strcmp(O.cmd, "trickle"))
		cmd_sync_or_trickle(1);
	else if (!strcmp(O.cmd, "hitratio"))
		cmd_hitratio();
	else if (!strcmp(O.cmd, "memory"))
		cmd_memory();
	else
		die("unknown workload %s (hot|miss|sync|trickle|hitratio|memory)",
		    O.cmd);
	return 0;
}
