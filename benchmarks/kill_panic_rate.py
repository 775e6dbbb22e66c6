"""How often a SIGKILL of a transaction worker panics the whole environment.

A worker process runs 8 coroutines of 3-page ``sync`` transactions (a few hundred bytes
changed per page); it is killed at a random moment; a fresh handle then reaps it and checks
for a panic (after which every process would need recovery). A worker killed inside a commit
has that commit finished from the log, or aborted, by the reaper (aiodbenv/txn/reapply.py):
0 of 30 panicked at git 1a00f6e (13 of 30 when every such death panicked the environment).
Written by the adversarial campaign of stop 23::

    .venv/bin/python benchmarks/kill_panic_rate.py HOME ROUNDS [LOG_BUFFER_BYTES]
"""

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys

import aiodbenv

WORKER = r"""
import asyncio, random, sys, aiodbenv
async def main():
    env = await aiodbenv.Env.open(sys.argv[1], log=True)
    f = await env.pool.open_file("a.db", page_size=4096, lsn_offset=0)
    async def loop(i):
        r = random.Random(i)
        while True:
            async with env.txn(durability="sync") as tx:
                for pg in sorted(r.sample(range(24), 3)):
                    p = await tx.page(f, pg)
                    for ch in r.sample(range(1, 63), 20):
                        p.data[ch * 64] = (p.data[ch * 64] + 1) & 255
    print("ready", flush=True)
    await asyncio.gather(*(loop(i) for i in range(8)))
asyncio.run(main())
"""


async def make(home, bsize):
    async with aiodbenv.Env.open(
        home, create=True, log=True, recover=True, log_buffer_size=bsize
    ) as env:
        f = await env.pool.open_file("a.db", create=True, page_size=4096, lsn_offset=0)
        for pg in range(24):
            async with env.txn() as tx:
                (await tx.page(f, pg, create=True)).data[100] = 1
        await f.close()


async def main():
    home, rounds = sys.argv[1], int(sys.argv[2])
    bsize = int(sys.argv[3]) if len(sys.argv) > 3 else None
    shutil.rmtree(home, ignore_errors=True)
    os.makedirs(home)
    await make(home, bsize)
    rng = random.Random(1)
    panics = 0
    for _ in range(rounds):
        w = subprocess.Popen([sys.executable, "-c", WORKER, home], stdout=subprocess.PIPE)
        w.stdout.readline()
        await asyncio.sleep(0.3 + rng.random())
        w.send_signal(signal.SIGKILL)
        w.wait()
        try:
            async with aiodbenv.Env.open(home, log=True) as env:
                env.pool.reap()
                env.stat()
        except aiodbenv.RunRecovery:
            panics += 1
            await aiodbenv.Env.remove(home, force=True)
            await make(home, bsize)
    print(
        f"log buffer {bsize or 'default'}: {panics} of {rounds} SIGKILLs panicked the environment"
    )
    await aiodbenv.Env.remove(home, force=True)
    shutil.rmtree(home)


asyncio.run(main())
