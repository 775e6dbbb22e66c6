/*
 * bdb_log.c -- speed anchor: Berkeley DB 5.3's own log (DB_ENV->log_put,
 * log_flush, log_stat) measured with the same workloads as aiodbenv's log
 * benchmark (benchmarks/log_bench.py).
 *
 * One run = one subcommand = ONE JSON object on stdout (errors included:
 * {"ok": false, "error": ...} and a non-zero exit status).  Diagnostics
 * from Berkeley DB itself go to stderr.
 *
 *   put --dir DIR --sync flush|wrnosync|none [--log file|memory]
 *       [--size BYTES] [--records N] [--seconds S] [--procs P]
 *       [--warmup N] [--lg-bsize B] [--lg-max B] [--flush-call]
 *
 * --sync flush     log_put(DB_FLUSH) per record: written and fsynced
 *                  (DB_TXN_SYNC's commit)
 * --sync wrnosync  log_put(DB_LOG_WRNOSYNC): written, no fsync
 *                  (DB_TXN_WRITE_NOSYNC's commit)
 * --sync none      log_put(0): the record stays in the buffer until it fills
 *                  (DB_TXN_NOSYNC's commit)
 * --flush-call     with --sync flush: log_put(0) then log_flush(&lsn)
 *                  instead of log_put(DB_FLUSH) (same durability)
 * --log memory     DB_LOG_IN_MEMORY: a ring in the region (1 MiB buffer,
 *                  256 KiB "files" unless --lg-bsize/--lg-max say otherwise)
 *
 * Every writer is a forked child (also with --procs 1) that opens the
 * environment itself, so no DB handle crosses a fork.  Each child puts
 * --warmup untimed records, reports ready, waits for the common start, then
 * puts until it has put --records records or --seconds have passed
 * (whichever comes first).  The parent measures the wall time from the
 * start to the last child's result and reads log_stat before the start and
 * after the end: records, writes, fsyncs, max/min commits per flush.
 *
 * Written for aiodbenv; uses only the public db.h API.
 * Build: gcc -O2 -o bdb_log bdb_log.c -ldb-5.3
 */
#define _GNU_SOURCE
#include <db.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXPROCS 256

/* ------------------------------------------------------------------ */
/* Options                                                             */
/* ------------------------------------------------------------------ */

struct opts {
	const char *cmd;
	const char *dir;
	const char *sync;	/* flush | wrnosync | none */
	const char *log;	/* file | memory */
	long long size;		/* record payload bytes */
	long long records;	/* per process; -1: unbounded (needs --seconds) */
	double seconds;		/* per process; <= 0: unbounded (needs --records) */
	long long warmup;	/* untimed records per process before the start */
	long long lg_bsize;	/* -1: Berkeley DB's default for the log kind */
	long long lg_max;
	int procs;
	int flush_call;
};

static struct opts O = {
	.sync = "flush", .log = "file", .size = 100, .records = -1,
	.seconds = -1, .warmup = 0, .lg_bsize = -1, .lg_max = -1, .procs = 1,
};

/* Cleanup state. */
static int g_dir_created;
static int g_dir_ready;		/* ensure_dir() ran: cleanup may touch O.dir */
static int g_is_child;
static pid_t g_pids[MAXPROCS];
static int g_npids;
static volatile sig_atomic_t g_interrupted;

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

static void cleanup_all(void);

static void
die(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (g_is_child) {
		fprintf(stderr, "bdb_log child %d: %s\n", (int)getpid(), msg);
		_exit(2);
	}
	cleanup_all();
	jreset();
	jraw("{");
	jfirst[++jdepth] = 1;
	jbool("ok", 0);
	jstr("workload", O.cmd);
	jstr("error", msg);
	jend();
	printf("%.*s\n", (int)jlen, jbuf);
	fflush(stdout);
	exit(g_interrupted ? 130 : 1);
}

#define CHECK(call, what) do {						\
	int ret_ = (call);						\
	if (ret_ != 0)							\
		die("%s: %s", (what), db_strerror(ret_));		\
} while (0)

static uint64_t
now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int in_memory(void) { return strcmp(O.log, "memory") == 0; }

/* env->remove(DB_FORCE) on a fresh handle: the region files go. */
static void
env_remove_dir(const char *home)
{
	DB_ENV *e;

	if (db_env_create(&e, 0) != 0)
		return;
	(void)e->remove(e, home, DB_FORCE); /* frees the handle */
}

