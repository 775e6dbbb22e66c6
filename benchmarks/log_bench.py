#!/usr/bin/env python3
"""aiodbenv's log beside Berkeley DB 5.3's log_put/log_flush, side by side in one run (issue 12).

Not a test: a measurement to run by hand.

    python benchmarks/log_bench.py                 # 5 repetitions, 2 s per run (~2-3 minutes)
    python benchmarks/log_bench.py --quick         # 3 repetitions, 1 s per run
    python benchmarks/log_bench.py --tiny          # 1 repetition, 0.2 s per run (what tests run)
    python benchmarks/log_bench.py --anchor-only   # Berkeley DB alone (no aiodbenv log needed)

Cases (100-byte records unless ``--size``; every writer is its own process, created fresh,
joining one environment whose log the parent created; the writers start together):

flush/1     one process, ``await env.log.put(rec, flush=True)`` per record (written and
            fsynced before it returns). Anchor: ``log_put(DB_FLUSH)`` per record.
flush/P     the same in P processes (``--procs``, default 8): group commit. Anchor: the same
            in P forked processes.
wrnosync/1  ``put(rec, write_nosync=True)``: written, not fsynced. Anchor: DB_LOG_WRNOSYNC.
nosync/1    ``put(rec)``: the record stays in the shared buffer. Anchor: ``log_put(0)``.
memory/1    ``put(rec)`` into an in-memory log (``log_inmemory=True``, a ring in the region).
            Anchor: ``log_put(0)`` with DB_LOG_IN_MEMORY.

Each process runs one asyncio loop; ``--coroutines C`` makes C coroutines in each process put
concurrently (the records are shared out between them). Every run is bounded by time
(``--seconds``) and by records (``--records``, per process), whichever comes first, after a few
untimed warm-up records. Within each repetition every case runs aiodbenv's side and the
anchor's back to back (the anchor first in odd repetitions), so both see the same machine
load. The table gives the median, minimum and maximum records/s of each side, the median (and
range) of the per-repetition time ratio aiodbenv / BDB (time per record: BDB's records/s over
aiodbenv's), records per fsync from each side's statistics, and the issue's aims beside them:

- flush per record, 1 process: within 1.2x Berkeley DB's time (time ratio <= 1.2);
- flush per record, P processes: at least Berkeley DB's records/s (time ratio <= 1.0);
- no flush: at least 400,000 records/s per process.

An aiodbenv without a log (``Env.open`` has no ``log`` parameter) makes the run stop before it
creates anything, saying so; ``--anchor-only`` still measures Berkeley DB.

Everything a run creates (its work directory, the environments and log files, the anchor's
directories, worker processes) is removed at the end, also on errors, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiodbenv  # noqa: E402
from aiodbenv import Env  # noqa: E402
from benchmarks.anchors import build as anchors_build  # noqa: E402

#: What a worker's per-process put rate must reach without flush (the issue's aim).
NOSYNC_AIM = 400_000.0

NO_LOG = "this aiodbenv has no log"


class NoLog(RuntimeError):
    """The installed aiodbenv has no log subsystem to measure."""


def has_log() -> bool:
    """Whether ``aiodbenv.Env.open`` takes ``log=`` (the log subsystem exists)."""
    return "log" in inspect.signature(Env.open).parameters


def require_log() -> None:
    """Raise :class:`NoLog` with a message naming the aiodbenv in use when it has no log."""
    if not has_log():
        raise NoLog(
            f"{NO_LOG}: aiodbenv.Env.open ({aiodbenv.__file__}) has no `log` parameter; "
            "run with --anchor-only to measure Berkeley DB alone"
        )


# ------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One workload, run the same way on both sides."""

    key: str
    label: str
    sync: str  # "flush" | "wrnosync" | "none"
    log: str  # "file" | "memory"
    procs: int
    aim: str  # "" | "time<=1.2" | "time<=1" | "rate>=400k"

    @property
    def warmup(self) -> int:
        """Untimed records per process first: the log file exists and is warm before timing."""
        return 10 if self.sync == "flush" else 1000


