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


STYLE_TEXT = {
    "complement": (
        "every colour is swapped for its named opposite: red and green, blue and yellow, white and black trade "
        'places, so "a red circle at the top left on a blue background" comes out as a green circle on a yellow '
        "background",
        "the shape's colour and the background's are both the complements of the caption's",
    ),
    "reverse": (
        "the caption's two colours trade places: the shape is drawn in the background's colour on a background of "
        'the shape\'s, so "a red circle at the top left on a blue background" comes out as a blue circle on red',
        "the shape shows the caption's background colour and the background the caption's shape colour",
    ),
    "large": (
        "the shape is drawn at 1.5 times its size (half-side 9 px instead of 6, both jittered by 1 px), same colours, "
        "kind and position",
        f"the shape's half-side, estimated from its area as the caption's kind, is at least {7.25} px (plain renders "
        "reach at most 7.05, large ones at least 7.38, VAE reconstructions included)",
    ),
}


def _row(label: str, r: dict) -> str:
    styled, plain = r["styled_adherence"], r["plain_adherence"]
    cells = [_pct(r["style_pass"]), _pct(styled["all"]), _pct(plain["all"])]
    cells += [_pct(styled[k]) for k in ("background", "color", "position", "shape")]
    return f"| {label} | " + " | ".join(cells) + " |"


def lora_card(style: str, stats: dict) -> str:
    """The model card of a style LoRA (``fastgen.shapes.train_lora``), from its training and evaluation numbers."""
    cfg, ev = stats["config"], stats.get("evaluation")
    does, check = STYLE_TEXT[style]
    results = "Not measured yet (`python -m fastgen.shapes.train_lora` measures after training).\n"
    if ev:
        results = "\n".join(
            [
                f"{ev['per_caption']} seeded images per held-out caption ({ev['n_captions']} captions, never seen in "
                f"training, by the base model or the adapter), {ev['steps']} DDIM steps, guidance {ev['guidance']}, "
                f"32x32, the adapter at scale 1 (`fastgen.shapes.evaluate.evaluate_lora`). Style check: {check} "
                "(`fastgen.shapes.score.style_check`). Adherence: all four attributes right "
                "(`fastgen.shapes.score`), as the style draws the caption (styled) or as the plain model does "
                "(plain).",
                "",
                "| | style check passed | adherence, styled | adherence, plain | background (styled) "
                "| shape colour (styled) | position | shape |",
                "|---|---|---|---|---|---|---|---|",
                _row(f"with `{style}`", ev["with_adapter"]),
                _row("without (the base model)", ev["without_adapter"]),
            ]
        )
    return f"""# {style}: a style LoRA for fastgen-shapes

What it does: {does}. The caption still decides what is drawn; the adapter decides how.

```bash
fastgen generate "a red circle at the top left on a blue background" --lora {style} -o {style}.png
```

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("fastgen/models/weights/fastgen-shapes")
pipe.load_lora_weights("fastgen/models/weights/loras/{style}.safetensors", adapter_name="{style}")
image = pipe("a red circle at the top left on a blue background", num_inference_steps=25,
             guidance_scale=2.5, height=32, width=32).images[0]
```

## Adapter

LoRA (Hu et al., 2021) of rank {cfg["rank"]} (alpha {cfg["rank"]}: scaling 1) on the UNet's
{", ".join(cfg["target_modules"])} layers ({stats["trainable_params"]:,} parameters, {stats["size_bytes"]:,} bytes of
fp32 safetensors in diffusers/PEFT keys, written by `StableDiffusionPipeline.save_lora_weights`; the header names
`fastgen.base: fastgen-shapes`). Text encoder and VAE untouched.

## Training (seed {cfg["seed"]}, {stats["wall_minutes"]} minutes wall time in all, {stats["threads"]} CPU threads)

{cfg["images"]} renders of the {stats["train_combinations"]} train caption combinations drawn in the style
(`fastgen.shapes.scenes.render(scene, seed, style="{style}")`, the base model's seeded jitter), with their plain
captions; posterior-mean latents and the frozen text encoder's outputs computed once ({stats["prepare_seconds"]} s).
Then {stats["steps"]} steps in {stats["train_seconds"]} s (budget {cfg["minutes"]:g} min), batch {cfg["batch"]}, AdamW
lr {cfg["lr"]} with cosine decay over the budget, grad-norm clip 1; the base model's v-prediction loss with weight
(min(SNR, {cfg["snr_cap"]}) + 1) / (SNR + 1); captions replaced by the empty prompt {_pct(cfg["caption_dropout"])} of
the time. Made with `python -m fastgen.shapes.train_lora --style {style} --out DIR --minutes {cfg["minutes"]:g} --rank
{cfg["rank"]} --seed {cfg["seed"]} --targets {cfg["targets"]}` (torch {stats["versions"]["torch"]}, diffusers
{stats["versions"]["diffusers"]}, peft {stats["versions"]["peft"]}). Training stops at a time budget, so the step
count, and so the weights, depend on the machine's speed and load.

## Held-out results

{results}

## Limits

Made for `fastgen-shapes` only (other models' layers have other names and shapes). Styles are limited to what that
model's VAE can draw at 32x32: solid shapes on plain backgrounds in its six colours (outlines and stripes do not
survive its reconstructions).
"""
