"""Models: the registry of capabilities and the built-in models made without downloads."""

from fastgen.models.registry import BUILTIN_SPECS, ModelRegistry, ModelSpec

__all__ = ["BUILTIN_SPECS", "ModelRegistry", "ModelSpec"]
