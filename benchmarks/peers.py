"""The Python peers: reads of cached 4 KiB records with ``lmdb`` and ``berkeleydb``.

Run by ``benchmarks/run.py`` in a child process, one per peer and repetition, so that a peer
that is missing or crashes cannot take the run down and its process RSS is its own::

    python benchmarks/peers.py lmdb --dir DIR --records 16384 --ops 250000 [--seed S]
    python benchmarks/peers.py berkeleydb --dir DIR --records 16384 --ops 250000

It stores ``--records`` records of 4096 bytes under 4-byte big-endian keys in DIR (created, and
removed at the end), reads every one once (so all are cached), then times ``--ops`` reads of
uniformly random keys, touching the first byte of each value, as aiodbenv's hot loop touches the
first byte of each page. It prints one JSON object on stdout:

- ``lmdb``: ``long_txn`` (every get in one read transaction, ``buffers=True``: no copy) and
  ``txn_per_get`` (a read transaction per get, also ``buffers=True``);
- ``berkeleydb``: ``btree`` and ``hash`` (``DB->get`` on a database of that type with 4 KiB
  pages in an environment whose cache holds all of it; each get copies the value);

each with ``ns_per_op`` and ``ops_per_sec``, plus ``rss`` (VmRSS, VmHWM, RssAnon, RssFile,
RssShmem of this process in KiB, after the timed reads).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import struct
import sys
import time
from typing import Any

RECORD = 4096
PAGE = 4096


def rss() -> dict[str, int]:
    """This process's resident memory from /proc/self/status, in KiB."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[f"{name}_kb"] = int(rest.split()[0])
    except OSError:
        pass
    return out


def _keys(records: int, ops: int, seed: int) -> tuple[list[bytes], list[bytes]]:
    allk = [struct.pack(">I", i) for i in range(records)]
    rng = random.Random(seed)
    return allk, [allk[rng.randrange(records)] for _ in range(ops)]


def run_lmdb(d: str, records: int, ops: int, seed: int) -> dict[str, Any]:
    import lmdb  # type: ignore[import-untyped,unused-ignore]

    allk, keys = _keys(records, ops, seed)
    value = os.urandom(RECORD)
    # A 4 KiB value is an overflow record of 2 pages; leave room for the tree and free pages.
    # writemap: the load writes into the map, not into heap pages (which would stay in RSS).
    env = lmdb.open(
        d,
        map_size=max(64 << 20, records * RECORD * 4),
        sync=False,
        metasync=False,
        writemap=True,
        max_dbs=0,
        readahead=False,
    )
    try:
        with env.begin(write=True) as txn:
            for k in allk:
                txn.put(k, value)
        env.sync(True)
        with env.begin(buffers=True) as txn:  # touch every record once
            for k in allk:
                buf: Any = txn.get(k)
                buf[0]
        out: dict[str, Any] = {"version": lmdb.__version__, "records": records, "ops": ops}
        with env.begin(buffers=True) as txn:
            get = txn.get
            t0 = time.perf_counter_ns()
            for k in keys:
                get(k)[0]  # type: ignore[index]
            ns = time.perf_counter_ns() - t0
        out["long_txn"] = {"ns_per_op": ns / ops, "ops_per_sec": ops * 1e9 / ns}
        begin = env.begin
        t0 = time.perf_counter_ns()
        for k in keys:
            with begin(buffers=True) as txn:
                txn.get(k)[0]  # type: ignore[index]
        ns = time.perf_counter_ns() - t0
        out["txn_per_get"] = {"ns_per_op": ns / ops, "ops_per_sec": ops * 1e9 / ns}
        out["rss"] = rss()
        out["map_size"] = env.info()["map_size"]
        return out
    finally:
        env.close()


def run_berkeleydb(d: str, records: int, ops: int, seed: int) -> dict[str, Any]:
    from berkeleydb import db  # type: ignore[import-untyped,unused-ignore]

    allk, keys = _keys(records, ops, seed)
    value = os.urandom(RECORD)
    env = db.DBEnv()
    # Each 4 KiB record is an overflow item of 2 pages: 3x the data holds both databases' hot
    # parts comfortably (checked: no cache misses in the timed part).
    cache = max(32 << 20, records * RECORD * 3)
    env.set_cachesize(cache >> 30, cache & ((1 << 30) - 1), 1)
    env.open(d, db.DB_CREATE | db.DB_INIT_MPOOL, 0o600)
    out: dict[str, Any] = {
        "version": ".".join(map(str, db.version())),
        "records": records,
        "ops": ops,
        "cache_bytes": cache,
    }
    try:
        for name, kind in (("btree", db.DB_BTREE), ("hash", db.DB_HASH)):
            d_ = db.DB(env)
            d_.set_pagesize(PAGE)
            d_.open(f"{name}.db", None, kind, db.DB_CREATE, 0o600)
            try:
                for k in allk:
                    d_.put(k, value)
                for k in allk:  # touch every record once
                    d_.get(k)
                miss0 = env.memp_stat()[0]["cache_miss"]
                get = d_.get
                t0 = time.perf_counter_ns()
                for k in keys:
                    get(k)[0]
                ns = time.perf_counter_ns() - t0
                miss1 = env.memp_stat()[0]["cache_miss"]
                out[name] = {
                    "ns_per_op": ns / ops,
                    "ops_per_sec": ops * 1e9 / ns,
                    "timed_cache_miss": miss1 - miss0,
                }
            finally:
                d_.close()
        out["rss"] = rss()
        return out
    finally:
        env.close()
        try:
            db.DBEnv().remove(d, db.DB_FORCE)
        except db.DBError:
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("peer", choices=("lmdb", "berkeleydb"))
    ap.add_argument("--dir", required=True, help="work directory (created, then removed)")
    ap.add_argument("--records", type=int, default=16384)
    ap.add_argument("--ops", type=int, default=250_000)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    os.makedirs(a.dir, exist_ok=False)
    try:
        fn = run_lmdb if a.peer == "lmdb" else run_berkeleydb
        out = {"ok": True, "peer": a.peer, **fn(a.dir, a.records, a.ops, a.seed)}
    except Exception as err:  # reported, not raised: the runner shows it in the table
        out = {"ok": False, "peer": a.peer, "error": f"{type(err).__name__}: {err}"}
    finally:
        shutil.rmtree(a.dir, ignore_errors=True)
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