/*
 * DB_ENV->remove leaves log files alone (they are the database's history),
 * so the harness deletes the log.NNNNNNNNNN files it made itself.
 */
static void
remove_log_files(void)
{
	char p[4096 + 256];
	struct dirent *e;
	DIR *d;

	if ((d = opendir(O.dir)) == NULL)
		return;
	while ((e = readdir(d)) != NULL)
		if (strncmp(e->d_name, "log.", 4) == 0) {
			snprintf(p, sizeof(p), "%.4000s/%s", O.dir, e->d_name);
			(void)unlink(p);
		}
	closedir(d);
}

static void
kill_children(void)
{
	int i, status;

	for (i = 0; i < g_npids; i++)
		if (g_pids[i] > 0)
			(void)kill(g_pids[i], SIGKILL);
	for (i = 0; i < g_npids; i++)
		if (g_pids[i] > 0)
			(void)waitpid(g_pids[i], &status, 0);
	g_npids = 0;
}

static void
cleanup_all(void)
{
	kill_children();
	if (O.dir == NULL || !g_dir_ready)
		return;
	env_remove_dir(O.dir);
	remove_log_files();
	if (g_dir_created)
		(void)rmdir(O.dir); /* only succeeds if empty */
}

/* Ctrl-C / SIGTERM in the parent: stop waiting, then clean up in die(). */
static void
on_signal(int sig)
{
	(void)sig;
	g_interrupted = 1;
}

static void
install_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0; /* no SA_RESTART: a blocked read() returns EINTR */
	(void)sigaction(SIGINT, &sa, NULL);
	(void)sigaction(SIGTERM, &sa, NULL);
}

/* ------------------------------------------------------------------ */
/* Berkeley DB wrappers                                                */
/* ------------------------------------------------------------------ */

static DB_ENV *
env_open(int create)
{
	DB_ENV *env;
	int ret;

	CHECK(db_env_create(&env, 0), "db_env_create");
	env->set_errfile(env, stderr);
	env->set_errpfx(env, "bdb_log");
	/* Sizes and the in-memory flag only matter to the creator. */
	if (create) {
		if (in_memory())
			CHECK(env->log_set_config(env, DB_LOG_IN_MEMORY, 1),
			    "log_set_config(DB_LOG_IN_MEMORY)");
		if (O.lg_bsize > 0)
			CHECK(env->set_lg_bsize(env, (u_int32_t)O.lg_bsize),
			    "set_lg_bsize");
		if (O.lg_max > 0)
			CHECK(env->set_lg_max(env, (u_int32_t)O.lg_max),
			    "set_lg_max");
	}
	if ((ret = env->open(env, O.dir, DB_INIT_LOG | (create ? DB_CREATE : 0),
	    0600)) != 0) {
		(void)env->close(env, 0);
		die("DB_ENV->open(%s, log=%s): %s", O.dir, O.log,
		    db_strerror(ret));
	}
	return env;
}

static DB_LOG_STAT *
lstat_(DB_ENV *env)
{
	DB_LOG_STAT *sp;

	CHECK(env->log_stat(env, &sp, 0), "log_stat");
	return sp;
}

static u_int32_t
put_flags(void)
{
	if (strcmp(O.sync, "flush") == 0)
		return O.flush_call ? 0 : DB_FLUSH;
	if (strcmp(O.sync, "wrnosync") == 0)
		return DB_LOG_WRNOSYNC;
	return 0;
}

/* ------------------------------------------------------------------ */
/* put                                                                 */
/* ------------------------------------------------------------------ */

struct child_result {
	int idx;
	int ok;
	long long records;
	uint64_t ns;
	u_int32_t last_file, last_offset;
};

/*
 * Put records until `limit` records are put or `deadline` (0: none) has
 * passed.  The clock is read every 16 records: about 6 us of overshoot
 * without fsyncs, a few ms with one per record.
 */
