"""A ``nosync`` transaction's CPU time by phase, for one or more trees side by side: the
begin (``env.txn()``), taking the page (``await tx.page``), the 100-byte change, and the
commit, each timed with ``time.thread_time`` (the event loop thread's CPU: preemption on a
loaded machine does not count, other processes' cache pollution still does). One child
process per tree and repetition, trees interleaved; medians per phase.

    .venv/bin/python benchmarks/txn_cpu.py [commits] [reps] /path/to/tree [/path/to/tree ...]

Each tree is imported through PYTHONPATH (build its accelerator first). Seconds per tree.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

CHILD = """
import asyncio, shutil, sys, tempfile, time
import aiodbenv

async def main(n):
    home = tempfile.mkdtemp(prefix="aiodbenv-txncpu-")
    env = await aiodbenv.Env.open(home, create=True, log=True, log_buffer_size=16 << 20)
    try:
        f = await env.pool.open_file("data.db", create=True, page_size=4096, lsn_offset=0)
        tc = time.thread_time
        for _ in range(2):  # the first pass warms up
            tot = [0.0] * 4
            for i in range(n):
                t0 = tc()
                tx = env.txn(durability="nosync")
                t1 = tc()
                p = await tx.page(f, 0, create=True)
                t2 = tc()
                p.data[64 + i % 64 : 164 + i % 64] = b"y" * 100 if i % 2 else bytes(100)
                t3 = tc()
                await tx.commit()
                t4 = tc()
                for k, d in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    tot[k] += d
        print(" ".join(f"{t / n * 1e6:.2f}" for t in tot))
        await f.close()
    finally:
        await env.close(nosync=True)
        await aiodbenv.Env.remove(home, force=True)
        shutil.rmtree(home, ignore_errors=True)

asyncio.run(main(int(sys.argv[1])))
"""

PHASES = ("begin", "page", "change", "commit")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    trees = sys.argv[3:] or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    got: dict[str, list[list[float]]] = {t: [] for t in trees}
    for _ in range(reps):
        for tree in trees:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(n)],
                env={**os.environ, "PYTHONPATH": tree},
                cwd="/",
                capture_output=True,
                text=True,
                check=True,
                timeout=600,
            ).stdout
            got[tree].append([float(x) for x in out.split()])
    print(f"us of event loop thread CPU per nosync commit, median of {reps} (a loaded machine)")
    print(f"{'tree':40s} " + " ".join(f"{p:>7s}" for p in PHASES) + "   total")
    for tree, rows in got.items():
        med = [statistics.median(r[k] for r in rows) for k in range(len(PHASES))]
        print(f"{tree[-40:]:40s} " + " ".join(f"{m:7.1f}" for m in med) + f" {sum(med):7.1f}")


if __name__ == "__main__":
    main()
