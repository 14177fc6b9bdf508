"""Procedural coloured-shape scenes, a numpy scorer for caption adherence, and a tiny text-to-image model for them.

The scenes are small enough that a latent diffusion model made only of diffusers/transformers classes can be trained
from scratch on two CPU cores in well under an hour, and simple enough that adherence to the caption can be checked
with plain image analysis instead of a learned judge.
"""