static long long
put_loop(DB_ENV *env, unsigned char *buf, long long limit, uint64_t deadline,
    int idx, long long seq, DB_LSN *lsn)
{
	DBT dbt;
	u_int32_t flags = put_flags();
	int flush_call = O.flush_call && strcmp(O.sync, "flush") == 0;
	long long n;
	int ret;

	memset(&dbt, 0, sizeof(dbt));
	dbt.data = buf;
	dbt.size = (u_int32_t)O.size;
	for (n = 0; limit < 0 || n < limit; n++) {
		if (deadline && (n & 15) == 0 && now_ns() >= deadline)
			break;
		/* Every record differs: writer index and sequence number. */
		if (O.size >= 12) {
			int32_t i32 = idx;
			int64_t s64 = seq + n;
			memcpy(buf, &i32, 4);
			memcpy(buf + 4, &s64, 8);
		} else
			buf[0] = (unsigned char)(seq + n);
		if ((ret = env->log_put(env, lsn, &dbt, flags)) != 0)
			die("log_put: %s", db_strerror(ret));
		if (flush_call && (ret = env->log_flush(env, lsn)) != 0)
			die("log_flush: %s", db_strerror(ret));
	}
	return n;
}

static void
child_main(int i, int ready_w, int go_r, int out_w)
{
	struct child_result res;
	unsigned char *buf;
	DB_ENV *env;
	DB_LSN lsn;
	uint64_t t0, t1;
	char c;
	ssize_t n;

	g_is_child = 1;
	/* Die with the parent, and from Ctrl-C like any child. */
	(void)prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() == 1)
		_exit(4);
	signal(SIGINT, SIG_DFL);
	signal(SIGTERM, SIG_DFL);
	if ((buf = malloc((size_t)O.size ? (size_t)O.size : 1)) == NULL)
		die("out of memory");
	memset(buf, 0xa5, (size_t)O.size);
	env = env_open(0);
	memset(&lsn, 0, sizeof(lsn));
	if (O.warmup > 0)
		(void)put_loop(env, buf, O.warmup, 0, i, -O.warmup, &lsn);
	if (write(ready_w, "r", 1) != 1)
		_exit(3);
	/* Blocks until the parent closes go[1]. */
	while ((n = read(go_r, &c, 1)) < 0 && errno == EINTR)
		;
	memset(&res, 0, sizeof(res));
	res.idx = i;
	t0 = now_ns();
	res.records = put_loop(env, buf, O.records,
	    O.seconds > 0 ? t0 + (uint64_t)(O.seconds * 1e9) : 0, i, 0, &lsn);
	t1 = now_ns();
	res.ns = t1 - t0;
	res.last_file = lsn.file;
	res.last_offset = lsn.offset;
	res.ok = 1;
	(void)env->close(env, 0);
	free(buf);
	if (write(out_w, &res, sizeof(res)) != (ssize_t)sizeof(res))
		_exit(3);
	_exit(0);
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
	/* A stale environment or log left by a crashed run must not be joined. */
	env_remove_dir(O.dir);
	remove_log_files();
}

/* Read exactly `len` bytes; 0 on success, -1 on EOF/error/interrupt. */
static int
read_full(int fd, void *p, size_t len)
{
	ssize_t n;
	size_t got = 0;

	while (got < len) {
		n = read(fd, (char *)p + got, len - got);
		if (n < 0 && errno == EINTR && !g_interrupted)
			continue;
		if (n <= 0)
			return -1;
		got += (size_t)n;
	}
	return 0;
}

static void
json_stat(const char *key, const DB_LOG_STAT *s0, const DB_LOG_STAT *s1)
{
	jbegin(key);
	juint("st_lg_bsize", s1->st_lg_bsize);
	juint("st_lg_size", s1->st_lg_size);
	juint("st_record", (unsigned long long)(s1->st_record - s0->st_record));
	juint("bytes", ((unsigned long long)s1->st_w_mbytes * 1048576ull +
	    s1->st_w_bytes) - ((unsigned long long)s0->st_w_mbytes *
	    1048576ull + s0->st_w_bytes));
	juint("st_wcount", (unsigned long long)(s1->st_wcount - s0->st_wcount));
	juint("st_wcount_fill",
	    (unsigned long long)(s1->st_wcount_fill - s0->st_wcount_fill));
	juint("st_scount", (unsigned long long)(s1->st_scount - s0->st_scount));
	juint("st_region_wait",
	    (unsigned long long)(s1->st_region_wait - s0->st_region_wait));
	juint("st_region_nowait",
	    (unsigned long long)(s1->st_region_nowait - s0->st_region_nowait));
	/* Running extremes since the environment was created (not deltas). */
	juint("st_maxcommitperflush", s1->st_maxcommitperflush);
	juint("st_mincommitperflush", s1->st_mincommitperflush);
	juint("st_cur_file", s1->st_cur_file);
	juint("st_cur_offset", s1->st_cur_offset);
	juint("st_disk_file", s1->st_disk_file);
	juint("st_disk_offset", s1->st_disk_offset);
	jend();
}

