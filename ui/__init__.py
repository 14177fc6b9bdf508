"""The Gradio page, which talks to the REST API through ``fastgen.client`` and never imports torch.

Installed as ``fastgen.ui``.
"""
