"""Stored denoising states: one safetensors file per (entry, K) under an fsspec URL every worker can read."""

from __future__ import annotations

import json

import fsspec
from safetensors.torch import load, save

from fastgen.cache.resume import State, from_safetensors, to_safetensors


class StateFiles:
    """``<url>/<entry id>/k<K>.safetensors``: a local directory, or any fsspec URL across machines.

    Entry ids are unique across partitions (the store hands them out), so a path needs nothing else.
    """

    def __init__(self, url: str):
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def path(self, entry_id: int, k: int) -> str:
        return f"{self.root}/{entry_id}/k{k}.safetensors"

    def write(self, entry_id: int, state: State) -> int:
        """Store the state; return its size in bytes."""
        tensors, meta = to_safetensors(state)
        data = save(tensors, metadata=meta)
        path = self.path(entry_id, state.step)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)
        return len(data)

    def read(self, entry_id: int, k: int) -> State:
        """The stored state; raises on a missing or unreadable file (the caller treats that as a miss)."""
        data = self.fs.cat_file(self.path(entry_id, k))
        return from_safetensors(load(data), header_metadata(data))

    def delete(self, entry_id: int, k: int) -> None:
        try:
            self.fs.rm_file(self.path(entry_id, k))
        except FileNotFoundError:
            pass


def header_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file (its JSON header's ``__metadata__``)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})
