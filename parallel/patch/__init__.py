"""Patch parallelism's layer wrappers: one module per layer kind that needs other strips' data.

``conv`` (halo rows), ``norm`` (GroupNorm statistics), ``attention`` (self-attention K/V), all sharing one
``context.PatchContext`` per request; ``fastgen.parallel.unet`` installs them.
"""
