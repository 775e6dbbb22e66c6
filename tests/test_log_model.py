"""The log against a model: random sequences of puts (small, buffer-filling, larger than the
buffer), flushes, cursor moves, checkpoints with archive, reopening and losing the regions,
with small buffers and files so every path (switches, direct writes, fill writes) is taken.
The model is the list of records put; the log must always hold exactly its tail."""

from __future__ import annotations

import os
import random

import pytest

import aiodbenv
from aiodbenv import LSN, CheckpointRecord
from aiodbenv.log.redo import redo_start

SEEDS = range(6)


async def check_against(
    log: aiodbenv.Log, model: list[tuple[LSN, bytes]], rng: random.Random
) -> None:
    got = [(lsn, d) async for lsn, d in log.cursor() if not isinstance(d, CheckpointRecord)]
    assert got == model[len(model) - len(got) :]
    async with log.cursor() as c:
        for _ in range(5):
            if not got:
                break
            i = rng.randrange(len(got))
            assert await c.set(got[i][0]) == got[i]
            item = await c.prev()
            while item is not None and isinstance(item[1], CheckpointRecord):
                item = await c.prev()
            assert item == (got[i - 1] if i else None)


async def run_model(home: str, seed: int, inmemory: bool) -> None:
    rng = random.Random(seed)
    kwargs: dict[str, object] = (
        {"log_inmemory": True, "log_buffer_size": 16384, "log_file_size": 4096}
        if inmemory
        else {"log": True, "log_buffer_size": 1024, "log_file_size": 4096}
    )
    env = await aiodbenv.Env.open(home, create=True, **kwargs)  # type: ignore[arg-type]
    model: list[tuple[LSN, bytes]] = []
    try:
        for _ in range(250):
            op = rng.random()
            log = env.log
            if op < 0.6:
                size = rng.choice([0, 5, 100, 700, 1500, 3000])
                data = rng.randbytes(size)
                mode = rng.random()
                try:
                    lsn = await log.put(data, flush=mode < 0.2, write_nosync=0.2 <= mode < 0.3)
                except aiodbenv.LogBufferFull:
                    assert inmemory  # the ring holds what the last checkpoint needs
                    continue
                assert not model or lsn > model[-1][0]
                model.append((lsn, data))
            elif op < 0.7:
                await log.flush(model[-1][0] if model and rng.random() < 0.5 else None)
                assert not model or log.flushed_lsn > model[-1][0]
            elif op < 0.8:
                await check_against(log, model, rng)
            elif op < 0.87:
                try:
                    await log.checkpoint_record(log.end_lsn)
                except aiodbenv.LogBufferFull:
                    assert inmemory
                    continue
                removed = await log.archive(remove=rng.random() < 0.5)
                ckp = log.last_checkpoint
                assert ckp is not None
                assert all(int(p[-10:]) < ckp[1].file for p in removed)
                if removed:  # only what recovery (from the checkpoint before) never reads
                    start = await redo_start(log)
                    assert start[0] is not None and all(
                        int(p[-10:]) < start[0].file for p in removed
                    )
            elif op < 0.94 or inmemory:
                await env.close()
                env = await aiodbenv.Env.open(home, create=True, **kwargs)  # type: ignore[arg-type]
                if inmemory:
                    model = []  # a new in-memory environment starts a new log
                    await env.close()
                    await aiodbenv.Env.remove(home)
                    env = await aiodbenv.Env.open(home, create=True, **kwargs)  # type: ignore[arg-type]
            else:
                await env.close()  # flushes what is buffered
                await aiodbenv.Env.remove(home)
                env = await aiodbenv.Env.open(home, create=True, **kwargs)  # type: ignore[arg-type]
                async with env.log.cursor() as c:
                    last = await c.last()
                if last is not None:  # it ends right after the last record (or a new file's header)
                    end = LSN(last[0].file, last[0].offset + 16 + len(last[1]))
                    assert env.log.end_lsn == end or env.log.end_lsn == LSN(end.file + 1, 32)
        await check_against(env.log, model, rng)
    finally:
        await env.close()
        await aiodbenv.Env.remove(home)
        for name in os.listdir(home):  # the log files: the next run starts a new log
            os.unlink(os.path.join(home, name))


@pytest.mark.parametrize("seed", SEEDS)
async def test_file_log_model(home: str, seed: int) -> None:
    await run_model(home, seed, inmemory=False)


@pytest.mark.parametrize("seed", SEEDS)
async def test_inmemory_log_model(home: str, seed: int) -> None:
    await run_model(home, seed, inmemory=True)


@pytest.mark.slow
async def test_log_model_many_seeds(home: str) -> None:
    for seed in range(100, 160):
        await run_model(home, seed, inmemory=seed % 2 == 0)
