"""Build and run the Berkeley DB 5.3 speed anchors (bdb_mpool.c, bdb_log.c, bdb_txn.c).

Library use::

    from benchmarks.anchors.build import run_anchor
    r = run_anchor(["hot", "--region", "file", "--cache-mb", "128",
                    "--file-mb", "64", "--ops", "2000000", "--pattern", "random"])
    r["ns_per_op"]

Command line::

    python benchmarks/anchors/build.py --build            # build only, print the binary path
    python benchmarks/anchors/build.py --selftest         # every workload at a tiny size
    python benchmarks/anchors/build.py --zipf-trace OUT --pages 20000 --refs 500000
    python benchmarks/anchors/build.py run -- hot --cache-mb 128 --file-mb 64 --ops 2000000
    python benchmarks/anchors/build.py run-log -- put --sync flush --procs 8 --seconds 2
    python benchmarks/anchors/build.py run-txn -- commit --sync sync --procs 4 --seconds 1

``run_anchor(args, harness="log")`` runs the log harness (bdb_log.c), ``harness="txn"``
the transaction harness (bdb_txn.c). The binaries are
cached in benchmarks/.build/ and rebuilt when the source, the compiler
or the flags change.  ``run_anchor`` supplies a temporary ``--dir`` when none is given.
"""

from __future__ import annotations

import argparse
import array
import bisect
import glob
import hashlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE.parent / ".build"
#: The C harnesses by name: each is HERE/bdb_<name>.c, built into BUILD_DIR/bdb_<name>.
HARNESSES = ("mpool", "log", "txn")
SOURCE = HERE / "bdb_mpool.c"
BINARY = BUILD_DIR / "bdb_mpool"
STAMP = BUILD_DIR / "bdb_mpool.stamp"

CFLAGS = ["-O2", "-Wall", "-Wextra"]
LIB_NAME = "db-5.3"
APT_PACKAGE = "libdb5.3-dev"
HEADER = Path("/usr/include/db.h")
LIB_GLOBS = (
    "/usr/lib/*/libdb-5.3.so",
    "/usr/lib/libdb-5.3.so",
    "/usr/lib64/libdb-5.3.so",
)


class AnchorError(RuntimeError):
    """The anchor could not be built, or a run failed."""


# --------------------------------------------------------------------------- build


def _libdb_present() -> bool:
    if not HEADER.exists():
        return False
    try:
        text = HEADER.read_text(errors="replace")
    except OSError:
        return False
    if "DB_VERSION_MAJOR\t5" not in text and "DB_VERSION_MAJOR 5" not in text:
        return False
    return any(glob.glob(pattern) for pattern in LIB_GLOBS)


