"""Prometheus metrics: the CLI's text, the prometheus_client collector, and that any one
process reports the whole environment."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

import aiodbenv
import aiodbenv.metrics

from .conftest import REPO, spawn

prometheus_client = pytest.importorskip("prometheus_client", reason="in the test extra")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# Reads pages 0..9 of m.db three times (10 misses, 20 hits), pins page 4 and holds it,
# prints READY, and waits for a line on stdin.
CHILD = """
import asyncio, sys
import aiodbenv

async def main(home):
    async with aiodbenv.Env.open(home) as env:
        async with env.pool.open_file("m.db") as f:
            for _ in range(3):
                for p in range(10):
                    async with f.get(p):
                        pass
            async with f.get(4):
                print("READY", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

asyncio.run(main(sys.argv[1]))
"""


def parse(text: str) -> tuple[list[object], Samples]:
    families = list(text_string_to_metric_families(text))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for fam in families for s in fam.samples
    }
    return families, samples


def check_conventions(text: str) -> None:
    families, _ = parse(text)
    assert len(families) > 40
    helps = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}
    types = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    for fam in families:
        name = fam.name  # type: ignore[attr-defined]
        assert name.startswith("aiodbenv_"), name
        assert fam.documentation, name  # type: ignore[attr-defined]
        kind = fam.type  # type: ignore[attr-defined]
        assert kind in ("counter", "gauge"), (name, kind)
        written = name + "_total" if kind == "counter" else name
        assert written in helps and written in types, name
        for s in fam.samples:  # type: ignore[attr-defined]
            assert s.name.endswith("_total") == (kind == "counter"), s.name


async def test_cli_metrics_parse_and_count_another_process(
    home: str, procs: list[subprocess.Popen[str]]
) -> None:
    with open(os.path.join(home, "m.db"), "wb") as raw:
        raw.write(bytes(10 * 4096))
    env = await aiodbenv.Env.open(home, create=True)
    try:
        child = spawn(CHILD, home)
        procs.append(child)
        assert child.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 60)
        assert line.strip() == "READY"
        # A third process, the CLI, reports what the child did: the counts are shared.
        r = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "aiodbenv", "metrics", "-h", home],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert r.returncode == 0, r.stderr
        check_conventions(r.stdout)
        _, s = parse(r.stdout)
        path = (("file", os.path.join(home, "m.db")),)
        assert s[("aiodbenv_file_cache_misses_total", path)] == 10
        assert s[("aiodbenv_file_cache_hits_total", path)] == 21
        assert s[("aiodbenv_file_pages_read_total", path)] == 10
        assert s[("aiodbenv_file_pinned_pages", path)] == 1
        assert s[("aiodbenv_pinned_pages", ())] == 1
        assert 0 <= s[("aiodbenv_oldest_pin_age_seconds", ())] < 120
        assert s[("aiodbenv_cache_hits_total", ())] == 21
        assert s[("aiodbenv_handles", ())] == 3  # this test, the child, the CLI
        assert s[("aiodbenv_healthy", ())] == 1 and s[("aiodbenv_panicked", ())] == 0
        assert s[("aiodbenv_worker_failures_total", (("kind", "checkpoint"),))] == 0
        assert ("aiodbenv_last_checkpoint_timestamp_seconds", ()) not in s  # none yet

        # This process's collector sees the same environment.
        registry = prometheus_client.CollectorRegistry()
        registry.register(aiodbenv.metrics.Collector(env))
        text = prometheus_client.generate_latest(registry).decode()
        check_conventions(text)
        _, mine = parse(text)
        assert mine[("aiodbenv_file_cache_hits_total", path)] == 21
        assert mine[("aiodbenv_file_pinned_pages", path)] == 1
        # prometheus_client's rendering and aiodbenv's own give the same series.
        _, own = parse(aiodbenv.metrics.generate(env))
        assert own.keys() == mine.keys()
        stable = [
            k for k in own if "lock" not in k[0] and "mutex" not in k[0] and "age" not in k[0]
        ]
        assert {k: own[k] for k in stable} == {k: mine[k] for k in stable}

        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
        await env.checkpoint()
        _, after = parse(aiodbenv.metrics.generate(env))
        assert ("aiodbenv_oldest_pin_age_seconds", ()) not in after  # nothing pinned now
        assert after[("aiodbenv_pinned_pages", ())] == 0
        assert after[("aiodbenv_last_checkpoint_timestamp_seconds", ())] > 1e9
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        await env.close()
        await aiodbenv.Env.remove(home)


async def test_label_values_are_escaped_and_temporary_files_summed(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True) as env:
        odd = 'we"ird\\name\nx.db'
        async with env.pool.open_file(odd, create=True) as f:
            async with f.get(0, create=True):
                pass
            t1 = await env.pool.open_file(None)
            t2 = await env.pool.open_file(None)
            for t in (t1, t2):
                async with t.get(0, create=True):
                    pass
            _, s = parse(aiodbenv.metrics.generate(env))
            assert s[("aiodbenv_file_pages_created_total", (("file", env.resolve(odd)),))] == 1
            assert s[("aiodbenv_file_pages_created_total", (("file", "(temporary)"),))] == 2
            await t1.close()
            await t2.close()
        os.remove(env.resolve(odd))
    await aiodbenv.Env.remove(home, force=True)  # the created page is dirty: discard it


async def test_collector_of_a_closed_environment_yields_nothing(home: str) -> None:
    env = await aiodbenv.Env.open(home, create=True)
    collector = aiodbenv.metrics.Collector(env)
    assert list(collector.collect())
    await env.close()
    assert list(collector.collect()) == []
    await aiodbenv.Env.remove(home)
