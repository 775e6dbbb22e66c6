"""The command line: parse it, run the command, turn its errors into one line on stderr and
an exit status."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ..errors import AiodbenvError
from .demo import demo_command
from .logtools import archive_command, parse_lsn, printlog_command
from .maintain import checkpoint_command, failchk_command, remove_command
from .recover import recover_command
from .stats import metrics_command, stat_command, watch_command

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    handler = {
        "demo": demo_command,
        "stat": stat_command,
        "remove": remove_command,
        "checkpoint": checkpoint_command,
        "watch": watch_command,
        "failchk": failchk_command,
        "metrics": metrics_command,
        "printlog": printlog_command,
        "archive": archive_command,
        "recover": recover_command,
    }[args.command]
    try:
        return asyncio.run(handler(args))
    except AiodbenvError as err:
        print(f"aiodbenv {args.command}: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`watch | head`): nothing more to say, and nobody to say it to.
        # Point stdout at /dev/null so the interpreter's final flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except OSError as err:  # an error of the system, not of aiodbenv: still one line
        print(f"aiodbenv {args.command}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be within 0..1, not {text}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {text}")
        return value

    return parse


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aiodbenv",
        description="Berkeley DB's utilities for aiodbenv environments: statistics, "
        "checkpoints, metrics, the log, removal. Errors are one line on stderr and a non-zero exit "
        "status.",
    )
    p.add_argument("--version", action="version", version=f"aiodbenv {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="create an environment, join it from a second process, "
        "print its statistics, remove it",
    )
    d.add_argument(
        "--region",
        choices=("file", "system"),
        default="file",
        help="where the regions live (default: file)",
    )
    d.add_argument(
        "--shm-key", type=int, default=0x41D8E0, help="base System V key for --region system"
    )
    for name, text in (
        ("stat", "print statistics (db_stat)"),
        ("remove", "remove an environment (DB_ENV->remove)"),
        ("checkpoint", "keep an environment checkpointed (db_checkpoint)"),
        ("watch", "live statistics, refreshed in place"),
        ("failchk", "reclaim what dead processes held, and say what (DB_ENV->failchk)"),
        ("metrics", "print the statistics as Prometheus metrics (text exposition format)"),
        ("printlog", "print every log record with its LSN, type and length (db_printlog)"),
        ("archive", "list the log files no longer needed, or remove them (db_archive)"),
        ("recover", "rebuild the regions and replay committed transactions (db_recover)"),
    ):
        sp = sub.add_parser(name, help=text, add_help=False)
        sp.add_argument("--help", action="help", help="show this help and exit")
        sp.add_argument(
            "-h",
            metavar="HOME",
            default=None,
            help="environment home (default: $DB_HOME, then the current directory)",
        )
        if name == "stat":
            sp.add_argument("-e", action="store_true", help="environment region statistics")
            sp.add_argument("-m", action="store_true", help="buffer pool statistics")
            sp.add_argument("-l", action="store_true", help="log statistics")
            sp.add_argument("--json", action="store_true", help="print JSON instead of text")
        elif name == "remove":
            sp.add_argument(
                "-f",
                action="store_true",
                help="force: remove even while handles are open (they are panicked) or the "
                "cache holds dirty pages (they are discarded)",
            )
        elif name == "checkpoint":
            sp.add_argument(
                "-p",
                type=_positive_float,
                default=1.0,
                metavar="MINUTES",
                help="checkpoint at least every MINUTES minutes (default 1)",
            )
            sp.add_argument(
                "-k",
                type=_int_at_least(1),
                default=None,
                metavar="KBYTES",
                help="also checkpoint once KBYTES KiB of pages were dirtied",
            )
            sp.add_argument(
                "-1", dest="once", action="store_true", help="checkpoint once, now, and exit"
            )
            sp.add_argument(
                "--completion-target",
                type=_fraction,
                default=0.9,
                metavar="X",
                help="spread each checkpoint over this share (0..1) of the interval (default 0.9)",
            )
        elif name == "printlog":
            sp.add_argument(
                "-b", type=parse_lsn, default=None, metavar="LSN", help="start at FILE/OFFSET"
            )
            sp.add_argument(
                "-e", type=parse_lsn, default=None, metavar="LSN", help="stop after FILE/OFFSET"
            )
            sp.add_argument("-v", action="store_true", help="show user records' data in full")
        elif name == "recover":
            sp.add_argument(
                "-l",
                metavar="LOGDIR",
                default=None,
                help="the log's directory, relative to the home, as the service's log_dir "
                "(DB_CONFIG's set_lg_dir overrides it, as it does Env.open's; default: the "
                "home)",
            )
        elif name == "archive":
            sp.add_argument("-a", action="store_true", help="print absolute paths")
            sp.add_argument(
                "--remove", action="store_true", help="remove the files listed (db_archive -d)"
            )
        elif name == "watch":
            sp.add_argument(
                "-i",
                "--interval",
                type=_positive_float,
                default=1.0,
                metavar="SECONDS",
                help="refresh every SECONDS seconds (default 1)",
            )
            sp.add_argument(
                "-c",
                "--count",
                type=_int_at_least(0),
                default=0,
                metavar="N",
                help="stop after N refreshes (default: until Ctrl-C)",
            )
    return p