def _apt_install(package: str, timeout: float = 600.0) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", package]
    try:
        if subprocess.run(cmd, env=env, capture_output=True, timeout=timeout).returncode == 0:
            return
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AnchorError(f"apt-get install {package} timed out after {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise AnchorError(f"apt-get install {package} failed:\n{proc.stderr[-2000:]}")


def ensure_libdb() -> None:
    """Make sure Berkeley DB 5.3's headers and library are installed.

    Installs libdb5.3-dev with apt-get when running as root; otherwise raises
    AnchorError saying what to install.
    """
    if _libdb_present():
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install(APT_PACKAGE)
        if _libdb_present():
            return
        raise AnchorError(
            f"{APT_PACKAGE} was installed but {HEADER} / libdb-5.3.so are still missing"
        )
    raise AnchorError(
        f"Berkeley DB 5.3 development files are missing ({HEADER}, libdb-5.3.so). "
        f"Install them as root: apt-get install -y {APT_PACKAGE}"
    )


def _compiler() -> str:
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name and shutil.which(name):
            return name
    if os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install("gcc")
        if shutil.which("gcc"):
            return "gcc"
    raise AnchorError("no C compiler found (install gcc)")


def _stamp(cc: str, source: Path) -> str:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    h.update(source.read_bytes())
    h.update("\0".join([cc, version, *CFLAGS, LIB_NAME]).encode())
    return h.hexdigest()


def paths(harness: str = "mpool") -> tuple[Path, Path, Path]:
    """The source, binary and build stamp of a harness (``"mpool"``, ``"log"`` or ``"txn"``)."""
    if harness not in HARNESSES:
        raise ValueError(f"unknown harness {harness!r} (one of {', '.join(HARNESSES)})")
    name = f"bdb_{harness}"
    return HERE / f"{name}.c", BUILD_DIR / name, BUILD_DIR / f"{name}.stamp"


def build(force: bool = False, harness: str = "mpool") -> Path:
    """Compile bdb_<harness>.c into benchmarks/.build/ (if needed) and return the binary."""
    source, binary, stamp_path = paths(harness)
    ensure_libdb()
    cc = _compiler()
    stamp = _stamp(cc, source)
    if (
        not force
        and binary.exists()
        and stamp_path.exists()
        and stamp_path.read_text().strip() == stamp
    ):
        return binary
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = BUILD_DIR / f".{binary.name}.{os.getpid()}"
    cmd = [cc, *CFLAGS, "-o", str(tmp), str(source), f"-l{LIB_NAME}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise AnchorError(f"compile failed: {' '.join(cmd)}\n{proc.stderr}")
    os.replace(tmp, binary)
    stamp_path.write_text(stamp + "\n")
    return binary


# ----------------------------------------------------------------------------- run


def run_anchor(
    args: Sequence[str], timeout: float = 900.0, check: bool = True, harness: str = "mpool"
) -> dict[str, Any]:
    """Run one workload of an anchor and return its JSON object.

    ``args`` is the argument list after the program name, e.g.
    ``["hot", "--cache-mb", "128", ...]`` (``harness="mpool"``, the default) or
    ``["put", "--sync", "flush", "--seconds", "2"]`` (``harness="log"``).  When it has
    no ``--dir``, a fresh temporary directory is used and removed afterwards.  With
    ``check`` (the default) a failed run raises AnchorError; otherwise its
    ``{"ok": false, ...}`` object is returned.
    """
    binary = build(harness=harness)
    argv = [str(binary), *map(str, args)]
    tmpdir = None
    if "--dir" not in argv:
        tmpdir = tempfile.mkdtemp(prefix="bdb_anchor.")
        argv += ["--dir", os.path.join(tmpdir, "work")]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AnchorError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    result: dict[str, Any] | None = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    if result is None:
        raise AnchorError(
            f"no JSON from {' '.join(argv)} (exit {proc.returncode})\n"
            f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
        )
    if check and (proc.returncode != 0 or not result.get("ok")):
        raise AnchorError(
            f"{' '.join(argv)} failed: {result.get('error')}\nstderr: {proc.stderr[-2000:]}"
        )
    if proc.stderr.strip():
        result.setdefault("stderr", proc.stderr[-2000:])
    return result


# --------------------------------------------------------------------------- traces


def zipf_trace(
    npages: int, nrefs: int, theta: float = 0.99, seed: int = 1, scramble: bool = True
) -> list[int]:
    """``nrefs`` page numbers in [0, npages) drawn from Zipf(theta) over ranks.

    Rank r (0-based) has weight 1 / (r + 1) ** theta.  With ``scramble`` the
    ranks are mapped to page numbers through a seeded permutation, so hot pages
    are spread over the file instead of being pages 0, 1, 2, ...
    """
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / (r + 1) ** theta for r in range(npages)))
    total = cum[-1]
    ranks = [bisect.bisect_left(cum, rng.random() * total) for _ in range(nrefs)]
    ranks = [min(r, npages - 1) for r in ranks]
    if not scramble:
        return ranks
    perm = list(range(npages))
    rng.shuffle(perm)
    return [perm[r] for r in ranks]


def write_trace(path: str | os.PathLike[str], pages: Sequence[int]) -> None:
    """Write page numbers as little-endian u32, the format ``hitratio`` reads."""
    arr = array.array("I", pages)
    if arr.itemsize != 4:
        arr = array.array("L", pages)
    if sys.byteorder != "little":
        arr.byteswap()
    with open(path, "wb") as fh:
        arr.tofile(fh)


# ------------------------------------------------------------------------- selftest


# bdb_mpool picks its default SysV keys in [0x5db00000, 0x5dc00000).
SHM_KEY_RANGE = (0x5DB00000, 0x5DC00000)


def _shm_keys() -> set[str]:
    """Segments in the anchor's own key range (other processes' keys are ignored)."""
    try:
        out = subprocess.run(["ipcs", "-m"], capture_output=True, text=True).stdout
    except OSError:
        return set()
    keys = set()
    for ln in out.splitlines():
        if ln.startswith("0x"):
            key = ln.split()[0]
            if SHM_KEY_RANGE[0] <= int(key, 16) < SHM_KEY_RANGE[1]:
                keys.add(key)
    return keys


def _brief(r: dict[str, Any]) -> str:
    keys = (
        "region",
        "pattern",
        "procs",
        "ns_per_op",
        "ops_per_sec",
        "total_ops_per_sec",
        "timed_cache_miss",
        "st_cache_miss",
        "miss_ratio",
        "pages_written",
        "ms",
        "mib_per_sec",
        "hits",
        "misses",
        "hit_ratio",
        "shm_segments_left",
    )
    return ", ".join(f"{k}={r[k]}" for k in keys if k in r)


