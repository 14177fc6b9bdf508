"""Prometheus text exposition: queue depth, jobs by state, job latency, and the approximate cache's counters."""

from __future__ import annotations

from fastgen.jobs import JobStore

CACHE_COUNTERS = {
    "hits": "Requests that started from a similar earlier prompt's stored state.",
    "misses": "Requests that looked in the approximate cache and ran every step.",
    "steps_saved": "Denoising steps skipped thanks to cache hits.",
    "steps_run": "Denoising steps run by requests that used the cache.",
    "bad_states": "Stored states that could not be read (treated as misses).",
}


def render_metrics(jobs: JobStore, cache: dict[str, dict[str, int]] | None = None) -> str:
    lines = [
        "# HELP fastgen_queue_depth Jobs waiting in each queue.",
        "# TYPE fastgen_queue_depth gauge",
        *(f'fastgen_queue_depth{{queue="{queue}"}} {depth}' for queue, depth in jobs.queue_depths().items()),
        "# HELP fastgen_jobs Jobs by state (queued and running now; final states since the store began).",
        "# TYPE fastgen_jobs gauge",
        *(f'fastgen_jobs{{state="{state}"}} {count}' for state, count in jobs.state_counts().items()),
        *_histogram("fastgen_job_latency_seconds", "Seconds from submission to a final state.", jobs),
        *(_cache_counters(cache) if cache is not None else []),
    ]
    return "\n".join(lines) + "\n"


def _histogram(name: str, help_text: str, jobs: JobStore) -> list[str]:
    histogram = jobs.latency()
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, count in zip(histogram.buckets, histogram.counts, strict=True):
        cumulative += count
        le = "+Inf" if bound == float("inf") else f"{bound:g}"
        lines.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
    return lines + [f"{name}_sum {histogram.total:.6f}", f"{name}_count {histogram.count}"]


def _cache_counters(counters: dict[str, dict[str, int]]) -> list[str]:
    lines = []
    for name, help_text in CACHE_COUNTERS.items():
        metric = f"fastgen_cache_{name}_total"
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        lines += [f'{metric}{{model="{model}"}} {value}' for model, value in sorted(counters.get(name, {}).items())]
    return lines
