"""One request across several devices: process groups, patch and CFG parallelism.

Installed as ``fastgen.parallel``.

- ``config.ParallelConfig``: the composed degrees (cfg x patch = ranks) and the patch mode, checked once;
- ``groups``: ``ParallelGroups`` (this rank's patch and CFG groups, passed in, never global) and ``run_ranks``
  (N local gloo processes, for tests and benchmarks);
- ``comm.CommBuffer``: registered slots in one flat buffer, batched asynchronous all-gathers or neighbour swaps,
  wait at use (DistriFusion's communication scheme);
- ``patch/``: the layer wrappers (halo convolutions, GroupNorm statistics, self-attention K/V);
- ``denoiser.apply(pipe, groups)``: splits the UNet call by batch half and row strip, gathers the result back;
  the handle's ``remove()`` restores the pipeline exactly.
"""
