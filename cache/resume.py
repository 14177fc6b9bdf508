"""Capture a pipeline's denoising state after K steps, and resume another run from it.

A state is the latents after K steps plus whatever history the scheduler carries into step K+1
(multistep solvers keep their last model outputs). Resuming runs the pipeline's own loop over the
remaining timesteps only: for the call, ``pipe.scheduler`` is a thin proxy that shows the pipeline
the tail of the schedule while the real scheduler keeps its full schedule, its step index starts at
K and its history is restored, so step K+1 is computed exactly as in an uninterrupted run.
Resuming a prompt from its own state therefore reproduces the uninterrupted output bit for bit.

Schedulers that draw fresh noise in their steps (DDPM, ancestral and SDE samplers) cannot be
resumed exactly from a stored state; :func:`resumable` says so and the cache treats them as a miss.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import sys
from dataclasses import dataclass
from typing import Any

import torch

# Scheduler class -> the attributes that carry history from one step into the next.
HISTORY: dict[str, tuple[str, ...]] = {
    "DDIMScheduler": (),
    "EulerDiscreteScheduler": (),
    "FlowMatchEulerDiscreteScheduler": (),
    "DPMSolverMultistepScheduler": ("model_outputs", "lower_order_nums"),
    "UniPCMultistepScheduler": ("model_outputs", "timestep_list", "lower_order_nums", "last_sample", "this_order"),
}


def resumable(scheduler) -> str | None:
    """None when ``scheduler`` can resume exactly from a stored state, else the reason it cannot."""
    name = scheduler.__class__.__name__  # __class__: a resuming proxy answers for the scheduler it wraps
    if name not in HISTORY:
        return f"scheduler {name} cannot resume exactly from a stored state"
    if str(getattr(scheduler.config, "algorithm_type", "")).startswith("sde"):
        return f"scheduler {name} with a stochastic (SDE) solver cannot resume exactly"
    if getattr(scheduler.config, "s_churn", 0.0):
        return f"scheduler {name} with s_churn > 0 adds noise and cannot resume exactly"
    return None


@dataclass(frozen=True)
class State:
    """The denoising state after ``step`` of ``total`` steps.

    ``prediction``: what the denoiser predicted from these latents for the run's own prompt (its conditional output at
    step ``step``), and ``unconditional``, its unconditional one where the run used classifier-free guidance: kept
    where the quality-aware check compares a new prompt against them (``fastgen.cache.check``)."""

    step: int
    total: int
    latents: torch.Tensor
    history: dict[str, Any]
    prediction: torch.Tensor | None = None
    unconditional: torch.Tensor | None = None


def capture(scheduler, latents: torch.Tensor, step: int, total: int) -> State:
    """A CPU copy of the state after ``step`` steps (call it from the step-end callback)."""
    history = {name: _copy(getattr(scheduler, name)) for name in HISTORY[scheduler.__class__.__name__]}
    return State(step, total, latents.detach().to("cpu", copy=True), history)


PREDICTED = ("prediction", "unconditional")  # the check's tensors, kept per image like the latents


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    return torch.cat(tensors) if all(t is not None for t in tensors) else None


def stack(states: list[State]) -> State:
    """One state for a batch of images, one per image in order (its latents and sample-shaped history stacked along
    the batch); a single state as it is."""
    if len(states) == 1:
        return states[0]
    first = states[0]
    history = {
        name: _batched([state.history[name] for state in states]) if name in SAMPLE_SHAPED else value
        for name, value in first.history.items()
    }
    latents = torch.cat([state.latents for state in states])
    return State(
        first.step, first.total, latents, history, *(_cat([getattr(s, n) for s in states]) for n in PREDICTED)
    )


def split(state: State, count: int) -> list[State]:
    """The state of each of a batch's ``count`` images (``stack`` undone)."""
    if count == 1:
        return [state]

    def sample(value, i: int):
        if isinstance(value, torch.Tensor):
            return value[i : i + 1].clone()
        return [sample(v, i) for v in value] if isinstance(value, list) else value

    return [
        State(
            state.step,
            state.total,
            state.latents[i : i + 1].clone(),
            {name: sample(value, i) if name in SAMPLE_SHAPED else value for name, value in state.history.items()},
            *(None if getattr(state, n) is None else sample(getattr(state, n), i) for n in PREDICTED),
        )
        for i in range(count)
    ]


