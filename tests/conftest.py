"""Shared fixtures: settings in a temporary data directory and one warm engine for the session.

Built-in models are built once per session (a few seconds) into that directory, exactly as a
user's first run builds them.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def settings(tmp_path_factory):
    from fastgen.settings import Settings

    return Settings(data_dir=tmp_path_factory.mktemp("fastgen-data"), device="cpu")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """REDIS_URL when set, else a throwaway redis-server of our own."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from services import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def engine(settings):
    from fastgen.engine import Engine

    return Engine(settings)


@pytest.fixture(scope="session")
def sd_pipe(engine):
    """The warm tiny-sd pipeline inside the engine's pool."""
    loaded, _ = engine.pool.get(engine.registry.resolve("tiny-sd"))
    return loaded.pipe


def small(model: str = "tiny-sd", **fields) -> dict:
    """A fast request: tiny sizes and few steps, seeded."""
    sizes = {"tiny-sd": 64, "tiny-pixart": 64, "tiny-wan": 32}
    request = {
        "prompt": "a red circle at the top left",
        "model": model,
        "width": sizes[model],
        "height": sizes[model],
        "steps": 4,
        "seed": 7,
    }
    if model == "tiny-wan":
        request["num_frames"] = 5
    return {**request, **fields}
