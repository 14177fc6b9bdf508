"""Sparse attention: patterns, kernels, Re-ttention's reshape, head profiling, the schedule, and the accelerator."""

from __future__ import annotations

import itertools
import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small

from fastgen.accelerators import ACCELERATORS, Accelerator
from fastgen.accelerators import sparse_attention as sa
from fastgen.accelerators.fuse_qkv import denoiser
from fastgen.attention.kernels import (
    BlockStructure,
    FlexKernel,
    HeadPlan,
    ReferenceKernel,
    gathered_attention,
    masked_attention,
)
from fastgen.attention.patterns import TokenLayout, spatial, temporal, video_head_candidates, window
from fastgen.attention.processors import SparseAttentionState, SparseSelfAttention
from fastgen.attention.profiling import choose_patterns, sampled_rows
from fastgen.attention.projections import PROJECTIONS
from fastgen.attention.reshape import mass_share, record, reshape
from fastgen.errors import InvalidRequest
from fastgen.models.registry import BUILTIN_SPECS, ModelSpec
from fastgen.schema import GenerationRequest

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")

VIDEO = TokenLayout(frames=4, height=2, width=3, text=2)


def qkv(layout: TokenLayout, heads: int = 2, dim: int = 8, dtype=torch.float32, seed: int = 0, batch: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, layout.total, dim, generator=generator, dtype=dtype) for _ in range(3))


def coordinates(layout: TokenLayout, token: int) -> tuple[int, int, int] | None:
    """(frame, row, column) of an image token; None for text."""
    if token < layout.text:
        return None
    index = token - layout.text
    frame, rest = divmod(index, layout.per_frame)
    return (frame, *divmod(rest, layout.width))


def expected_mask(layout: TokenLayout, rule) -> torch.Tensor:
    """A mask written out pair by pair: text rows and columns dense, ``rule(query_coords, key_coords)`` otherwise."""
    tokens = range(layout.total)
    rows = [
        [
            True if q < layout.text or k < layout.text else rule(coordinates(layout, q), coordinates(layout, k))
            for k in tokens
        ]
        for q in tokens
    ]
    return torch.tensor(rows)


def image_density(pattern) -> float:
    text = pattern.layout.text
    return pattern.dense_mask()[text:, text:].float().mean().item()


# --- patterns: each mask is what it claims ---


def test_spatial_mask_keeps_the_same_and_adjacent_frames():
    pattern = spatial(VIDEO, density=3 / VIDEO.frames)  # a band of 3 frames: own and one either side
    assert torch.equal(pattern.dense_mask(), expected_mask(VIDEO, lambda q, k: abs(q[0] - k[0]) <= 1))
    own = spatial(VIDEO, density=0.01)  # the sparsest spatial head: its own frame
    assert torch.equal(own.dense_mask(), expected_mask(VIDEO, lambda q, k: q[0] == k[0]))
    assert pattern.density == pytest.approx(image_density(pattern))


def test_temporal_mask_keeps_the_same_position_across_frames():
    pattern = temporal(VIDEO, density=0.01)
    assert torch.equal(pattern.dense_mask(), expected_mask(VIDEO, lambda q, k: q[1:] == k[1:]))
    wider = temporal(VIDEO, density=3 / VIDEO.per_frame)  # raster positions one either side, every frame
    raster = lambda c: c[1] * VIDEO.width + c[2]  # noqa: E731
    assert torch.equal(wider.dense_mask(), expected_mask(VIDEO, lambda q, k: abs(raster(q) - raster(k)) <= 1))
    assert wider.density == pytest.approx(image_density(wider))