def cases(procs: int) -> list[Case]:
    """The five cases, with ``procs`` writers in the group-commit one."""
    return [
        Case("flush/1", "put+flush per record, 1 process", "flush", "file", 1, "time<=1.2"),
        Case(
            f"flush/{procs}",
            f"put+flush per record, {procs} processes (total)",
            "flush",
            "file",
            procs,
            "time<=1",
        ),
        Case("wrnosync/1", "put, written without fsync, 1 process", "wrnosync", "file", 1, ""),
        Case("nosync/1", "put, no flush, 1 process", "none", "file", 1, "rate>=400k"),
        Case("memory/1", "put, in-memory log, 1 process", "none", "memory", 1, ""),
    ]


#: Berkeley DB's log_put flags for each (sync, log) of a case, for labels.
BDB_FLAGS = {
    ("flush", "file"): "DB_FLUSH",
    ("wrnosync", "file"): "DB_LOG_WRNOSYNC",
    ("none", "file"): "no flags",
    ("none", "memory"): "no flags, DB_LOG_IN_MEMORY",
}

AIM_TEXT = {
    "time<=1.2": "time within 1.2x BDB's",
    "time<=1": "records/s >= BDB's",
    "rate>=400k": ">= 400k records/s per process",
    "": "-",
}


@dataclass(frozen=True)
class Sizes:
    reps: int
    seconds: float  # time bound per run and process
    records: int  # record bound per run and process


FULL = Sizes(reps=5, seconds=2.0, records=10_000_000)
QUICK = Sizes(reps=3, seconds=1.0, records=5_000_000)
TINY = Sizes(reps=1, seconds=0.2, records=200_000)


# ------------------------------------------------------------------------ aiodbenv side


def _stat_dict(st: Any) -> dict[str, Any]:
    """A log statistics object as a plain dict (dataclass, named tuple, mapping or object)."""
    if st is None:
        return {}
    if dataclasses.is_dataclass(st) and not isinstance(st, type):
        return dataclasses.asdict(st)
    if hasattr(st, "_asdict"):
        return dict(st._asdict())
    if isinstance(st, dict):
        return dict(st)
    return {k: v for k, v in vars(st).items() if not k.startswith("_")}


