"""Which steps to store, and how many to skip for a given similarity.

Nirvana stores the states after K = 5, 10, 15, 20, 25 of 50 steps and skips more steps the closer the
match: similarity above 0.95 skips 25, above 0.9 skips 20, above 0.85 skips 15, above 0.75 skips 10,
above 0.65 skips 5; anything less is a miss. Both are written here as fractions of the request's
step count, so they scale to any schedule.

fastgen's own policy keeps that table and changes how candidates are used:
- it looks at the nearest several entries, not only the nearest one, and takes the one that allows the
  most skipped steps among the marks it still holds (eviction removes single marks, so the nearest
  entry may have lost the mark its similarity earns while a close runner-up still has it);
- a hit stores the states it passes through after K, so the prompts people ask for again become entries
  themselves. Such an entry serves only repeats of its own prompt (the same text up to spacing, recognised by
  ``approximate.prompt_key``, not by similarity: all-MiniLM-L6-v2 rates "… at the bottom left …" and "… at the
  bottom right …" 0.995 alike, so no similarity gate tells a repeat from a neighbour whose picture differs).
  Neighbours start from entries a prompt computed itself. With ``repeats_only`` off (the benchmark's
  ``--every-hit`` variant), a hit-stored entry serves any prompt close enough to each earlier prompt whose first
  steps it carries (its lineage) to be allowed that many of their steps (``approximate.inherits_fairly``);
- a hit swaps the stored state's starting noise for the request's own seed's (``resume.reseed``): the earlier
  run's content, this request's randomness, so repeats of a prompt with new seeds still vary and land nearer to
  what the request would have drawn uncached.

The quality-aware policy (``quality``) is fastgen's with a table calibrated for one model and embedder
(``fastgen.cache.check``): its ``check`` says, for each skipped fraction that needs it, how far the model's layout
for the new prompt may lie from the stored run's (the check's distance) before that many steps are not reused.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CachePolicy:
    name: str
    # (minimum similarity, fraction of the steps skipped), most similar first.
    thresholds: tuple[tuple[float, float], ...] = ((0.95, 0.5), (0.9, 0.4), (0.85, 0.3), (0.75, 0.2), (0.65, 0.1))
    candidates: int = 1  # nearest entries considered per lookup
    store_on_hit: float | None = None  # hits at least this similar store the states they compute after K (None: never)
    repeats_only: bool = False  # entries stored by hits serve only repeats of their own prompt (same text)
    reseed: bool = False  # swap the stored state's starting noise for the request's own (resume.reseed)
    # (fraction of the steps skipped, the check's largest distance) for the fractions that need the check at resume
    # time (fastgen.cache.check); fractions not named need none. Empty: no check.
    check: tuple[tuple[float, float], ...] = ()
    check_at: float = 0.08  # the fraction of the steps after which the state the check compares against is stored

    def __post_init__(self):
        sims = [s for s, _ in self.thresholds]
        if not self.thresholds or sims != sorted(sims, reverse=True):
            raise ValueError("thresholds: need at least one, ordered from the highest similarity down")
        if any(not 0.0 < f < 1.0 for _, f in self.thresholds):
            raise ValueError("thresholds: each skipped fraction must be between 0 and 1")
        if self.store_on_hit is not None and not 0.0 <= self.store_on_hit <= 1.0:
            raise ValueError(f"store_on_hit: a similarity between 0 and 1, or None, got {self.store_on_hit}")
        if self.candidates < 1:
            raise ValueError(f"candidates: must be at least 1, got {self.candidates}")
        if any(fraction not in {f for _, f in self.thresholds} or distance < 0 for fraction, distance in self.check):
            raise ValueError("check: each fraction must be one of the thresholds' and its distance at least 0")
        if not 0.0 < self.check_at < 1.0:
            raise ValueError(f"check_at: a fraction of the steps between 0 and 1, got {self.check_at}")

    @property
    def lowest_similarity(self) -> float:
        return self.thresholds[-1][0]

    def stores_after_hit(self, similarity: float) -> bool:
        return self.store_on_hit is not None and similarity >= self.store_on_hit

    def marks(self, steps: int) -> tuple[int, ...]:
        """The step counts after which states are stored, for a ``steps``-step request (with the check's)."""
        fractions = {f for _, f in self.thresholds} | ({self.check_at} if self.check else set())
        return tuple(sorted({k for f in fractions if 1 <= (k := round(f * steps)) < steps}))

    def check_step(self, steps: int) -> int | None:
        """The mark whose stored prediction the check compares against, or None without a check."""
        step = round(self.check_at * steps)
        return step if self.check and 1 <= step < steps else None

    def max_distance(self, k: int, steps: int) -> float | None:
        """The check's largest distance for skipping ``k`` of ``steps`` steps; None when that skip needs no check."""
        return next((d for f, d in self.check if round(f * steps) == k), None)

    def skip(self, similarity: float, steps: int) -> int:
        """The most steps a match this similar may skip (0: a miss)."""
        for minimum, fraction in self.thresholds:
            if similarity > minimum:
                return max(0, min(round(fraction * steps), steps - 1))
        return 0


NIRVANA = CachePolicy("nirvana")
FASTGEN = CachePolicy("fastgen", candidates=8, store_on_hit=0.0, repeats_only=True, reseed=True)
POLICIES = {policy.name: policy for policy in (NIRVANA, FASTGEN)}
QUALITY = "quality"  # FASTGEN_CACHE_POLICY's name for fastgen's policy with each model's calibrated table