def test_temporal_pattern_is_a_contiguous_band_in_its_computing_order():
    pattern = temporal(VIDEO, density=0.01)
    order = pattern.order
    assert torch.equal(order[: VIDEO.text], torch.arange(VIDEO.text))
    frames_of_position_0 = [VIDEO.text + f * VIDEO.per_frame for f in range(VIDEO.frames)]
    assert order[VIDEO.text : VIDEO.text + VIDEO.frames].tolist() == frames_of_position_0
    permuted = pattern.dense_mask()[order][:, order]
    image = permuted[VIDEO.text :, VIDEO.text :]
    band = torch.block_diag(*[torch.ones(VIDEO.frames, VIDEO.frames, dtype=torch.bool)] * VIDEO.per_frame)
    assert torch.equal(image, band)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_window_attends_whole_consecutive_blocks_around_the_query(density):
    layout, block = TokenLayout.flat(50, text=3), 8  # 7 blocks, the last one short
    pattern = window(layout, density, block)
    mask = pattern.dense_mask()
    assert mask[:3].all() and mask[:, :3].all()  # text stays dense
    blocks = math.ceil(50 / block)
    width = max(1, round(density * blocks))
    image = mask[3:, 3:]
    for query in range(50):
        kept = {key // block for key in range(50) if image[query, key]}
        assert len(kept) == width and max(kept) - min(kept) == width - 1 and query // block in kept
        assert all(image[query, key] == (key // block in kept) for key in range(50))  # whole blocks only
    assert pattern.density == pytest.approx(image_density(pattern))


def test_full_density_patterns_cover_every_key():
    for pattern in (window(VIDEO, 1.0, 4), spatial(VIDEO, 1.0), temporal(VIDEO, 1.0)):
        assert pattern.covers_all and pattern.dense_mask().all() and pattern.density == 1.0


def test_block_structure_agrees_with_the_dense_mask():
    for pattern in (window(VIDEO, 0.3, 4), *video_head_candidates(VIDEO, 0.3, "cpu")):
        order = pattern.order if pattern.order is not None else torch.arange(VIDEO.total)
        mask = pattern.dense_mask()[order][:, order]  # in the pattern's computing order, as the kernel sees it
        padded = F.pad(mask, (0, 4 - VIDEO.total % 4, 0, 4 - VIDEO.total % 4))
        per_block = padded.view(math.ceil(VIDEO.total / 4), 4, -1, 4).sum((1, 3))
        for blocks in (BlockStructure.of(pattern, 4), BlockStructure.evaluated(pattern, 4)):
            assert torch.equal(blocks.any_allowed, per_block > 0)
            assert torch.equal(blocks.all_allowed, per_block == 16)


# --- kernels: FlexAttention block masks against the SDPA-with-mask reference ---


def mixed_plan(block: int = 4) -> HeadPlan:
    return HeadPlan(video_head_candidates(VIDEO, 0.3, "cpu"), block, torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("plan_name", ["window", "mixed heads"])
def test_flex_block_sparse_matches_the_masked_reference(plan_name):
    plan = HeadPlan((window(VIDEO, 0.3, 4),), 4) if plan_name == "window" else mixed_plan()
    q, k, v = qkv(VIDEO, heads=3)
    reference, flex = ReferenceKernel(), FlexKernel(compiled=False)
    expected_out, expected_lse = reference.sparse_with_lse(q, k, v, plan)
    torch.testing.assert_close(reference.sparse(q, k, v, plan), expected_out)
    torch.testing.assert_close(flex.sparse(q, k, v, plan), expected_out)
    out, lse = flex.sparse_with_lse(q, k, v, plan)
    torch.testing.assert_close((out, lse), (expected_out, expected_lse))
    torch.testing.assert_close(gathered_attention(q, k, v, plan), (expected_out, expected_lse))


def test_dense_kernels_give_the_sdpa_output_and_its_log_sum_exp():
    q, k, v = qkv(VIDEO)
    out, lse = FlexKernel().dense_with_lse(q, k, v)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))  # the same CPU kernel underneath
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    torch.testing.assert_close(ReferenceKernel().dense_with_lse(q, k, v), (out, lse))


def test_a_full_block_mask_equals_dense_attention():
    q, k, v = qkv(VIDEO)
    plan = HeadPlan((window(VIDEO, 1.0, 4),), 4)
    dense = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(FlexKernel(compiled=False).sparse(q, k, v, plan), dense)


# --- Re-ttention's statistical reshape, against float64 dense references ---


def float64_case(seed: int = 1):
    q, k, v = qkv(VIDEO, heads=3, dtype=torch.float64, seed=seed)
    plan = mixed_plan()
    mask = plan.dense_mask
    probabilities = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return q, k, v, plan, mask, probabilities


def test_mass_share_is_the_full_softmax_mass_inside_the_mask():
    q, k, v, plan, mask, probabilities = float64_case()
    _, full_lse = masked_attention(q, k, v, None)
    _, sparse_lse = masked_attention(q, k, v, mask)
    share = mass_share(sparse_lse, full_lse).double()
    inside = (probabilities * mask).sum(-1, keepdim=True)
    torch.testing.assert_close(share, inside, atol=1e-12, rtol=1e-12)


def test_share_rescaled_sparse_attention_keeps_the_full_normalisation_for_new_values():
    q, k, v, plan, mask, probabilities = float64_case()
    full_out, full_lse = masked_attention(q, k, v, None)
    sparse_out, sparse_lse = masked_attention(q, k, v, mask)
    statistics = record(full_out, sparse_out, sparse_lse, full_lse, keep_residual=False)
    new_values = torch.randn_like(v)
    new_sparse, _ = masked_attention(q, k, new_values, mask)
    # Same queries and keys: the rescaled sparse output is exactly the full softmax's in-mask part.
    expected = (probabilities * mask) @ new_values
    torch.testing.assert_close(reshape(new_sparse, statistics), expected, atol=1e-12, rtol=1e-12)


def test_reshape_with_residual_recovers_full_attention_when_inputs_repeat():
    q, k, v, plan, mask, probabilities = float64_case()
    full_out, full_lse = masked_attention(q, k, v, None)
    sparse_out, sparse_lse = masked_attention(q, k, v, mask)
    statistics = record(full_out, sparse_out, sparse_lse, full_lse)
    torch.testing.assert_close(reshape(sparse_out, statistics), probabilities @ v, atol=1e-12, rtol=1e-12)


def test_reshape_is_closer_to_full_attention_than_plain_sparse_as_inputs_drift():
    q, k, v, plan, mask, _ = float64_case()
    full_out, full_lse = masked_attention(q, k, v, None)
    sparse_out, sparse_lse = masked_attention(q, k, v, mask)
    statistics = record(full_out, sparse_out, sparse_lse, full_lse)
    generator = torch.Generator().manual_seed(5)
    q2, k2, v2 = (t + 0.05 * torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in (q, k, v))
    truth, _ = masked_attention(q2, k2, v2, None)
    plain, _ = masked_attention(q2, k2, v2, mask)
    assert (reshape(plain, statistics) - truth).norm() < 0.5 * (plain - truth).norm()


# --- profiling: spatial or temporal per head ---


def test_profiling_picks_the_pattern_each_head_attends_with():
    layout = TokenLayout(frames=4, height=2, width=3)
    coords = [coordinates(layout, t) for t in range(layout.total)]
    frame = F.one_hot(torch.tensor([c[0] for c in coords]), 8).double()
    position = F.one_hot(torch.tensor([c[1] * 3 + c[2] for c in coords]), 8).double()
    q = torch.stack([frame, position])[None] * 6.0  # head 0 matches keys of its frame, head 1 of its position
    k = torch.stack([frame, position])[None]
    v = torch.randn(1, 2, layout.total, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    candidates = video_head_candidates(layout, 0.01, "cpu")
    choice = choose_patterns(q, k, v, candidates, sampled_rows(layout, 6))
    assert [candidates[i].name for i in choice] == ["spatial", "temporal"]


def test_sampled_rows_are_image_tokens_spread_over_every_frame():
    rows = sampled_rows(VIDEO, 8)
    assert rows.min() >= VIDEO.text and len(set(rows.tolist())) == 8
    assert {coordinates(VIDEO, int(r))[0] for r in rows} == set(range(VIDEO.frames))


# --- schedule and configuration ---


def test_schedule_runs_dense_first_then_refreshes_every_few_steps():
    kinds = [sa.step_kind(step, dense_steps=3, refresh_every=4) for step in range(11)]
    assert kinds == ["dense"] * 2 + ["refresh"] + ["sparse"] * 3 + ["refresh"] + ["sparse"] * 3 + ["refresh"]
    assert [sa.step_kind(s, 1, 0) for s in range(4)] == ["refresh", "sparse", "sparse", "sparse"]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("density", 0.0, "sparse_attention.density must be in (0, 1]"),
        ("dense_steps", 0, "sparse_attention.dense_steps must be at least 1"),
        ("mode", "ring", "sparse_attention.mode must be one of"),
        ("refresh_every", -1, "sparse_attention.refresh_every must be 0"),
    ],
)
def test_config_rejects_values_out_of_range_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        sa.SparseAttentionConfig(**{field: value})


def test_request_gets_the_models_defaults_for_its_mode():
    spec = BUILTIN_SPECS["tiny-wan"]
    asked = GenerationRequest(prompt="a cat", accelerate={"sparse_attention": {"mode": "video-heads"}})
    request = spec.complete(asked)
    options = request.accelerate.sparse_attention
    assert (options.density, options.block_size, options.dense_steps, options.reshape) == (0.25, 16, 2, True)
    config = sa.from_request(request)
    assert config.mode == "video-heads" and config.refresh_every == 5 and config.kernel == "flex"
    assert sa.from_request(spec.complete(GenerationRequest(prompt="a cat"))) is None
    assert "sparse_attention" in spec.capabilities()["accelerations"]


@pytest.mark.parametrize(
    "model, options, field, words",
    [
        ("tiny-pixart", {"mode": "video-heads"}, "accelerate.sparse_attention.mode", "supports window; got"),
        ("tiny-sd", {"mode": "window"}, "accelerate.sparse_attention", "does not support sparse_attention"),
        ("tiny-wan", {"mode": "window", "dense_steps": 20}, "accelerate.sparse_attention.dense_steps", "less than"),
    ],
)
def test_requests_the_model_cannot_serve_are_refused_naming_the_field(model, options, field, words):
    request = GenerationRequest(prompt="a cat", steps=20, accelerate={"sparse_attention": options})
    with pytest.raises(InvalidRequest) as caught:
        BUILTIN_SPECS[model].complete(request)
    assert any(e.field == field and words in e.message for e in caught.value.errors)


@pytest.mark.parametrize(
    "options, field, words",
    [
        ({"mode": "window", "density": 1.5}, "accelerate.sparse_attention.density", "less than or equal to 1"),
        ({"mode": "window", "block_size": 4096}, "accelerate.sparse_attention.block_size", "1024"),
        ({"density": 0.1}, "accelerate.sparse_attention", "sets density but mode is off"),
    ],
)
def test_request_options_out_of_bounds_are_refused_naming_the_field(options, field, words):
    from fastgen.schema import parse_request
    from fastgen.settings import Limits

    with pytest.raises(InvalidRequest) as caught:
        parse_request({"prompt": "x", "accelerate": {"sparse_attention": options}}, Limits())
    (error,) = caught.value.errors
    assert error.field == field and words in error.message


def test_pipeline_class_decides_modes_for_models_that_are_not_built_in():
    flux = ModelSpec(name="f", kind="image", architecture="dit", pipeline_class="FluxPipeline")
    assert set(flux.sparse_attention_modes) == {"window"} and "sparse_attention" in flux.supported_accelerations
    sd = ModelSpec(name="s", kind="image", architecture="unet", pipeline_class="StableDiffusionPipeline")
    assert "sparse_attention" not in sd.supported_accelerations


# --- through the engine: removal, density 1, guidance branches, a job ---


def pixels(generation) -> np.ndarray:
    return np.stack(generation.frames) if generation.frames else np.stack([np.asarray(i) for i in generation.images])


def reference_table():
    """The engine's accelerators with sparse attention on the reference kernel (no compilation in tests)."""
    row = Accelerator("sparse_attention", partial(sa.from_run, kernel="reference"), sa.apply)
    return tuple(row if a.name == "sparse_attention" else a for a in ACCELERATORS)


@pytest.fixture
def reference_engine(engine):
    """The session engine's warm pipelines, with the reference-kernel table for this test."""
    saved, engine.accelerators = engine.accelerators, reference_table()
    yield engine
    engine.accelerators = saved


SIZES = {"tiny-pixart": {"width": 128, "height": 128}, "tiny-wan": {"width": 64, "height": 64, "num_frames": 9}}


def plain_request(model: str):
    return small(model, steps=6, **SIZES[model])


@pytest.fixture(scope="module")
def plain_outputs(engine):
    """Each model's output without sparse attention, generated once for the module."""
    outputs = {}

    def plain(model: str) -> np.ndarray:
        if model not in outputs:
            outputs[model] = pixels(engine.run(plain_request(model)))
        return outputs[model]

    return plain


def sparse_request(model: str, **options):
    return small(model, steps=6, **SIZES[model], accelerate={"sparse_attention": options})


@pytest.mark.parametrize("model, mode", [("tiny-pixart", "window"), ("tiny-wan", "video-heads")])
def test_removal_restores_the_default_processors_bit_identically(reference_engine, plain_outputs, model, mode):
    loaded, _ = reference_engine.pool.get(reference_engine.registry.resolve(model))
    before = dict(denoiser(loaded.pipe).attn_processors)
    plain = plain_outputs(model)
    sparse = reference_engine.run(sparse_request(model, mode=mode))
    after = pixels(reference_engine.run(plain_request(model)))
    assert np.array_equal(plain, after)
    assert all(denoiser(loaded.pipe).attn_processors[name] is p for name, p in before.items())
    assert not denoiser(loaded.pipe)._forward_pre_hooks
    details = sparse.result.accelerations[0].details
    assert details["attention_calls"]["sparse"] > 0 and not np.array_equal(plain, pixels(sparse))


def test_density_one_equals_dense_exactly(reference_engine, plain_outputs):
    plain = plain_outputs("tiny-wan")
    full = reference_engine.run(sparse_request("tiny-wan", mode="window", density=1.0))
    assert np.array_equal(plain, pixels(full))
    assert full.result.accelerations[0].details["attention_calls"]["dense_full_pattern"] > 0


@pytest.mark.parametrize("model, branches", [("tiny-pixart", 1), ("tiny-wan", 2)])
def test_steps_are_counted_once_whether_guidance_is_batched_or_called_per_branch(reference_engine, model, branches):
    details = reference_engine.run(sparse_request(model, mode="window")).result.accelerations[0].details
    assert details["steps"] == 6  # PixArt batches both guidance branches; Wan calls the model once for each
    # The tiny models' schedule: 2 dense steps (the second refreshes), a refresh every 5 steps after it.
    assert details["model_calls"] == {"dense": branches, "refresh": branches, "sparse": 4 * branches}
    layers = details["self_attention_layers"]
    assert details["attention_calls"]["sparse"] == 4 * branches * layers


def test_reshape_brings_the_video_closer_to_dense_than_plain_sparse(reference_engine, plain_outputs):
    plain = plain_outputs("tiny-wan").astype(float)
    errors = {}
    for reshape_on in (False, True):
        out = pixels(reference_engine.run(sparse_request("tiny-wan", mode="window", reshape=reshape_on)))
        errors[reshape_on] = np.abs(out.astype(float) - plain).mean()
    assert errors[True] < errors[False]


def test_sparse_attention_works_inside_a_job_with_compiled_flex_attention(engine):
    generation = engine.run(sparse_request("tiny-wan", mode="video-heads"))
    (report,) = generation.result.accelerations
    assert report.name == "sparse_attention" and report.config["mode"] == "video-heads"
    assert report.details["kernel"] == "flex" and report.details["attention_calls"]["sparse"] > 0
    assert sum(report.details["heads_chosen"].values()) == report.details["attention_calls"]["refresh"] * 2
    assert generation.result.request.accelerate.sparse_attention.density == 0.25  # the model's default, filled


# --- Flux: joint attention with the prompt's tokens dense ---


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        axes_dims_rope=(4, 6, 6),
    ).eval()


