"""A standalone checkpoint worker: joins an environment others created and keeps it clean.

    python examples/checkpoint_worker.py --home /tmp/web-env --interval 5 [--kbytes 1024]

It is what ``python -m aiodbenv checkpoint -h HOME -p MINUTES`` does, written out with the
library's API: join the environment, start a checkpoint worker, report each checkpoint, stop
cleanly on SIGTERM or Ctrl-C: the worker stops, then one final checkpoint writes every page
still dirty, so stopping the writers first and then this worker leaves everything on disk
(``Env.remove`` discards the cache, dirty pages included).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time

import aiodbenv


async def run(home: str, interval: float, kbytes: int | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with aiodbenv.Env.open(home) as env:  # join: the web backend created it
        worker = env.start_checkpoint(
            aiodbenv.CheckpointSettings(interval=interval, kbytes=kbytes, completion_target=0.5)
        )
        print(f"checkpointing {home} every {interval} s", flush=True)
        seen = 0
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            st = worker.status()
            if st.runs != seen:
                seen = st.runs
                ps = env.pool.stat()
                print(
                    f"{time.strftime('%H:%M:%S')} checkpoint {st.runs}: {st.pages} pages "
                    f"in {st.write_calls} writes so far; cache hits {ps.cache_hit}, "
                    f"misses {ps.cache_miss}",
                    flush=True,
                )
            if not st.healthy:
                print(f"checkpoint failing: {st.last_error}", file=sys.stderr, flush=True)
        # Leaving the block closes the handle: close() stops the worker and, because a
        # checkpoint worker ran, takes a final checkpoint. close(nosync=True) would skip it
        # and leave the pages dirtied since the last checkpoint to whoever checkpoints next.
    print("stopped after a final checkpoint", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between checkpoints")
    ap.add_argument("--kbytes", type=int, default=None, help="also after this many KiB dirtied")
    args = ap.parse_args()
    return asyncio.run(run(args.home, args.interval, args.kbytes))


if __name__ == "__main__":
    sys.exit(main())
