"""The ``fastgen`` command line: generate one image or video, list models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

from fastgen import techniques
from fastgen.errors import FastgenError, FieldError, InvalidRequest
from fastgen.schema import IMAGE_FORMATS, VIDEO_FORMATS, GenerationResult, parse_request
from fastgen.settings import Settings
from fastgen.techniques.seam import Flag, Technique

FORMAT_BY_SUFFIX = {".jpg": "jpeg", **{f".{fmt}": fmt for fmt in IMAGE_FORMATS + VIDEO_FORMATS}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        settings = Settings.from_env()
        return args.command(args, settings)
    except InvalidRequest as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    except FastgenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad FASTGEN_* settings
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        problem = service_problem(exc)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 1


def service_problem(exc: Exception) -> str | None:
    """A sentence for a service that answered with an error or could not be reached (``--url``); None otherwise."""
    if "fastgen.client" not in sys.modules:  # no command talked to a service
        return None
    import httpx

    from fastgen.client import ServiceError

    if isinstance(exc, ServiceError):
        return f"the service answered {exc}"
    if isinstance(exc, httpx.RequestError):  # it always knows its request
        return f"cannot talk to the service at {exc.request.url}: {exc or type(exc).__name__}"
    return None


def quiet_libraries(args: argparse.Namespace) -> None:
    """Our own progress bar is the only one a user should see; the libraries' notices go with --verbose.

    Called only by the commands that load models: importing diffusers costs seconds the thin ones must not pay.
    """
    if args.verbose:
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def build_parser(table: tuple[Technique, ...] | None = None) -> argparse.ArgumentParser:
    """The command line; ``generate`` has each technique's flags, from ``table`` (default: the technique table)."""
    parser = argparse.ArgumentParser(prog="fastgen", description="Fast diffusion image and video generation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    gen = commands.add_parser(
        "generate", help="generate images or a video", description="Generate one video or images of one prompt."
    )
    gen.add_argument("prompt")
    gen.add_argument(
        "-o",
        "--output",
        type=Path,
        help="file to write (format from its suffix); default: ./<id>.<fmt>; several images: <name>_<i><suffix>",
    )
    gen.add_argument(
        "-m", "--model", help="model name, local pipeline directory or hub id (default: FASTGEN_DEFAULT_MODEL)"
    )
    gen.add_argument("-n", "--num-images", type=int, help="image models: images to make, seeds seed, seed + 1, ...")
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("-W", "--width", type=int)
    gen.add_argument("-H", "--height", type=int)
    gen.add_argument("-s", "--steps", type=int)
    gen.add_argument("-g", "--guidance", type=float)
    gen.add_argument("--seed", type=int, help="random seed (default: a random one, printed)")
    gen.add_argument("--frames", type=int, dest="num_frames", help="video models: number of frames")
    gen.add_argument("--fps", type=int, help="video models: frames per second")
    gen.add_argument("-f", "--format", dest="output_format", choices=IMAGE_FORMATS + VIDEO_FORMATS)
    table = table or techniques.TECHNIQUES
    for technique in table:
        for flag in technique.flags:
            add_flag(gen, flag)
    gen.add_argument("--json", action="store_true", help="print the result metadata as JSON")
    gen.add_argument("--url", help="run on a fastgen service at this URL instead of in this process")
    gen.add_argument("--api-key", default=os.environ.get("FASTGEN_API_KEY"), help="key for --url (FASTGEN_API_KEY)")
    gen.set_defaults(command=generate, techniques=table)

    worker = commands.add_parser("worker", help="serve models' job queues on this host")
    worker.add_argument("--models", help="comma-separated models (default: FASTGEN_MODELS or the built-ins)")
    worker.add_argument("--concurrency", type=int, default=1, help="pool processes, each with its own models")
    worker.add_argument(
        "--devices",
        type=int,
        help="ranks that split each request (one GPU each; CPU processes without GPUs); default: FASTGEN_DEVICES",
    )
    worker.set_defaults(command=run_worker)

    serve = commands.add_parser("serve", help="the API, the web page and workers in one command")
    serve.add_argument("--workers", type=int, default=1, help="worker processes to start (0: API only)")
    serve.add_argument("--models", help="comma-separated models (default: FASTGEN_MODELS or the built-ins)")
    serve.add_argument("--host", help="listen address (default: FASTGEN_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default: FASTGEN_PORT or 8000)")
    serve.set_defaults(command=run_serve)

    models = commands.add_parser("models", help="list the models and their capabilities (a service's with --url)")
    models.add_argument("--json", action="store_true")
    models.add_argument("--url", help="list the models of the fastgen service at this URL")
    models.add_argument("--api-key", default=os.environ.get("FASTGEN_API_KEY"), help="key for --url (FASTGEN_API_KEY)")
    models.set_defaults(command=list_models)

    loras = commands.add_parser("loras", help="list the LoRA library (FASTGEN_LORA_DIR, or a service's with --url)")
    loras.add_argument("--json", action="store_true")
    loras.add_argument("--url", help="list the LoRAs of the fastgen service at this URL")
    loras.add_argument("--api-key", default=os.environ.get("FASTGEN_API_KEY"), help="key for --url (FASTGEN_API_KEY)")
    loras.set_defaults(command=list_loras)

    schema = commands.add_parser("schema", help="print the request JSON schema with this service's limits")
    schema.set_defaults(command=print_schema)

    cache = commands.add_parser("cache", help="the approximate cache's tools").add_subparsers(required=True)
    calibrate = cache.add_parser("calibrate", help="measure and write a model's quality-aware table per embedder")
    calibrate.add_argument("--model", default="fastgen-shapes")
    calibrate.add_argument("--embedder", action="append", help="minilm, pipeline, ... (repeatable; default both)")
    calibrate.add_argument("--shapes-bases", type=int, default=10, help="calibration scenes, 6 pairs each")
    calibrate.add_argument("--trace", type=Path, action="append", default=[], help="a .jsonl of natural prompts")
    calibrate.add_argument("--skip", type=int, default=400, help="rows of each trace left for evaluation")
    calibrate.add_argument("--natural-pairs", type=int, default=20)
    calibrate.add_argument("--keep", type=float, default=0.97, help="share of admitted pairs meeting the floor")
    calibrate.add_argument("--psnr-db", type=float, default=20.0, help="the floor for prompts no scorer reads")
    calibrate.add_argument("--out", type=Path, required=True, help="folder (FASTGEN_CACHE_CALIBRATIONS)")
    calibrate.add_argument("--measurements", type=Path, help="also write every pair's measurements here (JSON lines)")
    calibrate.set_defaults(command=calibrate_cache)
    return parser


