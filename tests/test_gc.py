"""Pausing the cyclic garbage collector around bulk loads leaves its state as it was."""

from __future__ import annotations

import gc

import pytest

from taskiq_beat._gc import gc_paused


def test_collector_is_paused_in_the_block_and_enabled_again() -> None:
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_collector_is_enabled_again_after_an_error() -> None:
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
