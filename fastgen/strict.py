"""The base of every model at the service's edge (requests, their technique options, results)."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """Strict at the edge: unknown fields, a bool or a string where a number belongs, NaN and infinity are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)
