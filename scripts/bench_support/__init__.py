"""Helpers of ``scripts/bench.py``: measurement tools and one module per scheduler measured.

- ``common``: measurement tools, standard library only (the parent process imports it).
- ``brokers``: the no-op broker and ``InMemoryBroker``.
- ``scenarios``: what every scenario does with a running scheduler, and its result fields.
- ``apps``: the scenarios as run alike on both taskiq-beat versions (SQLAlchemy).
- ``ours``, ``taskiq_sched``, ``beat140``: what differs per system measured.

Only ``ours`` imports this repository's ``taskiq_beat``, and only ``beat140`` imports
taskiq-beat 1.4.0, so that the shared modules run under both interpreters (see
``scripts/README.md``); ``taskiq_sched`` imports no SQLAlchemy.
"""
