"""Process groups for one rank group, and a launcher that runs a function on N local ranks.

Nothing here is global: :class:`ParallelGroups` is built once per rank group and passed to whatever
needs it. gloo on CPU, NCCL on GPUs; the code above is the same.
"""

from __future__ import annotations

import os
import queue
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgen.parallel.config import ParallelConfig


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in a composed layout: its patch group (same CFG branch) and CFG group (same strip)."""

    config: ParallelConfig
    rank: int
    patch_group: Any  # ProcessGroup, or None when patch == 1
    cfg_group: Any  # ProcessGroup, or None when cfg == 1
    # The same ranks as patch_group, for the blocking gather of the output strips: on a group of its own it does not
    # queue behind the step's asynchronous exchanges, which are needed only one step later.
    output_group: Any = None

    @property
    def patch_index(self) -> int:
        return self.config.patch_index(self.rank)

    @property
    def cfg_index(self) -> int:
        return self.config.cfg_index(self.rank)

    @classmethod
    def build(cls, config: ParallelConfig, timeout: timedelta | None = None) -> ParallelGroups:
        """Split the initialised default group; collective: every rank calls it with the same config.

        ``timeout``: how long any collective on these groups may wait (default: torch's, 30 min on gloo).
        """
        config.check_world(dist.get_world_size())
        rank = dist.get_rank()
        patch_sets = [[c * config.patch + p for p in range(config.patch)] for c in range(config.cfg)]
        cfg_sets = [[c * config.patch + p for c in range(config.cfg)] for p in range(config.patch)]
        patch_group, cfg_group = _own_group(patch_sets, rank, timeout), _own_group(cfg_sets, rank, timeout)
        return cls(config, rank, patch_group, cfg_group, _own_group(patch_sets, rank, timeout))


def _own_group(rank_sets: list[list[int]], rank: int, timeout: timedelta | None = None):
    """new_group is collective over the whole world, so every rank creates every subgroup, in the same order."""
    own = None
    for ranks in rank_sets:
        group = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
        if rank in ranks:
            own = group
    return own


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_rank(rank: int, world_size: int, port: int, backend: str = "gloo") -> None:
    """Join a local rank group over TCP on the loopback interface."""
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, threads: int, backend: str, results, args) -> None:
    torch.set_num_threads(threads)
    init_rank(rank, world_size, port, backend)
    try:
        results.put((rank, fn(rank, world_size, *args)))
    finally:
        dist.destroy_process_group()


def run_ranks(
    fn: Callable, world_size: int, *args, threads: int = 1, backend: str = "gloo", timeout_s: float = 600
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes in one process group; their results.

    ``fn`` must be importable (spawned processes unpickle it by name). A rank that fails fails the call.
    """
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    results = mp.get_context("spawn").Queue()
    context = mp.start_processes(
        _rank_main,
        args=(fn, world_size, free_port(), threads, backend, results, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    collected, deadline = {}, time.monotonic() + timeout_s
    # Drain while waiting: a rank blocks on a large result until someone reads it.
    while not context.join(timeout=0.05):
        _drain(results, collected)
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"ranks did not finish within {timeout_s} s")
    _drain(results, collected)
    return [collected[rank] for rank in range(world_size)]


def _drain(results, collected: dict) -> None:
    while True:
        try:
            rank, value = results.get_nowait()
        except queue.Empty:
            return
        collected[rank] = value
