"""HTML for the page's read-outs: progress, problems, what a job did, the session's history.

Pure functions of what the service answered, so they are tested without a browser. Everything that
came from a user or the service is escaped; a problem is a sentence, never a traceback.
"""

from __future__ import annotations

import time
from html import escape
from typing import Any

import httpx

from fastgen.client import ServiceError
from fastgen.ui.session import Job

DASH = "&mdash;"


def progress_html(job: Job | None) -> str:
    """A bar with "step i of N, ETA x s" for the newest job, or its final state."""
    if job is None:
        return _bar("idle", 0, "No job yet: write a prompt and press Generate.")
    step, total, eta = _progress(job)
    fraction = step / total if total else 0.0
    if job.status == "queued":
        text = "queued: waiting for a worker" + (" (cancelling)" if job.cancel_requested else "")
    elif job.status == "running":
        text = f"step {step} of {total}, ETA {eta:.1f} s" if total else "starting: loading the model"
        text += " (cancelling)" if job.cancel_requested else ""
    elif job.status == "succeeded":
        fraction, timings = 1.0, (job.result or {}).get("timings", {})
        text = f"done: {(job.result or {}).get('steps', total)} steps in {timings.get('total_s', 0):.2f} s"
    elif job.status == "cancelled":
        text = f"cancelled at step {step} of {total}" if total else "cancelled before it started"
    else:
        text = f"failed: {job.error or 'the job failed'}"
    return _bar(job.status, fraction, text)


def refused_html(text: str) -> str:
    """The bar for a submission the service did not queue."""
    return _bar("refused", 0, text)


def _progress(job: Job) -> tuple[int, int, float]:
    progress = job.progress or {}
    return int(progress.get("step", 0)), int(progress.get("total", 0)), float(progress.get("eta_s", 0.0))


def _bar(state: str, fraction: float, text: str) -> str:
    percent = max(0.0, min(1.0, fraction)) * 100
    return (
        f'<div class="fg-progress" data-state="{escape(state)}">'
        f'<div class="fg-track"><div class="fg-fill" style="width: {percent:.1f}%"></div></div>'
        f'<div class="fg-progress-text">{escape(text)}</div></div>'
    )


def problem_text(exc: Exception, api_url: str) -> tuple[str, list[dict[str, str]]]:
    """A readable sentence for what went wrong talking to the service, and the fields it named."""
    if isinstance(exc, ServiceError):
        if exc.status_code == 422:
            return "The service refused the request:", exc.detail or [{"field": "request", "message": exc.message}]
        if exc.status_code == 401:
            return f"The service at {api_url} needs an API key the page was not given ({exc.message}).", []
        if exc.status_code == 503:
            return f"The service is up but its job queue is not: {exc.message}", []
        return f"The service answered {exc.status_code}: {exc.message}", []
    if isinstance(exc, httpx.TimeoutException):
        return f"The service at {api_url} did not answer in time; it may be overloaded. Try again.", []
    if isinstance(exc, httpx.HTTPError):
        return f"The service at {api_url} cannot be reached ({_reason(exc)}). Is `fastgen serve` running?", []
    return f"Something went wrong in the page: {type(exc).__name__}: {exc}", []


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def unusable_text(models: list[dict[str, Any]]) -> tuple[str, list[dict[str, str]]]:
    """The served models the service could not read, each with why (the others are offered as usual)."""
    fields = [{"field": str(m.get("name")), "message": str(m.get("error", "cannot be used"))} for m in models]
    return "Some of the service's models cannot be used:", fields


def problem_html(headline: str, fields: list[dict[str, str]] | None = None) -> str:
    items = "".join(
        f"<li><code>{escape(str(f.get('field', 'request')))}</code>: {escape(str(f.get('message', '')))}</li>"
        for f in fields or []
    )
    return (
        f'<div class="fg-problem" role="alert"><b>{escape(headline)}</b>{f"<ul>{items}</ul>" if items else ""}</div>'
    )


def field_problems_html(problems: list[tuple[str, str]]) -> str:
    """What the service said about one control's fields, shown right under that control ("" when nothing)."""
    items = "".join(f"<li><b>{escape(label)}</b>: {escape(message)}</li>" for label, message in problems)
    return f'<ul class="fg-field-problem" role="alert">{items}</ul>' if items else ""


