"""What each rank runs in the parallel tests (spawned processes import it by name, so it is not a test module)."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import torch

from fastgen.parallel.config import ParallelConfig
from fastgen.parallel.groups import ParallelGroups
from fastgen.parallel.layout import split

SHAPES = Path(__file__).resolve().parents[1] / "fastgen" / "models" / "weights" / "fastgen-shapes"


def load(model: str):
    if model == "fastgen-shapes":
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(SHAPES)
    else:
        from fastgen.models.builtin import BUILDERS

        pipe = BUILDERS[model](seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, call: dict) -> np.ndarray:
    generator = torch.Generator().manual_seed(call.get("seed", 0))
    fields = {k: v for k, v in call.items() if k != "seed"}
    out = pipe(**fields, generator=generator, output_type="np")
    return out.frames if hasattr(out, "frames") else out.images


def compare_modes(
    rank: int, world_size: int, model: str, call: dict, configs: dict[str, dict], calls: dict | None = None
) -> dict:
    """Plain output, each config's output and report, and the plain output again after every handle came off.

    ``calls`` overrides call fields per config (e.g. a size that does not split).
    """
    pipe = load(model)
    result = {"plain": generate(pipe, call), "runs": {}}
    for name, fields in configs.items():
        groups = ParallelGroups.build(ParallelConfig(**fields))
        handle = split(pipe, groups, guidance_on=call.get("guidance_scale", 1.0) > 1.0)
        try:
            images = generate(pipe, call | (calls or {}).get(name, {}))
        except ValueError as exc:
            result["runs"][name] = {"error": str(exc)}
            continue
        finally:
            handle.remove()
        result["runs"][name] = {"images": images, "report": handle.report()}
    result["after"] = generate(pipe, call)
    return result


def group_jobs(rank: int, world_size: int, settings, jobs: list[dict], lora_dirs: list | None = None) -> dict:
    """A multi-device worker's ranks without Celery: rank 0 leads ``jobs`` one after another, the others follow.

    ``lora_dirs``: each rank's own LoRA library. Rank 0 returns each job's outcome (its plan, and its image and
    reports or its error); the others return the plans they ran. Pickled here: a plan's cache hit holds tensors,
    which a queue would share through this process, gone by the time they are read.
    """
    import dataclasses

    from fastgen.workers.group import RankGroup, follow, rank_engine

    if lora_dirs:
        settings = dataclasses.replace(settings, lora_dir=lora_dirs[rank])
    group = RankGroup.create(rank, world_size, settings.job_timeout_s)
    engine = rank_engine(settings, ["tiny-sd"], group)
    if rank:
        return pickle.dumps({"plans": follow(engine, group)})
    outcomes = [_lead(engine, group, payload, f"job-{i}") for i, payload in enumerate(jobs)]
    if not group.broken:
        group.release()
    return pickle.dumps({"outcomes": outcomes})


def group_batch(rank: int, world_size: int, settings, jobs: list[dict], lora_dirs: list) -> dict:
    """A multi-device worker's ranks without Celery: rank 0 leads ``jobs`` as one call (a batch), the others follow.

    Rank 0 returns each job's image or error and the plan; the others return the plans they ran."""
    import dataclasses

    from fastgen.engine import Member
    from fastgen.workers.group import RankGroup, follow, lead, rank_engine

    settings = dataclasses.replace(settings, lora_dir=lora_dirs[rank])
    group = RankGroup.create(rank, world_size, settings.job_timeout_s)
    engine = rank_engine(settings, ["tiny-sd"], group)
    if rank:
        return pickle.dumps({"plans": follow(engine, group)})
    members = [Member(engine.resolve(payload), f"job-{i}", "tests") for i, payload in enumerate(jobs)]
    outcomes = []
    for outcome in lead(engine, group, members):
        if isinstance(outcome, BaseException):
            outcomes.append({"error": (type(outcome).__name__, str(outcome))})
        else:
            outcomes.append({"image": np.asarray(outcome.images[0]), "batch": outcome.result.batch})
    group.release()
    return pickle.dumps({"outcomes": outcomes, "plan": group.plan})


def _lead(engine, group, payload: dict, job_id: str) -> dict:
    from fastgen.engine import Member
    from fastgen.workers.group import lead

    outcome: dict = {"plan": None, "image": None, "reports": None, "error": None}
    try:
        (generation,) = lead(engine, group, [Member(engine.resolve(payload), job_id, "tests")])
        if isinstance(generation, BaseException):
            raise generation
        outcome |= {"image": np.asarray(generation.images[0]), "reports": generation.result.accelerations}
    except Exception as exc:
        outcome["error"] = (type(exc).__name__, str(exc))
    outcome["ended_at"] = time.monotonic()  # CLOCK_MONOTONIC: comparable between the ranks' processes
    if group.plan is not None and group.plan.job_id == job_id:
        outcome["plan"] = group.plan
    return outcome


def hanging_helper(rank: int, world_size: int, port: int, settings, job: dict, hang_s: float, results) -> None:
    """Rank 0 leads ``job``; rank 1 hangs ``hang_s`` in its third UNet call. Each puts what it saw on ``results``.

    Run by hand (not by ``run_ranks``): rank 1 is expected to end with a non-zero status, as in a real worker.
    """
    import torch.distributed as dist

    from fastgen.parallel.groups import init_rank
    from fastgen.workers.group import RankGroup, follow, rank_engine

    init_rank(rank, world_size, port)
    group = RankGroup.create(rank, world_size, settings.job_timeout_s)
    engine = rank_engine(settings, ["tiny-sd"], group)
    if rank == 0:
        results.put((0, _lead(engine, group, job, "hung-job")))
        if not group.broken:
            group.release()
            dist.destroy_process_group()
        return
    unet = engine.pool.get(engine.registry.resolve("tiny-sd"))[0].pipe.unet
    forward, calls = unet.forward, []

    def hang_on_the_third_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            results.put((rank, {"hung_at": time.monotonic()}))
            time.sleep(hang_s)
        return forward(*args, **kwargs)

    unet.forward = hang_on_the_third_call
    follow(engine, group)
    results.put((rank, {"hung_at": None}))  # not reached when the group broke: follow ends the process