def _batched(values: list):
    """Per-image history values (tensors, lists of them, or None) stacked along the batch."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(values)
    if isinstance(first, list):
        return [_batched([value[i] for value in values]) for i in range(len(first))]
    return first


def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, list | tuple):
        return [_copy(v) for v in value]
    return value


def flatten(history: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """History as named tensors (for safetensors) plus a JSON-able layout that rebuilds it."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(name: str, value):
        if isinstance(value, torch.Tensor):
            tensors[name] = value.contiguous()
            return {"tensor": name}
        if isinstance(value, list):
            return {"list": [encode(f"{name}.{i}", v) for i, v in enumerate(value)]}
        if value is None or isinstance(value, int | float | bool):
            return {"value": value}
        raise TypeError(f"cannot store scheduler history value of type {type(value).__name__}")

    layout = {name: encode(f"history.{name}", value) for name, value in history.items()}
    return tensors, layout


def unflatten(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    def decode(node):
        if "tensor" in node:
            return tensors[node["tensor"]]
        if "list" in node:
            return [decode(item) for item in node["list"]]
        return node["value"]

    return {name: decode(node) for name, node in layout.items()}


def to_safetensors(state: State) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, layout = flatten(state.history)
    meta = {"step": str(state.step), "total": str(state.total), "history": json.dumps(layout)}
    for name in PREDICTED:
        if getattr(state, name) is not None:
            tensors[name] = getattr(state, name).contiguous()
    return {"latents": state.latents.contiguous(), **tensors}, meta


def from_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> State:
    history = unflatten(tensors, json.loads(meta["history"]))
    predicted = (tensors.get(name) for name in PREDICTED)
    return State(int(meta["step"]), int(meta["total"]), tensors["latents"], history, *predicted)


# History values shaped like the latents (model outputs, the previous sample); other history tensors are scalars.
SAMPLE_SHAPED = frozenset({"model_outputs", "last_sample"})


@dataclass(frozen=True)
class Expected:
    """What a state must hold to resume one request on one pipeline."""

    shapes: frozenset[tuple[int, ...]]  # the latents' may have any of these (see latent_shapes)
    dtypes: frozenset[torch.dtype]  # the latents' may be any of these
    history: tuple[str, ...]  # the names the scheduler carries from one step into the next
    order: int  # entries in each list-valued history: the solver's order (1 for single-step schedulers)


def expected(pipe, width: int, height: int, num_frames: int | None) -> Expected:
    """What ``pipe`` computes for a request of this size, derived as the pipeline itself derives it."""
    scheduler = pipe.scheduler
    # The pipeline's dtype or float32, and no other even where the cast would be lossless: Wan draws its latents in
    # float32 and multistep solvers hand float32 back for half-precision model outputs, so a run like this one leaves
    # either; any other dtype (float64, integers, the other half type) was not captured by such a run.
    dtypes = frozenset({pipe.dtype, torch.float32})
    history, order = HISTORY[scheduler.__class__.__name__], getattr(scheduler.config, "solver_order", 1)
    return Expected(latent_shapes(pipe, width, height, num_frames), dtypes, history, order)


def latent_shapes(pipe, width: int, height: int, num_frames: int | None) -> frozenset[tuple[int, ...]]:
    """The shapes the latents of one prompt and one output (all a request asks) may have on ``pipe``: the request's
    size, and for PixArt also the trained size it draws at unless its call says ``use_resolution_binning=False``,
    which the cache does not see."""
    return frozenset(latent_shape(pipe, w, h, num_frames) for h, w in {(height, width), *_binned(pipe, width, height)})


def latent_shape(pipe, width: int, height: int, num_frames: int | None) -> tuple[int, ...]:
    """The shape of the latents ``pipe.prepare_latents`` makes for one prompt and one output at this size."""
    # Wan may hold only its second transformer; its own prepare_latents takes the channels from that one then.
    denoisers = (getattr(pipe, name, None) for name in ("transformer", "transformer_2", "unet"))
    channels = next(module for module in denoisers if module is not None).config.in_channels
    if hasattr(pipe, "vae_scale_factor_temporal"):  # Wan: the video VAE compresses time as well
        scale = pipe.vae_scale_factor_spatial
        frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        return (1, channels, frames, height // scale, width // scale)
    scale = pipe.vae_scale_factor
    if hasattr(pipe, "_pack_latents"):  # Flux: 2 x 2 latent patches packed into tokens of in_channels
        return (1, (height // (2 * scale)) * (width // (2 * scale)), channels)
    if num_frames is not None:  # AnimateDiff: one latent per frame
        return (1, channels, num_frames, height // scale, width // scale)
    return (1, channels, height // scale, width // scale)


# PixArt's table of trained sizes, by its transformer's sample size (as its pipeline chooses it).
BIN_TABLES = {
    256: "ASPECT_RATIO_2048_BIN",
    128: "ASPECT_RATIO_1024_BIN",
    64: "ASPECT_RATIO_512_BIN",
    32: "ASPECT_RATIO_256_BIN",
}


def _binned(pipe, width: int, height: int) -> list[tuple[int, int]]:
    """(height, width) the pipeline bins this size to, when it can bin at all; else nothing."""
    if "use_resolution_binning" not in inspect.signature(type(pipe).__call__).parameters:
        return []
    table = getattr(sys.modules[type(pipe).__module__], BIN_TABLES.get(pipe.transformer.config.sample_size, ""), None)
    return [tuple(pipe.image_processor.classify_height_width_bin(height, width, ratios=table))] if table else []


def fits(state: State, expected: Expected) -> str | None:
    """None when ``state`` can resume the request ``expected`` describes, else the reason it does not fit."""
    latents = state.latents
    if tuple(latents.shape) not in expected.shapes:
        computes = " or ".join(str(list(shape)) for shape in sorted(expected.shapes))
        return f"latents of shape {list(latents.shape)}, the request computes {computes}"
    if latents.dtype not in expected.dtypes:
        return f"latents in {latents.dtype}, the pipeline computes in {' or '.join(sorted(map(str, expected.dtypes)))}"
    if not torch.isfinite(latents).all():
        return "latents not finite (NaN or infinite values)"
    if sorted(state.history) != sorted(expected.history):
        return f"scheduler history {sorted(state.history)}, the scheduler carries {sorted(expected.history)}"
    for name, value in state.history.items():
        reason = _history_misfit(name, value, expected.order, tuple(latents.shape))
        if reason is not None:
            return reason
    return None


def _history_misfit(name: str, value, order: int, latents: tuple[int, ...]) -> str | None:
    if isinstance(value, list) and len(value) != order:
        return f"scheduler history {name} holds {len(value)} entries, the solver keeps {order}"
    shape = latents if name in SAMPLE_SHAPED else ()
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, torch.Tensor | int | float | None):  # what flatten writes (bool is an int)
            return f"scheduler history {name} holds a {type(item).__name__}"
        if isinstance(item, torch.Tensor) and tuple(item.shape) != shape:
            return f"scheduler history {name} of shape {list(item.shape)}, the request computes {list(shape)}"
        if isinstance(item, torch.Tensor) and not torch.isfinite(item).all():
            return f"scheduler history {name} not finite (NaN or infinite values)"
    return None


def noise_level(scheduler, steps: int, step: int) -> float:
    """How much unit noise the latents hold after ``step`` of ``steps`` steps: latents = signal + level * noise."""
    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t"):  # multistep solvers: VP or flow sigmas
        return float(scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[step])[1])
    if hasattr(scheduler, "sigmas"):  # Euler and flow-matching Euler: latents = x0 + sigma * noise (scaled)
        return float(scheduler.sigmas[step])
    alpha = scheduler.alphas_cumprod[int(scheduler.timesteps[step])]  # DDIM: variance-preserving
    return float((1 - alpha).sqrt())


def starting_noise(shape: torch.Size, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The unit noise a pipeline starts from with fastgen's seeded CPU generator."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=dtype)


def reseed(state: State, scheduler, from_seed: int, to_seed: int) -> State:
    """The state with the noise of ``from_seed``'s start swapped for ``to_seed``'s, at the state's noise level.

    A stored state is roughly signal + level * (its run's starting noise). Swapping in the request's own starting
    noise keeps the denoised content the earlier run reached and gives the rest of the run this request's own
    randomness, so a hit lands nearer to what the request would have drawn uncached (identity for equal seeds).
    """
    if from_seed == to_seed:
        return state
    level = noise_level(scheduler, state.total, state.step)
    shape, dtype = state.latents.shape, state.latents.dtype
    swapped = state.latents + level * (starting_noise(shape, to_seed, dtype) - starting_noise(shape, from_seed, dtype))
    return dataclasses.replace(state, latents=swapped)


class ResumingScheduler:
    """Stands in for ``pipe.scheduler`` during a resumed call; everything else goes to the real one."""

    def __init__(self, scheduler, state: State, device: torch.device, dtype: torch.dtype):
        object.__setattr__(self, "_inner", scheduler)
        object.__setattr__(self, "_state", state)
        object.__setattr__(self, "_device", device)
        object.__setattr__(self, "_dtype", dtype)

    @property
    def __class__(self):  # isinstance checks in pipelines see the real scheduler's class
        return type(self._inner)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._inner, name, value)

    @property
    def timesteps(self):
        """What the pipeline loops over: the steps after K only."""
        return self._inner.timesteps[self._state.step :]

    @property
    def init_noise_sigma(self) -> float:
        return 1.0  # the stored latents are already at the scale of step K

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Some pipelines (Wan) pin the begin index themselves; it counts from the resumed step."""
        self._inner.set_begin_index(self._state.step + begin_index)

    def set_timesteps(self, *args, **kwargs):
        result = self._inner.set_timesteps(*args, **kwargs)
        inner, state = self._inner, self._state
        if len(inner.timesteps) != state.total:
            raise ValueError(f"scheduler made {len(inner.timesteps)} steps, the state was taken from {state.total}")
        if hasattr(inner, "set_begin_index"):
            inner.set_begin_index(state.step)
        for name, value in state.history.items():
            setattr(inner, name, _to(value, self._device, self._dtype))
        return result


def _to(value, device: torch.device, dtype: torch.dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, list):
        return [_to(v, device, dtype) for v in value]
    return value


class ResumeHandle:
    """Puts the real scheduler back, with exactly the state it had before the call."""

    def __init__(self, pipe, scheduler, saved: dict[str, Any]):
        self.pipe, self.scheduler, self.saved = pipe, scheduler, saved

    def remove(self) -> None:
        # Straight into __dict__: diffusers' __setattr__ would rewrite the pipeline's config.
        self.pipe.__dict__["scheduler"] = self.scheduler
        self.scheduler.__dict__.clear()
        self.scheduler.__dict__.update(self.saved)


def apply(pipe, state: State) -> tuple[ResumeHandle, dict[str, Any]]:
    """Make the next ``pipe(...)`` call start after ``state.step``; returns the handle and the call's extra kwargs."""
    reason = resumable(pipe.scheduler)
    if reason is not None:
        raise ValueError(reason)
    scheduler = pipe.scheduler
    device, dtype = pipe.device, pipe.dtype
    handle = ResumeHandle(pipe, scheduler, copy.deepcopy(scheduler.__dict__))
    pipe.__dict__["scheduler"] = ResumingScheduler(scheduler, state, device, dtype)
    return handle, {"latents": state.latents.to(device, dtype)}
