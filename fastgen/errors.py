"""The errors fastgen reports to its users. Each says what was wrong in words a caller can act on."""

from __future__ import annotations

from dataclasses import dataclass


class FastgenError(Exception):
    """Base of every error fastgen raises on purpose."""


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidRequest(FastgenError, ValueError):
    """A request that cannot be run as asked; names every offending field."""

    def __init__(self, errors: list[FieldError]):
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))

    @classmethod
    def one(cls, field: str, message: str) -> InvalidRequest:
        return cls([FieldError(field, message)])


class UnknownModel(InvalidRequest):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        super().__init__(
            [
                FieldError(
                    "model",
                    f"unknown model {name!r}; known models: {', '.join(known)} "
                    "(or a local pipeline directory, or a Hugging Face hub id like owner/name)",
                )
            ]
        )


class ModelLoadError(FastgenError):
    """A model that exists by name but could not be loaded (missing files, no network, bad config)."""


class Cancelled(FastgenError):
    """The caller asked to stop; raised at the first step boundary after the request."""

    def __init__(self, step: int, total: int):
        self.step, self.total = step, total
        super().__init__(f"cancelled after step {step} of {total}")
