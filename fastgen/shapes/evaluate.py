"""Measure a trained shape model's adherence to held-out captions, and draw a grid of its samples.

python -m fastgen.shapes.evaluate DIR [--guidance 2 2.5 3] [--per-caption 1] [--grid PNG] [--update-card]

``evaluate_lora`` measures a style adapter (``fastgen.shapes.train_lora``) the same way: held-out captions, seeded
images, with the adapter at scale 1 and without it.
"""

import argparse
import json
import logging
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from fastgen.shapes import scenes as sc
from fastgen.shapes.score import adherence, style_check

logger = logging.getLogger(__name__)

STEPS = 25
GUIDANCES = (2.0, 2.5, 3.0)


def generate(pipe, captions: list[str], guidance: float, seed: int = 0, steps: int = STEPS) -> list[Image.Image]:
    """One 32x32 image per caption; image i uses seed + i, so it does not depend on the batch it is in."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(captions))]
    result = pipe(
        prompt=captions,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=sc.SIZE,
        width=sc.SIZE,
        generator=generators,
    )
    return result.images


def load(path: Path):
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def evaluate(path: Path, guidances=GUIDANCES, per_caption: int = 1, seed: int = 0) -> dict:
    """Held-out adherence at each guidance scale, with the best one picked by all-four-correct."""
    pipe = load(path)
    captions = [sc.caption(scene) for scene in sc.heldout_scenes()] * per_caption
    by_guidance = {}
    for guidance in guidances:
        images = generate(pipe, captions, guidance, seed)
        by_guidance[str(guidance)] = adherence(images, captions)
        logger.info("guidance %s: %s", guidance, by_guidance[str(guidance)])
    best = max(by_guidance, key=lambda g: (by_guidance[g]["all"], -abs(float(g) - 2.5)))
    return {
        "steps": STEPS,
        "per_caption": per_caption,
        "n_captions": len(sc.heldout_scenes()),
        "seed": seed,
        "by_guidance": by_guidance,
        "best_guidance": float(best),
        "best": by_guidance[best],
    }


def style_results(images, captions: list[str], style: str) -> dict:
    """Style-check pass rate, adherence to each caption as the style draws it, and to the plain caption."""
    passed = [style_check(image, text, style) for image, text in zip(images, captions, strict=True)]
    return {
        "style_pass": float(sum(passed) / len(passed)),
        "styled_adherence": adherence(images, captions, style),
        "plain_adherence": adherence(images, captions),
    }


def evaluate_lora(
    base: Path, lora: Path, style: str, per_caption: int = 4, guidance: float = 2.5, seed: int = 0
) -> dict:
    """A style adapter on held-out captions: the base model's images and the adapter's (scale 1, same seeds)."""
    pipe = load(base)
    captions = [sc.caption(scene) for scene in sc.heldout_scenes()] * per_caption
    without = style_results(generate(pipe, captions, guidance, seed), captions, style)
    pipe.load_lora_weights(str(lora), adapter_name=style)
    pipe.set_adapters([style], [1.0])
    adapted = style_results(generate(pipe, captions, guidance, seed), captions, style)
    logger.info("%s without: %s; with: %s", style, without, adapted)
    return {
        "style": style,
        "steps": STEPS,
        "guidance": guidance,
        "per_caption": per_caption,
        "n_captions": len(sc.heldout_scenes()),
        "seed": seed,
        "with_adapter": adapted,
        "without_adapter": without,
    }


def grid(images: list[Image.Image], captions: list[str], columns: int = 4, cell: int = 96) -> Image.Image:
    """Images upscaled with nearest neighbour, each with its caption (wrapped) underneath."""
    text_h, pad, width = 40, 6, cell + 2 * 64
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (cell + text_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, text) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * width, (i // columns) * (cell + text_h + pad)
        sheet.paste(image.resize((cell, cell), Image.Resampling.NEAREST), (x + 4, y + pad))
        words, line, lines = text.split(), "", []
        for word in words:
            if len(line) + len(word) + 1 > 34:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}".strip()
        lines.append(line)
        for j, part in enumerate(lines):
            draw.text((x + 4, y + pad + cell + 2 + 11 * j), part, fill="black")
    return sheet


def save_grid(path: Path, out: Path, guidance: float, count: int = 16, seed: int = 0) -> None:
    pipe = load(path)
    captions = [sc.caption(scene) for scene in sc.heldout_scenes()[:: max(1, len(sc.heldout_scenes()) // count)]]
    captions = captions[:count]
    out.parent.mkdir(parents=True, exist_ok=True)
    grid(generate(pipe, captions, guidance, seed), captions).save(out)


def evaluate_and_update_card(path: Path, guidances=GUIDANCES, per_caption: int = 1) -> dict:
    """Evaluate, write evaluation.json, and rewrite the model card with the numbers."""
    from fastgen.shapes.card import model_card

    evaluation = evaluate(path, guidances, per_caption)
    (path / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n")
    stats = json.loads((path / "training.json").read_text())
    (path / "README.md").write_text(model_card(stats, evaluation))
    return evaluation


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--guidance", type=float, nargs="+", default=list(GUIDANCES))
    parser.add_argument("--per-caption", type=int, default=1)
    parser.add_argument("--grid", type=Path, default=None, help="write a 16-image sample grid PNG here")
    parser.add_argument("--update-card", action="store_true", help="write evaluation.json and the model card")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.update_card:
        evaluation = evaluate_and_update_card(args.path, args.guidance, args.per_caption)
    else:
        evaluation = evaluate(args.path, args.guidance, args.per_caption)
    print(json.dumps(evaluation, indent=2))
    if args.grid is not None:
        save_grid(args.path, args.grid, evaluation["best_guidance"])
        print(f"grid: {args.grid}")


if __name__ == "__main__":
    main()
