"""Sparse self-attention for DiTs, with Re-ttention's statistical reshape.

Papers:
- Re-ttention: Chen et al., "Re-ttention: Ultra Sparse Visual Generation via Attention Statistical Reshape",
  NeurIPS 2025 (arXiv:2505.22918): sparse steps rescaled by the softmax mass a full step found inside the mask,
  plus the full-minus-sparse residual, so very sparse masks (about 3% of the tokens) keep the full attention's
  normalisation.
- Sparse VideoGen: Xi et al., "Sparse VideoGen: Accelerating Video Diffusion Transformers with Spatial-Temporal
  Sparsity", ICML 2025 (arXiv:2502.01776): each head of a video DiT is spatial or temporal, chosen online from a few
  sampled query rows.
- FlexAttention: Dong et al., "Flex Attention: A Programming Model for Generating Optimized Attention Kernels", 2024
  (arXiv:2412.05496): block masks, so skipped blocks cost nothing.

Each request's schedule counts denoising steps, not model calls: a step is a run of denoiser calls with the same
timestep, so a pipeline that calls the model once per guidance branch (Wan) and one that batches the branches
(PixArt) are scheduled alike, and each branch keeps its own statistics. The first ``dense_steps - 1`` steps run the
model's own attention; step ``dense_steps - 1`` and every ``refresh_every``-th step after it are full steps that
record statistics (refresh); the others are sparse.

``apply`` swaps the self-attention processors of the pipeline's denoiser(s) and adds a forward pre-hook that counts
the steps; ``remove()`` puts back the very processor objects it found and takes the hooks off.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from fastgen.attention.kernels import FlexKernel, Kernel, ReferenceKernel
from fastgen.attention.patterns import TokenLayout
from fastgen.attention.processors import CallKind, SparseAttentionState, SparseSelfAttention
from fastgen.attention.projections import PROJECTIONS
from fastgen.schema import GenerationRequest
from fastgen.techniques.sparse_attention import SPARSE_ATTENTION_MODES

if TYPE_CHECKING:
    from fastgen.engine.run import Run

logger = logging.getLogger(__name__)

KERNELS = ("flex", "flex-eager", "reference")


@dataclass(frozen=True)
class SparseAttentionConfig:
    """Sparse self-attention (Re-ttention, NeurIPS 2025; Sparse VideoGen, ICML 2025; FlexAttention, Dong et al. 2024).

    mode: ``window`` (a window of key blocks over the flattened tokens) or ``video-heads`` (spatial or temporal per
    head, profiled). density: share of the image keys each query attends to. block_size: tokens per block of the
    block mask. dense_steps: full-attention steps at the start (the last one records statistics). refresh_every:
    steps between later full steps (0: none). reshape: Re-ttention's rescaling by the recorded softmax mass;
    residual: also add the recorded full-minus-sparse residual. profile_rows: sampled query rows per head choice.
    kernel: ``flex`` (compiled FlexAttention), ``flex-eager`` (uncompiled: tiny sizes only) or ``reference``
    (SDPA with a dense mask: correctness checks).
    """

    mode: Literal["window", "video-heads"] = "window"
    density: float = 0.03125
    block_size: int = 128
    dense_steps: int = 2
    refresh_every: int = 10
    reshape: bool = True
    residual: bool = True
    profile_rows: int = 64
    kernel: Literal["flex", "flex-eager", "reference"] = "flex"

    def __post_init__(self) -> None:
        _check(self.mode in SPARSE_ATTENTION_MODES[1:], "mode", f"must be one of {SPARSE_ATTENTION_MODES[1:]}")
        _check(0.0 < self.density <= 1.0, "density", "must be in (0, 1]")
        _check(1 <= self.block_size <= 1024, "block_size", "must be 1 to 1024 tokens")
        _check(self.dense_steps >= 1, "dense_steps", "must be at least 1 (the first full step records statistics)")
        _check(self.refresh_every >= 0, "refresh_every", "must be 0 (never) or more")
        _check(self.profile_rows >= 1, "profile_rows", "must be at least 1")
        _check(self.kernel in KERNELS, "kernel", f"must be one of {KERNELS}")


def _check(ok: bool, name: str, rule: str) -> None:
    if not ok:
        raise ValueError(f"sparse_attention.{name} {rule}")


def from_request(request: GenerationRequest, **overrides: Any) -> SparseAttentionConfig | None:
    """The request's config (its model's defaults already filled in by ``ModelSpec.complete``), or None when off.
    ``overrides`` set fields the request does not carry (the kernel, in tests and benchmarks)."""
    options = request.accelerate.sparse_attention
    if options.mode == "off":
        return None
    asked = {name: value for name, value in options.model_dump().items() if value is not None}
    return SparseAttentionConfig(**asked | overrides)


def from_run(run: Run, **overrides: Any) -> SparseAttentionConfig | None:
    return from_request(run.request, **overrides)


def step_kind(step: int, dense_steps: int, refresh_every: int) -> CallKind:
    """What attention step ``step`` (0-based) runs: the model's own, a full step that records, or sparse."""
    first_refresh = dense_steps - 1
    if step < first_refresh:
        return "dense"
    since = step - first_refresh
    if since == 0 or (refresh_every > 0 and since % refresh_every == 0):
        return "refresh"
    return "sparse"


