"""The environment's statistics as Prometheus metrics.

Everything comes from the shared region (:meth:`aiodbenv.Env.stat`,
:meth:`aiodbenv.Pool.stat` and the environment part of :meth:`aiodbenv.Env.health`), so any
one process, a web backend's worker say, reports the whole environment: every process's pins,
reads, writes and background workers.

Two ways out, made by the same code:

- :func:`generate` renders the Prometheus text exposition format (what ``python -m aiodbenv
  metrics`` prints), with no dependency;
- :class:`Collector` hands the same metric families to a ``prometheus_client`` registry
  (``pip install 'aiodbenv[metrics]'``), for an application that already exposes metrics::

      from prometheus_client import REGISTRY
      REGISTRY.register(aiodbenv.metrics.Collector(env))

  (``prometheus_client`` collects in the thread that serves the scrape. A private
  environment's pool statistics can only be read on its event loop's thread, so for one,
  render :func:`generate` on the loop instead.)

Names start with ``aiodbenv_``; counters end in ``_total``, gauges do not; per-file series
carry a ``file`` label (the file's path; all temporary files are summed as ``(temporary)``),
per-worker series a ``kind`` label (``trickle``, ``checkpoint``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ._env import Env

__all__ = ["CONTENT_TYPE", "Collector", "MetricFamily", "collect", "generate", "render"]

PREFIX = "aiodbenv_"
"""What every metric's name starts with."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Content type of :func:`generate`'s output (an HTTP response's ``Content-Type``)."""


@dataclass
class MetricFamily:
    """One metric: its full ``name`` (a counter's without ``_total``), ``kind``, ``help`` and
    samples as (labels, value) pairs."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        """Add a sample; a None value (nothing to report, e.g. no pin held) is left out."""
        if value is not None:
            self.samples.append((labels, float(value)))


# (PoolStat field, metric name, help) of the pool-wide counters.
_POOL_COUNTERS = (
    ("cache_hit", "cache_hits", "Pins that found their page in the cache"),
    ("cache_miss", "cache_misses", "Pins that did not find their page in the cache"),
    ("map", "mapped_pins", "Pins served from a read-only memory map of the file"),
    ("page_create", "pages_created", "Pages created in the cache"),
    ("page_in", "pages_read", "Pages read into the cache"),
    ("page_out", "pages_written", "Pages written from the cache to their files"),
    ("write_calls", "write_calls", "Write calls (runs of adjacent pages)"),
    ("bytes_out", "written_bytes", "Bytes written from the cache to files"),
    ("write_failures", "write_failures", "Failed writes"),
    ("ro_evict", "clean_evictions", "Clean pages forced out of the cache"),
    ("rw_evict", "dirty_evictions", "Dirty pages forced out of the cache (written first)"),
    ("page_trickle", "trickle_written_pages", "Dirty pages written by trickle"),
    ("hash_searches", "hash_searches", "Hash chain searches for a page"),
    ("hash_examined", "hash_examined", "Hash chain entries examined"),
    ("region_wait", "lock_waits", "Pool mutex locks that had to wait"),
    ("region_nowait", "lock_nowaits", "Pool mutex locks granted without waiting"),
    ("alloc_waits", "frame_waits", "Pins that waited for a free frame"),
    ("sync_calls", "sync_calls", "Pool sync calls"),
    ("dirtied_bytes", "dirtied_bytes", "Bytes of pages unpinned dirty"),
    ("procs_reaped", "dead_handles_reaped", "Handles of dead processes reaped"),
    ("pins_reclaimed", "dead_pins_reclaimed", "Pins held by dead processes, dropped"),
    ("dirty_inherited", "dead_dirty_pages_inherited", "Dirty pages inherited from dead processes"),
)

# (PoolStat field, metric name, help) of the pool-wide gauges.
_POOL_GAUGES = (
    ("cache_size", "cache_size_bytes", "Configured cache size"),
    ("ncache", "caches", "Number of caches the pool is split into"),
    ("page_size", "default_page_size_bytes", "The environment's default page size"),
    ("pages", "pages", "Pages in the cache now"),
    ("page_clean", "clean_pages", "Clean pages in the cache now"),
    ("page_dirty", "dirty_pages", "Dirty pages in the cache now"),
    ("page_pinned", "pinned_pages", "Pages pinned now, by any process"),
    ("oldest_pin_age", "oldest_pin_age_seconds", "Age of the oldest pin held now"),
    ("hash_buckets", "hash_buckets", "Hash buckets for page lookup"),
    ("hash_longest", "hash_longest_chain", "Longest hash chain searched"),
    ("files", "files", "Files known to the pool"),
)

# (FileStat field, metric name, help, counter?) of the per-file series.
_FILE_SERIES = (
    ("cache_hit", "file_cache_hits", "Pins of the file that found their page cached", True),
    ("cache_miss", "file_cache_misses", "Pins of the file that missed the cache", True),
    ("map", "file_mapped_pins", "Pins of the file served from a memory map", True),
    ("page_create", "file_pages_created", "Pages of the file created in the cache", True),
    ("page_in", "file_pages_read", "Pages of the file read into the cache", True),
    ("page_out", "file_pages_written", "Pages of the file written", True),
    ("write_calls", "file_write_calls", "Write calls for the file", True),
    ("bytes_out", "file_written_bytes", "Bytes written to the file", True),
    ("pages", "file_pages", "Pages of the file known to the pool", False),
    ("open_handles", "file_open_handles", "Handles that have the file open", False),
    ("pinned", "file_pinned_pages", "Pages of the file pinned now", False),
    ("oldest_pin_age", "file_oldest_pin_age_seconds", "Age of the file's oldest pin", False),
)

# (suffix of PoolStat's trickle_/checkpoint_ fields, metric name, help) per worker kind.
_WORKER_COUNTERS = (
    ("runs", "worker_runs", "Runs of the background worker that wrote (checkpoints: completed)"),
    ("pages", "worker_written_pages", "Pages written by the background worker"),
    ("write_calls", "worker_write_calls", "Write calls of the background worker"),
    ("bytes", "worker_written_bytes", "Bytes written by the background worker"),
    ("failures", "worker_failures", "Failed runs of the background worker"),
)


def collect(env: Env) -> list[MetricFamily]:
    """The environment's metrics, read now from the shared region. Raises what
    :meth:`aiodbenv.Env.stat` raises (a closed handle, a panicked environment)."""
    es = env.stat()
    ps = env.pool.stat()
    health = env.health()
    out: list[MetricFamily] = []

    def family(name: str, kind: Literal["counter", "gauge"], help: str) -> MetricFamily:
        fam = MetricFamily(PREFIX + name, kind, help)
        out.append(fam)
        return fam

    family("healthy", "gauge", "1 unless panicked or a background worker's latest run failed").add(
        1 if health.ok else 0
    )
    family("panicked", "gauge", "1 if the environment is panicked (run recovery)").add(
        1 if es.panicked else 0
    )
    family("handles", "gauge", "Handles open on the environment, in all processes").add(es.handles)
    family("handles_opened", "counter", "Handles ever opened on the environment").add(es.opens)
    if es.processes:  # a shared environment: its registry of live processes
        live = family("process_pins", "gauge", "Pins held now by each open handle's process")
        for p in es.processes:
            live.add(p.pins, pid=str(p.pid), slot=str(p.slot))
    family("mutex_waits", "counter", "Environment mutex locks that had to wait").add(es.mutex_waits)
    family("mutex_nowaits", "counter", "Environment mutex locks granted without waiting").add(
        es.mutex_nowaits
    )
    family("mutex_owner_died", "counter", "Mutexes found held by a dead process").add(
        es.mutex_owner_died
    )
    size = family("region_size_bytes", "gauge", "Size of each region")
    used = family("region_used_bytes", "gauge", "Bytes in use in each region's allocator arena")
    free = family("region_free_bytes", "gauge", "Free bytes in each region's allocator arena")
    fails = family("region_alloc_failures", "counter", "Failed allocations in each region")
    for r in es.regions:
        labels = {"region": str(r.region_id), "type": r.type}
        size.add(r.size, **labels)
        used.add(r.alloc.used, **labels)
        free.add(r.alloc.free, **labels)
        fails.add(r.alloc.failures, **labels)

    for attr, name, text in _POOL_COUNTERS:
        family(name, "counter", text).add(getattr(ps, attr))
    for attr, name, text in _POOL_GAUGES:
        value = getattr(ps, attr)
        family(name, "gauge", text).add(len(value) if attr == "files" else value)

    per_file: dict[str, dict[str, float | None]] = {}
    for f in ps.files:
        label = f.file_name if f.file_name is not None else "(temporary)"
        row = per_file.setdefault(label, {})
        for attr, _name, _text, _counter in _FILE_SERIES:
            value = getattr(f, attr)
            old = row.get(attr)
            if attr.endswith("_age"):  # temporary files summed: the oldest pin of any
                row[attr] = value if old is None else old if value is None else max(old, value)
            else:
                row[attr] = (old or 0) + value
    for attr, name, text, counter in _FILE_SERIES:
        fam = family(name, "counter" if counter else "gauge", text)
        for label, row in sorted(per_file.items()):
            fam.add(row[attr], file=label)

    for suffix, name, text in _WORKER_COUNTERS:
        fam = family(name, "counter", text)
        for kind in ("trickle", "checkpoint"):
            fam.add(getattr(ps, f"{kind}_{suffix}"), kind=kind)
    active = family("worker_active", "gauge", "1 if a live process holds the worker's lease")
    in_row = family(
        "worker_consecutive_failures", "gauge", "Failed runs since the worker's last success"
    )
    success = family(
        "worker_last_success_timestamp_seconds", "gauge", "When the worker last succeeded"
    )
    failure = family(
        "worker_last_failure_timestamp_seconds", "gauge", "When the worker last failed"
    )
    for s in health.shared:
        active.add(0 if s.holder_pid is None else 1, kind=s.kind)
        in_row.add(s.consecutive_failures, kind=s.kind)
        success.add(s.last_success, kind=s.kind)
        failure.add(s.last_failure, kind=s.kind)
    family(
        "last_checkpoint_timestamp_seconds", "gauge", "When the last complete checkpoint ended"
    ).add(health.last_checkpoint)
    return out


def _escape(text: str, quote: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def render(families: Iterable[MetricFamily]) -> str:
    """``families`` in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []
    for fam in families:
        # A counter is named with its _total suffix throughout, as prometheus_client writes it
        # (its parser then reports the family without the suffix).
        sample = fam.name + ("_total" if fam.kind == "counter" else "")
        lines.append(f"# HELP {sample} {_escape(fam.help, quote=False)}")
        lines.append(f"# TYPE {sample} {fam.kind}")
        for labels, value in fam.samples:
            if labels:
                text = ",".join(f'{k}="{_escape(v, quote=True)}"' for k, v in labels.items())
                lines.append(f"{sample}{{{text}}} {_number(value)}")
            else:
                lines.append(f"{sample} {_number(value)}")
    return "\n".join(lines) + "\n"


def generate(env: Env) -> str:
    """The environment's metrics in the Prometheus text exposition format: what ``python -m
    aiodbenv metrics`` prints, for a ``/metrics`` endpoint (``Content-Type``:
    :data:`CONTENT_TYPE`). Reads only shared memory: no I/O, nothing to cancel."""
    return render(collect(env))


class Collector:
    """A ``prometheus_client`` collector of an environment's metrics (needs the ``metrics``
    extra: ``pip install 'aiodbenv[metrics]'``). Register it once per process::

        REGISTRY.register(aiodbenv.metrics.Collector(env))

    Each scrape reads the shared region through ``env``; once ``env`` is closed it yields
    nothing (unregister it when closing the environment).
    """

    def __init__(self, env: Env) -> None:
        import prometheus_client.core  # fail at construction, not at the first scrape

        self._core = prometheus_client.core
        self._env = env

    def collect(self) -> Iterator[Any]:
        """Yield ``prometheus_client`` metric families (called by the registry)."""
        if self._env.closed:
            return
        core = self._core
        for fam in collect(self._env):
            if fam.kind == "counter":
                metric: Any = core.CounterMetricFamily(fam.name, fam.help, labels=())
            else:
                metric = core.GaugeMetricFamily(fam.name, fam.help, labels=())
            for labels, value in fam.samples:
                metric.add_sample(
                    fam.name + ("_total" if fam.kind == "counter" else ""), labels, value
                )
            yield metric
