"""The log benchmark runs end to end (no figure is checked: benchmarks are not assertions).

benchmarks/anchors/bdb_log.c (Berkeley DB 5.3's log_put/log_flush) is built and run at tiny
sizes and checked against Berkeley DB's own statistics; benchmarks/log_bench.py runs its
aiodbenv side beside it once aiodbenv has a log, refuses clearly while it has none, and
removes everything it created, also when interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import log_bench as lb
from benchmarks.anchors import build as anchors_build

from .conftest import REPO

BENCH = [sys.executable, str(REPO / "benchmarks" / "log_bench.py")]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
}


@pytest.fixture(scope="module")
def log_anchor() -> Path:
    """The built bdb_log binary; the tests that need it skip, saying why, without it."""
    try:
        return anchors_build.build(harness="log")
    except anchors_build.AnchorError as err:
        pytest.skip(f"the Berkeley DB log anchor cannot be built here: {err}")


def _procs_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (a unique work directory)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(f"{pid}: {cmd}")
    return out


def test_anchor_runs_every_log_mode(log_anchor: Path, tmp_path: Path) -> None:
    """Every sync mode, the in-memory log and several processes: the records the writers
    put are the records Berkeley DB counted, flushed runs fsynced, and nothing is left."""
    for i, case in enumerate(anchors_build.LOG_CASES):
        work = tmp_path / f"w{i}"
        r = anchors_build.run_anchor([*case, "--dir", str(work)], timeout=120, harness="log")
        assert anchors_build.log_problems(case, r) == [], (case, r)
        assert not work.exists(), f"{case} left {sorted(os.listdir(work))}"
    # The checks can fail: a run whose statistics disagree with its writers is reported.
    r = anchors_build.run_anchor(
        ["put", "--sync", "flush", "--records", "5", "--dir", str(tmp_path / "x")],
        harness="log",
    )
    r["stat"]["st_record"] += 1
    r["fsyncs"] = 0
    bad = anchors_build.log_problems(["put", "--sync", "flush", "--records", "5"], r)
    assert any("log_stat counted" in b for b in bad) and any("fsyncs" in b for b in bad), bad


def test_anchor_refuses_bad_arguments(log_anchor: Path, tmp_path: Path) -> None:
    for args in (
        ["put", "--sync", "sometimes", "--records", "5"],
        ["put", "--sync", "none"],  # neither --records nor --seconds
        ["put", "--sync", "none", "--flush-call", "--records", "5"],
        ["put", "--log", "tape", "--records", "5"],
    ):
        r = anchors_build.run_anchor(
            [*args, "--dir", str(tmp_path / "bad")], check=False, harness="log"
        )
        assert r["ok"] is False and r["error"], (args, r)
        assert not (tmp_path / "bad").exists()


def test_anchor_interrupted_cleans_up(log_anchor: Path, tmp_path: Path) -> None:
    """SIGINT to the harness while 3 writers flush: it kills them, removes its directory
    (regions and log files) and says it was interrupted."""
    work = tmp_path / "interrupted"
    p = subprocess.Popen(
        [str(log_anchor), "put", "--sync", "flush", "--procs", "3", "--seconds", "60"]
        + ["--dir", str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (work.exists() and any(n.startswith("log.") for n in os.listdir(work))):
            assert time.monotonic() < deadline, "no log file appeared"
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, (out, err)
    assert json.loads(out.strip().splitlines()[-1]) == {
        "ok": False,
        "workload": "put",
        "error": "interrupted",
    }
    assert not work.exists()
    assert _procs_mentioning(str(work)) == []


def test_log_bench_refuses_an_aiodbenv_without_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without a log the run stops before creating anything and says why (whatever this
    aiodbenv has: ``has_log`` is what tells)."""
    monkeypatch.setattr(lb, "has_log", lambda: False)
    assert lb.main(["--tiny", "--quiet", "--dir", str(tmp_path)]) == 2
    assert f"log_bench: {lb.NO_LOG}" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    with pytest.raises(lb.NoLog, match=lb.NO_LOG):
        lb.run_aiodbenv(lb.Workspace(str(tmp_path / "ws")), lb.cases(2)[0], lb.TINY, 100)
    assert os.listdir(tmp_path) == []


