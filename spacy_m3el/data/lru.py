"""A least-recently-used map bounded by item count and, optionally, bytes."""
import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, Optional, TypeVar

V = TypeVar("V")


class LRUCache(Generic[V]):
    """Keeps the most recently used values; evicts the oldest past a bound.

    ``sizeof(value)`` gives a value's size in bytes when ``max_bytes`` is set.
    """

    def __init__(
        self,
        max_items: int,
        *,
        max_bytes: Optional[int] = None,
        sizeof: Optional[Callable[[V], int]] = None,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        if max_bytes is not None and sizeof is None:
            raise ValueError("max_bytes needs a sizeof function")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.sizeof = sizeof
        self.items: "OrderedDict[Hashable, V]" = OrderedDict()
        self.bytes = 0
        # Images are decoded on a few threads (FeatureCache), which share the decoded-image cache.
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.items

    def get(self, key: Hashable) -> Optional[V]:
        """The value of ``key`` (now the most recent), or None."""
        with self._lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: V, *, evict: bool = True) -> bool:
        """Store ``value``, evicting the least recently used past the bounds;
        with ``evict=False`` only when it fits beside what is stored.
        Returns whether it was stored."""
        with self._lock:
            if not evict and not self._fits(key, value):
                return False
            if key in self.items:
                self._discard(key)
            self.items[key] = value
            if self.sizeof is not None:
                self.bytes += self.sizeof(value)
            while len(self.items) > self.max_items or (
                self.max_bytes is not None and self.bytes > self.max_bytes and len(self.items) > 1
            ):
                self._discard(next(iter(self.items)))
            return True

    def _fits(self, key: Hashable, value: V) -> bool:
        """Whether storing ``value`` under ``key`` stays within the bounds without evicting."""
        stored = self.items.get(key)
        if stored is None and len(self.items) >= self.max_items:
            return False
        if self.max_bytes is None:
            return True
        freed = self.sizeof(stored) if stored is not None else 0  # type: ignore[misc]
        return self.bytes - freed + self.sizeof(value) <= self.max_bytes  # type: ignore[misc]

    def _discard(self, key: Hashable) -> None:
        value = self.items.pop(key)
        if self.sizeof is not None:
            self.bytes -= self.sizeof(value)

    def clear(self) -> None:
        with self._lock:
            self.items.clear()
            self.bytes = 0
