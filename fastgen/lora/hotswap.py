"""LoRA adapters resident in a pipeline's denoiser, switched per request by hot-swapping their weights in place.

SwiftDiffusion (Li et al., "SwiftDiffusion: Efficient Diffusion Model Serving with Add-on Modules", 2024) keeps
add-on modules close to the model and loads them asynchronously so that a request rarely waits for one. Here:

- A pipeline gets a fixed number of adapter *slots*. Each slot starts as an all-zero adapter over every layer any
  adapter of the library adapts, at the library's highest rank (diffusers' ``enable_lora_hotswap(target_rank)``
  first), so any library adapter fits any slot: switching is diffusers' ``load_lora_weights(..., hotswap=True)``,
  a copy into tensors that already exist.
- A compiled denoiser (``torch.compile`` or ``Module.compile()``) is never recompiled for a new adapter or scale:
  its graphs depend on which adapters each layer runs and on Python-float scales, so there the request's i-th
  adapter goes into slot i (copied in unless already there), slots 0..n-1 are on in every adapted layer (scale 0
  where an adapter adapts nothing) and scales are tensors filled in place: one graph per adapter count.
- diffusers' swap walks the whole denoiser on every call (tens of milliseconds on an SD-1.5 UNet, more than the
  copy itself). So the first swap of an adapter goes through diffusers, which converts its file (Kohya or PEFT keys,
  alphas), and what it leaves in the slot (each adapted layer's weights and scaling) is kept in host memory; later
  swaps of that adapter copy it back into the same tensors: the same values, without the walk.
- Slots are kept least-recently-used: a request whose adapters are resident only chooses them and their scales,
  each only in the layers its adapter adapts (a slot covers every layer of the library; the others hold zeros and
  would cost compute for nothing); a request without adapters turns them all off, which runs every adapted layer's
  base layer alone: the base model's pixels exactly.
- Optionally (``apply_by_step`` > 0) an adapter that is not resident is swapped into a free, inactive slot by a
  background thread while denoising starts, and switched on at the first step end after it is ready, at step
  ``apply_by_step`` at the latest (waiting there if need be). The report says at which step it was applied.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from fastgen.lora.library import LoraError, LoraInfo, LoraLibrary
from fastgen.lora.segmented import BucketedForward, SegmentedForward

logger = logging.getLogger(__name__)

SLOT_PREFIX = "fastgen_slot"


@dataclass(frozen=True)
class Layout:
    """What every slot covers: the adapted layers (module name -> its lora_A and lora_B shapes) at one rank."""

    rank: int
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    def covers(self, other: Layout) -> bool:
        return self.rank >= other.rank and other.shapes.keys() <= self.shapes.keys()

    def union(self, other: Layout) -> Layout:
        rank = max(self.rank, other.rank)
        modules = self.shapes.keys() | other.shapes.keys()
        return Layout(rank, {name: _shapes_at(self.shapes.get(name) or other.shapes[name], rank) for name in modules})


@dataclass
class Converted:
    """One adapter checked against the denoiser: the library's description and its layout in PEFT names."""

    info: LoraInfo
    layout: Layout


@dataclass(frozen=True)
class Swapped:
    """An adapter as diffusers' swap left it in a slot: per adapted layer its lora_A and lora_B weights (at the
    adapter's own rank; the slot's extra rank is zero) and its scaling (alpha / rank)."""

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scalings: dict[str, float]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.weights.values())


@dataclass
class ActiveLoras:
    """The adapters one request uses; ``remove()`` switches them all off again."""

    slots: AdapterSlots
    chosen: list[tuple[str, float]]  # (slot, scale)
    report_items: list[dict[str, Any]]
    pending: list[tuple[Future, float, dict[str, Any]]] = field(default_factory=list)
    apply_by_step: int = 0

    def on_step(self, step: int, latents: torch.Tensor | None = None) -> None:
        """After each denoising step: switch on adapters whose background swap is done (all of them at the limit)."""
        ready = [p for p in self.pending if p[0].done() or step >= self.apply_by_step]
        if not ready:
            return
        for item in ready:
            future, scale, report = item
            slot = future.result()  # waits at the limit; re-raises a failed load: the request fails
            self.chosen.append((slot, scale))
            report["applied_at_step"] = step
            self.pending.remove(item)
        self.slots.choose(self.chosen)

    def remove(self) -> None:
        for future, *_ in self.pending:
            future.cancel()
            if not future.cancelled():
                future.exception()  # let a swap in flight finish before the next request touches the slots
        self.slots.switch_off()

    def report(self) -> dict[str, Any]:
        return {"adapters": self.report_items}


