"""The model card (README.md) written next to the trained shape-model weights, from the run's measured numbers."""

from fastgen.shapes import scenes as sc


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _ceiling(stats: dict) -> str:
    if "vae_heldout_adherence" not in stats:
        return ""
    return (
        " Every image passes through the VAE's decoder, so how its reconstructions of held-out ground-truth renders "
        f"score is a rough ceiling: {_pct(stats['vae_heldout_adherence'])} all-correct (a generated image can come "
        "out crisper than a reconstruction of a jittered render)."
    )


def _adherence_section(stats: dict, evaluation: dict | None) -> str:
    if evaluation is None:
        return "Not measured yet: run `python -m fastgen.shapes.evaluate DIR`.\n"
    lines = [
        f"Measured by `python -m fastgen.shapes.evaluate`: {evaluation['per_caption']} image(s) per held-out caption "
        f"({evaluation['n_captions']} captions), seeded, {evaluation['steps']} DDIM steps, 32x32, scored with "
        "`fastgen.shapes.score` (numpy image analysis that scores ground-truth renders 100% correct)."
        f"{_ceiling(stats)}",
        "",
        "| guidance | all four | background | shape colour | position | shape |",
        "|---|---|---|---|---|---|",
    ]
    for guidance, r in evaluation["by_guidance"].items():
        cells = [_pct(r[k]) for k in ("all", "background", "color", "position", "shape")]
        lines.append(f"| {guidance} | " + " | ".join(cells) + " |")
    lines += ["", f"Best guidance: **{evaluation['best_guidance']}** ({_pct(evaluation['best']['all'])} all correct)."]
    return "\n".join(lines) + "\n"


def model_card(stats: dict, evaluation: dict | None = None) -> str:
    cfg, params = stats["config"], stats["params"]
    guidance = evaluation["best_guidance"] if evaluation else 2.5
    channels = cfg.get("latent_channels", 4)
    return f"""# fastgen-shapes

A tiny latent text-to-image model trained from scratch on CPU on procedural 32x32 scenes of one coloured shape at a
named position on a coloured background, e.g. "a red circle at the top left on a blue background". It exists so
fastgen can serve and test a real model whose output is checkable: adherence to the caption is scored by plain image
analysis (`fastgen.shapes.score`). It is an ordinary `StableDiffusionPipeline` directory made only of diffusers and
transformers classes.

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("fastgen/models/weights/fastgen-shapes")
image = pipe("a red circle at the top left on a blue background", num_inference_steps=25,
             guidance_scale={guidance}, height=32, width=32).images[0]
```

Generation settings used for the numbers below: 32x32, DDIM 25 steps (`timestep_spacing="trailing"`,
`clip_sample=False`, v-prediction), classifier-free guidance {guidance} with the empty prompt as the unconditional
input. The pipeline's own default guidance (7.5) is too high for this model; pass `guidance_scale` explicitly.

## Data

Rendered by `fastgen.shapes.scenes` (no external data): {len(sc.COLORS)} colours ({", ".join(sc.COLORS)}),
{len(sc.SHAPES)} shapes ({", ".join(sc.SHAPES)}), {len(sc.POSITIONS)} positions ({", ".join(sc.POSITIONS)}), background
any other colour: {len(sc.all_scenes())} caption combinations. A seeded 10% ({len(sc.heldout_scenes())} combinations,
split seed {sc.SPLIT_SEED}) is held out of training entirely; training used the other
{stats["train_combinations"]}, as {cfg["images"]} renders with seeded jitter of the shape's size (+/-1 px) and centre
(+/-1.5 px).

## Architecture ({stats["size_mb"]} MB on disk, fp32 safetensors)

- Tokenizer: CLIPTokenizer over a BPE trained with the `tokenizers` library on the caption words (every word is one
  token), max length 16.
- Text encoder: CLIPTextModel, hidden 64, 2 layers, 4 heads ({params["text_encoder"]:,} parameters), trained jointly.
- VAE: AutoencoderKL, 3 levels (32, 64, 64), 1 layer per block, {channels} latent channels: 32x32x3 -> 8x8x{channels}
  ({params["vae"]:,} parameters); scaling factor {stats["scaling_factor"]} (1/std of the latents); reconstruction
  {stats["vae_psnr_db"]} dB PSNR on training images.
- UNet: UNet2DConditionModel, channels (64, 128), 1 layer per block, cross-attention dim 64 in both levels,
  `addition_embed_type="text"` (attention-pooled caption added to the time embedding) ({params["unet"]:,} parameters).
- Scheduler: DDIMScheduler, 1000 steps, scaled-linear betas 0.00085-0.012, `prediction_type="v_prediction"`.

## Training (seed {cfg["seed"]}, {stats["total_minutes"]} minutes wall time in all, 2 CPU threads)

1. VAE: {stats["vae_steps"]} steps in {stats["vae_seconds"]} s (budget {cfg["minutes_vae"]} min), batch
   {cfg["vae_batch"]}, AdamW lr {cfg["vae_lr"]} with cosine decay over the time budget; loss MSE + 0.1 L1 +
   {cfg["kl_weight"]} KL.
2. Posterior-mean latents of every training image, computed once.
3. UNet + text encoder jointly: {stats["unet_steps"]} steps in {stats["unet_seconds"]} s (budget {cfg["minutes_unet"]}
   min), batch {cfg["unet_batch"]}, AdamW lr {cfg["unet_lr"]} (weight decay 0.01, grad-norm clip 1) with cosine decay
   over the time budget; v-prediction with loss weight (min(SNR, {cfg["snr_cap"]}) + 1) / (SNR + 1); captions
   replaced by the empty prompt {_pct(cfg["caption_dropout"])} of the time; the saved UNet and text encoder are EMA
   copies (decay {cfg["ema_decay"]}).

Made with `python -m fastgen.shapes.train --out DIR --minutes-vae {cfg["minutes_vae"]:g} --minutes-unet
{cfg["minutes_unet"]:g} --seed {cfg["seed"]}` (torch {stats["versions"]["torch"]}). Because training stops at time
budgets, the step counts, and so the weights, depend on the machine's speed and load.

## Held-out adherence

{_adherence_section(stats, evaluation)}
## Limits

Only knows this grammar of captions and these 6 colours, 3 shapes and 5 positions, at 32x32. A toy for testing the
serving stack, not a general image model.
"""
