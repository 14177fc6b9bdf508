"""The Celery side of fastgen: app factory, thin tasks over the engine, worker bootstrap.

Installed as ``fastgen.workers``.
"""