#: bdb_log runs at a tiny size: every sync mode, the in-memory log, several processes.
LOG_CASES: tuple[tuple[str, ...], ...] = (
    ("put", "--sync", "flush", "--records", "50"),
    ("put", "--sync", "flush", "--flush-call", "--records", "50"),
    ("put", "--sync", "wrnosync", "--records", "2000"),
    ("put", "--sync", "none", "--records", "20000"),
    ("put", "--sync", "none", "--log", "memory", "--records", "20000"),
    ("put", "--sync", "flush", "--procs", "3", "--records", "30", "--warmup", "5"),
    ("put", "--sync", "none", "--procs", "2", "--seconds", "0.05"),
)


def log_problems(args: Sequence[str], r: dict[str, Any]) -> list[str]:
    """What is wrong with a bdb_log ``put`` result, checked against its arguments and
    Berkeley DB's own statistics (an empty list when nothing is)."""
    a = list(args)

    def opt(name: str, default: str) -> str:
        return a[a.index(name) + 1] if name in a else default

    bad: list[str] = []
    if r.get("ok") is not True:
        return [f"not ok: {r.get('error')}"]
    procs = int(opt("--procs", "1"))
    warmup = int(opt("--warmup", "0"))
    total = int(r["records"])
    st = r["stat"]
    if "--records" in a and "--seconds" not in a and total != procs * int(opt("--records", "0")):
        bad.append(f"{total} records put, expected {procs} x {opt('--records', '0')}")
    if total <= 0 or len(r["per_proc"]) != procs:
        bad.append(f"{total} records from {len(r['per_proc'])} of {procs} processes")
    if st["st_record"] != total:
        bad.append(f"log_stat counted {st['st_record']} records, the writers {total}")
    sync, memory = opt("--sync", "flush"), opt("--log", "file") == "memory"
    if memory and (st["st_wcount"] or r["fsyncs"]):
        bad.append(f"in-memory log wrote {st['st_wcount']} times, fsynced {r['fsyncs']}")
    if sync == "flush" and not memory:
        if not 0 < r["fsyncs"] <= total:
            bad.append(f"{r['fsyncs']} fsyncs for {total} flushed records")
        if st["st_disk_offset"] != st["st_cur_offset"]:
            bad.append("flushed records but the end of the log is not on disk")
        if procs == 1 and r["fsyncs"] != total:
            bad.append(f"1 writer, {total} flushed records, {r['fsyncs']} fsyncs")
    if sync == "wrnosync" and st["st_wcount"] < total:
        bad.append(f"DB_LOG_WRNOSYNC: {st['st_wcount']} writes for {total} records")
    if warmup and st["st_record"] == total + procs * warmup:
        bad.append("the warm-up records were counted in the timed part")
    return bad


#: bdb_txn runs at a tiny size: both durabilities, one and several writers.
TXN_CASES: tuple[tuple[str, ...], ...] = (
    ("commit", "--sync", "sync", "--seconds", "0.1"),
    ("commit", "--sync", "nosync", "--seconds", "0.1"),
    ("commit", "--sync", "sync", "--procs", "3", "--seconds", "0.1"),
)


def txn_problems(args: Sequence[str], r: dict[str, Any]) -> list[str]:
    """What is wrong with a bdb_txn ``commit`` result (an empty list when nothing is):
    checked against Berkeley DB's log statistics (a put and a commit record per
    transaction; DB_TXN_SYNC from one writer: one fsync per commit)."""
    a = list(args)
    if r.get("ok") is not True:
        return [f"not ok: {r.get('error')}"]
    procs = int(a[a.index("--procs") + 1]) if "--procs" in a else 1
    sync = a[a.index("--sync") + 1]
    bad: list[str] = []
    n = int(r["commits"])
    if n <= 0 or len(r["per_proc"]) != procs or sum(r["per_proc"]) != n:
        bad.append(f"{n} commits from {r['per_proc']} ({procs} writers)")
    if r["log_records"] < 2 * n:
        bad.append(f"{r['log_records']} log records for {n} commits (a put and a commit each)")
    if sync == "sync" and procs == 1 and r["fsyncs"] < n:
        bad.append(f"DB_TXN_SYNC: {r['fsyncs']} fsyncs for {n} commits from one writer")
    if sync == "nosync" and r["fsyncs"] >= n:
        bad.append(f"DB_TXN_NOSYNC: {r['fsyncs']} fsyncs for {n} commits")
    return bad


