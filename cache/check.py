"""The quality-aware cache: a calibrated similarity-to-K table per model and embedder, and a check at resume time.

Nirvana (Agarwal et al., "Approximate Caching for Efficiently Serving Text-to-Image Diffusion Models", NSDI 2024)
skips K steps by prompt similarity alone, with one table set for CLIP embeddings of natural prompts. Measured on
fastgen-shapes, a prompt a content word away from its neighbour ("top left" / "bottom right") is 0.99 alike to every
embedder here, and the neighbour's layout is fixed after about a fifth of the steps: a hit keeps it. Colour, shape and
background, on the other hand, are still repainted by the new prompt's own steps long after that.

So similarity alone cannot say how many steps are safe; the model can. Before trusting a hit, the new prompt's own
prediction is computed on the stored run's earliest stored latents (one conditional denoiser call, guidance off) and
compared with what the stored run predicted there (:func:`distance`: relative RMS). Where the content is not yet fixed
the model's two predictions show whether the prompts ask for the same picture. Which distance each K tolerates, and
which similarity each K needs, is measured, not assumed: ``fastgen cache calibrate`` (``fastgen.cache.calibrate``)
resumes calibration pairs at every mark and writes, per skipped fraction, the lowest similarity and the largest
distance at which a chosen share of pairs still meets a fidelity floor. The service loads one :class:`Calibration`
per model and embedder (``load_calibrations``) and builds the model's policy from it (:meth:`Calibration.policy`).
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
    for folder in folders:
        for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
            try:
                calibration = Calibration.from_json(path.read_text())
                calibration.policy()  # a table that makes no policy is as unusable as one that does not parse
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("cache calibration %s unusable (%s): skipped", path, exc)
                continue
            tables[calibration.model, calibration.embedder] = calibration
    return tables


def distance(new, stored) -> float:
    """How far the new prompt's prediction is from the stored run's on the same latents, relative to the stored one
    (0: the model says the same; about 1: as different as the prediction is large). Tensors of one shape."""
    if tuple(new.shape) != tuple(stored.shape):
        raise ValueError(f"prediction of shape {list(new.shape)}, the stored one is {list(stored.shape)}")
    norm = float(stored.float().norm())
    value = float((new.float() - stored.float()).norm()) / max(norm, 1e-12)
    return value if math.isfinite(value) else math.inf


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