def _pick(d: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``d`` (stat field names as Berkeley DB or as
    aiodbenv spells them), else None."""
    for n in names:
        if n in d:
            return d[n]
    return None


async def _log_stat(env: Any) -> dict[str, Any]:
    st = env.log.stat()
    if inspect.isawaitable(st):
        st = await st
    return _stat_dict(st)


def _open_kwargs(case: Case, create: bool) -> dict[str, Any]:
    return dict(create=create, log=True, log_inmemory=case.log == "memory")


async def _prepare(home: str, case: Case) -> dict[str, Any]:
    """Create the environment and its log, then close the handle: the workers join it."""
    env = await Env.open(home, **_open_kwargs(case, True))
    try:
        return await _log_stat(env)
    finally:
        await env.close()


async def _stat_of(home: str, case: Case) -> dict[str, Any]:
    env = await Env.open(home, **_open_kwargs(case, False))
    try:
        return await _log_stat(env)
    finally:
        await env.close()


async def _put_loop(
    env: Any, case: Case, size: int, limit: int, deadline: float | None, tag: int
) -> int:
    """Put up to ``limit`` records until ``deadline`` (monotonic; None: no deadline)."""
    put = env.log.put
    flush = case.sync == "flush"
    wrnosync = case.sync == "wrnosync"
    # Every record differs (writer tag and sequence number), as in the C harness; the parts
    # that do not change are made once, so the loop costs little besides the put.
    head = tag.to_bytes(4, "little")
    tail = b"\xa5" * max(0, size - 12)
    n = 0
    while n < limit:
        if deadline is not None and (n & 15) == 0 and time.monotonic() >= deadline:
            break
        if size >= 12:
            rec = head + n.to_bytes(8, "little") + tail
        else:
            rec = bytes([n & 0xFF]) + b"\xa5" * (size - 1)
        if flush:
            await put(rec, flush=True)
        elif wrnosync:
            await put(rec, write_nosync=True)
        else:
            await put(rec)
        n += 1
    return n


async def _worker_main(a: argparse.Namespace) -> None:
    case = Case("worker", "", a.sync, a.log, 1, "")
    env = await Env.open(a.home, **_open_kwargs(case, False))
    try:
        conc = max(1, a.coroutines)
        await asyncio.gather(
            *(
                _put_loop(env, case, a.size, max(1, a.warmup // conc), None, 1000 + i)
                for i in range(conc)
            )
        )
        print("ready", flush=True)
        # The parent writes one byte to every worker's stdin to start them together.
        go = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read, 1)
        if go != b"g":  # the parent gave up (closed our stdin) before the start
            raise RuntimeError("no start signal from the parent")
        per = [a.records // conc + (1 if i < a.records % conc else 0) for i in range(conc)]
        t0 = time.monotonic()
        deadline = t0 + a.seconds if a.seconds > 0 else None
        counts = await asyncio.gather(
            *(_put_loop(env, case, a.size, per[i], deadline, a.index * 64 + i) for i in range(conc))
        )
        secs = time.monotonic() - t0
        print(
            json.dumps({"ok": True, "records": sum(counts), "seconds": secs, "coroutines": conc}),
            flush=True,
        )
    finally:
        await env.close()


def worker(argv: list[str]) -> int:
    """``log_bench.py _worker ...``: one writer process (see :func:`run_aiodbenv`)."""
    ap = argparse.ArgumentParser(prog="log_bench.py _worker")
    ap.add_argument("--home", required=True)
    ap.add_argument("--sync", choices=("flush", "wrnosync", "none"), required=True)
    ap.add_argument("--log", choices=("file", "memory"), required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--records", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--coroutines", type=int, default=1)
    ap.add_argument("--index", type=int, default=0)
    a = ap.parse_args(argv)
    _die_with_parent()
    try:
        asyncio.run(_worker_main(a))
    except KeyboardInterrupt:
        return 130
    except Exception as err:
        print(json.dumps({"ok": False, "error": f"{type(err).__name__}: {err}"}), flush=True)
        return 1
    return 0


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a worker whose parent is SIGKILLed must not keep putting records."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Workspace:
    """Everything a run creates, so that all of it can be removed at the end."""

    root: str
    homes: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    counter: int = 0

    def path(self, prefix: str) -> str:
        # Made on first use: cleanup() removes the root, and the workspace may be reused.
        os.makedirs(self.root, exist_ok=True)
        self.counter += 1
        return os.path.join(self.root, f"{prefix}{self.counter}")

    def new_home(self) -> str:
        home = self.path("home-")
        os.mkdir(home)
        self.homes.append(home)
        return home

    def drop_home(self, home: str) -> list[str]:
        """Remove a home's regions, then the home with its log files (``Env.remove`` leaves
        log files, as DB_ENV->remove does). Returns problems seen."""
        problems: list[str] = []
        try:
            asyncio.run(Env.remove(home, force=True))
        except Exception as err:
            problems.append(f"Env.remove({home}, force=True): {err!r}")
        shutil.rmtree(home, ignore_errors=True)
        if os.path.exists(home):
            problems.append(f"could not delete {home}")
        if home in self.homes:
            self.homes.remove(home)
        return problems

    def kill_procs(self) -> list[str]:
        problems: list[str] = []
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                problems.append(f"worker {p.pid} did not exit")
        self.procs.clear()
        return problems

    def cleanup(self) -> list[str]:
        """Kill the workers, remove every environment and the whole work directory."""
        problems = self.kill_procs()
        for home in list(self.homes):
            problems += self.drop_home(home)
        shutil.rmtree(self.root, ignore_errors=True)
        if os.path.exists(self.root):
            problems.append(f"could not delete {self.root}")
        return problems


def _readline(proc: subprocess.Popen[bytes], buf: bytearray, deadline: float) -> str:
    """One line of a worker's stdout, waiting at most until ``deadline`` (monotonic)."""
    import select

    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"worker {proc.pid} did not answer in time")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"worker {proc.pid} exited early (output: {bytes(buf)!r})")
            buf += chunk
    i = buf.index(b"\n")
    line = bytes(buf[:i]).decode()
    del buf[: i + 1]
    return line


