"""Fused Q/K/V projections as a technique: one matmul instead of three per attention (``fastgen.accelerators``)."""

from __future__ import annotations

from types import MappingProxyType

from pydantic import Field

from fastgen.techniques.seam import Control, Flag, Technique

TECHNIQUE = Technique(
    "fuse_qkv",
    attach="fastgen.accelerators.fuse_qkv",
    asked=lambda r: r.accelerate.fuse_qkv,
    supported=lambda spec: "fuse_qkv" in spec.accelerations,
    options=(bool, Field(False, description="Fuse attention Q/K/V projections into one matmul")),
    # The fused projection is built from the base weights alone.
    conflicts=MappingProxyType({"loras": "cannot be combined with loras: it would bypass them"}),
    control=Control(
        "Fused Q/K/V projections",
        "One matmul instead of three for each attention's query, key and value: the same image up to rounding.",
    ),
    flags=(Flag("--fuse-qkv", "accelerate.fuse_qkv", "accelerate: fuse attention Q/K/V projections", switch=True),),
)
