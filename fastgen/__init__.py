"""fastgen: fast, cheap serving of diffusion image and video generation.

The engine wraps ordinary diffusers pipelines with removable accelerations; see
docs/ARCHITECTURE.md for the map.
"""

from fastgen.errors import Cancelled, FastgenError, InvalidRequest, ModelLoadError, UnknownModel
from fastgen.schema import GenerationRequest, GenerationResult, parse_request
from fastgen.settings import Limits, Settings

__all__ = [
    "Cancelled",
    "FastgenError",
    "GenerationRequest",
    "GenerationResult",
    "InvalidRequest",
    "Limits",
    "ModelLoadError",
    "Settings",
    "UnknownModel",
    "parse_request",
]
__version__ = "0.1.0"
