"""Built-in tiny diffusion pipelines with seeded random weights.

The machines fastgen is developed and tested on cannot download model weights, yet the service must load and run
real pipelines end to end. The built-in models are therefore genuine diffusers architectures (a cross-attention
UNet for Stable Diffusion, a DiT for PixArt-Sigma, a video DiT with a 3D causal VAE for Wan) shrunk to a few MB and
filled with seeded random weights. Tokenizers are built in memory from a small vocabulary, so nothing is fetched.

A built pipeline is an ordinary checkpoint: ``pipe.save_pretrained(d)`` writes it and
``DiffusionPipeline.from_pretrained(d)`` loads it back, exactly like a model from the Hub. The same seed always
gives bit-identical weights. The images are noise, but every code path (text encoding, CFG, scheduler, VAE decode,
serialization) is the real one.
"""

from collections.abc import Callable
from contextlib import contextmanager

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
TEXT_DIM = 32

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("o", "f</w>"), ("i", "n</w>")]
_T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
_T5_WORDS = ["the", "a", "an", "of", "and", "in", "on", "with", "photo", "cat", "dog", "red", "blue"]
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"


@contextmanager
def _seeded(seed: int):
    # Fork the RNG so building a model never disturbs the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    # from_pretrained returns models in eval mode; match it so in-memory and reloaded pipelines agree.
    return model.eval()


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the bytes 0..255, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = {b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in kept)}
    return [chr(b) if b in kept else moved[b] for b in range(256)]


def clip_tokenizer() -> CLIPTokenizer:
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(pair) for pair in _CLIP_MERGES] + [_CLIP_BOS, _CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=list(_CLIP_MERGES), model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    pieces = [(tok, 0.0) for tok in _T5_SPECIALS] + [("▁", -2.0)]
    pieces += [("▁" + word, -3.0) for word in _T5_WORDS] + [(c, -5.0) for c in _T5_CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def clip_text_encoder(
    tokenizer: CLIPTokenizer, hidden: int = TEXT_DIM, max_positions: int = CLIP_MAX_LENGTH
) -> CLIPTextModel:
    """A 2-layer CLIP text encoder sized for ``tokenizer``, with fresh (random) weights."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _t5_config(config_class: type[T5Config], tokenizer: T5Tokenizer) -> T5Config:
    return config_class(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=2 * TEXT_DIM,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _t5_text_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    return _frozen(T5EncoderModel(_t5_config(T5Config, tokenizer)))


def _umt5_text_encoder(tokenizer: T5Tokenizer) -> UMT5EncoderModel:
    # Wan's text encoder is UMT5 (per-layer relative position bias); WanPipeline warns on any other class.
    return _frozen(UMT5EncoderModel(_t5_config(UMT5Config, tokenizer)))


def _sd_vae(scaling_factor: float) -> AutoencoderKL:
    # Four levels give the 8x downsampling of the real VAE; with fewer, latents get large and sampling slows badly.
    return _frozen(
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=256,
            scaling_factor=scaling_factor,
        )
    )


def _sd_unet() -> UNet2DConditionModel:
    # UNet2DConditionModel's legacy attention_head_dim is really the head count: 2 and 4 heads give head dim 16.
    return _frozen(
        UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=TEXT_DIM,
            attention_head_dim=(2, 4),
        )
    )


def _sd_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def build_tiny_sd(seed: int = 0) -> StableDiffusionPipeline:
    tokenizer = clip_tokenizer()
    with _seeded(seed):
        text_encoder = _frozen(clip_text_encoder(tokenizer))
    with _seeded(seed + 1):
        unet = _sd_unet()
    with _seeded(seed + 2):
        vae = _sd_vae(scaling_factor=0.18215)
    return stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, _sd_scheduler())


def stable_diffusion_pipeline(vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from its parts, without a safety checker (none exists offline)."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _pixart_transformer() -> PixArtTransformer2DModel:
    # sample_size 32 (latent) makes the default size 256x256 and selects the pipeline's 256 aspect-ratio bins, so the
    # default call with use_resolution_binning=True works; learned sigma (out_channels 8) as in the real model.
    return _frozen(
        PixArtTransformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            caption_channels=TEXT_DIM,
            norm_type="ada_norm_single",
            use_additional_conditions=False,
        )
    )


def _pixart_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
    )


def build_tiny_pixart(seed: int = 0) -> PixArtSigmaPipeline:
    tokenizer = t5_tokenizer()
    with _seeded(seed):
        text_encoder = _t5_text_encoder(tokenizer)
    with _seeded(seed + 1):
        transformer = _pixart_transformer()
    with _seeded(seed + 2):
        vae = _sd_vae(scaling_factor=0.13025)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_pixart_scheduler(),
    )


def _wan_vae() -> AutoencoderKLWan:
    # Three downsamples (two of them temporal) give the real 8x spatial, 4x temporal compression.
    return _frozen(
        AutoencoderKLWan(
            base_dim=3,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    )


def _wan_transformer() -> WanTransformer3DModel:
    return _frozen(
        WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=TEXT_DIM,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
    )


def _wan_scheduler() -> UniPCMultistepScheduler:
    # Wan 2.1 samples with UniPC on flow-matching sigmas; shift 3.0 is its 480p setting.
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
    )


def build_tiny_wan(seed: int = 0) -> WanPipeline:
    tokenizer = t5_tokenizer()
    with _seeded(seed):
        text_encoder = _umt5_text_encoder(tokenizer)
    with _seeded(seed + 1):
        transformer = _wan_transformer()
    with _seeded(seed + 2):
        vae = _wan_vae()
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_wan_scheduler(),
        transformer=transformer,
    )


BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "tiny-sd": build_tiny_sd,
    "tiny-pixart": build_tiny_pixart,
    "tiny-wan": build_tiny_wan,
}
