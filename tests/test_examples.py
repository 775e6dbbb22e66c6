"""The examples run: a web backend of two worker processes sharing one environment, and a
checkpoint worker beside it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from aiodbenv.region.remove import remove_environment

from .conftest import REPO

pytest.importorskip("starlette", reason="the example needs starlette (in the test extra)")
pytest.importorskip("uvicorn", reason="the example needs uvicorn (in the test extra)")
pytest.importorskip("prometheus_client", reason="the example needs it (in the test extra)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(port: int, path: str, method: str = "GET") -> dict[str, object]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())  # type: ignore[no-any-return]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics: every sample, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_web_backend_with_two_workers_and_a_checkpoint_worker(home: str) -> None:
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "examples/web_backend.py",
            "--home",
            home,
            "--workers",
            "2",
            "--port",
            str(port),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    checkpointer = None
    try:
        deadline = time.monotonic() + 30
        while True:  # wait until both workers serve
            try:
                if call(port, "/stats")["handles"] == 2:
                    break
            except OSError:
                pass
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        checkpointer = subprocess.Popen(
            [sys.executable, "examples/checkpoint_worker.py", "--home", home, "--interval", "0.5"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        with ThreadPoolExecutor(8) as pool:
            bumps = list(pool.map(lambda _: call(port, "/counter/5", "POST"), range(100)))
            reads = list(pool.map(lambda _: call(port, "/counter/5"), range(40)))
        assert sorted(b["value"] for b in bumps) == list(range(1, 101))  # no lost update
        assert {r["value"] for r in reads} == {100}
        pids = {b["pid"] for b in bumps} | {r["pid"] for r in reads}
        assert len(pids) == 2, "both worker processes served requests"

        st = call(port, "/stats")
        counters = st["files"]["counters.db"]  # type: ignore[index]
        # Page 5 was made once and then found in the shared cache by both processes.
        assert counters["page_in"] == 0 and counters["misses"] == 1
        assert counters["hits"] >= 139

        # /metrics, from whichever worker answers, counts both workers' pins: all 140 requests.
        counters_db = os.path.join(home, "counters.db")
        for _ in range(4):
            samples = scrape(port)
            hits = samples[("aiodbenv_file_cache_hits_total", (("file", counters_db),))]
            assert hits >= 139
            assert samples[("aiodbenv_cache_hits_total", ())] >= 139
            assert samples[("aiodbenv_handles", ())] >= 2
            assert samples[("aiodbenv_file_pinned_pages", (("file", counters_db),))] == 0

        # The page is clean once its write is issued; the checkpoint is recorded only after
        # the write and the fsync complete, so wait for both (a loaded machine shows the gap).
        deadline = time.monotonic() + 20
        while (st := call(port, "/stats"))["page_dirty"] or st["last_checkpoint"] is None:
            assert time.monotonic() < deadline, "the checkpoint worker never checkpointed"
            time.sleep(0.1)
        with open(os.path.join(home, "counters.db"), "rb") as raw:
            raw.seek(5 * 4096)
            assert int.from_bytes(raw.read(8), "little") == 100
    finally:
        for proc in (checkpointer, server):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in (checkpointer, server):
            if proc is not None:
                try:
                    proc.communicate(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                codes.append(proc.returncode)
    assert codes == [0, 0]
    remove_environment(home, force=False)  # every handle closed cleanly: no force needed
    for name in ("counters.db", "counters.lock"):
        os.remove(os.path.join(home, name))
