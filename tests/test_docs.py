"""The documentation's code runs: every Python block and command-line example in README.md and
docs/*.md, each in a temporary directory that must be left without environments.

Blocks are found with markdown-it-py (the CommonMark parser) and Python blocks are run and
linted with pytest-examples, so a block added to any page is picked up without touching this
file. A block is changed from "run it" only by an HTML comment on the line before its fence:

- ``<!-- test: continue -->``: a Python block that goes on from the previous Python block of
  the page; the two run as one program, in that order, in one test.
- ``<!-- test: skip REASON -->``: not run, for the reason given (few are allowed; counted).
- ``<!-- test: signature NAME -->``: a signature listing of the callable ``aiodbenv.NAME``;
  compared with the real signature instead of run.
- ``<!-- test: ci ... -->`` or ``<!-- test command: ... -->``: an install or test command that
  CI itself runs (.ci/run); not run here.
- ``<!-- test: output -->``: a ``text`` block showing output of the page's previous Python
  block: every line of it must appear in what that block prints when it runs.

Command synopses in ``text`` blocks (lines starting ``python -m aiodbenv``) are checked against
the command line's own help: every subcommand and option they name must exist.

Shell blocks (``sh``, ``bash``, ``console``) run under ``bash -e -o pipefail`` with ``python``,
``python3`` and ``.venv/bin/python`` meaning this test's interpreter, the repository's
``examples/`` linked into the directory, and ``$PORT`` set to a free port. A block must stop
every process it starts: one still running when the block ends fails the test.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import aiodbenv
from aiodbenv.region.remove import remove_environment

from .conftest import REPO

markdown_it = pytest.importorskip("markdown_it", reason="needs markdown-it-py (the test extra)")
pytest_examples = pytest.importorskip(
    "pytest_examples", reason="needs pytest-examples (test extra)"
)
from pytest_examples.lint import FormatError, ruff_check  # noqa: E402

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON = {"python", "py"}
SHELL = {"sh", "bash", "console"}
NOT_CODE = {"text"}  # output, file formats, listings: shown, never run
MAX_SKIPS = 2  # blocks that truly cannot run here; keep it small
CI_COMMANDS = 3  # README's install and test commands and docs/index.md's install
MARKER = re.compile(r"^<!--\s*test( command)?:?\s*(\w*)\s*(.*?)\s*-->\s*$")
BLOCK_TIMEOUT = 240  # seconds; the web example starts uvicorn with two workers


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    source: str
    mark: str = ""  # "", "continue", "skip", "signature", "ci", "output"
    note: str = ""  # the marker's reason or name
    follows: list[Block] = field(default_factory=list)  # continuation blocks, in order
    outputs: list[Block] = field(default_factory=list)  # "output" text blocks after it

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def _marker(lines: list[str], fence: int) -> tuple[str, str]:
    i = fence - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    m = MARKER.match(lines[i].strip()) if i >= 0 else None
    if m is None:
        return "", ""
    if m.group(1):  # "<!-- test command: ..." is the marker .ci/run reads
        return "ci", (m.group(2) + " " + m.group(3)).strip()
    return m.group(2), m.group(3)


def find_blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    lines = text.splitlines()
    blocks = []
    for tok in markdown_it.MarkdownIt("commonmark").parse(text):
        if tok.type != "fence" or tok.map is None:
            continue
        mark, note = _marker(lines, tok.map[0])
        lang = tok.info.split()[0].lower() if tok.info.strip() else ""
        blocks.append(Block(page, tok.map[0] + 1, lang, tok.content, mark, note))
    return blocks


ALL = [b for page in PAGES for b in find_blocks(page)]


def _runnable() -> tuple[list[Block], list[Block]]:
    python: list[Block] = []
    shell: list[Block] = []
    last: dict[Path, Block] = {}
    for b in ALL:
        if (b.lang in PYTHON and b.mark == "continue") or b.mark == "output":
            # Ill-placed ones are reported by test_every_block_is_accounted_for.
            if b.page in last:
                (last[b.page].follows if b.mark == "continue" else last[b.page].outputs).append(b)
            continue
        if b.mark:
            continue
        if b.lang in PYTHON:
            python.append(b)
            last[b.page] = b
        elif b.lang in SHELL:
            shell.append(b)
    return python, shell


PYTHON_BLOCKS, SHELL_BLOCKS = _runnable()


def test_every_block_is_accounted_for() -> None:
    """No block is silently left out: each is run, checked, or marked with a reason."""
    problems = []
    seen_python: dict[Path, bool] = {}
    for b in ALL:
        if b.lang not in PYTHON | SHELL | NOT_CODE:
            problems.append(f"{b.id}: fence language {b.lang!r} is neither run nor known as text")
        if b.mark not in ("", "continue", "skip", "signature", "ci", "output"):
            problems.append(f"{b.id}: unknown marker {b.mark!r}")
        if b.mark == "skip" and not b.note:
            problems.append(f"{b.id}: a skip needs a reason")
        if b.mark == "continue" and (b.lang not in PYTHON or not seen_python.get(b.page)):
            problems.append(f"{b.id}: 'continue' must follow a Python block of the same page")
        if b.mark == "signature" and b.lang not in PYTHON:
            problems.append(f"{b.id}: a signature listing must be a python fence")
        if b.lang in PYTHON and b.mark in ("", "continue"):
            seen_python[b.page] = True
        if b.mark == "output" and (b.lang not in NOT_CODE or not seen_python.get(b.page)):
            problems.append(f"{b.id}: 'output' must be a text block after a Python block")
    assert not problems, "\n".join(problems)

    skips = [f"{b.id}: {b.note}" for b in ALL if b.mark == "skip"]
    assert len(skips) <= MAX_SKIPS, "too many skipped blocks:\n" + "\n".join(skips)
    ci = [b for b in ALL if b.mark == "ci"]
    assert len(ci) <= CI_COMMANDS and all("pip install" in b.source for b in ci), [b.id for b in ci]

    # pytest-examples must see exactly the Python blocks markdown-it-py sees, or one of the two
    # parsers would be hiding a block from the other.
    found = {(Path(e.path).resolve(), e.start_line) for e in pytest_examples.find_examples(*PAGES)}
    ours = {(b.page.resolve(), b.line) for b in ALL if b.lang in PYTHON}
    assert found == ours
    assert PYTHON_BLOCKS and SHELL_BLOCKS  # the parametrized tests below do run


# -- running -----------------------------------------------------------------------------------


def _leftover_regions(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("__db.*"))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The block's current directory: empty, with ``.venv/bin/python`` meaning this
    interpreter and ``examples`` the repository's; no environment may be left in it."""
    work = tmp_path / "work"
    (work / ".venv" / "bin").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Scripts, not symlinks: a symlinked venv interpreter would not find its pyvenv.cfg.
    for shim in (bin_dir / "python", bin_dir / "python3", work / ".venv" / "bin" / "python"):
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        shim.chmod(0o755)
    (work / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(work)
    monkeypatch.delenv("DB_HOME", raising=False)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    yield work
    left = _leftover_regions(work)
    for home in {os.path.dirname(work / name) for name in left}:
        try:  # report it below, but leave no segment or region file behind
            remove_environment(home, force=True)
        except Exception:
            pass
    assert not left, f"the block left environments behind: {left}"


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=lambda b: b.id)
def test_python_block(
    block: Block,
    workdir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Run the block (and the blocks continuing it) as a program, after ruff has checked it:
    an undefined name, i.e. a fragment that leans on context the page does not give, fails.
    Output shown after it on the page must be in what it prints (its subprocesses too)."""
    source = "".join(b.source for b in [block, *block.follows])
    example = pytest_examples.CodeExample.create(
        source, path=block.page, start_line=block.line, prefix="python"
    )
    ev = pytest_examples.EvalExample(tmp_path=tmp_path, pytest_request=request)
    ev.set_config(target_version="py311", line_length=100, ruff_line_length=100)
    try:  # the project's own ruff settings, whatever ruff would find from the temporary cwd
        ruff_check(example, ev.config, extra_ruff_args=("--config", str(REPO / "pyproject.toml")))
    except FormatError as err:
        pytest.fail(f"{block.id}: {err}", pytrace=False)
    main = sys.modules["__main__"]  # pytest-examples runs the block as __main__
    try:
        ev.run(example)
    finally:
        sys.modules["__main__"] = main
    printed = {" ".join(line.split()) for line in capfd.readouterr().out.splitlines()}
    for shown in block.outputs:
        for line in shown.source.splitlines():
            if line.strip():
                assert " ".join(line.split()) in printed, f"{shown.id}: {line!r} not printed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _group_members(pgid: int) -> list[str]:
    """Live (not zombie) processes of a process group, as "pid command" lines."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(f"{entry} {cmd}")
    return found


def _leftover_processes(pgid: int, wait: float = 5.0) -> list[str]:
    """Processes still in the group after a short bound (a killed one may take a moment)."""
    deadline = time.monotonic() + wait
    while (left := _group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.id)
def test_shell_block(block: Block, workdir: Path, tmp_path: Path) -> None:
    source = block.source
    if block.lang == "console":  # only the "$ " lines are commands; the rest is output
        source = "".join(ln[2:] + "\n" for ln in source.splitlines() if ln.startswith("$ "))
    script = tmp_path / "block.sh"
    script.write_text(source)
    log_path = tmp_path / "block.log"
    # Output goes to a file, not a pipe: a process the block leaves running must not keep the
    # test waiting for the end of its output.
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", str(script)],
            cwd=workdir,
            env={**os.environ, "PORT": str(_free_port())},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: whatever it starts can be found
        )
        try:
            proc.wait(timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{block.id} did not finish in {BLOCK_TIMEOUT} s:\n{log_path.read_text()}")
    leftover = _leftover_processes(proc.pid)
    if leftover:
        os.killpg(proc.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert proc.returncode == 0, f"{block.id} failed ({proc.returncode}):\n{out}"
    assert not leftover, f"{block.id} left processes running: {leftover}\n{out}"


# -- signature listings ------------------------------------------------------------------------


SIGNATURES = [b for b in ALL if b.mark == "signature"]


@pytest.mark.parametrize("block", SIGNATURES, ids=lambda b: b.id)
def test_signature_listing_matches_the_code(block: Block) -> None:
    obj: object = aiodbenv
    for part in block.note.split("."):
        obj = getattr(obj, part)
    assert callable(obj)
    shown = re.sub(r"^\s*(await\s+)?", "", block.source.strip())
    name, _, params = shown.partition("(")
    assert name == block.note
    # The listing parsed as a def: names, kinds and default values must be the real ones.
    fn = ast.parse(f"def f({params.strip().removesuffix(')')}): pass").body[0]
    assert isinstance(fn, ast.FunctionDef)
    a = fn.args
    listed = [(x.arg, "positional") for x in a.args] + [(x.arg, "keyword") for x in a.kwonlyargs]
    defaults = [ast.literal_eval(d) for d in a.defaults] + [
        ast.literal_eval(d) if d is not None else inspect.Parameter.empty for d in a.kw_defaults
    ]
    params_real = list(inspect.signature(obj).parameters.values())
    real = [
        (p.name, "keyword" if p.kind is inspect.Parameter.KEYWORD_ONLY else "positional")
        for p in params_real
    ]
    assert listed == real
    n_pos_default = len(a.defaults)
    real_defaults = [p.default for p in params_real if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    real_defaults = real_defaults[len(real_defaults) - n_pos_default :] + [
        p.default for p in params_real if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    assert defaults == real_defaults


# -- the docs site -----------------------------------------------------------------------------


def test_api_reference_covers_every_public_name() -> None:
    """docs/api.md lists every name of ``aiodbenv.__all__``: the classes one by one, the
    errors through the ``aiodbenv.errors`` module, whose every name it renders."""
    page = (REPO / "docs" / "api.md").read_text()
    listed = set(re.findall(r"^::: aiodbenv\.(\w+)\s*$", page, flags=re.M))
    assert "errors" in listed
    missing = [
        name
        for name in aiodbenv.__all__
        if name not in listed and name not in aiodbenv.errors.__all__
    ]
    assert not missing, f"public names missing from docs/api.md: {missing}"


def test_docs_site_builds_strict(tmp_path: Path) -> None:
    """mkdocs (material theme, mkdocstrings API reference) builds with --strict: no broken link,
    no unresolved cross-reference, no page missing from the nav."""
    pytest.importorskip("mkdocs", reason="the docs site needs the docs extra (in the test extra)")
    site = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    api = (site / "api" / "index.html").read_text()
    for name in ("aiodbenv.Env.open", "aiodbenv.PoolFile.get", "aiodbenv.errors.RunRecovery"):
        assert f'id="{name}"' in api, name
    assert ":class:`" not in api and ":meth:`" not in api  # the roles became links
    for page in ("when-to-use", "operating"):
        assert (site / page / "index.html").exists()


# -- command synopses --------------------------------------------------------------------------


SYNOPSES = [
    (b, line)
    for b in ALL
    if b.lang in NOT_CODE
    for line in b.source.splitlines()
    if line.startswith("python -m aiodbenv ")
]


@pytest.mark.parametrize("command", sorted({line.split()[3] for _, line in SYNOPSES}) or ["(none)"])
def test_command_synopses_match_the_command_line(command: str) -> None:
    """Each option a synopsis names for ``command`` appears in ``command --help``."""
    assert SYNOPSES, "the docs show no command synopsis: this check has nothing to check"
    r = subprocess.run(
        [sys.executable, "-m", "aiodbenv", command, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, f"no command {command!r}: {r.stderr}"
    helped = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", r.stdout))
    for b, line in SYNOPSES:
        if line.split()[3] != command:
            continue
        usage = line.split("#", 1)[0]
        for option in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", usage):
            assert option in helped, f"{b.id}: {option} is not an option of {command}"
