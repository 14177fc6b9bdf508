"""What one browser session knows: the served models and its jobs, as the service last reported them.

Kept in a ``gr.State``, so each browser tab has its own history. Nothing here talks to the service;
:mod:`fastgen.ui.page` polls it and feeds the answers in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Job:
    """One submitted job, as this page last saw it."""

    id: str
    model: str
    kind: str  # "image" or "video", from the model's capabilities
    prompt: str
    random_seed: bool
    submitted_at: float = field(default_factory=time.time)
    status: str = "queued"
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)  # local copies of the result's files, for Gradio to serve
    media_type: str | None = None
    cancel_requested: bool = False

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def update(self, status: dict[str, Any]) -> bool:
        """Take in a ``GET /v1/jobs/{id}`` answer; True when the job has just ended."""
        was_done = self.done
        self.status = status["status"]
        self.progress = status.get("progress") or self.progress
        self.result = status.get("result")
        self.error = status.get("error")
        return self.done and not was_done

    def captions(self) -> list[tuple[str, str]]:
        """Each image file with its caption: the prompt and that image's own seed."""
        result = self.result or {}
        artifacts = result.get("artifacts", [])
        seeds = [a.get("seed") for a in artifacts] if len(artifacts) == len(self.files) else [result.get("seed")]
        return [(file, f"{self.prompt} (seed {seed})") for file, seed in zip(self.files, seeds, strict=True)]

    @property
    def is_video(self) -> bool:
        return bool(self.media_type and self.media_type.startswith("video/"))


@dataclass
class Session:
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> capabilities
    jobs: list[Job] = field(default_factory=list)  # newest first
    poll_failed: bool = False  # the last status poll could not reach the service

    def add(self, job: Job) -> None:
        self.jobs.insert(0, job)

    @property
    def latest(self) -> Job | None:
        return self.jobs[0] if self.jobs else None

    def unfinished(self) -> list[Job]:
        return [job for job in self.jobs if not job.done]

    def with_files(self) -> list[Job]:
        return [job for job in self.jobs if job.files]

    def latest_video(self) -> Job | None:
        return next((job for job in self.with_files() if job.is_video), None)