def calibrate_cache(args: argparse.Namespace, settings: Settings) -> int:
    """``fastgen cache calibrate``: run the calibration pairs through this machine's engine and write the tables."""
    import tempfile

    quiet_libraries(args)
    from fastgen.cache import calibrate
    from fastgen.cache.embedder import load_sentence_embedder

    pairs = calibrate.shapes_pairs(args.shapes_bases) if args.model == "fastgen-shapes" else []
    if args.trace:
        minilm = load_sentence_embedder("minilm")
        pairs += calibrate.natural_pairs(args.trace, args.skip, args.natural_pairs, minilm)
    if not pairs:
        raise FastgenError("no calibration pairs: give --trace for a model other than fastgen-shapes")
    with tempfile.TemporaryDirectory(prefix="fastgen-calibrate-") as folder:
        embedders = args.embedder or ["minilm", "pipeline"]
        tables, measured = calibrate.calibrate(
            settings,
            args.model,
            pairs,
            embedders,
            Path(folder),
            args.keep,
            args.psnr_db,
            progress=lambda done, total: print(f"{done}/{total} pairs", file=sys.stderr),
        )
    for path in calibrate.write(tables, args.out):
        print(path)
    if args.measurements is not None:
        args.measurements.write_text("".join(json.dumps(asdict(m)) + "\n" for m in measured))
        print(args.measurements)
    return 0


