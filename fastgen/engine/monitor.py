"""The step loop's one observer: progress and its ETA, cooperative cancellation, and the hooks techniques take part
in the step loop through (the cache captures states there; a LoRA loaded in the background is switched on there)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fastgen.errors import Cancelled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """Reported after every denoising step."""

    step: int
    total: int
    elapsed_s: float
    eta_s: float


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


StepCallback = Callable[[Progress], None]


class StepMonitor:
    """The pipeline's ``callback_on_step_end``: progress, ETA, cooperative cancellation, state capture.

    ``skipped`` steps were not run (a resumed run starts after them): progress counts the full schedule.
    Each of ``hooks`` is called as ``hook(step, latents)`` after each step of the full schedule (the cache captures
    states there; a LoRA loaded in the background is switched on there).
    """

    def __init__(
        self,
        total: int,
        on_step: StepCallback | None,
        cancel: CancelFlag | None,
        skipped: int = 0,
    ):
        self.total, self.on_step, self.cancel = total, on_step, cancel
        self.skipped = skipped
        self.hooks: list[Callable[[int, torch.Tensor | None], None]] = []
        self.start = time.perf_counter()
        self.last_step_at = self.start
        self.steps_done = 0  # steps this run computed

    def __call__(self, pipe, index: int, timestep, callback_kwargs: dict) -> dict:
        self.steps_done = index + 1
        # Some schedulers add steps; a resumed pipeline counts only the steps it runs.
        self.total = self.skipped + (getattr(pipe, "_num_timesteps", None) or self.total - self.skipped)
        self.last_step_at = time.perf_counter()
        elapsed = self.last_step_at - self.start
        step = self.skipped + self.steps_done
        eta = elapsed / self.steps_done * (self.total - step)
        for hook in self.hooks:
            hook(step, callback_kwargs.get("latents"))
        if self.on_step is not None:
            self.on_step(Progress(step, self.total, elapsed, eta))
        self.check_cancel()
        return callback_kwargs

    def legacy_callback(self, index: int, timestep, latents) -> None:
        """The older ``callback(step, timestep, latents)`` some pipelines (PixArt) still take instead."""
        self(None, index, timestep, {"latents": latents})

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(self.skipped + self.steps_done, self.total)


def step_callback(accepted: Mapping[str, Any], monitor: StepMonitor, pipeline_name: str) -> dict:
    """Hook the monitor into whichever step callback the pipeline's ``__call__`` (``accepted``) has."""
    if "callback_on_step_end" in accepted:
        return {"callback_on_step_end": monitor}
    if "callback" in accepted:
        return {"callback": monitor.legacy_callback, "callback_steps": 1}
    logger.warning("%s has no step callback: no progress or cancellation", pipeline_name)
    return {}
