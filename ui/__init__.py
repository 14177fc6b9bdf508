"""The Gradio page, which talks to the REST API through ``fastgen.client`` and never imports torch.

Installed as ``fastgen.ui``. ``create_ui(api_url)`` builds the page; ``mount_ui(app, api_url)``
mounts it on a FastAPI app (``fastgen serve`` mounts it at ``/ui`` of its own API).
"""

from fastgen.ui.page import ACCELERATIONS, AccelerationControl, create_ui, mount_ui

__all__ = ["ACCELERATIONS", "AccelerationControl", "create_ui", "mount_ui"]
