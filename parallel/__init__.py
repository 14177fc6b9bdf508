"""One request across several devices: process groups, patch, sequence and CFG parallelism.

Installed as ``fastgen.parallel``. Its methods arrive with the multi-device worker issue; the
engine composes them through the same accelerator seam as every other technique
(see ``fastgen.accelerators``).
"""
