"""The approximate noise-state cache attached to one run: start after the matched states' steps, capture each
member's states as the run denoises, store them when it completes.

Nirvana (Agarwal et al., "Approximate Caching for Efficiently Serving Text-to-Image Diffusion Models", NSDI 2024);
the cache itself (index, policy, stores, exact resume) is ``fastgen.cache``. Each member of the run was looked up
when the engine built it (``Member.cached``); the engine puts members with the same start step in one run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastgen.accelerators.sparse_attention import denoisers
from fastgen.cache import resume
from fastgen.cache.predict import Prediction, PredictionTap

if TYPE_CHECKING:
    import torch

    from fastgen.engine.run import Run


@dataclass(frozen=True)
class CacheUse:
    """No knobs of its own: each member's lookup decided what the cache does for it."""


def from_run(run: Run) -> CacheUse | None:
    """On when some member of the run uses the cache."""
    return CacheUse() if any(member.cached for member in run.members) else None


def apply(pipe, config: CacheUse, run: Run) -> CachedRun:
    """On a hit, the pipeline resumes from the members' stored states (``start_step`` steps later), stacked image
    after image."""
    starts = {member.start_step for member in run.members}
    if len(starts) != 1:
        raise ValueError(f"the members of one run must start at the same step, got {sorted(starts)}")
    states = [state for member in run.members if member.cached for state in member.cached.start_states()]
    wanted = any(member.cached and member.cached.prediction_step is not None for member in run.members)
    tap = PredictionTap(denoisers(pipe), len(run.seeds), armed=False) if wanted else None
    if not states:
        return CachedRun(run, lambda: None, {}, 0, tap)
    handle, kwargs = resume.apply(pipe, resume.stack(states))
    return CachedRun(run, handle.remove, kwargs, starts.pop(), tap)


class CachedRun:
    """The cache's handle: ``start_step`` and ``call_kwargs`` resume a hit, ``on_step`` captures each member's states
    at its marks, ``report`` stores them after a completed run, one report per member (unless a technique changed
    the denoiser mid-run: the states are not the prompts' own then; nor for a member that was cancelled)."""

    def __init__(self, run: Run, detach, call_kwargs: dict[str, Any], start_step: int, tap: PredictionTap | None):
        self.run, self.detach, self.call_kwargs, self.start_step = run, detach, call_kwargs, start_step
        self.tap = tap  # the denoiser's predictions, for the states that keep them (the quality-aware check's)

    def on_step(self, step: int, latents: torch.Tensor | None) -> None:
        if self.tap is not None and self.tap.armed:
            self._keep_prediction(step - 1, self.tap.take())
        members = self.run.members
        wanted = [member.cached is not None and step in member.cached.marks for member in members]
        if latents is None or not any(wanted):
            return
        scheduler = self.run.loaded.pipe.scheduler
        images = resume.split(resume.capture(scheduler, latents, step, self.run.request.steps), len(self.run.seeds))
        first = 0
        for member, wants in zip(members, wanted, strict=True):
            count = len(member.seeds)
            if wants:
                member.cached.captured.append(resume.stack(images[first : first + count]))
            first += count
        if self.tap is not None and any(m.cached and m.cached.prediction_step == step for m in members):
            self.tap.arm()  # the next step predicts from the latents just captured

    def _keep_prediction(self, step: int, prediction: Prediction | None) -> None:
        """The step just run predicted from the latents after ``step``: keep it with the states captured there."""
        first = 0
        for member in self.run.members:
            count, cached = len(member.seeds), member.cached
            if prediction is not None and cached and cached.prediction_step == step and cached.captured:
                state = cached.captured[-1]
                if state.step == step and prediction.conditional.shape[1:] == state.latents.shape[1:]:
                    own = prediction.rows(first, count)
                    cached.captured[-1] = dataclasses.replace(
                        state, prediction=own.conditional, unconditional=own.unconditional
                    )
            first += count

    def remove(self) -> None:
        if self.tap is not None:
            self.tap.remove()
        self.detach()

    def report(self) -> list[dict[str, Any] | None]:
        reports = []
        for member in self.run.members:
            cached = member.cached
            if cached is None or member.cancelled is not None:
                reports.append(None)
                continue
            if self.run.changed_mid_run:
                cached.captured.clear()
            reports.append(cached.finish())
        return reports
