"""Per-request LoRA adapters switched on for one run, swapped into the pipeline's warm adapter slots; requests of one
batch with different adapters each get their own (Punica's segmented LoRA, ``fastgen.lora.segmented``).

SwiftDiffusion (Li et al., "SwiftDiffusion: Efficient Diffusion Model Serving with Add-on Modules", 2024): adapters
are hot-swapped into resident slots instead of merged; the slots and the swap are ``fastgen.lora.hotswap``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastgen.lora.hotswap import ActiveLoras, AdapterSlots, SegmentedLoras
from fastgen.lora.library import fingerprints

if TYPE_CHECKING:
    from fastgen.engine.run import Run


@dataclass(frozen=True)
class LoraUse:
    """The run's adapters as (name, SHA-256, scale), in the request's order, when every member has the same; with
    ``segmented``, members have different ones (each member's report names its own)."""

    adapters: tuple[tuple[str, str, float], ...] = ()
    segmented: bool = False


def from_run(run: Run) -> LoraUse | None:
    sets = {fingerprints(member.resolved.adapters) for member in run.members}
    if sets == {()}:
        return None
    return LoraUse(sets.pop()) if len(sets) == 1 else LoraUse(segmented=True)


def apply(pipe, config: LoraUse, run: Run) -> SwitchedOn | SegmentedLoras:
    """Switch the run's adapters on. Each is due by ``lora_apply_by_step`` (at the latest by the last step): one not
    resident yet is swapped in the background while the first steps run; a run resumed after that step waits for all
    of them before its first step. Members with different adapters get each their own, per row of the batch
    (``AdapterSlots.activate_rows``: every adapter swapped in before the first step)."""
    loaded, settings = run.loaded, run.settings
    if loaded.adapters is None:
        loaded.adapters = AdapterSlots(pipe, run.library, settings.lora_slots)
    if config.segmented:
        members = run.members
        return loaded.adapters.activate_rows([m.resolved.adapters for m in members], [len(m.seeds) for m in members])
    by_step = min(settings.lora_apply_by_step, run.monitor.total - 1)
    active = loaded.adapters.activate(run.adapters, by_step if by_step > run.monitor.skipped else 0)
    if active.pending:  # swapped in the background: the first steps run without them
        run.changed_mid_run.add("loras")
    return SwitchedOn(active)


class SwitchedOn:
    """The adapters' handle: ``on_step`` switches on those swapped in the background, ``remove`` switches all off."""

    def __init__(self, active: ActiveLoras):
        self.active = active
        self.on_step = active.on_step

    def remove(self) -> None:
        self.active.remove()

    def report(self) -> dict[str, Any]:
        return self.active.report()
