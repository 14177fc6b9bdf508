"""Prometheus text exposition: queue depth, jobs by state, job latency, and the approximate cache's counters.

Each source (the job store, the cache's counters) is read on its own: one that cannot be read (Redis down, a
corrupt SQLite file) is left out of the scrape and ``fastgen_metrics_source_up{source=...}`` says 0, so the
endpoint still answers with everything it could read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from fastgen.jobs import JobStore

logger = logging.getLogger(__name__)

CACHE_COUNTERS = {
    "hits": "Requests that started from a similar earlier prompt's stored state.",
    "misses": "Requests that looked in the approximate cache and ran every step.",
    "steps_saved": "Denoising steps skipped thanks to cache hits.",
    "steps_run": "Denoising steps run by requests that used the cache.",
    "bad_states": "Stored states that could not be read or did not fit their request (treated as misses).",
}
CacheCounters = Callable[[], dict[str, dict[str, int]]]


def render_metrics(jobs: JobStore, cache: CacheCounters | None = None) -> str:
    """The scrape; ``cache`` reads the cache's counters (None when the cache is off)."""
    sources: dict[str, Callable[[], list[str]]] = {"jobs": lambda: _job_lines(jobs)}
    if cache is not None:
        sources["cache"] = lambda: _cache_lines(cache())
    # Read side by side: when Redis hangs, each source waits out its own timeout, and the scrape waits only once.
    with ThreadPoolExecutor(len(sources)) as pool:
        read = {source: pool.submit(reader) for source, reader in sources.items()}
    lines, up = [], {}
    for source, future in read.items():
        try:
            lines += future.result()
            up[source] = 1
        except Exception as exc:  # whatever broke, the other sources are still worth a scrape
            logger.warning("metrics: the %s source could not be read: %s", source, exc)
            up[source] = 0
    lines += [
        "# HELP fastgen_metrics_source_up 1 when this scrape could read the source, 0 when it could not.",
        "# TYPE fastgen_metrics_source_up gauge",
        *(f'fastgen_metrics_source_up{{source="{source}"}} {value}' for source, value in up.items()),
    ]
    return "\n".join(lines) + "\n"


def _job_lines(jobs: JobStore) -> list[str]:
    depths, counts = jobs.queue_depths(), jobs.state_counts()
    return [
        "# HELP fastgen_queue_depth Jobs waiting in each queue.",
        "# TYPE fastgen_queue_depth gauge",
        *(f'fastgen_queue_depth{{queue="{queue}"}} {depth}' for queue, depth in depths.items()),
        "# HELP fastgen_jobs Jobs by state (queued and running now; final states since the store began).",
        "# TYPE fastgen_jobs gauge",
        *(f'fastgen_jobs{{state="{state}"}} {count}' for state, count in counts.items()),
        *_histogram("fastgen_job_latency_seconds", "Seconds from submission to a final state.", jobs),
    ]


def _histogram(name: str, help_text: str, jobs: JobStore) -> list[str]:
    histogram = jobs.latency()
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, count in zip(histogram.buckets, histogram.counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
    return lines + [f"{name}_sum {histogram.total:.6f}", f"{name}_count {histogram.count}"]


def _cache_lines(counters: dict[str, dict[str, int]]) -> list[str]:
    lines = []
    for name, help_text in CACHE_COUNTERS.items():
        metric = f"fastgen_cache_{name}_total"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        lines += [f'{metric}{{model="{model}"}} {value}' for model, value in sorted(counters.get(name, {}).items())]
    return lines
