"""Prometheus text exposition of the job store's numbers: queue depth, jobs by state, job latency."""

from __future__ import annotations

from fastgen.jobs import JobStore


def render_metrics(jobs: JobStore) -> str:
    lines = [
        "# HELP fastgen_queue_depth Jobs waiting in each queue.",
        "# TYPE fastgen_queue_depth gauge",
        *(f'fastgen_queue_depth{{queue="{queue}"}} {depth}' for queue, depth in jobs.queue_depths().items()),
        "# HELP fastgen_jobs Jobs by state (queued and running now; final states since the store began).",
        "# TYPE fastgen_jobs gauge",
        *(f'fastgen_jobs{{state="{state}"}} {count}' for state, count in jobs.state_counts().items()),
        *_histogram("fastgen_job_latency_seconds", "Seconds from submission to a final state.", jobs),
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