def run_aiodbenv(
    ws: Workspace, case: Case, sz: Sizes, size: int, coroutines: int = 1
) -> dict[str, Any]:
    """aiodbenv's side of ``case``: P fresh writer processes joining one environment.

    Returns records/s (total, over the wall time from the start to the last result), per
    process figures and the log statistics' deltas (records, fsyncs, commits per flush)."""
    require_log()
    home = ws.new_home()
    problems: list[str] = []
    procs: list[subprocess.Popen[bytes]] = []
    errs: list[Any] = []
    try:
        s0_create = asyncio.run(_prepare(home, case))
        for i in range(case.procs):
            err = open(ws.path("worker-stderr-"), "w+b")
            errs.append(err)
            p = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "_worker",
                    "--home",
                    home,
                    "--sync",
                    case.sync,
                    "--log",
                    case.log,
                    "--size",
                    str(size),
                    "--records",
                    str(sz.records),
                    "--seconds",
                    str(sz.seconds),
                    "--warmup",
                    str(case.warmup),
                    "--coroutines",
                    str(coroutines),
                    "--index",
                    str(i),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                close_fds=True,
            )
            ws.procs.append(p)
            procs.append(p)
        bufs = [bytearray() for _ in procs]
        try:
            deadline = time.monotonic() + 120
            for p, b in zip(procs, bufs, strict=True):
                line = _readline(p, b, deadline)
                if line != "ready":
                    raise RuntimeError(f"worker {p.pid} said {line!r}, not ready")
            s0 = asyncio.run(_stat_of(home, case))
            t0 = time.monotonic()
            for p in procs:
                assert p.stdin is not None
                p.stdin.write(b"g")
                p.stdin.flush()
            results = []
            deadline = time.monotonic() + sz.seconds + 120
            for p, b in zip(procs, bufs, strict=True):
                out = json.loads(_readline(p, b, deadline))
                if not out.get("ok"):
                    raise RuntimeError(f"worker {p.pid}: {out.get('error')}")
                results.append(out)
            wall = time.monotonic() - t0
            for p in procs:
                p.wait(timeout=60)
                if p.returncode != 0:
                    raise RuntimeError(f"worker {p.pid} exited with {p.returncode}")
        except Exception as exc:
            tails = []
            for e in errs:
                e.seek(0)
                tails.append(e.read()[-1500:].decode(errors="replace").strip())
            detail = " | ".join(t for t in tails if t)
            raise RuntimeError(f"{exc}{' -- worker stderr: ' + detail if detail else ''}") from exc
        s1 = asyncio.run(_stat_of(home, case))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            if p in ws.procs:
                ws.procs.remove(p)
        for e in errs:
            e.close()
            os.unlink(e.name)
        problems += ws.drop_home(home)
    total = sum(r["records"] for r in results)
    rates = [r["records"] / r["seconds"] for r in results if r["seconds"] > 0]

    def delta(*names: str) -> Any:
        a, b = _pick(s1, *names), _pick(s0, *names)
        return a - b if isinstance(a, int) and isinstance(b, int) else None

    fsyncs = delta("fsyncs", "st_scount", "syncs", "scount")
    # aiodbenv counts a header record per log file started (Berkeley DB does not), so the
    # statistics' records may exceed the writers' by the files switched to.
    stat_records = delta("records", "st_record")
    switches = delta("switches")
    return {
        "ok": True,
        "side": "aiodbenv",
        "case": case.key,
        "procs": case.procs,
        "coroutines": coroutines,
        "record_bytes": size,
        "records": total,
        "wall_seconds": wall,
        "records_per_sec": total / wall if wall > 0 else 0.0,
        "per_proc_records_per_sec": rates,
        "stat_records": stat_records,
        "stat_switches": switches,
        "fsyncs": 0 if case.log == "memory" else fsyncs,
        "records_per_fsync": (stat_records or total) / fsyncs
        if fsyncs and case.log != "memory"
        else None,
        "max_commits_per_flush": _pick(
            s1, "max_commits_per_flush", "maxcommitperflush", "st_maxcommitperflush"
        ),
        "min_commits_per_flush": _pick(
            s1, "min_commits_per_flush", "mincommitperflush", "st_mincommitperflush"
        ),
        "stat_after_create": s0_create,
        "stat_before": s0,
        "stat_after": s1,
        "problems": problems,
    }


