"""What the denoiser predicts for a run's own prompt, taken from its forward calls (``fastgen.cache.check`` compares
a new prompt's against a stored run's)."""

from __future__ import annotations

import torch


class Predicted(Exception):  # noqa: N818 -- not an error: how a one-call probe stops the pipeline's loop
    """Raised by a stopping tap once it has the prediction: nothing after that call is needed."""


def conditional(output, images: int) -> torch.Tensor | None:
    """The conditional rows of one denoiser call's output for ``images`` images: all of them, or the second half of
    a classifier-free-guidance batch (diffusers puts the unconditional rows first); None for any other batch."""
    tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
    if not isinstance(tensor, torch.Tensor):
        return None
    if tensor.shape[0] == 2 * images:
        return tensor[images:]
    return tensor if tensor.shape[0] == images else None


class PredictionTap:
    """Forward hooks on the denoisers that keep the first call's conditional output since the last ``take`` (Wan
    calls its transformer twice a step, conditional first; the others once, both halves in one batch). ``stop``
    raises :class:`Predicted` right after it: a probe needs that one call only. Unless ``armed``, a call is kept only
    after :meth:`arm` (and until the next ``take``): a run needs one step's prediction, not a copy of every step's."""

    def __init__(self, modules: list[torch.nn.Module], images: int, stop: bool = False, armed: bool = True):
        self.images, self.stop, self.first, self.armed = images, stop, None, armed
        self.stays_armed = armed
        self.handles = [module.register_forward_hook(self._seen) for module in modules]

    def arm(self) -> None:
        self.armed = True

    def _seen(self, module, args, output) -> None:
        if self.armed and self.first is None:
            found = conditional(output, self.images)
            self.first = None if found is None else found.detach().to("cpu", torch.float32, copy=True)
            if self.stop:
                raise Predicted

    def take(self) -> torch.Tensor | None:
        first, self.first = self.first, None
        self.armed = self.stays_armed
        return first

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
