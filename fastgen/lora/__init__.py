"""LoRA adapters per request: the library on disk (``library``) and hot-swapped slots in a pipeline (``hotswap``)."""
