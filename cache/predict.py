"""What the denoiser predicts for a run's own prompt, taken from its forward calls (``fastgen.cache.check`` compares
a new prompt's against a stored run's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Predicted(Exception):  # noqa: N818 -- not an error: how a one-call probe stops the pipeline's loop
    """Raised by a stopping tap once it has the prediction: nothing after that call is needed."""


@dataclass(frozen=True)
class Prediction:
    """One step's denoiser output for a run's images: conditional, and unconditional where guidance ran (None else)."""

    conditional: torch.Tensor
    unconditional: torch.Tensor | None = None

    def rows(self, first: int, count: int) -> Prediction:
        """The prediction of ``count`` of the images from the ``first``."""
        part = slice(first, first + count)
        uncond = None if self.unconditional is None else self.unconditional[part].clone()
        return Prediction(self.conditional[part].clone(), uncond)


def halves(output, images: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(conditional, unconditional) rows of one denoiser call's output for ``images`` images: the halves of a
    classifier-free-guidance batch (diffusers puts the unconditional rows first), or all of them and None; None for
    any other batch."""
    tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.shape[0] == 2 * images:
        return tensor[images:], tensor[:images]
    return (tensor, None) if tensor.shape[0] == images else None


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32, copy=True)


class PredictionTap:
    """Forward hooks on the denoisers that keep the first call's output since the last ``take`` (Wan calls its
    transformer twice a step, conditional first, and its second call is kept as the unconditional; the others once,
    both halves in one batch). ``stop`` raises :class:`Predicted` right after it: a probe needs that one call only.
    Unless ``armed``, a call is kept only after :meth:`arm` (and until the next ``take``): a run needs one step's
    prediction, not a copy of every step's."""

    def __init__(self, modules: list[torch.nn.Module], images: int, stop: bool = False, armed: bool = True):
        self.images, self.stop, self.first, self.armed = images, stop, None, armed
        self.stays_armed = armed
        self.handles = [module.register_forward_hook(self._seen) for module in modules]

    def arm(self) -> None:
        self.armed = True

    def _seen(self, module, args, output) -> None:
        if not self.armed:
            return
        found = halves(output, self.images)
        if self.first is None:
            self.first = None if found is None else Prediction(*(None if t is None else _cpu(t) for t in found))
            if self.stop:
                raise Predicted
        elif self.first.unconditional is None and found is not None and found[1] is None:
            self.first = Prediction(self.first.conditional, _cpu(found[0]))  # the step's second call: unconditional

    def take(self) -> Prediction | None:
        first, self.first = self.first, None
        self.armed = self.stays_armed
        return first

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
