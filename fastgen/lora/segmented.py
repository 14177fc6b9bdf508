"""Different LoRAs for different samples of one batch, over the adapter slots (``fastgen.lora.hotswap``).

Punica (Chen et al., "Punica: Multi-Tenant LoRA Serving", MLSys 2024) serves requests with different adapters in one
batch: each adapted layer computes its base output once for the whole batch, plus each sample's own low-rank update
(its segmented gather matrix-vector product, SGMV). Here each adapted layer's forward becomes: the base layer on the
batch, plus, for every row, the sum over its adapters of ``scale * B(A(x))``, where A and B are *gathered* from the
slots by each row's adapter indices (once per batch, with the scales folded into B) and applied to all rows in two
batched matmuls (``torch.bmm``): no loop over samples or adapters in Python, the same code on CPU and GPU.

A row's adapters are its request's (a request without any has none: its rows get the base layer alone). A batch with
guidance holds each sample several times (unconditional rows, then conditional ones), so the row indices repeat.
Removing the handle puts each layer's own forward back and switches every slot off: the base model exactly.

A compiled denoiser (``torch.compile``) must not be traced again for every batch: there :class:`BucketedForward`
gives each adapted layer one forward for good (the same function object every batch), which gathers from *all*
the slots' weights inside the graph by each row's indices and scales, tensors kept per (samples, adapters per
sample) bucket and filled in place per batch. A graph then depends only on the batch's size and how many adapters
its widest request has (and torch's automatic dynamic shapes may fold batch sizes together): new adapters, scales
or mixes within a bucket run the graph already compiled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from peft.tuners.tuners_utils import BaseTunerLayer


@dataclass
class RowUpdates:
    """One adapted layer's low-rank updates for a batch: the slots' stacked weights and each row's (slot, scale)."""

    a: torch.Tensor  # [slots, rank, in] (Linear) or [slots, rank, in, kh, kw] (Conv2d)
    b: torch.Tensor  # [slots, out, rank]
    index: torch.Tensor  # [rows, k]: positions in the stacks, per sample (padded with 0)
    scale: torch.Tensor  # [rows, k]: 0 for padding
    conv: dict[str, Any] | None = None  # lora_A's stride, padding and dilation for a Conv2d layer
    gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # rows -> per-row A^T, sB^T

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Every row's update: ``sum_k scale[r, k] * B[index[r, k]] A[index[r, k]] x[r]``."""
        rows = x.shape[0]
        x = x.to(self.a.dtype)
        if self.conv is None:
            a_t, b_t = self.per_row(rows)
            flat = x.reshape(rows, -1, x.shape[-1])  # [rows, tokens, in]
            return torch.bmm(torch.bmm(flat, a_t), b_t).reshape(*x.shape[:-1], self.b.shape[1])
        index, scale = self.rows_of(rows)
        slots, rank = self.a.shape[:2]
        hidden = F.conv2d(x, self.a.reshape(slots * rank, *self.a.shape[2:]), **self.conv)  # every slot's A at once
        hidden = hidden.view(rows, slots, rank, *hidden.shape[2:])
        hidden = hidden[torch.arange(rows, device=x.device)[:, None], index] * scale[:, :, None, None, None]
        return torch.einsum("rkqhw,rkoq->rohw", hidden, self.b[index])

    def per_row(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's adapters' A (transposed, side by side) and scaled B (stacked): gathered once per batch size, so
        every step runs two batched matmuls and nothing else. ``[rows, in, k*rank]``, ``[rows, k*rank, out]``."""
        if rows not in self.gathered:
            index, scale = self.rows_of(rows)
            width = index.shape[1] * self.a.shape[1]
            a_t = self.a[index].reshape(rows, width, -1).transpose(1, 2).contiguous()
            scaled = self.b[index] * scale[:, :, None, None]  # [rows, k, out, rank]
            b_t = scaled.permute(0, 1, 3, 2).reshape(rows, width, -1).contiguous()
            self.gathered[rows] = (a_t, b_t)
        return self.gathered[rows]

    def rows_of(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-row indices and scales for a batch of ``rows`` (guidance repeats each sample's rows)."""
        repeats, rest = divmod(rows, self.index.shape[0])
        if rest:
            raise ValueError(f"a batch of {rows} rows for {self.index.shape[0]} samples")
        return self.index.repeat(repeats, 1), self.scale.repeat(repeats, 1)


def _conv_args(layer: BaseTunerLayer, slot: str) -> dict[str, Any] | None:
    first = layer.lora_A[slot]
    if isinstance(first, torch.nn.Conv2d):
        return {"stride": first.stride, "padding": first.padding, "dilation": first.dilation}
    return None


def row_updates(layer: BaseTunerLayer, rows: list[list[tuple[str, float]]]) -> RowUpdates | None:
    """``layer``'s updates for rows that each use (slot, scale) pairs, the scale already the layer's own (the request's
    times the adapter's alpha / rank there); None when no row adapts this layer."""
    used = sorted({slot for row in rows for slot, scale in row if scale})
    if not used:
        return None
    position = {slot: i for i, slot in enumerate(used)}
    width = max(sum(1 for _, scale in row if scale) for row in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    scale = torch.zeros(len(rows), width)
    for r, row in enumerate(rows):
        for k, (slot, value) in enumerate((s, v) for s, v in row if v):
            index[r, k], scale[r, k] = position[slot], value
    a = torch.stack([layer.lora_A[slot].weight for slot in used]).detach()
    b = torch.stack([layer.lora_B[slot].weight for slot in used]).detach()
    b = b.reshape(*b.shape[:3])  # a Conv2d's 1x1 lora_B as a matrix
    return RowUpdates(a, b, index.to(a.device), scale.to(a.device, a.dtype), _conv_args(layer, used[0]))


class SegmentedForward:
    """Each adapted layer's forward for one batch: its base layer, plus the rows' gathered updates."""

    def __init__(self, layers: dict[str, BaseTunerLayer], rows: list[list[tuple[str, dict[str, float]]]]):
        """``rows``: per row, (slot, the request's scale times the adapter's alpha / rank in each layer it adapts)."""
        self.layers = []
        for name, layer in layers.items():
            updates = row_updates(layer, [[(slot, scales.get(name, 0.0)) for slot, scales in row] for row in rows])
            if updates is not None:
                layer.forward = _forward(layer, updates)  # an instance attribute: deleting it restores the class's
                self.layers.append(layer)

    def remove(self) -> None:
        for layer in self.layers:
            del layer.forward
        self.layers = []


def _forward(layer: BaseTunerLayer, updates: RowUpdates):
    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        return result + updates.delta(x).to(result.dtype)

    return forward


@dataclass
class Bucket:
    """One layer's per-row slot positions and scales for batches of one (samples, width) shape, filled in place."""

    index: torch.Tensor  # [samples, width]: positions among all the slots
    scale: torch.Tensor  # [samples, width]: 0 for padding and where a row's adapter does not adapt the layer


class BucketedForward:
    """A compiled denoiser's segmented LoRA: each adapted layer's one forward, reading its current bucket.

    ``slots``: every slot, in a fixed order (a row's indices are positions in it). ``use(rows)`` makes a batch's rows
    current, ``remove()`` puts each layer's own forward back (the compiled graph of the plain path then runs again).
    """

    def __init__(self, layers: dict[str, BaseTunerLayer], slots: list[str]):
        self.layers, self.slots = layers, slots
        self.buckets: dict[str, dict[tuple[int, int], Bucket]] = {name: {} for name in layers}
        self.current: dict[str, Bucket] = {}
        # Every slot's A and B of each layer, stacked once and refreshed in place per batch (a swap between batches
        # changes them), so the steps read them rather than stack them again on every call.
        self.stacked = {name: self._stack(layer) for name, layer in layers.items()}
        self.forwards = {name: self._forward(name, layer) for name, layer in layers.items()}

    def use(self, rows: list[list[tuple[str, dict[str, float]]]]) -> BucketedForward:
        """``rows``: per sample, (slot, its scale in each layer it adapts), as ``SegmentedForward`` takes them."""
        width = max(1, *(len(row) for row in rows))
        position = {slot: i for i, slot in enumerate(self.slots)}
        index = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            for k, (slot, _) in enumerate(row):
                index[r, k] = position[slot]
        for name, layer in self.layers.items():
            scale = torch.zeros(len(rows), width)
            for r, row in enumerate(rows):
                for k, (_, scales) in enumerate(row):
                    scale[r, k] = scales.get(name, 0.0)
            self.current[name] = self._fill(name, layer, index, scale)
            self._refresh(name, layer)
            layer.forward = self.forwards[name]
        return self

    @torch.no_grad()
    def _refresh(self, name: str, layer: BaseTunerLayer) -> None:
        a, b = self.stacked[name]
        for i, slot in enumerate(self.slots):
            a[i].copy_(layer.lora_A[slot].weight)
            b[i].copy_(layer.lora_B[slot].weight.reshape(b.shape[1:]))

    @torch.no_grad()
    def _stack(self, layer: BaseTunerLayer) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.stack([layer.lora_A[slot].weight for slot in self.slots])
        b = torch.stack([layer.lora_B[slot].weight for slot in self.slots])
        return a, b.reshape(*b.shape[:3])  # a Conv2d's 1x1 lora_B as a matrix

    def _fill(self, name: str, layer: BaseTunerLayer, index: torch.Tensor, scale: torch.Tensor) -> Bucket:
        weight = layer.lora_A[self.slots[0]].weight
        bucket = self.buckets[name].get(tuple(index.shape))
        if bucket is None:
            bucket = Bucket(torch.empty_like(index, device=weight.device), torch.empty_like(scale, dtype=weight.dtype))
            self.buckets[name][tuple(index.shape)] = bucket
        bucket.index.copy_(index)
        bucket.scale.copy_(scale)
        return bucket

    def _forward(self, name: str, layer: BaseTunerLayer):
        conv = _conv_args(layer, self.slots[0])

        def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = layer.base_layer(x, *args, **kwargs)
            (a, b), bucket = self.stacked[name], self.current[name]
            updates = RowUpdates(a, b, bucket.index, bucket.scale, conv)
            return result + updates.delta(x).to(result.dtype)

        return forward

    def remove(self) -> None:
        for layer in self.layers.values():
            layer.__dict__.pop("forward", None)
        self.current = {}