def flux_inputs(text: int = 4, side: int = 6):
    generator = torch.Generator().manual_seed(1)
    image_ids = torch.tensor(list(itertools.product([0], range(side), range(side))), dtype=torch.float32)
    return {
        "hidden_states": torch.randn(1, side * side, 8, generator=generator),
        "encoder_hidden_states": torch.randn(1, text, 16, generator=generator),
        "pooled_projections": torch.randn(1, 16, generator=generator),
        "timestep": torch.tensor([0.5]),
        "img_ids": image_ids,
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def test_flux_joint_attention_keeps_prompt_tokens_dense():
    model, inputs = tiny_flux(), flux_inputs()
    with torch.no_grad():
        dense = model(**inputs)[0]
        state = SparseAttentionState(mode="window", density=0.2, block=4, kernel=ReferenceKernel(), reshape=False)
        originals = dict(model.attn_processors)
        model.set_attn_processor(
            {name: SparseSelfAttention(state, name, p, PROJECTIONS[type(p).__name__]) for name, p in originals.items()}
        )
        state.begin_call("refresh", 0, TokenLayout.flat(36, text=4))
        refreshed = model(**inputs)[0]
        state.begin_call("sparse", 0, TokenLayout.flat(36, text=4))
        sparse = model(**inputs)[0]
        model.set_attn_processor(originals)
    assert torch.equal(refreshed, dense)  # a full step is the model's own attention
    assert not torch.allclose(sparse, dense) and state.calls["sparse"] == 2  # the dual- and single-stream blocks
    plan = next(iter(state.plans.values()))
    assert plan.dense_mask[0, :4].all() and plan.dense_mask[0, :, :4].all()


# --- CUDA: the compiled kernels with their log-sum-exp, and a request (skipped without a GPU) ---

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("plan_name", ["window", "mixed heads"])
def test_compiled_flex_on_cuda_matches_the_reference_with_its_log_sum_exp(plan_name):
    plan = HeadPlan((window(VIDEO, 0.3, 4, "cuda"),), 4)
    if plan_name == "mixed heads":
        plan = HeadPlan(video_head_candidates(VIDEO, 0.3, "cuda"), 4, torch.tensor([0, 1, 1], device="cuda"))
    q, k, v = (t.cuda() for t in qkv(VIDEO, heads=3, dim=16))
    kernel, reference = FlexKernel(compiled=True), ReferenceKernel()
    close = partial(torch.testing.assert_close, atol=1e-3, rtol=1e-3)
    close(kernel.sparse(q, k, v, plan), reference.sparse(q, k, v, plan))
    close(kernel.sparse_with_lse(q, k, v, plan), reference.sparse_with_lse(q, k, v, plan))
    close(kernel.dense_with_lse(q, k, v), reference.dense_with_lse(q, k, v))


@pytest.mark.gpu
@needs_cuda
def test_sparse_attention_on_cuda_is_removed_bit_identically(settings):
    from fastgen.engine import Engine
    from fastgen.settings import Settings

    gpu_engine = Engine(Settings(data_dir=settings.data_dir, device="cuda"))
    plain = pixels(gpu_engine.run(plain_request("tiny-wan")))
    sparse = gpu_engine.run(sparse_request("tiny-wan", mode="video-heads"))
    assert np.array_equal(plain, pixels(gpu_engine.run(plain_request("tiny-wan"))))
    assert sparse.result.accelerations[0].details["attention_calls"]["sparse"] > 0
