"""The approximate noise-state cache across prompts (Nirvana, NSDI'24).

Installed as ``fastgen.cache``: prompt embeddings, the nearest-neighbour index, the state store
and its eviction policy. It plugs into the engine's step callback to capture states.
"""