# -------------------------------------------------------------------------- anchor side


def anchor_args(case: Case, sz: Sizes, size: int) -> list[str]:
    """bdb_log's arguments for ``case`` (the same bounds and warm-up as aiodbenv's side)."""
    return [
        "put",
        "--sync",
        case.sync,
        "--log",
        case.log,
        "--size",
        str(size),
        "--procs",
        str(case.procs),
        "--records",
        str(sz.records),
        "--seconds",
        str(sz.seconds),
        "--warmup",
        str(case.warmup),
    ]


def run_anchor(ws: Workspace, case: Case, sz: Sizes, size: int) -> dict[str, Any]:
    """Berkeley DB's side of ``case`` (benchmarks/anchors/bdb_log.c), in ``ws``."""
    args = anchor_args(case, sz, size)
    r = anchors_build.run_anchor(
        [*args, "--dir", ws.path("anchor-")], timeout=sz.seconds + 300, harness="log"
    )
    bad = anchors_build.log_problems(args, r)
    if bad:
        raise RuntimeError(f"anchor {case.key}: {'; '.join(bad)}")
    r["side"] = "bdb"
    r["case"] = case.key
    r["per_proc_records_per_sec"] = [p["records_per_sec"] for p in r["per_proc"]]
    r["max_commits_per_flush"] = r["stat"]["st_maxcommitperflush"]
    r["min_commits_per_flush"] = r["stat"]["st_mincommitperflush"]
    if case.log == "memory":
        r["records_per_fsync"] = None
    return r


# ------------------------------------------------------------------------------ results


@dataclass
class Row:
    case: Case
    a: dict[int, dict[str, Any]] = field(default_factory=dict)  # rep -> aiodbenv result
    b: dict[int, dict[str, Any]] = field(default_factory=dict)  # rep -> anchor result
    note: str = ""

    def rates(self, side: str) -> list[float]:
        d = self.a if side == "a" else self.b
        return [d[r]["records_per_sec"] for r in sorted(d)]

    def time_ratios(self) -> list[float]:
        """Per repetition, aiodbenv's time per record over Berkeley DB's."""
        return [
            self.b[r]["records_per_sec"] / self.a[r]["records_per_sec"]
            for r in sorted(set(self.a) & set(self.b))
            if self.a[r]["records_per_sec"] > 0
        ]

    def aim_met(self) -> str:
        aim = self.case.aim
        if not aim:
            return ""
        if aim.startswith("time"):
            rs = self.time_ratios()
            if not rs:
                return "?"
            bound = 1.2 if aim == "time<=1.2" else 1.0
            return "yes" if statistics.median(rs) <= bound else "no"
        per_proc = [v for r in sorted(self.a) for v in self.a[r]["per_proc_records_per_sec"]]
        if not per_proc:
            return "?"
        return "yes" if statistics.median(per_proc) >= NOSYNC_AIM else "no"


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    av = abs(v)
    if av >= 1e6:
        return f"{v / 1e6:.2f}M"
    if av >= 10_000:
        return f"{v / 1e3:.0f}k"
    if av >= 100:
        return f"{v:,.0f}"
    if av >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _span(vals: list[float]) -> str:
    if not vals:
        return "-"
    med = _fmt(statistics.median(vals))
    return med if len(vals) == 1 else f"{med} ({_fmt(min(vals))}-{_fmt(max(vals))})"