static void
cmd_put(void)
{
	struct child_result res, all[MAXPROCS];
	DB_ENV *env;
	DB_LOG_STAT *s0, *s1;
	int ready[2], go[2], out[2], i, status, failed = 0;
	uint64_t t0, t1;
	long long total = 0;
	double sum_rate = 0, wall;
	char c;

	if (strcmp(O.sync, "flush") && strcmp(O.sync, "wrnosync") &&
	    strcmp(O.sync, "none"))
		die("--sync must be flush, wrnosync or none");
	if (strcmp(O.log, "file") && strcmp(O.log, "memory"))
		die("--log must be file or memory");
	if (O.size < 1 || O.size > 64 * 1024 * 1024)
		die("--size must be 1..64 MiB");
	if (O.procs < 1 || O.procs > MAXPROCS)
		die("--procs must be 1..%d", MAXPROCS);
	if (O.records < 0 && O.seconds <= 0)
		die("give --records N or --seconds S (or both)");
	if (O.records == 0)
		die("--records must be positive");
	if (O.flush_call && strcmp(O.sync, "flush"))
		die("--flush-call goes with --sync flush");

	ensure_dir();
	install_signals();
	/* The creator sets the sizes and makes the region; then it lets go. */
	env = env_open(1);
	CHECK(env->close(env, 0), "env close");

	if (pipe(ready) || pipe(go) || pipe(out))
		die("pipe: %s", strerror(errno));
	fflush(stdout);
	fflush(stderr);
	for (i = 0; i < O.procs; i++) {
		pid_t pid = fork();

		if (pid < 0)
			die("fork: %s", strerror(errno));
		if (pid == 0) {
			close(ready[0]);
			close(go[1]);
			close(out[0]);
			child_main(i, ready[1], go[0], out[1]);
		}
		g_pids[g_npids++] = pid;
	}
	close(ready[1]);
	close(go[0]);
	close(out[1]);
	for (i = 0; i < O.procs; i++)
		if (read_full(ready[0], &c, 1) != 0)
			die(g_interrupted ? "interrupted" :
			    "a child failed before the start (see stderr)");
	/* The parent's own handle, opened after the forks, reads the stats. */
	env = env_open(0);
	s0 = lstat_(env);
	t0 = now_ns();
	close(go[1]); /* start everyone at once */
	memset(all, 0, sizeof(all));
	for (i = 0; i < O.procs; i++) {
		if (read_full(out[0], &res, sizeof(res)) != 0) {
			failed = 1;
			break;
		}
		if (res.idx >= 0 && res.idx < O.procs)
			all[res.idx] = res;
	}
	t1 = now_ns();
	if (g_interrupted) {
		(void)env->close(env, 0);
		die("interrupted");
	}
	for (i = 0; i < g_npids; i++) {
		if (waitpid(g_pids[i], &status, 0) < 0 || !WIFEXITED(status) ||
		    WEXITSTATUS(status) != 0)
			failed = 1;
		g_pids[i] = 0;
	}
	g_npids = 0;
	close(ready[0]);
	close(out[0]);
	if (failed) {
		(void)env->close(env, 0);
		die("a child process failed (see stderr)");
	}
	s1 = lstat_(env);

	wall = (double)(t1 - t0) / 1e9;
	jreset();
	jraw("{");
	jfirst[++jdepth] = 1;
	jbool("ok", 1);
	jstr("workload", "put");
	{
		int maj, min, pat;
		jstr("bdb_version", db_version(&maj, &min, &pat));
	}
	jstr("log", O.log);
	jstr("sync", O.sync);
	jstr("put_flags", strcmp(O.sync, "flush") == 0 ? (O.flush_call ?
	    "0 + log_flush(&lsn)" : "DB_FLUSH") : strcmp(O.sync, "wrnosync")
	    == 0 ? "DB_LOG_WRNOSYNC" : "0");
	jint("record_bytes", O.size);
	jint("procs", O.procs);
	jint("warmup_per_proc", O.warmup);
	jint("records_limit_per_proc", O.records);
	jdbl("seconds_limit_per_proc", O.seconds);
	jabegin("per_proc");
	for (i = 0; i < O.procs; i++) {
		double s = (double)all[i].ns / 1e9;
		jbegin(NULL);
		jint("proc", i);
		jint("records", all[i].records);
		jdbl("seconds", s);
		jdbl("records_per_sec", s > 0 ? (double)all[i].records / s : 0);
		{
			char l[32];
			snprintf(l, sizeof(l), "%u/%u", all[i].last_file,
			    all[i].last_offset);
			jstr("last_lsn", l);
		}
		jend();
		total += all[i].records;
		if (s > 0)
			sum_rate += (double)all[i].records / s;
	}
	jaend();
	jint("records", total);
	/* Wall clock from the start signal to the last result. */
	jdbl("wall_seconds", wall);
	jdbl("records_per_sec", wall > 0 ? (double)total / wall : 0);
	jdbl("sum_proc_records_per_sec", sum_rate);
	/* Per record as one writer sees it: its time over its records. */
	jdbl("us_per_record", sum_rate > 0 ? 1e6 * O.procs / sum_rate : 0);
	json_stat("stat", s0, s1);
	if (in_memory()) {
		/*
		 * In memory, st_scount counts switches of the ring's "files";
		 * nothing is fsynced (checked with strace -e fsync,fdatasync).
		 */
		jint("fsyncs", 0);
		jdbl("records_per_fsync", 0);
	} else {
		juint("fsyncs",
		    (unsigned long long)(s1->st_scount - s0->st_scount));
		jdbl("records_per_fsync", s1->st_scount > s0->st_scount ?
		    (double)(s1->st_record - s0->st_record) /
		    (double)(s1->st_scount - s0->st_scount) : 0);
	}
	free(s0);
	free(s1);
	CHECK(env->close(env, 0), "env close");
	cleanup_all();
	jend();
	printf("%.*s\n", (int)jlen, jbuf);
	fflush(stdout);
}

