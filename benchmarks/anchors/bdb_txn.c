/*
 * bdb_txn.c -- speed anchor: Berkeley DB 5.3 transactions, one 100-byte
 * record update per transaction in a btree, measured beside aiodbenv's
 * transactions (benchmarks/txn_bench.py).
 *
 *   commit --dir DIR --sync sync|nosync [--procs P] [--seconds S]
 *          [--size BYTES] [--keys N] [--warmup N]
 *
 * The parent creates an environment (DB_INIT_MPOOL | DB_INIT_LOCK |
 * DB_INIT_LOG | DB_INIT_TXN, deadlock detection on every conflict) and a
 * btree of --keys records (4 KiB pages), then forks P writers.  Each opens
 * the environment and the database itself (no handle crosses a fork), makes
 * --warmup untimed commits, reports ready, waits for the common start, then
 * runs transactions for --seconds: txn_begin, DB->put of its own key (keys
 * N/P apart, so each writer's record is on its own leaf page, as each
 * aiodbenv writer has its own page), DB_TXN->commit with DB_TXN_SYNC (the
 * log written and fsynced) or DB_TXN_NOSYNC (left in the log buffer).  A
 * DB_LOCK_DEADLOCK aborts and retries (counted).  The parent measures the
 * wall time from the start to the last writer's result, and reads log_stat
 * before and after (fsyncs, so commits per fsync).
 *
 * One run prints ONE JSON object on stdout ({"ok": false, "error": ...}
 * and a non-zero exit on failure).  Written for aiodbenv from Berkeley DB's
 * documented API (db.h) only.
 * Build: gcc -O2 -o bdb_txn bdb_txn.c -ldb-5.3
 */
#define _GNU_SOURCE
#include <db.h>

#include <dirent.h>
#include <errno.h>
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

#define MAXPROCS 64
#define DBNAME "anchor.db"

static const char *o_dir, *o_sync = "sync";
static int o_procs = 1;
static double o_seconds = 1.0;
static long o_size = 100, o_keys = 2000, o_warmup = 20;

static int g_dir_created, g_is_child;
static pid_t g_pids[MAXPROCS];
static int g_npids;

struct result {
	long long commits, deadlocks;
	uint64_t ns;
	int ok;
};

static void cleanup(void);

