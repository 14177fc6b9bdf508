"""The LoRA library: a directory of adapter files, scanned, described and pre-read into host memory.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (ICLR 2022) is the adapter; serving many of them
with almost no overhead is SwiftDiffusion's problem (Li et al., "SwiftDiffusion: Efficient Diffusion Model
Serving with Add-on Modules", 2024): production text-to-image traffic mostly brings its own LoRA, and reading and
patching it dominates latency unless adapters stay close at hand.

Adapters are ``.safetensors`` files in ``FASTGEN_LORA_DIR``, in diffusers/PEFT format (``unet.<module>.lora_A``)
or Kohya's (``lora_unet_<module>.lora_down``). A request names them; a name is only ever looked up among the files
a scan found, never turned into a path, so no name can reach outside the directory. Each file is described from
its header alone (format, rank, adapted layers, base model family, size) plus a SHA-256 of its bytes, and its
tensors are pre-read into host memory (least recently used dropped beyond ``host_bytes``), so a request never
waits for a disk read of an adapter the worker has seen.

The adapters shipped with the package (``fastgen/models/weights/loras``: style LoRAs for ``fastgen-shapes``, each
with its model card) are listed beside the directory's files, so a fresh service offers them; a file of the same
name in ``FASTGEN_LORA_DIR`` wins (the operator's library is theirs to override), and the listing says which
adapters are the shipped ones.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safetensors import safe_open

from fastgen.errors import FieldError, InvalidRequest
from fastgen.schema import LORA_NAME

if TYPE_CHECKING:  # tensors are read lazily: the API only lists adapters and must not import torch
    import torch

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "models" / "weights" / "loras"
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te_")
DENOISER_PREFIXES = ("unet.", "transformer.", "lora_unet_", "lora_transformer_")
DOWN_MARKERS = (".lora_A.", ".lora.down.", ".lora_down.")  # the (rank, in) half of a pair
# Block containers in a module path; what is left names the kind of layer (attn1.to_q, ff.net.0.proj, conv1).
CONTAINERS = re.compile(
    r"^((down|up)_blocks[._]\d+[._]|mid_block[._]|(single_)?transformer_blocks[._]\d+[._]|attentions[._]\d+[._]"
    r"|resnets[._]\d+[._]|blocks[._]\d+[._])+"
)
CROSS_ATTENTION_KEY = re.compile(r"attn2[._]to_k")
# The cross-attention width a base model's LoRAs carry, when a file does not name its base.
FAMILY_BY_CROSS_ATTENTION = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
BASE_METADATA = ("fastgen.base", "ss_base_model_version", "base_model", "modelspec.architecture")


class LoraError(InvalidRequest):
    """A LoRA a request names that cannot be used: unknown, unreadable, or not made for the request's model."""

    def __init__(self, field: str, message: str):
        super().__init__([FieldError(field, message)])


def fingerprints(adapters: list[tuple[LoraInfo, float]]) -> tuple[tuple[str, str, float], ...]:
    """(name, SHA-256, scale) of each adapter: what names a request's LoRAs across processes (the approximate cache's
    key, a multi-device worker's plan)."""
    return tuple((info.name, info.sha256, scale) for info, scale in adapters)


@dataclass(frozen=True)
class LoraInfo:
    """What the library knows of one adapter file, read from its header."""

    name: str
    path: Path
    format: Literal["peft", "kohya"]
    rank: int
    layers: int  # adapted layers of the denoiser
    targets: tuple[str, ...]  # kinds of adapted layers (attn1.to_q, ff.net.0.proj, ...)
    base: str  # the family it was made for: declared in its metadata, else inferred from its shapes
    cross_attention_dim: int | None
    text_encoder_layers: int  # fastgen cannot hot-swap text-encoder adapters; requests using such a file fail
    size_bytes: int
    sha256: str
    mtime_ns: int
    shipped: bool = False  # one of the package's adapters (not shadowed by a file of the library directory)

    def public(self) -> dict[str, Any]:
        """JSON for the listing: everything but the path (the directory is the operator's business)."""
        return {
            "name": self.name,
            "format": self.format,
            "rank": self.rank,
            "layers": self.layers,
            "targets": list(self.targets),
            "base": self.base,
            "cross_attention_dim": self.cross_attention_dim,
            "text_encoder_layers": self.text_encoder_layers,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "shipped": self.shipped,
        }


