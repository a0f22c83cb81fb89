"""Device buffers that outlive the states using them, for backends that replay CUDA graphs.

A captured graph reads and writes fixed addresses, so a state's buffers must never move: a state takes a slot
(its buffers, and the graphs captured over them) and gives it back when the state is garbage-collected; the next
state of the same shape reuses the slot, graphs included. Released slots are kept, so device memory stays at the
most states alive at once.
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
    def __init__(self, make: Callable[[Hashable], Any]):
        self.make = make
        self.free: dict[Hashable, list] = defaultdict(list)

    def take(self, key: Hashable) -> tuple[SlotHandle, bool]:
        """A slot for `key`, and whether it is a reused one (whose buffers hold a previous state's values)."""
        free = self.free[key]
        reused = bool(free)
        return SlotHandle(free.pop() if reused else self.make(key), free), reused
