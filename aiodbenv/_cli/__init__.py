"""``python -m aiodbenv`` (also the ``aiodbenv`` command): Berkeley DB's utilities in one
entry point.

``demo`` shows an environment shared between two processes; ``stat -e``/``-m``/``-l`` prints
region, pool or log statistics (``db_stat``); ``printlog`` prints the log's records
(``db_printlog``); ``archive`` lists or removes log files no longer needed (``db_archive``);
``checkpoint`` keeps an environment checkpointed (``db_checkpoint``), exiting cleanly on
SIGTERM or SIGINT; ``watch`` shows live statistics; ``metrics`` prints the statistics as
Prometheus metrics; ``remove`` removes an environment (``DB_ENV->remove``); ``failchk``
reclaims what dead processes held (Berkeley DB's failchk) and prints what it did; ``recover``
rebuilds the regions and replays committed transactions (``db_recover``). Errors are
one line on stderr and a non-zero exit status.

One module per command group: :mod:`.stats` (stat, watch, metrics), :mod:`.maintain`
(checkpoint, failchk, remove), :mod:`.logtools` (printlog, archive), :mod:`.recover`,
:mod:`.demo`;
:mod:`.text` renders statistics as text and :mod:`.entry` parses the command line and runs
the command.
"""

from .entry import main
from .text import format_env_stat, format_pool_stat

__all__ = ["format_env_stat", "format_pool_stat", "main"]
