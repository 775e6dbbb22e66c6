"""DB_CONFIG: valid lines, malformed lines, precedence over arguments, the NOSYNC truth table."""

from __future__ import annotations

import itertools
import os

import pytest

import aiodbenv
from aiodbenv import ConfigError, Settings
from aiodbenv._config import apply_db_config


def write_config(home: str, text: str) -> None:
    with open(os.path.join(home, "DB_CONFIG"), "w") as f:
        f.write(text)


async def test_db_config_settings_apply(home: str, shm_key: int) -> None:
    write_config(
        home,
        f"""
# a comment, then a blank line

set_cachesize 0 1048576 1
set_mp_pagesize 8192
set_mp_mmapsize 12582912
set_shm_key {shm_key}
set_flags db_nommap
set_flags DB_LOG_INMEMORY on
set_open_flags db_system_mem
""",
    )
    async with aiodbenv.Env.open(home, create=True) as env:
        st = env.stat()
        assert st.kind == "system" and st.shm_key == shm_key
        assert (st.cache_size, st.page_size, st.mmap_size) == (1 << 20, 8192, 12582912)
        assert st.flags == {"nommap", "log_inmemory"}
    await aiodbenv.Env.remove(home)


async def test_db_config_beats_arguments(home: str) -> None:
    write_config(home, "set_cachesize 0 2097152 0\nset_mp_pagesize 2048\n")
    async with aiodbenv.Env.open(home, create=True, cache_size=1 << 20, page_size=16384) as env:
        assert (env.settings.cache_size, env.settings.page_size) == (2 << 20, 2048)
    await aiodbenv.Env.remove(home)


async def test_db_config_private_flag(home: str) -> None:
    write_config(home, "set_open_flags db_private\n")
    async with aiodbenv.Env.open(home, create=True, region="file") as env:
        assert env.kind == "private"
        assert os.listdir(home) == ["DB_CONFIG"]
    await aiodbenv.Env.remove(home)


@pytest.mark.parametrize(
    "line",
    [
        "set_cache_max 1",
        "set_region_init 100",
        'set_shm_key ""',
        "set_shm_key 11 12 13",
        "set_shm_key -5",
        "set_cachesize 0 1000 1",  # impossibly small
        "set_cachesize 0 1048576",  # too few values
        "set_mp_pagesize 1000",  # not a power of two
        "set_mp_mmapsize lots",
        "set_flags db_nosuchflag",
        "set_flags db_nommap maybe",
        "set_open_flags db_create",
        "no_such_setting 1",
    ],
)
async def test_malformed_line_fails_open_with_line_number(home: str, line: str) -> None:
    write_config(home, f"# ok\nset_mp_pagesize 4096\n{line}\n")
    with pytest.raises(ConfigError) as err:
        await aiodbenv.Env.open(home, create=True)
    assert err.value.lineno == 3
    assert "DB_CONFIG:3:" in str(err.value)
    assert os.listdir(home) == ["DB_CONFIG"], "a failed open creates nothing"


async def test_ignored_berkeley_db_names_still_open(home: str) -> None:
    write_config(home, "set_lg_bsize 262144\nset_lk_max_locks 1000\nset_tmp_dir /tmp\n")
    async with aiodbenv.Env.open(home, create=True):
        pass
    await aiodbenv.Env.remove(home)


async def test_db_config_that_is_not_a_file(home: str) -> None:
    os.mkdir(os.path.join(home, "DB_CONFIG"))
    with pytest.raises(ConfigError, match="not a regular file"):
        await aiodbenv.Env.open(home, create=True)


# -- the NOSYNC truth table (Berkeley DB env007.k) ----------------------------------------------

ARG_CHOICES = {
    "none": {},
    "nosync": {"txn_nosync": True},
    "write_nosync": {"txn_write_nosync": True},
}
CONFIG_CHOICES = {
    "none": [],
    "nosync": ["set_flags db_txn_nosync"],
    "write_nosync": ["set_flags db_txn_write_nosync"],
    "nosync,write_nosync": ["set_flags db_txn_nosync", "set_flags db_txn_write_nosync"],
    "write_nosync,nosync": ["set_flags db_txn_write_nosync", "set_flags db_txn_nosync"],
    "nosync,off": ["set_flags db_txn_nosync", "set_flags db_txn_nosync off"],
}


def expected(arg: str, config: str) -> tuple[bool, bool]:
    # The last setter wins and clears the other; DB_CONFIG comes after the arguments.
    state = (arg == "nosync", arg == "write_nosync")
    for step in config.split(","):
        if step == "nosync":
            state = (True, False)
        elif step == "write_nosync":
            state = (False, True)
        elif step == "off":
            state = (False, state[1])
    return state


@pytest.mark.parametrize("arg,config", list(itertools.product(ARG_CHOICES, CONFIG_CHOICES)))
def test_nosync_truth_table(arg: str, config: str) -> None:
    base = Settings(**ARG_CHOICES[arg])  # type: ignore[arg-type]
    s = apply_db_config(base, "\n".join(CONFIG_CHOICES[config]), "DB_CONFIG")
    assert (s.txn_nosync, s.txn_write_nosync) == expected(arg, config)


async def test_nosync_flags_reach_the_environment(home: str) -> None:
    write_config(home, "set_flags db_txn_write_nosync\n")
    async with aiodbenv.Env.open(home, create=True, txn_nosync=True) as env:
        assert env.stat().flags == {"txn_write_nosync"}
    await aiodbenv.Env.remove(home)


async def test_both_nosync_arguments_is_an_error(home: str) -> None:
    with pytest.raises(ConfigError, match="exclude each other"):
        await aiodbenv.Env.open(home, create=True, txn_nosync=True, txn_write_nosync=True)