@dataclass
class SegmentedLoras:
    """Different adapters per member in one call; ``remove()`` restores every layer and switches the slots off."""

    slots: AdapterSlots
    forward: SegmentedForward | BucketedForward
    reports: list[list[dict[str, Any]]]  # per member, its adapters' reports

    def remove(self) -> None:
        self.forward.remove()
        self.slots.switch_off()

    def report(self) -> list[dict[str, Any] | None]:
        return [{"adapters": items, "segmented": True} if items else None for items in self.reports]


class AdapterSlots:
    """A pipeline's adapter slots and which library adapter each one holds (one request at a time)."""

    def __init__(self, pipe, library: LoraLibrary, count: int):
        if count < 1:
            raise ValueError(f"lora slots: need at least 1, got {count}")
        self.pipe, self.library, self.count = pipe, library, count
        self.prefix = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
        self.denoiser = _uncompiled(getattr(pipe, self.prefix))
        self.layout: Layout | None = None
        self.holding: OrderedDict[str, tuple[str, str] | None] = OrderedDict()  # slot -> (name, sha256), LRU first
        self.swaps = 0
        self.rebuilds = 0
        self._zero: dict[str, torch.Tensor] = {}  # the all-zero adapter every slot starts as
        self._layouts: dict[tuple[str, str], Layout] = {}  # (name, sha256) -> its layout: converted once
        self.layers: dict[str, BaseTunerLayer] = {}  # the denoiser's adapter layers, by module name
        self.scalings: dict[str, dict[str, float]] = {}  # slot -> layer -> its adapter's alpha / rank there
        # (name, sha256) -> the adapter as swapped, LRU first, within the library's host memory budget
        self._swapped: OrderedDict[tuple[str, str], Swapped] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-swap")
        self._bucketed: BucketedForward | None = None  # a compiled denoiser's segmented forwards, made once per layout

    def activate(self, adapters: list[tuple[LoraInfo, float]], apply_by_step: int = 0) -> ActiveLoras:
        """Make ``adapters`` (with their scales) the active ones for one request."""
        converted = [self.convert(info, f"loras[{i}]") for i, (info, _) in enumerate(adapters)]
        self._ensure_layout(converted)
        if _compiled(getattr(self.pipe, self.prefix)):
            return self._activate_in_positions(converted, [scale for _, scale in adapters])
        wanted = {(c.info.name, c.info.sha256) for c in converted}
        active, taken = ActiveLoras(self, [], [], apply_by_step=apply_by_step), set()
        for c, (_, scale) in zip(converted, adapters, strict=True):
            slot = self._resident(c.info)
            report = {"name": c.info.name, "scale": scale, "resident": slot is not None}
            active.report_items.append(report)
            if slot is None:
                slot = self._free_slot(wanted, taken)
                if apply_by_step > 0:  # swapped by the background thread into a slot no step uses yet
                    taken.add(slot)
                    active.pending.append((self._executor.submit(self._swap_timed, slot, c, report), scale, report))
                    continue
                self._swap_timed(slot, c, report)
            taken.add(slot)
            active.chosen.append((slot, scale))
        self.choose(active.chosen)
        return active

    def activate_rows(self, members: list[list[tuple[LoraInfo, float]]], images: list[int]) -> SegmentedLoras:
        """Each member's adapters (with their scales) for its own ``images`` rows of one call, different per member
        (Punica's segmented LoRA, ``fastgen.lora.segmented``): every adapter the batch needs is put in a slot of its
        own first (synchronously), then each adapted layer adds every row's own update to its base output (on a
        compiled denoiser through ``BucketedForward``: one graph per bucket)."""
        converted = [[self.convert(info, f"loras[{i}]") for i, (info, _) in enumerate(m)] for m in members]
        self._ensure_layout([c for member in converted for c in member])
        wanted = {(c.info.name, c.info.sha256) for member in converted for c in member}
        if len(wanted) > self.count:
            raise LoraError("loras", f"a batch of {len(wanted)} adapters, more than the {self.count} slots")
        slots: dict[tuple[str, str], str] = {}
        reports = []
        for member, adapters in zip(converted, members, strict=True):
            pairs = zip(member, adapters, strict=True)
            reports.append([self._place(c, scale, wanted, slots) for c, (_, scale) in pairs])
        self.switch_off()  # PEFT's own path off: each layer's segmented forward adds the updates
        rows = []
        for member, adapters, count in zip(converted, members, images, strict=True):
            row = []
            for c, (_, scale) in zip(member, adapters, strict=True):
                slot = slots[(c.info.name, c.info.sha256)]
                row.append((slot, {layer: scale * value for layer, value in self.scalings[slot].items()}))
            rows += [row] * count
        if _compiled(getattr(self.pipe, self.prefix)):
            return SegmentedLoras(self, self._bucketed_forward().use(rows), reports)
        return SegmentedLoras(self, SegmentedForward(self.layers, rows), reports)

    def _bucketed_forward(self) -> BucketedForward:
        if self._bucketed is None or self._bucketed.layers is not self.layers:  # a rebuilt layout has new layers
            self._bucketed = BucketedForward(self.layers, sorted(self.holding))
        return self._bucketed

    def _place(self, c: Converted, scale: float, wanted: set, slots: dict[tuple[str, str], str]) -> dict[str, Any]:
        """Put one adapter of a batch in a slot (or find it resident); its report."""
        key = (c.info.name, c.info.sha256)
        slot = slots.get(key) or self._resident(c.info)
        report = {"name": c.info.name, "scale": scale, "resident": slot is not None}
        if slot is None:
            slot = self._free_slot(wanted, set(slots.values()))
            self._swap_timed(slot, c, report)
        slots[key] = slot
        return report

    def choose(self, chosen: list[tuple[str, float]], everywhere: bool = False) -> None:
        """Switch on ``chosen`` (slot, scale) and nothing else, each only in the layers its adapter adapts, or with
        ``everywhere`` in every adapted layer (scale 0 where its adapter adapts nothing: the compiled mode).

        Done per adapted layer rather than with diffusers' ``set_adapters``: that walks every module of the pipeline
        and recomputes each scale from the *slot's* alpha and rank (the zero adapter's), losing the adapter's own.
        Here each scale is the request's times the adapter's alpha / rank, as the swap left it.
        """
        for name, layer in self.layers.items():
            on = chosen if everywhere else [(slot, scale) for slot, scale in chosen if name in self.scalings[slot]]
            for slot, scale in on:
                _set_scaling(layer, slot, scale * self.scalings[slot].get(name, 0.0))
            _switch(layer, [slot for slot, _ in on])

    def _activate_in_positions(self, converted: list[Converted], scales: list[float]) -> ActiveLoras:
        """For a compiled denoiser: adapter i in slot i, the first n slots on everywhere (no background loading)."""
        self._scalings_as_tensors()
        active = ActiveLoras(self, [], [])
        for slot, c, scale in zip(sorted(self.holding), converted, scales, strict=False):
            resident = self.holding[slot] == (c.info.name, c.info.sha256)
            report = {"name": c.info.name, "scale": scale, "resident": resident}
            if not resident:
                self._swap_timed(slot, c, report)
            active.report_items.append(report)
            active.chosen.append((slot, scale))
        self.choose(active.chosen, everywhere=True)
        return active

    def _scalings_as_tensors(self) -> None:
        """A Python-float scale is a constant in a compiled graph (a new value recompiles); a tensor is an input."""
        for layer in self.layers.values():
            for slot, value in layer.scaling.items():
                if not isinstance(value, torch.Tensor):
                    layer.scaling[slot] = torch.tensor(float(value), device=layer.lora_A[slot].weight.device)

    def switch_off(self) -> None:
        """Every adapted layer runs its base layer alone: the base model exactly."""
        for layer in self.layers.values():
            _switch(layer, [])

    def unload(self) -> None:
        """Take every adapter layer out of the denoiser: the pipeline as it was before any LoRA."""
        if self.layout is not None:
            self.pipe.unload_lora_weights()
        self.layout, self.holding, self.layers, self.scalings = None, OrderedDict(), {}, {}
        self._swapped.clear()

    def convert(self, info: LoraInfo, field: str) -> Converted:
        """The adapter in PEFT names, checked against this denoiser's layers (a clear error when it does not fit)."""
        layout = self._layouts.get((info.name, info.sha256))
        if layout is not None:
            return Converted(info, layout)
        try:
            state = type(self.pipe).lora_state_dict(dict(self.library.tensors(info)))  # a copy: diffusers pops keys
        except Exception as exc:
            raise LoraError(f"{field}.name", f"LoRA {info.name!r} is not a LoRA diffusers can read: {exc}") from exc
        state = state[0] if isinstance(state, tuple) else state
        layout = self._layouts[info.name, info.sha256] = self._layout_of(info, field, state)
        return Converted(info, layout)

    def _layout_of(self, info: LoraInfo, field: str, state: dict[str, torch.Tensor]) -> Layout:
        from diffusers.utils import convert_unet_state_dict_to_peft

        ours = {k.removeprefix(f"{self.prefix}."): v for k, v in state.items() if k.startswith(f"{self.prefix}.")}
        peft = convert_unet_state_dict_to_peft(ours) if ours and "lora_A" not in next(iter(ours)) else ours
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in peft.items():
            if ".lora_A." in key or ".lora_B." in key:
                module, half = key.rsplit(".lora_", 1)
                pairs.setdefault(module, {})[half[0]] = tensor
        if not pairs:
            raise LoraError(f"{field}.name", f"LoRA {info.name!r} adapts no layer of the {self.prefix}")
        shapes = {module: self._fitting_shapes(info, field, module, pair) for module, pair in pairs.items()}
        return Layout(max(pair["A"].shape[0] for pair in pairs.values()), shapes)

    def _fitting_shapes(self, info: LoraInfo, field: str, module: str, pair: dict[str, torch.Tensor]):
        try:
            layer = self.denoiser.get_submodule(module)
        except AttributeError:
            layer = None
        layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        a, b = pair.get("A"), pair.get("B")
        expected = _pair_shapes(layer, a.shape[0] if a is not None else 0) if layer is not None else None
        if expected is None or a is None or b is None or (tuple(a.shape), tuple(b.shape)) != expected:
            got = "no such layer" if layer is None else f"shapes {_shape(a)} and {_shape(b)}, expected {expected}"
            raise LoraError(
                f"{field}.name",
                f"LoRA {info.name!r} (base {info.base}) does not fit this model: layer {module}: {got}",
            )
        return expected

    def _ensure_layout(self, converted: list[Converted]) -> None:
        """Slots cover every layer of every library adapter that fits; rebuilt (rarely) when one does not."""
        needed = None
        for c in converted:
            needed = c.layout if needed is None else needed.union(c.layout)
        if needed is None or (self.layout is not None and self.layout.covers(needed)):
            return
        layout = self._library_layout(needed)
        if self.layout is not None:
            self.rebuilds += 1
            logger.info("LoRA slots rebuilt for a wider layout (rank %d, %d layers)", layout.rank, len(layout.shapes))
            self.pipe.unload_lora_weights()
        self._build(layout)

    def _library_layout(self, needed: Layout) -> Layout:
        """``needed`` widened by every other library adapter that fits this model, so later swaps fit too."""
        layout = needed
        for name in self.library.names():
            try:
                layout = layout.union(self.convert(self.library.get(name), "loras").layout)
            except LoraError:
                continue  # made for another model, or unusable: never swapped into these slots
        return layout

    def _build(self, layout: Layout) -> None:
        self.pipe.enable_lora_hotswap(target_rank=layout.rank)
        self._zero = {}
        for module, (a_shape, b_shape) in layout.shapes.items():
            self._zero[f"{self.prefix}.{module}.lora_A.weight"] = torch.zeros(a_shape)
            self._zero[f"{self.prefix}.{module}.lora_B.weight"] = torch.zeros(b_shape)
        self.holding = OrderedDict()
        for i in range(self.count):
            slot = f"{SLOT_PREFIX}{i:02d}"  # fixed width: peft finds an adapter's keys by substring
            self.pipe.load_lora_weights(self._zero_copy(), adapter_name=slot)
            self.holding[slot] = None
        self.layout = layout
        self.layers = {name: m for name, m in self.denoiser.named_modules() if isinstance(m, BaseTunerLayer)}
        self.scalings = {slot: {} for slot in self.holding}
        self.switch_off()

    def _zero_copy(self) -> dict[str, torch.Tensor]:
        # Fresh tensors per slot: diffusers may keep the given tensors as the slot's parameters, and slots sharing
        # them would all change with the first swap.
        return {key: tensor.clone() for key, tensor in self._zero.items()}

    def _resident(self, info: LoraInfo) -> str | None:
        for slot, held in self.holding.items():
            if held == (info.name, info.sha256):
                self.holding.move_to_end(slot)
                return slot
        return None

    def _free_slot(self, wanted: set[tuple[str, str]], taken: set[str]) -> str:
        """An empty slot, else the least recently used one holding nothing this request needs."""
        for slot, held in self.holding.items():
            if slot not in taken and (held is None or held not in wanted):
                return slot
        raise LoraError("loras", f"more adapters than the {self.count} slots of this worker (FASTGEN_LORA_SLOTS)")

    def _swap_timed(self, slot: str, c: Converted, report: dict[str, Any]) -> str:
        started = time.perf_counter()
        report["swap"] = self._swap(slot, c)
        report["swap_s"] = round(time.perf_counter() - started, 6)
        return slot

    def _swap(self, slot: str, c: Converted) -> str:
        """Put ``c`` into ``slot``; says how: ``copy`` (from host memory) or ``diffusers`` (its first swap)."""
        key = (c.info.name, c.info.sha256)
        self.holding[slot] = None  # until the swap is complete, the slot holds nothing anyone may reuse
        swapped = self._swapped.get(key)
        if swapped is not None:
            self._swapped.move_to_end(key)
            self._copy_into(slot, swapped)
        else:
            self._swap_with_diffusers(slot, c)
            self._keep(key, slot, c.layout)
        self.holding[slot] = key
        self.holding.move_to_end(slot)
        self.swaps += 1
        return "diffusers" if swapped is None else "copy"

    def _swap_with_diffusers(self, slot: str, c: Converted) -> None:
        try:
            self.pipe.load_lora_weights(dict(self.library.tensors(c.info)), adapter_name=slot, hotswap=True)
        except Exception as exc:
            if slot not in getattr(self.denoiser, "peft_config", {}):  # diffusers drops an adapter it failed to swap
                self.pipe.load_lora_weights(self._zero_copy(), adapter_name=slot)
                self.switch_off()
            raise LoraError("loras", f"LoRA {c.info.name!r} could not be swapped in: {exc}") from exc
        # The swap set each adapted layer's scaling to the adapter's alpha / rank: kept, since choosing scales it.
        self.scalings[slot] = {name: float(self.layers[name].scaling[slot]) for name in c.layout.shapes}

    def _keep(self, key: tuple[str, str], slot: str, layout: Layout) -> None:
        """Remember what the swap left in ``slot``, within the library's host budget (least recently used dropped)."""
        weights = {}
        for name, (a_shape, _) in layout.shapes.items():
            layer, rank = self.layers[name], a_shape[0]
            a, b = layer.lora_A[slot].weight, layer.lora_B[slot].weight
            weights[name] = (a[:rank].detach().to("cpu", copy=True), b[:, :rank].detach().to("cpu", copy=True))
        self._swapped[key] = Swapped(weights, dict(self.scalings[slot]))
        while self._swapped and sum(s.nbytes for s in self._swapped.values()) > self.library.host_bytes:
            self._swapped.popitem(last=False)

    @torch.no_grad()
    def _copy_into(self, slot: str, swapped: Swapped) -> None:
        for name, (a, b) in swapped.weights.items():
            layer, rank = self.layers[name], a.shape[0]
            target_a, target_b = layer.lora_A[slot].weight, layer.lora_B[slot].weight
            target_a[:rank].copy_(a)
            target_a[rank:].zero_()
            target_b[:, :rank].copy_(b)
            target_b[:, rank:].zero_()
        self.scalings[slot] = dict(swapped.scalings)