def generate(args: argparse.Namespace, settings: Settings) -> int:
    request = request_from_args(args)
    result, files = generate_remote(args, request) if args.url else generate_here(args, settings, request)
    outputs = output_paths(args.output or Path(f"{result.id}.{result.output_format}"), len(files))
    for output, data in zip(outputs, files, strict=True):
        output.write_bytes(data)
    if args.output is None:
        print(f"no -o given: wrote {', '.join(map(str, outputs))}", file=sys.stderr)
    if args.json:  # the result, and where this command wrote the files (the artifacts are the service's copies)
        written = [str(output.resolve()) for output in outputs]
        print(json.dumps({**result.model_dump(mode="json"), "output": written[0], "outputs": written}, indent=2))
        return 0
    for output, seed in zip(outputs, result.seeds or [result.seed], strict=True):
        print(
            f"{output}  model={result.model} seed={seed} {result.width}x{result.height} "
            f"steps={result.steps} {result.timings.total_s:.2f}s"
        )
    return 0


def output_paths(output: Path, count: int) -> list[Path]:
    """Where the files go: ``output`` for one, ``<name>_<i><suffix>`` beside it for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{i}{output.suffix}") for i in range(count)]


def generate_here(args: argparse.Namespace, settings: Settings, request: dict) -> tuple[GenerationResult, list[bytes]]:
    parse_request(request, settings.limits)  # out-of-limits input is told before torch and the engine are imported
    quiet_libraries(args)
    from fastgen.artifacts import encode
    from fastgen.cache import open_cache
    from fastgen.engine import Engine

    generation = Engine(settings, cache=open_cache(settings)).run(request, on_step=ProgressBar())
    return generation.result, [data for _, data in encode(generation)]


def generate_remote(args: argparse.Namespace, request: dict) -> tuple[GenerationResult, list[bytes]]:
    from fastgen.client import FastgenClient, ServiceError

    bar = ProgressBar()
    with FastgenClient(args.url, api_key=args.api_key) as client:
        try:
            job = client.submit(request)
            status = client.wait(job["id"], on_progress=lambda p: bar(SimpleNamespace(**p)))
            bar.close(status["result"]["steps"] if status["status"] == "succeeded" else None)
            if status["status"] != "succeeded":
                raise FastgenError(f"job {job['id']} {status['status']}: {status.get('error') or ''}".strip(": "))
            result = GenerationResult.model_validate(status["result"])
            return result, [client.result_bytes(job["id"], i)[0] for i in range(len(result.artifacts))]
        except ServiceError as exc:
            if exc.detail:
                raise InvalidRequest([FieldError(d["field"], d["message"]) for d in exc.detail]) from None
            raise FastgenError(f"the service answered {exc}") from None


def request_from_args(args: argparse.Namespace) -> dict:
    fields = (
        "prompt",
        "negative_prompt",
        "model",
        "width",
        "height",
        "steps",
        "guidance",
        "seed",
        "num_frames",
        "fps",
        "output_format",
        "num_images",
    )
    request = {name: getattr(args, name) for name in fields if getattr(args, name) not in (None, "")}
    if args.output is not None and "output_format" not in request:
        suffix = args.output.suffix.lower()
        if suffix not in FORMAT_BY_SUFFIX:
            raise InvalidRequest.one(
                "output", f"unknown file type {suffix or '(none)'}; use one of {', '.join(sorted(FORMAT_BY_SUFFIX))}"
            )
        request["output_format"] = FORMAT_BY_SUFFIX[suffix]
    for technique in args.techniques:
        for flag in technique.flags:
            value = getattr(args, flag.dest)
            if value not in (None, False, []):
                convert = flag.convert or (lambda v: v)
                set_field(request, flag.field, [convert(v) for v in value] if flag.repeat else convert(value))
    return request


def add_flag(parser: argparse.ArgumentParser, flag: Flag) -> None:
    """A technique's flag on ``generate``."""
    if flag.switch:
        parser.add_argument(flag.name, action="store_true", help=flag.help)
        return
    options = {"type": flag.type, "choices": flag.choices, "metavar": flag.metavar, "help": flag.help}
    if flag.repeat:
        options |= {"action": "append", "default": []}
    parser.add_argument(flag.name, **{k: v for k, v in options.items() if v is not None})