def make_kernel(name: str) -> Kernel:
    return ReferenceKernel() if name == "reference" else FlexKernel(compiled=name == "flex")


def denoisers(pipe) -> list[torch.nn.Module]:
    """The pipeline's denoising networks: its transformer(s) (Wan 2.2 has two) or its UNet."""
    found = [getattr(pipe, name, None) for name in ("transformer", "transformer_2", "unet")]
    models = [m for m in found if m is not None]
    if not models:
        raise ValueError(f"sparse_attention: {type(pipe).__name__} has no transformer or unet")
    return models


class StepCounter:
    """Forward pre-hook on every denoiser: counts steps by timestep changes, numbers the calls within a step
    (guidance branches), and tells the state the call's kind and token grid."""

    def __init__(self, state: SparseAttentionState, config: SparseAttentionConfig):
        self.state, self.config = state, config
        self.step, self.branch, self.timestep = -1, 0, None
        self.model_calls: dict[str, int] = {"dense": 0, "refresh": 0, "sparse": 0}

    def __call__(self, module, args, kwargs) -> None:
        inputs = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
        self._advance(inputs.get("timestep"))
        kind = step_kind(self.step, self.config.dense_steps, self.config.refresh_every)
        self.model_calls[kind] += 1
        self.state.begin_call(kind, self.branch, token_grid(module, inputs))

    def _advance(self, timestep) -> None:
        current = timestep.detach().clone() if isinstance(timestep, torch.Tensor) else timestep
        if self.timestep is not None and _same(current, self.timestep):
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        self.timestep = current


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    return a is not None and a == b


def token_grid(model: torch.nn.Module, inputs: dict[str, Any]) -> TokenLayout | None:
    """The model call's token grid from its input: (frames, rows, columns) after patching, and the prompt length
    for joint-attention models (Flux). None when the input says nothing about it (a UNet's levels differ)."""
    latents = inputs.get("hidden_states")
    patch = getattr(model.config, "patch_size", None)
    if latents is None or patch is None:
        return None
    if latents.ndim == 5:  # (batch, channels, frames, height, width): Wan
        p_t, p_h, p_w = patch
        return TokenLayout(latents.shape[2] // p_t, latents.shape[3] // p_h, latents.shape[4] // p_w)
    if latents.ndim == 4:  # (batch, channels, height, width): PixArt
        return TokenLayout(1, latents.shape[2] // patch, latents.shape[3] // patch)
    if latents.ndim == 3:  # already packed tokens, after the prompt's in joint attention: Flux
        prompt = inputs.get("encoder_hidden_states")
        return TokenLayout.flat(latents.shape[1], prompt.shape[1] if prompt is not None else 0)
    return None


class SparseAttentionHandle:
    """Sparse processors on every self-attention of the pipeline's denoisers, for one request."""

    def __init__(self, pipe, config: SparseAttentionConfig):
        self.config = config
        self.models = denoisers(pipe)
        self.saved = [dict(model.attn_processors) for model in self.models]
        self.state = SparseAttentionState(
            mode=config.mode,
            density=config.density,
            block=config.block_size,
            kernel=make_kernel(config.kernel),
            reshape=config.reshape,
            residual=config.residual,
            profile_rows=config.profile_rows,
        )
        self.counter = StepCounter(self.state, config)
        self.hooks: list = []
        self.wrapped = 0
        try:
            for model, processors in zip(self.models, self.saved, strict=True):
                self._attach(model, processors)
        except BaseException:
            self.remove()
            raise
        logger.debug(
            "sparse attention (%s, density %s) on %d self-attention layers", config.mode, config.density, self.wrapped
        )

    def _attach(self, model: torch.nn.Module, processors: dict) -> None:
        replaced = {name: self._sparse(model, name, p) for name, p in processors.items()}
        self.wrapped += sum(replaced[name] is not processors[name] for name in processors)
        model.set_attn_processor(replaced)
        self.hooks.append(model.register_forward_pre_hook(self.counter, with_kwargs=True))

    def _sparse(self, model: torch.nn.Module, name: str, processor):
        """The sparse stand-in for a self-attention processor; cross-attention keeps its own."""
        module = model.get_submodule(name.removesuffix(".processor"))
        if getattr(module, "is_cross_attention", False):
            return processor
        projections = PROJECTIONS.get(type(processor).__name__)
        if projections is None:
            raise ValueError(
                f"sparse_attention: {name} uses {type(processor).__name__}, not a processor it can stand in for "
                f"({', '.join(PROJECTIONS)})"
            )
        return SparseSelfAttention(self.state, name, processor, projections)

    def remove(self) -> None:
        while self.hooks:
            self.hooks.pop().remove()
        for model, processors in zip(self.models, self.saved, strict=True):
            model.set_attn_processor(processors)
        self.state.reset()

    def report(self) -> dict[str, Any]:
        counter = self.counter
        return {
            "kernel": self.state.kernel.name,
            "self_attention_layers": self.wrapped,
            "steps": counter.step + 1,
            "model_calls": counter.model_calls,
            **self.state.report(),
        }


def apply(pipe, config: SparseAttentionConfig, run: Run | None = None) -> SparseAttentionHandle:
    """Install sparse self-attention on ``pipe`` for one request; ``remove()`` restores it exactly."""
    return SparseAttentionHandle(pipe, config)