@dataclass(frozen=True)
class Unreadable:
    """A file in the directory whose header could not be read: listed, and refused by name."""

    name: str
    reason: str

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "error": self.reason}


class LoraLibrary:
    """The adapters in one directory, and the shipped ones (``shipped=None``: none); safe to share between threads."""

    def __init__(self, directory: Path | None, host_bytes: int = 4 * 1024**3, shipped: Path | None = SHIPPED_DIR):
        self.directory = Path(directory).expanduser() if directory else None
        self.shipped = Path(shipped) if shipped else None
        self.host_bytes = host_bytes
        self._entries: dict[str, LoraInfo | Unreadable] = {}
        self._tensors: OrderedDict[tuple[str, str], dict[str, torch.Tensor]] = OrderedDict()
        self._lock = threading.RLock()
        self.scan()

    def scan(self) -> None:
        """Read the directory again; files whose size and mtime are unchanged keep their description."""
        shipped, own = _adapter_files(self.shipped), _adapter_files(self.directory)
        found = shipped | own  # a name in both: the operator's file
        with self._lock:
            old = self._entries
            self._entries = {name: self._describe(name, path, old.get(name)) for name, path in found.items()}
        for name in shipped.keys() & own.keys():
            if not isinstance(old.get(name), LoraInfo) or old[name].path != own[name]:
                logger.info("LoRA %r: %s replaces the shipped adapter of that name", name, own[name])
        self._preread()

    def _describe(self, name: str, path: Path, known: LoraInfo | Unreadable | None) -> LoraInfo | Unreadable:
        stat = path.stat()
        same = isinstance(known, LoraInfo) and known.path == path
        if same and (known.size_bytes, known.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
            return known
        try:
            return describe(name, path, shipped=self.shipped is not None and path.parent == self.shipped)
        except Exception as exc:
            logger.warning("LoRA file %s is unreadable: %s", path, exc)
            return Unreadable(name, f"unreadable safetensors file ({type(exc).__name__}: {exc})")

    def listing(self) -> list[dict[str, Any]]:
        with self._lock:
            return [entry.public() for _, entry in sorted(self._entries.items())]

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def get(self, name: str, field: str = "loras") -> LoraInfo:
        """The adapter called ``name``; a rescan first if it is not known yet. Raises LoraError."""
        entry = self._entries.get(name)
        if (entry is None or _changed(entry)) and LORA_NAME.match(name):
            self.scan()  # on demand: a file copied in (or replaced) since the last scan
            entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self.names()) or "none (the library is empty)"
            raise LoraError(f"{field}.name", f"unknown LoRA {name!r}; the library has: {known}")
        if isinstance(entry, Unreadable):
            raise LoraError(f"{field}.name", f"LoRA {name!r} is unusable: {entry.reason}")
        if entry.text_encoder_layers:
            raise LoraError(
                f"{field}.name",
                f"LoRA {name!r} adapts the text encoder ({entry.text_encoder_layers} layers), which fastgen cannot "
                "hot-swap; use a denoiser-only LoRA",
            )
        return entry

    def tensors(self, info: LoraInfo) -> dict[str, torch.Tensor]:
        """The adapter's tensors from host memory (read from disk once, and again only if the file changed)."""
        key = (info.name, info.sha256)
        with self._lock:
            if key in self._tensors:
                self._tensors.move_to_end(key)
                return self._tensors[key]
        tensors = read_tensors(info)
        with self._lock:
            self._tensors[key] = tensors
            self._trim()
        return tensors

    def _preread(self) -> None:
        for entry in list(self._entries.values()):
            if isinstance(entry, LoraInfo) and self._host_total() + entry.size_bytes <= self.host_bytes:
                try:
                    self.tensors(entry)
                except LoraError as exc:
                    logger.warning("%s", exc)

    def _host_total(self) -> int:
        return sum(t.nbytes for tensors in self._tensors.values() for t in tensors.values())

    def _trim(self) -> None:
        current = {(e.name, e.sha256) for e in self._entries.values() if isinstance(e, LoraInfo)}
        for key in [k for k in self._tensors if k not in current]:
            del self._tensors[key]
        while len(self._tensors) > 1 and self._host_total() > self.host_bytes:
            self._tensors.popitem(last=False)