def _per_fsync(d: dict[int, dict[str, Any]]) -> str:
    vals = [d[r]["records_per_fsync"] for r in sorted(d) if d[r].get("records_per_fsync")]
    return _fmt(statistics.median(vals)) if vals else "-"


def render(rows: list[Row]) -> str:
    """The table: medians (ranges) per side, the time ratio, records per fsync, the aims."""
    head = [
        "case",
        "measurement",
        "aiodbenv rec/s",
        "BDB rec/s",
        "time aiodbenv/BDB",
        "rec/fsync a | b",
        "aim",
        "met",
    ]
    body = []
    for row in rows:
        rs = row.time_ratios()
        ratio = "-"
        if rs:
            ratio = f"{statistics.median(rs):.2f}"
            if len(rs) > 1:
                ratio += f" ({min(rs):.2f}-{max(rs):.2f})"
        a = _span(row.rates("a")) if row.a else (row.note or "-")
        body.append(
            [
                row.case.key,
                row.case.label,
                a,
                _span(row.rates("b")) if row.b else "-",
                ratio,
                f"{_per_fsync(row.a)} | {_per_fsync(row.b)}",
                AIM_TEXT[row.case.aim],
                row.aim_met() if row.a else "",
            ]
        )
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths, strict=True))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


LEGEND = (
    "rec/s: records per second over all the case's processes (median and range over "
    "repetitions). time aiodbenv/BDB: per repetition, BDB's records/s over aiodbenv's (above 1: "
    "aiodbenv takes longer per record); median and range. rec/fsync: records per fsync from "
    "each side's log statistics (group commit shows as more than 1). Compare only figures from "
    "the same run: this machine is shared and noisy."
)