static void
die(const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (g_is_child) {
		fprintf(stderr, "bdb_txn child %d: %s\n", (int)getpid(), msg);
		_exit(2);
	}
	cleanup();
	printf("{\"ok\": false, \"workload\": \"commit\", \"error\": \"");
	for (const char *p = msg; *p; p++)
		printf(*p == '"' || *p == '\\' ? "\\%c" : "%c", *p);
	printf("\"}\n");
	exit(1);
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

/* Region files (DB_ENV->remove), then the log and database files it leaves. */
static void
cleanup(void)
{
	char p[4096 + 256];
	struct dirent *e;
	DB_ENV *env;
	DIR *d;
	int i, status;

	for (i = 0; i < g_npids; i++)
		if (g_pids[i] > 0)
			(void)kill(g_pids[i], SIGKILL);
	for (i = 0; i < g_npids; i++)
		if (g_pids[i] > 0)
			(void)waitpid(g_pids[i], &status, 0);
	g_npids = 0;
	if (o_dir == NULL)
		return;
	if (db_env_create(&env, 0) == 0)
		(void)env->remove(env, o_dir, DB_FORCE);
	if ((d = opendir(o_dir)) != NULL) {
		while ((e = readdir(d)) != NULL)
			if (strncmp(e->d_name, "log.", 4) == 0 ||
			    strcmp(e->d_name, DBNAME) == 0) {
				snprintf(p, sizeof(p), "%.4000s/%s", o_dir,
				    e->d_name);
				(void)unlink(p);
			}
		closedir(d);
	}
	if (g_dir_created)
		(void)rmdir(o_dir);
}

static DB_ENV *
env_open(int create)
{
	DB_ENV *env;
	int ret;

	CHECK(db_env_create(&env, 0), "db_env_create");
	env->set_errfile(env, stderr);
	env->set_errpfx(env, "bdb_txn");
	if (create) {
		CHECK(env->set_cachesize(env, 0, 16 * 1024 * 1024, 1),
		    "set_cachesize");
		CHECK(env->set_lk_detect(env, DB_LOCK_DEFAULT), "set_lk_detect");
	}
	ret = env->open(env, o_dir, (create ? DB_CREATE : 0) | DB_INIT_MPOOL |
	    DB_INIT_LOCK | DB_INIT_LOG | DB_INIT_TXN, 0600);
	if (ret != 0) {
		(void)env->close(env, 0);
		die("DB_ENV->open(%s): %s", o_dir, db_strerror(ret));
	}
	return env;
}

static DB *
db_open(DB_ENV *env, int create)
{
	DB *db;

	CHECK(db_create(&db, env, 0), "db_create");
	if (create)
		CHECK(db->set_pagesize(db, 4096), "set_pagesize");
	CHECK(db->open(db, NULL, DBNAME, NULL, DB_BTREE,
	    DB_AUTO_COMMIT | (create ? DB_CREATE : 0), 0600), "DB->open");
	return db;
}

static void
set_key(DBT *key, uint32_t *buf, long k)
{
	*buf = htobe32((uint32_t)k); /* big-endian: keys sort as numbers */
	memset(key, 0, sizeof(*key));
	key->data = buf;
	key->size = sizeof(*buf);
}

/* One transaction updating record `k`; 1 if it committed, 0 on a deadlock. */
static int
update(DB_ENV *env, DB *db, long k, unsigned char *data, long long n)
{
	DBT key, val;
	DB_TXN *t;
	uint32_t kb;
	int ret;

	set_key(&key, &kb, k);
	memset(&val, 0, sizeof(val));
	memset(data, (int)(n & 0xff), (size_t)o_size); /* every update differs */
	val.data = data;
	val.size = (u_int32_t)o_size;
	CHECK(env->txn_begin(env, NULL, &t, 0), "txn_begin");
	ret = db->put(db, t, &key, &val, 0);
	if (ret == DB_LOCK_DEADLOCK) {
		CHECK(t->abort(t), "DB_TXN->abort");
		return 0;
	}
	if (ret != 0) {
		(void)t->abort(t);
		die("DB->put: %s", db_strerror(ret));
	}
	CHECK(t->commit(t, strcmp(o_sync, "sync") == 0 ? DB_TXN_SYNC :
	    DB_TXN_NOSYNC), "DB_TXN->commit");
	return 1;
}

static void
child(int idx, int ready_fd, int start_fd, int result_fd)
{
	struct result r = {0, 0, 0, 1};
	unsigned char *data = malloc((size_t)o_size);
	long k = (long)idx * (o_keys / o_procs);
	long long n;
	uint64_t t0, deadline;
	DB_ENV *env;
	DB *db;
	char c;

	g_is_child = 1;
	(void)prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (data == NULL)
		die("out of memory");
	env = env_open(0);
	db = db_open(env, 0);
	for (n = 0; n < o_warmup; n++)
		(void)update(env, db, k, data, n);
	if (write(ready_fd, "r", 1) != 1 || read(start_fd, &c, 1) != 1)
		die("start pipe: %s", strerror(errno));
	t0 = now_ns();
	deadline = t0 + (uint64_t)(o_seconds * 1e9);
	for (n = 0; now_ns() < deadline; n++) {
		if (update(env, db, k, data, n))
			r.commits++;
		else
			r.deadlocks++;
	}
	r.ns = now_ns() - t0;
	CHECK(db->close(db, 0), "DB->close");
	CHECK(env->close(env, 0), "DB_ENV->close");
	if (write(result_fd, &r, sizeof(r)) != (ssize_t)sizeof(r))
		_exit(3);
	_exit(0);
}

static void
usage(void)
{
	die("usage: bdb_txn commit --dir DIR --sync sync|nosync [--procs P] "
	    "[--seconds S] [--size BYTES] [--keys N] [--warmup N]");
}

int
main(int argc, char **argv)
{
	int ready[2], start[2], results[2], i, status;
	struct result r, all[MAXPROCS];
	long long commits = 0, deadlocks = 0;
	DB_LOG_STAT *ls0, *ls1;
	unsigned char *data;
	uint64_t t0, wall;
	DB_ENV *env;
	DB *db;
	DB_TXN *t;
	DBT key, val;
	uint32_t kb;
	long k;

	if (argc < 2 || strcmp(argv[1], "commit") != 0)
		usage();
	for (i = 2; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--dir")) o_dir = argv[i + 1];
		else if (!strcmp(argv[i], "--sync")) o_sync = argv[i + 1];
		else if (!strcmp(argv[i], "--procs")) o_procs = atoi(argv[i + 1]);
		else if (!strcmp(argv[i], "--seconds")) o_seconds = atof(argv[i + 1]);
		else if (!strcmp(argv[i], "--size")) o_size = atol(argv[i + 1]);
		else if (!strcmp(argv[i], "--keys")) o_keys = atol(argv[i + 1]);
		else if (!strcmp(argv[i], "--warmup")) o_warmup = atol(argv[i + 1]);
		else usage();
	}
	if (i != argc || o_dir == NULL || o_procs < 1 || o_procs > MAXPROCS ||
	    o_size < 1 || o_size > 1000 || o_keys < o_procs ||
	    (strcmp(o_sync, "sync") && strcmp(o_sync, "nosync")))
		usage();
	if (mkdir(o_dir, 0700) == 0)
		g_dir_created = 1;
	else if (errno != EEXIST)
		die("mkdir %s: %s", o_dir, strerror(errno));

	/* The environment and the btree, filled, then closed before the fork. */
	env = env_open(1);
	db = db_open(env, 1);
	if ((data = calloc(1, (size_t)o_size)) == NULL)
		die("out of memory");
	CHECK(env->txn_begin(env, NULL, &t, 0), "txn_begin");
	memset(&val, 0, sizeof(val));
	val.data = data;
	val.size = (u_int32_t)o_size;
	for (k = 0; k < o_keys; k++) {
		set_key(&key, &kb, k);
		CHECK(db->put(db, t, &key, &val, 0), "DB->put (fill)");
	}
	CHECK(t->commit(t, DB_TXN_SYNC), "DB_TXN->commit (fill)");
	CHECK(env->txn_checkpoint(env, 0, 0, DB_FORCE), "txn_checkpoint");
	CHECK(db->close(db, 0), "DB->close");
	CHECK(env->close(env, 0), "DB_ENV->close");

	if (pipe(ready) || pipe(start) || pipe(results))
		die("pipe: %s", strerror(errno));
	for (i = 0; i < o_procs; i++) {
		pid_t pid = fork();
		if (pid < 0)
			die("fork: %s", strerror(errno));
		if (pid == 0)
			child(i, ready[1], start[0], results[1]);
		g_pids[g_npids++] = pid;
	}
	for (i = 0; i < o_procs; i++) {
		char c;
		if (read(ready[0], &c, 1) != 1)
			die("a writer failed before the start (see stderr)");
	}
	env = env_open(0); /* the parent's own handle: statistics */
	CHECK(env->log_stat(env, &ls0, 0), "log_stat");
	t0 = now_ns();
	for (i = 0; i < o_procs; i++)
		if (write(start[1], "s", 1) != 1)
			die("start pipe: %s", strerror(errno));
	for (i = 0; i < o_procs; i++) {
		if (read(results[0], &r, sizeof(r)) != (ssize_t)sizeof(r))
			die("a writer failed (see stderr)");
		all[i] = r;
		commits += r.commits;
		deadlocks += r.deadlocks;
	}
	wall = now_ns() - t0;
	CHECK(env->log_stat(env, &ls1, 0), "log_stat");
	for (i = 0; i < g_npids; i++) {
		(void)waitpid(g_pids[i], &status, 0);
		g_pids[i] = 0;
	}
	printf("{\"ok\": true, \"workload\": \"commit\", \"sync\": \"%s\", "
	    "\"procs\": %d, \"size\": %ld, \"seconds\": %.6f, "
	    "\"commits\": %lld, \"commits_per_s\": %.1f, \"deadlocks\": %lld, "
	    "\"fsyncs\": %lu, \"log_records\": %lu, \"per_proc\": [",
	    o_sync, o_procs, o_size, wall / 1e9, commits,
	    commits / (wall / 1e9), deadlocks,
	    (unsigned long)(ls1->st_scount - ls0->st_scount),
	    (unsigned long)(ls1->st_record - ls0->st_record));
	for (i = 0; i < o_procs; i++)
		printf("%s%lld", i ? ", " : "", all[i].commits);
	printf("]}\n");
	free(ls0);
	free(ls1);
	CHECK(env->close(env, 0), "DB_ENV->close");
	cleanup();
	return 0;
}
