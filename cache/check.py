"""The quality-aware cache: a calibrated similarity-to-K table per model and embedder, and a check at resume time.

Nirvana (Agarwal et al., "Approximate Caching for Efficiently Serving Text-to-Image Diffusion Models", NSDI 2024)
skips K steps by prompt similarity alone, with one table set for CLIP embeddings of natural prompts. Measured on
fastgen-shapes, a prompt a content word away from its neighbour ("top left" / "bottom right") is 0.99 alike to every
embedder here, and the neighbour's layout is fixed after about a fifth of the steps: a hit keeps it. Colour, shape and
background, on the other hand, are still repainted by the new prompt's own steps long after that.

So similarity alone cannot say how many steps are safe; the model can. Before trusting a hit, the new prompt's own
prediction is computed on the stored run's earliest stored latents (one conditional denoiser call, guidance off) and
compared with what the stored run predicted there (:func:`distance`): where each prompt's contribution to the
prediction lies, its layout, since the layout is what the skipped early steps fix (Hertz et al., "Prompt-to-Prompt
Image Editing with Cross Attention Control", 2022, show the same of attention maps). Measured on fastgen-shapes'
calibration pairs, that layout distance keeps a moved shape (0.41-0.89 on 15 pairs) apart from a recoloured one (at
most 0.22) or a new background (at most 0.27); the plain relative RMS of the two predictions did not (on 10 pairs each:
position 0.78-1.43, background 0.66-1.77, colour 0.27-0.97). Which distance each K tolerates, and which similarity each
K needs, is measured, not assumed: ``fastgen cache calibrate`` (``fastgen.cache.calibrate``) resumes calibration pairs
at every mark and writes, per skipped fraction, the lowest similarity and the largest distance at which a chosen share
of pairs still meets a fidelity floor. The service loads one :class:`Calibration` per model and embedder
(``load_calibrations``) and builds the model's policy from it (:meth:`Calibration.policy`).
Torch-free: the door and the settings read these files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastgen.cache.policy import FASTGEN, QUALITY, CachePolicy

logger = logging.getLogger(__name__)

BUILT_IN = Path(__file__).parent / "calibrations"  # the built-in models' tables, made by ``fastgen cache calibrate``


@dataclass(frozen=True)
class Rung:
    """Skipping ``fraction`` of the steps: the similarity it needs, and the check's largest distance (None: no check
    needed, the calibration pairs met the floor at that similarity whatever the model said)."""

    fraction: float
    min_similarity: float
    max_distance: float | None


@dataclass(frozen=True)
class Calibration:
    model: str
    embedder: str
    rungs: tuple[Rung, ...]
    keep: float  # the share of admitted calibration pairs that met the floor, at least
    floor: dict[str, Any]  # what meeting it means: adherence kept (scorable captions), PSNR against the exact image
    check_at: float  # the fraction of the steps after which the check's distances were measured
    made: dict[str, Any] = field(default_factory=dict)  # how: traces, pairs, seeds, wall time, date

    def policy(self, base: CachePolicy = FASTGEN) -> CachePolicy:
        """``base`` with this table: the rungs as its thresholds (a rung a higher one dominates dropped: it would
        never be chosen) and their distances as its check."""
        rungs = sorted(self.rungs, key=lambda r: (-r.min_similarity, -r.fraction))
        kept = [r for i, r in enumerate(rungs) if all(r.fraction > lower.fraction for lower in rungs[i + 1 :])]
        if not kept:
            raise ValueError(f"calibration of {self.model} with {self.embedder}: no rung admits any step")
        return dataclasses.replace(
            base,
            name=QUALITY,
            thresholds=tuple((r.min_similarity, r.fraction) for r in kept),
            check=tuple((r.fraction, r.max_distance) for r in kept if r.max_distance is not None),
            check_at=self.check_at,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        rungs = tuple(Rung(float(r["fraction"]), float(r["min_similarity"]), r["max_distance"]) for r in data["rungs"])
        keep, check_at = float(data["keep"]), float(data["check_at"])
        return cls(data["model"], data["embedder"], rungs, keep, data["floor"], check_at, data.get("made", {}))


def file_name(model: str, embedder: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in embedder)
    return f"{model}.{safe}.json"


def load_calibrations(folders: list[Path]) -> dict[tuple[str, str], Calibration]:
    """Every table in ``folders`` by (model, embedder); a later folder's replaces an earlier one's. A file that does
    not parse is logged and skipped: the model then runs the uncalibrated policy."""
    tables: dict[tuple[str, str], Calibration] = {}
    for folder in map(Path, folders):
        if not folder.is_dir():
            logger.warning("cache calibrations: no folder at %s; its models keep the uncalibrated policy", folder)
            continue
        for path in sorted(folder.glob("*.json")):
            try:
                calibration = Calibration.from_json(path.read_text())
                calibration.policy()  # a table that makes no policy is as unusable as one that does not parse
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("cache calibration %s unusable (%s): skipped", path, exc)
                continue
            tables[calibration.model, calibration.embedder] = calibration
    return tables


def distance(new, stored, unconditional=None) -> float:
    """How differently the model lays out the new prompt's picture and the stored run's, from their predictions on the
    same latents: 0 for the same layout, up to 1 for layouts that share nothing (a shape elsewhere).

    Each prompt's own contribution is its prediction less the unconditional one (the prediction itself where the
    run had no guidance); a layout is where that contribution's energy lies: per position, its squared deviation from
    each channel's mean, summed over channels (a new colour, or a new background, moves the means, not the places).
    The distance is one less the cosine of the two layouts. Tensors of one shape, batch first, channels second."""
    if tuple(new.shape) != tuple(stored.shape):
        raise ValueError(f"prediction of shape {list(new.shape)}, the stored one is {list(stored.shape)}")
    if unconditional is not None and tuple(unconditional.shape) != tuple(stored.shape):
        raise ValueError(f"unconditional prediction of shape {list(unconditional.shape)}, not {list(stored.shape)}")
    a, b = _layout(new, unconditional), _layout(stored, unconditional)
    norms = math.sqrt(float(a @ a) * float(b @ b))
    if norms == 0.0:
        return 0.0 if float(a @ a) == float(b @ b) else 1.0
    value = 1.0 - float(a @ b) / norms
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else 1.0


def _layout(prediction, unconditional):
    content = prediction.float() - (0.0 if unconditional is None else unconditional.float())
    flat = content.flatten(2)  # batch, channel, positions (frames too, for video)
    centred = flat - flat.mean(dim=-1, keepdim=True)
    return centred.pow(2).sum(dim=1).flatten().double()


@dataclass
class Verdict:
    """What the check said for one lookup, for the result."""

    verdict: str  # passed, lowered, refused, not needed, repeat, unavailable
    k_asked: int  # the skip the similarity allowed
    k: int  # the skip granted (0: a miss)
    at_step: int | None = None
    distance: float | None = None
    max_distance: float | None = None
    seconds: float = 0.0
    reason: str = ""

    def report(self) -> dict[str, Any]:
        report = {"verdict": self.verdict, "k_asked": self.k_asked, "k": self.k, "seconds": round(self.seconds, 6)}
        if self.distance is not None:
            report |= {"at_step": self.at_step, "distance": round(self.distance, 4)}
        if self.max_distance is not None:
            report["max_distance"] = self.max_distance
        if self.reason:
            report["reason"] = self.reason
        return report


def granted(policy: CachePolicy, usable: list[int], steps: int, measured: float | None) -> int:
    """The largest of the ``usable`` marks the check's ``measured`` distance allows (None: not measured, so only
    marks that need no check); 0 when none does."""
    allowed = [
        k
        for k in usable
        if (limit := policy.max_distance(k, steps)) is None or (measured is not None and measured <= limit)
    ]
    return max(allowed, default=0)