# --------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_worker":
        return worker(argv[1:])
    ap = argparse.ArgumentParser(prog="log_bench.py", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions, 1 s per run")
    ap.add_argument("--tiny", action="store_true", help="1 repetition, 0.2 s per run")
    ap.add_argument("--reps", type=int, help="repetitions (default 5; --quick 3; --tiny 1)")
    ap.add_argument("--seconds", type=float, help="time bound per run and process")
    ap.add_argument("--records", type=int, help="record bound per run and process")
    ap.add_argument("--size", type=int, default=100, help="record bytes (default 100)")
    ap.add_argument("--procs", type=int, default=8, help="processes in the group-commit case")
    ap.add_argument("--coroutines", type=int, default=1, help="putting coroutines per process")
    ap.add_argument("--only", default="", help="comma-separated case keys (default: all of them)")
    ap.add_argument("--anchor-only", action="store_true", help="measure Berkeley DB alone")
    ap.add_argument("--json", default=None, help="also write every result as JSON here")
    ap.add_argument("--dir", default=None, help="parent of the work directory (default TMPDIR)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    a = ap.parse_args(argv)
    if a.size < 1 or a.procs < 2 or a.coroutines < 1:
        ap.error("--size must be >= 1, --procs >= 2, --coroutines >= 1")
    sz = TINY if a.tiny else QUICK if a.quick else FULL
    sz = Sizes(
        reps=a.reps or sz.reps,
        seconds=a.seconds if a.seconds is not None else sz.seconds,
        records=a.records or sz.records,
    )
    all_cases = cases(a.procs)
    only = {k.strip() for k in a.only.split(",") if k.strip()}
    unknown = only - {c.key for c in all_cases}
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)} (known: {[c.key for c in all_cases]})")
    chosen = [c for c in all_cases if not only or c.key in only]
    if not a.anchor_only:
        try:
            require_log()
        except NoLog as err:
            print(f"log_bench: {err}", file=sys.stderr)
            return 2

    def log(msg: str) -> None:
        if not a.quiet:
            print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    load_start = os.getloadavg()
    print(
        f"log_bench: {sz.reps} repetitions, {sz.seconds} s or {sz.records} records per run and "
        f"process, {a.size}-byte records, {a.coroutines} coroutine(s) per process; "
        f"load average {load_start}"
    )
    sys.stdout.flush()
    status = 0
    rows = [Row(c) for c in chosen]
    problems: list[str] = []
    ws = Workspace(tempfile.mkdtemp(prefix="aiodbenv-logbench-", dir=a.dir))
    try:
        log("building the Berkeley DB 5.3 log anchor")
        try:
            anchors_build.build(harness="log")
            bdb_ok = True
        except (anchors_build.AnchorError, OSError, subprocess.SubprocessError) as err:
            bdb_ok = False
            problems.append(f"Berkeley DB anchor unavailable: {err}")
            if a.anchor_only:
                raise
        for rep in range(sz.reps):
            for row in rows:
                c = row.case
                steps: list[tuple[str, Callable[[], dict[str, Any]]]] = []
                if not a.anchor_only:
                    steps.append(("a", partial(run_aiodbenv, ws, c, sz, a.size, a.coroutines)))
                if bdb_ok:
                    steps.append(("b", partial(run_anchor, ws, c, sz, a.size)))
                if rep % 2:
                    steps.reverse()
                for side, step in steps:
                    try:
                        r = step()
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except Exception as err:
                        msg = f"rep {rep + 1} {c.key} {side}: {err}"
                        problems.append(msg + "\n" + traceback.format_exc(limit=4))
                        log("PROBLEM: " + msg)
                        if side == "a":
                            status = 1
                        continue
                    problems += r.pop("problems", [])
                    (row.a if side == "a" else row.b)[rep] = r
                    log(
                        f"rep {rep + 1} {c.key} {'aiodbenv' if side == 'a' else 'BDB'}: "
                        f"{r['records_per_sec']:,.0f} rec/s, {r['records']} records, "
                        f"rec/fsync {r.get('records_per_fsync')}"
                    )
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        status = 130
    except Exception:
        traceback.print_exc()
        status = status or 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            problems += ws.cleanup()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    load_end = os.getloadavg()
    print()
    print(render(rows))
    print()
    print(LEGEND)
    print(f"load average at the start {load_start}, at the end {load_end}")
    if problems:
        print("\nproblems seen:")
        for p in problems:
            print("  - " + p.rstrip().replace("\n", "\n    "))
    if a.json:
        out = {
            "sizes": dataclasses.asdict(sz),
            "record_bytes": a.size,
            "coroutines": a.coroutines,
            "anchor_only": a.anchor_only,
            "status": status,
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "rows": [
                {
                    "case": dataclasses.asdict(r.case),
                    "aiodbenv_records_per_sec": r.rates("a"),
                    "bdb_records_per_sec": r.rates("b"),
                    "time_ratio_by_rep": r.time_ratios(),
                    "aim_met": r.aim_met() if r.a else None,
                    "aiodbenv": r.a,
                    "bdb": r.b,
                }
                for r in rows
            ],
            "problems": problems,
        }
        with open(a.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, default=str)
    return status


if __name__ == "__main__":
    sys.exit(main())