def _compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs compiled: wrapped by ``torch.compile`` or compiled in place by ``Module.compile()``."""
    return hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None


def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "_orig_mod", module)


def _switch(layer: BaseTunerLayer, slots: list[str]) -> None:
    """Run ``slots`` in ``layer``, or its base layer alone when there are none.

    Sets what PEFT's forward reads (its active adapters and its off switch) directly: the public ``set_adapter`` and
    ``enable_adapters`` also flip ``requires_grad`` on every slot's parameters, which inference never reads and
    which made switching cost tens of milliseconds on an SD-1.5 UNet.
    """
    if slots:
        layer._active_adapter = slots
    layer._disable_adapters = not slots


def _set_scaling(layer: BaseTunerLayer, slot: str, value: float) -> None:
    # A tensor (after enable_lora_hotswap) is filled in place, so a compiled denoiser sees no new constant.
    if isinstance(layer.scaling[slot], torch.Tensor):
        layer.scaling[slot].fill_(value)
    else:
        layer.scaling[slot] = value


def _pair_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The (lora_A, lora_B) shapes a rank-``rank`` adapter of ``layer`` has; None for layers LoRA cannot adapt."""
    if isinstance(layer, torch.nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    if isinstance(layer, torch.nn.Conv2d):
        return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return None


def _shapes_at(shapes: tuple[tuple[int, ...], tuple[int, ...]], rank: int):
    a, b = shapes
    return (rank, *a[1:]), (b[0], rank, *b[2:])


def _shape(tensor: torch.Tensor | None) -> str:
    return "missing" if tensor is None else "x".join(map(str, tensor.shape))