def _changed(entry: LoraInfo | Unreadable) -> bool:
    if not isinstance(entry, LoraInfo):
        return False
    try:
        stat = entry.path.stat()
    except OSError:
        return True
    return (stat.st_size, stat.st_mtime_ns) != (entry.size_bytes, entry.mtime_ns)


def _adapter_files(directory: Path | None) -> dict[str, Path]:
    """``name -> path`` for every ``<name>.safetensors`` directly in ``directory`` whose name a request can use."""
    if directory is None or not directory.is_dir():
        return {}
    files = {}
    for path in sorted(directory.iterdir()):
        name = path.name[: -len(SUFFIX)]
        if path.name.endswith(SUFFIX) and path.is_file() and LORA_NAME.match(name) and ".." not in name:
            files[name] = path
    return files


def describe(name: str, path: Path, shipped: bool = False) -> LoraInfo:
    """An adapter's description from its safetensors header, and the SHA-256 of the whole file."""
    with safe_open(str(path), framework="numpy") as f:  # header only; "pt" would import torch
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        metadata = f.metadata() or {}
    downs = {key: shape for key, shape in shapes.items() if any(m in key for m in DOWN_MARKERS)}
    denoiser = {key: shape for key, shape in downs.items() if not key.startswith(TEXT_ENCODER_PREFIXES)}
    if not downs:
        raise ValueError("no LoRA layers (no lora_A / lora_down weights)")
    cross = next((shape[1] for key, shape in denoiser.items() if CROSS_ATTENTION_KEY.search(key)), None)
    stat = path.stat()
    return LoraInfo(
        name=name,
        path=path,
        format="kohya" if any(".lora_down." in key for key in downs) else "peft",
        rank=max(shape[0] for shape in downs.values()),
        layers=len(denoiser),
        targets=tuple(sorted({layer_kind(key) for key in denoiser})),
        base=_base(metadata, cross),
        cross_attention_dim=cross,
        text_encoder_layers=len(downs) - len(denoiser),
        size_bytes=stat.st_size,
        sha256=_sha256(path),
        mtime_ns=stat.st_mtime_ns,
        shipped=shipped,
    )


def layer_kind(key: str) -> str:
    """``…transformer_blocks.0.attn1.to_q.lora_A.weight`` -> ``attn1.to_q`` (Kohya's ``…_0_attn1_to_q`` alike)."""
    module = re.split(r"\.lora[._]", key)[0]
    for prefix in DENOISER_PREFIXES:
        module = module.removeprefix(prefix)
    return CONTAINERS.sub("", module)


def _base(metadata: dict[str, str], cross_attention_dim: int | None) -> str:
    declared = next((metadata[key] for key in BASE_METADATA if metadata.get(key)), None)
    if declared:
        return declared
    if cross_attention_dim is None:
        return "unknown"
    return FAMILY_BY_CROSS_ATTENTION.get(cross_attention_dim, f"cross-attention {cross_attention_dim}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_tensors(info: LoraInfo) -> dict[str, torch.Tensor]:
    """The file's tensors, if its bytes are still the ones the scan described."""
    from safetensors.torch import load

    try:
        data = info.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise ValueError("the file changed since it was scanned")
        return load(data)
    except Exception as exc:
        raise LoraError("loras", f"LoRA {info.name!r} could not be read: {type(exc).__name__}: {exc}") from exc