def test_has_log_follows_env_open() -> None:
    import inspect

    from aiodbenv import Env

    assert lb.has_log() == ("log" in inspect.signature(Env.open).parameters)


def _run_bench(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Any]:
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "log.json"
    proc = subprocess.run(
        [*BENCH, "--tiny", "--quiet", "--procs", "3", "--json", str(out), "--dir", str(work)]
        + list(extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr}"
    assert os.listdir(work) == [], f"the run left files behind: {os.listdir(work)}"
    return proc, json.loads(out.read_text())


def test_log_bench_anchor_only(log_anchor: Path, tmp_path: Path) -> None:
    proc, data = _run_bench(tmp_path, "--anchor-only")
    keys = [r["case"]["key"] for r in data["rows"]]
    assert keys == ["flush/1", "flush/3", "wrnosync/1", "nosync/1", "memory/1"]
    for row in data["rows"]:
        assert len(row["bdb_records_per_sec"]) == 1 and row["bdb_records_per_sec"][0] > 0
        assert row["aiodbenv_records_per_sec"] == []
        assert row["case"]["key"] in proc.stdout
    flush3 = data["rows"][1]["bdb"]["0"]
    assert flush3["procs"] == 3 and flush3["fsyncs"] > 0
    assert data["problems"] == []


def test_log_bench_side_by_side(log_anchor: Path, tmp_path: Path) -> None:
    """aiodbenv's side beside the anchor, every case, with 2 coroutines per process."""
    assert lb.has_log(), "this aiodbenv has no log: log_bench has nothing to compare"
    _proc, data = _run_bench(tmp_path, "--coroutines", "2")
    for row in data["rows"]:
        key = row["case"]["key"]
        assert row["aiodbenv_records_per_sec"] and row["bdb_records_per_sec"], key
        (a,) = row["aiodbenv"].values()
        assert a["records"] > 0 and a["coroutines"] == 2, (key, a)
        if a["stat_records"] is not None:  # the log's statistics are exact across processes
            # ... and count a header record per log file started
            extra = a["stat_switches"] or 0
            assert a["records"] <= a["stat_records"] <= a["records"] + extra, (key, a)
        if row["case"]["sync"] == "flush":
            assert a["fsyncs"] and a["fsyncs"] > 0, (key, a)
        assert len(row["time_ratio_by_rep"]) == 1
    assert not [p for p in data["problems"] if "could not" in p or "did not exit" in p]


def test_log_bench_interrupted_cleans_up(log_anchor: Path, tmp_path: Path) -> None:
    """SIGINT to log_bench while a multi-process run is going: exit 130, nothing left (work
    directory, environments, log files, anchor or worker processes)."""
    work = tmp_path / "work"
    work.mkdir()
    args = ["--reps", "1", "--seconds", "60", "--procs", "3", "--only", "flush/3"]
    if not lb.has_log():
        args.append("--anchor-only")
    p = subprocess.Popen(
        [*BENCH, *args, "--dir", str(work)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 60
        while not _procs_mentioning(str(work)) or not any(
            name.startswith(("log.", "__db")) for _, _, names in os.walk(work) for name in names
        ):
            assert time.monotonic() < deadline, "the run did not start"
            assert p.poll() is None, p.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, (out, err)
    assert "interrupted: cleaning up" in err
    assert os.listdir(work) == []
    deadline = time.monotonic() + 10
    while _procs_mentioning(str(work)) and time.monotonic() < deadline:
        time.sleep(0.05)  # SIGKILLed children may take a moment to be reaped
    assert _procs_mentioning(str(work)) == []
