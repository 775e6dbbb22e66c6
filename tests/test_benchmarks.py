"""The benchmark suite runs end to end (no figure is checked: benchmarks are not assertions).

``python -m benchmarks --quick --tiny`` runs every workload once at tiny sizes, with whatever
anchors it can install or build (Berkeley DB 5.3 via apt-get when root, lmdb and berkeleydb via
pip); anchors it cannot get must show up as "unavailable: <reason>" rows, not as a failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.log_bench import NO_LOG, has_log

from .conftest import REPO

WORKLOADS = ("hot", "miss", "hitratio", "writeback", "lateness", "memory", "log")
ANCHORS = ("bdb", "lmdb", "berkeleydb", "dd", "drop_caches")
CLEANUP_WORDS = ("could not", "left", "grew", "leftover", "did not exit")


def run_bench(
    tmp_path: Path, *extra: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--tiny",
            "--quiet",
            "--json",
            str(out),
            "--dir",
            str(work),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert os.listdir(work) == [], f"the run left files behind: {os.listdir(work)}"
    data: dict[str, Any] = json.loads(out.read_text())
    return proc, data


def check_common(proc: subprocess.CompletedProcess[str], data: dict[str, Any]) -> None:
    table = [ln for ln in proc.stdout.splitlines() if ln.split(" ", 1)[0] in WORKLOADS]
    for w in WORKLOADS:
        assert any(ln.startswith(w + " ") for ln in table), f"no table row for {w}"
    for key in (
        "mode",
        "machine",
        "sizes",
        "elapsed_s",
        "status",
        "loadavg_start",
        "loadavg_end",
        "workloads",
        "anchors",
        "rows",
        "problems",
    ):
        assert key in data, key
    assert data["mode"] == "tiny" and data["status"] == 0
    assert list(data["workloads"]) == list(WORKLOADS)
    assert set(data["anchors"]) == set(ANCHORS)
    for name, av in data["anchors"].items():
        assert isinstance(av["available"], bool)
        assert av["available"] or av["reason"], f"{name} unavailable without a reason"
    for row in data["rows"]:
        for key in (
            "workload",
            "key",
            "label",
            "unit",
            "anchor",
            "note",
            "aiodbenv",
            "anchor_values",
            "aiodbenv_by_rep",
            "anchor_by_rep",
            "ratio_by_rep",
            "ratio_median",
        ):
            assert key in row, (key, row)
    # Every workload measured aiodbenv at least once (the log once aiodbenv has one; until
    # then its rows say so).
    for w in WORKLOADS:
        if w == "log" and not has_log():
            rows = [r for r in data["rows"] if r["workload"] == "log"]
            assert rows and all(f"aiodbenv side: {NO_LOG}" in r["note"] for r in rows), rows
            assert not any(r["aiodbenv"] for r in rows), rows
            continue
        assert any(r["workload"] == w and r["aiodbenv"] for r in data["rows"]), w
    # An anchor that is not there says so in its rows.
    for row in data["rows"]:
        kind = row["anchor_kind"]
        if kind in data["anchors"] and not data["anchors"][kind]["available"]:
            assert row["note"].startswith(("unavailable:", "skipped:")), row
            assert not row["anchor_values"], row
    leftovers = [p for p in data["problems"] if any(w in p for w in CLEANUP_WORDS)]
    assert not leftovers, leftovers


def test_quick_tiny_runs_every_workload_with_its_anchors(tmp_path: Path) -> None:
    proc, data = run_bench(tmp_path)
    check_common(proc, data)
    # Anchors that are available produced values.
    for row in data["rows"]:
        kind = row["anchor_kind"]
        if kind in data["anchors"] and data["anchors"][kind]["available"]:
            if row["note"].startswith("skipped:"):
                continue  # the cold misses need to drop the OS cache
            assert row["anchor_values"], f"{kind} is available but {row['key']} has no value"
    assert any(r["key"] == "hit/zipf/lru" and r["anchor_values"] for r in data["rows"])


def test_without_anchors_rows_say_unavailable(tmp_path: Path) -> None:
    proc, data = run_bench(tmp_path, "--no-install", "--without", ",".join(ANCHORS))
    check_common(proc, data)
    assert not any(av["available"] for av in data["anchors"].values())
    assert "unavailable: disabled with --without bdb" in proc.stdout
    notes = {r["key"]: r["note"] for r in data["rows"]}
    assert notes["hot/file/random/asyncio"].startswith("unavailable:")
    assert notes["cold/1"].startswith("skipped:")


def test_flush_floor_measures_the_c_hand_off_and_aiodbenv(tmp_path: Path) -> None:
    """benchmarks/flush_floor.py builds its C program and library and prints the five rows
    (seven with uvloop installed), each with a positive time and its ratio to the synchronous
    flush, and leaves nothing behind."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "benchmarks/flush_floor.py", "0.3"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()}
    want = {"sync", "handoff", "empty", "asyncio", "aiodbenv"}
    if importlib.util.find_spec("uvloop") is not None:
        want |= {"uvloop", "aiodbenv-uvloop"}
    assert set(rows) == want, proc.stdout
    for cols in rows.values():
        assert float(cols[1]) > 0 and cols[2] == "us/record", cols
    assert rows["sync"][4] == "1.00", rows["sync"]
    assert list(tmp_path.iterdir()) == []
