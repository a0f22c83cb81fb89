"""Device buffers that outlive the states using them, for backends that replay CUDA graphs.

A captured graph reads and writes fixed addresses, so a state's buffers must never move: a state takes a slot
(its buffers, and the graphs captured over them) and gives it back when the state is garbage-collected; the next
state of the same shape reuses the slot, graphs included. Released slots are kept for that, but only those of the
shape last made anew: a new slot first lets go of the free slots of other shapes, so device memory stays at the
states alive plus the free slots of one shape (a bench at batch 1, then 8, then 32 holds 32 rows of state, not
41), at the cost of capturing graphs again when shapes alternate beyond the states alive.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Any


class SlotHandle:
    """What a runtime State holds: one slot, given back to its pool when this handle is gone."""

    def __init__(self, slot: Any, pool: list):
        self.slot = slot
        release = weakref.finalize(self, pool.append, slot)
        release.atexit = False


class SlotPool:
    def __init__(self, make: Callable[[Hashable], Any], release_other_shapes: bool = True):
        """`release_other_shapes=False` keeps every released slot: for graphs its owner cannot release (ONNX
        Runtime keeps the graphs it captured for as long as the session lives)."""
        self.make = make
        self.release_other_shapes = release_other_shapes
        self.free: dict[Hashable, list] = defaultdict(list)

    def take(self, key: Hashable) -> tuple[SlotHandle, bool]:
        """A slot for `key`, and whether it is a reused one (whose buffers hold a previous state's values)."""
        free = self.free[key]
        if free:
            return SlotHandle(free.pop(), free), True
        if self.release_other_shapes:
            for slots in self.free.values():
                slots.clear()
        return SlotHandle(self.make(key), free), False
