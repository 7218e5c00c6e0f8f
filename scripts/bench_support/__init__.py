"""Helpers of ``scripts/bench.py``: measurement tools and one module per scheduler measured.

``common`` imports neither this repository's ``taskiq_beat`` nor taskiq-beat 1.4.0, so that
the same helpers run under both interpreters (see ``scripts/README.md``).
"""
