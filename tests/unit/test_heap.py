"""Freezing a ready process's heap out of full garbage collections."""

from __future__ import annotations

import gc
import weakref

from config.heap import freeze_heap


class _Node:
    def __init__(self):
        self.me = self  # a cycle: only the collector frees it


def test_freezing_the_heap_collects_garbage_first_and_keeps_the_living_out_of_full_passes():
    garbage, kept = _Node(), _Node()
    gone = weakref.ref(garbage)
    del garbage
    try:
        frozen = freeze_heap()
        assert gone() is None  # collected, not frozen for good
        # Frozen objects may still die (another thread lets go of some), but none joins the frozen ones by itself.
        assert 0 < gc.get_freeze_count() <= frozen
        assert not any(o is kept for o in gc.get_objects())  # what lived is out of the collector's walks
    finally:
        gc.unfreeze()
    assert any(o is kept for o in gc.get_objects())
