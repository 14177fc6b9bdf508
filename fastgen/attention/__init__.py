"""Sparse self-attention for diffusion transformers: patterns, kernels, statistics and the processors that use them.

The pieces, each in its own module:

- ``patterns``: which keys each query attends to (a local window over the flattened tokens; Sparse VideoGen's
  spatial and temporal heads for video), as FlexAttention ``mask_mod`` functions with dense reference masks.
- ``kernels``: block-sparse attention with FlexAttention block masks, and the SDPA-with-mask reference path.
- ``reshape``: Re-ttention's statistical reshape (the softmax mass inside the mask, and the residual).
- ``profiling``: the per-head choice between the spatial and the temporal pattern from a few sampled query rows.
- ``projections``: how each model family (PixArt/UNet, Wan, Flux) computes Q, K, V and the attention's output
  (shared with the patch- and sequence-parallel processors).
- ``processors``: the attention processor installed in place of the model's own, and the per-request state.

``fastgen.accelerators.sparse_attention`` attaches them to a pipeline for one request.
"""