def selftest() -> int:
    before = _shm_keys()
    tmp = tempfile.mkdtemp(prefix="bdb_anchor_selftest.")
    trace = os.path.join(tmp, "zipf.trace")
    write_trace(trace, zipf_trace(2000, 20000, 0.99, seed=7))
    small_hot = ["--cache-mb", "8", "--file-mb", "4", "--ops", "20000"]
    cases: list[list[str]] = []
    for region in ("file", "system", "private"):
        for pattern in ("random", "seq"):
            cases.append(["hot", "--region", region, "--pattern", pattern, *small_hot])
    cases.append(["hot", "--region", "file", "--procs", "2", *small_hot])
    cases.append(["hot", "--region", "system", "--procs", "2", *small_hot])
    cases.append(["miss", "--cache-mb", "1", "--file-mb", "8", "--ops", "5000"])
    cases.append(
        ["miss", "--region", "system", "--cache-mb", "1", "--file-mb", "8", "--ops", "5000"]
    )
    cases.append(["sync", "--cache-mb", "8", "--dirty-mb", "4"])
    cases.append(["trickle", "--cache-mb", "8", "--dirty-mb", "4", "--pct", "50"])
    cases.append(["hitratio", "--cache-pages", "200", "--trace", trace, "--warmup", "2000"])
    cases.append(["memory", "--cache-mb", "2"])
    cases.append(
        [
            "hitratio",
            "--region",
            "private",
            "--cache-pages",
            "200",
            "--trace",
            trace,
            "--warmup",
            "2000",
        ]
    )
    failed = 0
    try:
        for i, log_case in enumerate(LOG_CASES):
            workdir = os.path.join(tmp, f"l{i}")
            try:
                r = run_anchor([*log_case, "--dir", workdir], timeout=300, harness="log")
                bad = log_problems(log_case, r)
                if os.path.exists(workdir):
                    bad.append(f"work directory not removed: {workdir}")
            except AnchorError as exc:
                bad, r = [str(exc)], {}
            failed += bool(bad)
            brief = {k: r.get(k) for k in ("records", "records_per_sec", "fsyncs")}
            print(f"{'FAIL' if bad else 'ok  '} {' '.join(log_case)}\n     {bad or brief}")
        for i, txn_case in enumerate(TXN_CASES):
            workdir = os.path.join(tmp, f"t{i}")
            try:
                r = run_anchor([*txn_case, "--dir", workdir], timeout=300, harness="txn")
                bad = txn_problems(txn_case, r)
                if os.path.exists(workdir):
                    bad.append(f"work directory not removed: {workdir}")
            except AnchorError as exc:
                bad, r = [str(exc)], {}
            failed += bool(bad)
            brief = {k: r.get(k) for k in ("commits", "commits_per_s", "fsyncs")}
            print(f"{'FAIL' if bad else 'ok  '} {' '.join(txn_case)}\n     {bad or brief}")
        for i, case in enumerate(cases):
            workdir = os.path.join(tmp, f"w{i}")
            try:
                r = run_anchor([*case, "--dir", workdir], timeout=300)
                ok = r.get("ok") is True and r.get("shm_segments_left", 0) == 0
                if case[0] == "hot" and r.get("timed_cache_miss", 0):
                    ok = False
                if os.path.exists(workdir):
                    ok = False
                    print(f"   work directory not removed: {workdir}")
            except AnchorError as exc:
                ok, r = False, {"error": str(exc)}
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {' '.join(case)}\n     {_brief(r) or r}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    passed = len(cases) + len(LOG_CASES) + len(TXN_CASES) - failed
    leaked = _shm_keys() - before
    if leaked:
        failed += 1
        print(f"FAIL SysV segments left behind: {sorted(leaked)}")
    print(f"selftest: {passed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("run", "run-log", "run-txn"):
        rest = argv[1:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        harness = {"run": "mpool", "run-log": "log", "run-txn": "txn"}[argv[0]]
        r = run_anchor(rest, check=False, harness=harness)
        print(json.dumps(r))
        return 0 if r.get("ok") else 1
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--build", action="store_true", help="build every harness (if needed), print paths"
    )
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--selftest", action="store_true", help="run every workload, tiny")
    ap.add_argument("--zipf-trace", metavar="OUT", help="write a zipf trace file")
    ap.add_argument("--pages", type=int, default=20000)
    ap.add_argument("--refs", type=int, default=500000)
    ap.add_argument("--theta", type=float, default=0.99)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--no-scramble",
        action="store_true",
        help="hot pages are 0,1,2,... instead of spread over the file",
    )
    ns = ap.parse_args(argv)
    if ns.zipf_trace:
        write_trace(
            ns.zipf_trace, zipf_trace(ns.pages, ns.refs, ns.theta, ns.seed, not ns.no_scramble)
        )
        print(ns.zipf_trace)
    if ns.build or ns.force:
        for harness in HARNESSES:
            print(build(force=ns.force, harness=harness))
    if ns.selftest:
        return selftest()
    if not (ns.zipf_trace or ns.build or ns.force or ns.selftest):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