/* ------------------------------------------------------------------ */
/* main                                                                */
/* ------------------------------------------------------------------ */

static void
usage(void)
{
	fprintf(stderr,
"usage: bdb_log put --dir DIR --sync flush|wrnosync|none [options]\n"
"  --log file|memory   file log (default) or DB_LOG_IN_MEMORY\n"
"  --size BYTES        record payload (default 100)\n"
"  --records N         records per process\n"
"  --seconds S         time limit per process (give this or --records)\n"
"  --procs P           writer processes (default 1)\n"
"  --warmup N          untimed records per process first (default 0)\n"
"  --lg-bsize B        log buffer size (default: BDB's, 32000 / 1 MiB)\n"
"  --lg-max B          log file size (default: BDB's, 10 MiB / 256 KiB)\n"
"  --flush-call        --sync flush as log_put(0) + log_flush(&lsn)\n");
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
		else if (!strcmp(a, "--sync"))
			O.sync = argval(argc, argv, &i);
		else if (!strcmp(a, "--log"))
			O.log = argval(argc, argv, &i);
		else if (!strcmp(a, "--size"))
			O.size = numval(argc, argv, &i);
		else if (!strcmp(a, "--records"))
			O.records = numval(argc, argv, &i);
		else if (!strcmp(a, "--seconds"))
			O.seconds = dblval(argc, argv, &i);
		else if (!strcmp(a, "--procs"))
			O.procs = (int)numval(argc, argv, &i);
		else if (!strcmp(a, "--warmup"))
			O.warmup = numval(argc, argv, &i);
		else if (!strcmp(a, "--lg-bsize"))
			O.lg_bsize = numval(argc, argv, &i);
		else if (!strcmp(a, "--lg-max"))
			O.lg_max = numval(argc, argv, &i);
		else if (!strcmp(a, "--flush-call"))
			O.flush_call = 1;
		else
			die("unknown option %s", a);
	}
	if (!strcmp(O.cmd, "put"))
		cmd_put();
	else
		die("unknown workload %s (put)", O.cmd);
	return 0;
}