def metadata_html(job: Job | None) -> str:
    """What the newest job did: seed, size, device, timings and each acceleration's report."""
    if job is None or job.result is None:
        return ""
    r = job.result
    size = f"{r['width']}&times;{r['height']}" + (f", {r['num_frames']} frames" if r.get("num_frames") else "")
    seed = f"{r['seed']}" + (" (picked at random)" if job.random_seed else "")
    rows = [
        ("job", f"<code>{escape(job.id)}</code>"),
        ("model", escape(r["model"])),
        ("seed", seed),
        ("size", size),
        ("steps", str(r["steps"])),
        ("device", escape(str(r.get("device", "")))),
        ("time", _timings(r.get("timings", {}))),
        ("LoRAs", _loras(r.get("accelerations", []))),
        ("accelerations", _accelerations([a for a in r.get("accelerations", []) if a["name"] != "loras"])),
    ]
    body = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    return f'<table class="fg-meta">{body}</table>'


def _timings(t: dict[str, float]) -> str:
    return (
        f"{t.get('per_step_s', 0) * 1000:.1f} ms per step; load {t.get('load_s', 0):.2f} s, "
        f"denoise {t.get('denoise_s', 0):.2f} s, encode {t.get('encode_s', 0):.2f} s, "
        f"total {t.get('total_s', 0):.2f} s"
    )


def _accelerations(reports: list[dict[str, Any]]) -> str:
    if not reports:
        return "none"
    return "; ".join(f"<b>{escape(a['name'])}</b>{_pairs(a.get('config'))}{_pairs(a.get('details'))}" for a in reports)


def _loras(reports: list[dict[str, Any]]) -> str:
    report = next((a for a in reports if a["name"] == "loras"), None)
    if report is None:
        return "none"
    return ", ".join(_lora(item) for item in report["details"].get("adapters", []))


def _lora(item: dict[str, Any]) -> str:
    how = "resident" if item.get("resident") else f"swapped in ({item.get('swap_s', 0) * 1000:.0f} ms)"
    late = f", on from step {item['applied_at_step']}" if "applied_at_step" in item else ""
    return f"<b>{escape(item['name'])}</b> &times; {_short(float(item['scale']))} ({how}{late})"


def _pairs(values: dict[str, Any] | None) -> str:
    if not values:
        return ""
    return (
        " (" + ", ".join(f"{escape(str(k)).replace('_', ' ')}: {escape(_short(v))}" for k, v in values.items()) + ")"
    )


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def history_html(jobs: list[Job]) -> str:
    """This browser session's jobs, newest first, with what each one reported."""
    if not jobs:
        return '<p class="fg-empty">Jobs you start from this page are listed here.</p>'
    head = "".join(
        f"<th>{h}</th>" for h in ("when", "model", "prompt", "status", "seed", "per step", "total", "accel")
    )
    return f'<table class="fg-history"><tr>{head}</tr>{"".join(_history_row(job) for job in jobs)}</table>'


def _history_row(job: Job) -> str:
    r = job.result or {}
    timings = r.get("timings", {})
    status = job.status if job.status != "failed" else f"failed: {job.error or ''}"
    if job.status == "running" and job.progress:
        status = f"running {job.progress.get('step', 0)}/{job.progress.get('total', 0)}"
    cells = [
        time.strftime("%H:%M:%S", time.localtime(job.submitted_at)),
        escape(job.model),
        escape(job.prompt if len(job.prompt) <= 60 else job.prompt[:57] + "..."),
        escape(status),
        str(r["seed"]) if "seed" in r else DASH,
        f"{timings['per_step_s'] * 1000:.1f} ms" if timings else DASH,
        f"{timings['total_s']:.2f} s" if timings else DASH,
        escape(", ".join(a["name"] for a in r.get("accelerations", []))) or DASH,
    ]
    row = "".join(f"<td>{cell}</td>" for cell in cells)
    return f'<tr data-job="{escape(job.id)}" data-status="{escape(job.status)}">{row}</tr>'