def set_field(request: dict, path: str, value) -> None:
    """``request["a"]["b"] = value`` for the path ``a.b``."""
    *parents, name = path.split(".")
    for parent in parents:
        request = request.setdefault(parent, {})
    request[name] = value


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from fastgen.models.registry import ModelRegistry
    from fastgen.workers.worker import run_worker as start

    quiet_libraries(args)
    models = _models(args.models) or settings.served_models(ModelRegistry(settings.model_dir).names())
    devices = settings.devices if args.devices is None else args.devices
    if devices < 1:
        raise ValueError(f"--devices: must be at least 1, got {devices}")
    if devices > 1:
        from fastgen.workers.group import run_group_worker

        if args.concurrency != 1:
            raise ValueError("--concurrency: a multi-device worker (--devices above 1) runs one job at a time")
        return run_group_worker(settings, models, devices)
    start(settings, models, concurrency=args.concurrency)
    return 0


def run_serve(args: argparse.Namespace, settings: Settings) -> int:
    from fastgen.serve import serve

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    serve(replace(settings, **overrides), workers=args.workers, models=_models(args.models))
    return 0


def _models(text: str | None) -> list[str]:
    return [name.strip() for name in (text or "").split(",") if name.strip()]


class ProgressBar:
    """A one-line progress bar on stderr."""

    def __init__(self, width: int = 30, stream=sys.stderr):
        self.width, self.stream = width, stream
        self.last_step, self.open = 0, False

    def __call__(self, progress) -> None:
        if progress.step == self.last_step:  # polling a remote job sees the same step several times
            return
        self.last_step = progress.step
        filled = round(self.width * progress.step / max(progress.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        self.open = progress.step < progress.total
        end = "" if self.open else "\n"
        self.stream.write(f"\r[{bar}] step {progress.step}/{progress.total}  ETA {progress.eta_s:5.1f}s{end}")
        self.stream.flush()

    def close(self, total: int | None = None) -> None:
        """End the line: drawn full when the job finished (polling may have missed its last steps), else as it is."""
        if total and self.last_step != total:
            self(SimpleNamespace(step=total, total=total, eta_s=0.0))
        elif self.open:
            self.stream.write("\n")
            self.open = False


def list_models(args: argparse.Namespace, settings: Settings) -> int:
    if args.url:
        from fastgen.client import FastgenClient

        with FastgenClient(args.url, api_key=args.api_key) as client:
            capabilities = client.models()
    else:
        from fastgen.models.registry import ModelRegistry

        registry = ModelRegistry(settings.model_dir)
        capabilities = [registry.resolve(name).capabilities() for name in registry.names()]
    if args.json:
        print(json.dumps(capabilities, indent=2))
        return 0
    for cap in capabilities:
        d = cap["defaults"]
        size = f"{d['width']}x{d['height']}" + (f"x{d['num_frames']}f" if cap["kind"] == "video" else "")
        # A service's default is its own FASTGEN_DEFAULT_MODEL, which this process does not know.
        default = " (default)" if cap["name"] == settings.default_model and not args.url else ""
        print(
            f"{cap['name']:<14} {cap['kind']:<6} {cap['architecture']:<5} {size:<12} "
            f"accelerations: {', '.join(cap['accelerations']) or '-'}{default}"
        )
    return 0


def list_loras(args: argparse.Namespace, settings: Settings) -> int:
    if args.url:
        from fastgen.client import FastgenClient

        with FastgenClient(args.url, api_key=args.api_key) as client:
            listing = client.loras()
    else:
        from fastgen.lora.library import LoraLibrary

        listing = LoraLibrary(settings.lora_dir, host_bytes=0).listing()
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    if not listing:
        print(f"no LoRAs (put .safetensors files in {settings.lora_dir if not args.url else 'the service library'})")
    for lora in listing:
        if "error" in lora:
            print(f"{lora['name']:<24} unusable: {lora['error']}")
            continue
        size = f"{lora['size_bytes'] / 2**20:.1f} MiB"
        shipped = "  shipped" if lora.get("shipped") else ""  # one of the package's adapters
        print(f"{lora['name']:<24} {lora['format']:<5} rank {lora['rank']:<4} {lora['base']:<18} {size:>10}{shipped}")
    return 0


def print_schema(args: argparse.Namespace, settings: Settings) -> int:
    from fastgen.schema import request_schema

    print(json.dumps(request_schema(settings.limits), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
