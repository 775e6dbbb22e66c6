"""A small async web backend whose worker processes share one aiodbenv cache.

Each uvicorn worker process joins the same environment at startup; a request pins a page of
``counters.db`` in the shared buffer pool, reads or changes it, and unpins it. A page one worker
changes is seen by the others at once, from the cache, without any disk write; the writes to
disk are left to a checkpoint worker running beside the server (examples/checkpoint_worker.py
or ``python -m aiodbenv checkpoint``).

Run it (and, in another shell, the checkpoint worker):

    python examples/web_backend.py --home /tmp/web-env --workers 2 --port 8000
    python examples/checkpoint_worker.py --home /tmp/web-env --interval 5

    curl -X POST localhost:8000/counter/3      # add one to counter 3
    curl localhost:8000/counter/3              # {"counter": 3, "value": 1, "pid": ...}
    curl localhost:8000/stats                  # hits and misses of the shared cache
    curl localhost:8000/metrics                # the same, for Prometheus

Counter n lives in page n. Changing it takes a cross-process lock on byte n of a lock file
(Berkeley DB would use its lock region) *after* pinning: the pin may wait for a read, but once
the lock is held, read-modify-write-unlock runs without an await, so coroutines of one process
never interleave inside it either.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import sys
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import aiodbenv
import aiodbenv.metrics

HOME_VAR = "AIODBENV_EXAMPLE_HOME"
COUNTERS = 64


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # Each worker process opens the environment itself: handles never cross a fork.
    home = os.environ[HOME_VAR]
    env = await aiodbenv.Env.open(home)
    f = await env.pool.open_file("counters.db", create=True)
    app.state.env, app.state.file = env, f
    # The counts live in the shared region: whichever worker answers /metrics reports the
    # whole environment, so a scrape that reaches any one of them sees every worker's work.
    app.state.registry = CollectorRegistry()
    app.state.registry.register(aiodbenv.metrics.Collector(env))
    app.state.lock_fd = os.open(os.path.join(home, "counters.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        yield
    finally:
        os.close(app.state.lock_fd)
        await f.close()
        await env.close()


async def _locked(fd: int, n: int) -> None:
    """Take the lock on byte n without blocking the loop (retry every half millisecond)."""
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, n)
            return
        except (BlockingIOError, PermissionError):
            await asyncio.sleep(0.0005)


def _counter(request: Request) -> int:
    n = int(request.path_params["n"])
    if not 0 <= n < COUNTERS:
        raise ValueError(n)
    return n


async def read_counter(request: Request) -> JSONResponse:
    try:
        n = _counter(request)
    except ValueError:
        return JSONResponse({"error": "no such counter"}, status_code=404)
    f: aiodbenv.PoolFile = request.app.state.file
    async with f.get(n, create=True) as page:
        value = int.from_bytes(page.data[0:8], "little")
    return JSONResponse({"counter": n, "value": value, "pid": os.getpid()})


async def bump_counter(request: Request) -> JSONResponse:
    try:
        n = _counter(request)
    except ValueError:
        return JSONResponse({"error": "no such counter"}, status_code=404)
    f: aiodbenv.PoolFile = request.app.state.file
    fd: int = request.app.state.lock_fd
    async with f.get(n, create=True) as page:
        await _locked(fd, n)
        # From here to the unlock there is no await: no other coroutine can interleave.
        value = int.from_bytes(page.data[0:8], "little") + 1
        page.data[0:8] = value.to_bytes(8, "little")
        page.mark_dirty()
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, n)
    return JSONResponse({"counter": n, "value": value, "pid": os.getpid()})


async def stats(request: Request) -> JSONResponse:
    env: aiodbenv.Env = request.app.state.env
    st = env.pool.stat()
    files = {
        f.file_name.rsplit("/", 1)[-1]: {
            "hits": f.cache_hit,
            "misses": f.cache_miss,
            "page_in": f.page_in,
            "page_out": f.page_out,
        }
        for f in st.files
        if f.file_name
    }
    return JSONResponse(
        {
            "pid": os.getpid(),
            "handles": env.stat().handles,
            "cache_hit": st.cache_hit,
            "cache_miss": st.cache_miss,
            "page_dirty": st.page_dirty,
            "files": files,
            "last_checkpoint": env.health().last_checkpoint,
        }
    )


async def metrics(request: Request) -> Response:
    registry: CollectorRegistry = request.app.state.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


app = Starlette(
    routes=[
        Route("/counter/{n:int}", read_counter, methods=["GET"]),
        Route("/counter/{n:int}", bump_counter, methods=["POST"]),
        Route("/stats", stats, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ],
    lifespan=lifespan,
)


async def _create(home: str) -> None:
    async with aiodbenv.Env.open(home, create=True, cache_size=8 << 20):
        pass  # the environment outlives this handle; workers join it


def main() -> int:
    import uvicorn

    ap = argparse.ArgumentParser(description="aiodbenv web backend example")
    ap.add_argument("--home", required=True, help="environment home (created if needed)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    os.makedirs(args.home, exist_ok=True)
    asyncio.run(_create(args.home))
    os.environ[HOME_VAR] = os.path.abspath(args.home)  # inherited by the worker processes
    uvicorn.run(
        "web_backend:app",
        host=args.host,
        port=args.port,
        workers=args.workers,
        app_dir=os.path.dirname(os.path.abspath(__file__)),
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
