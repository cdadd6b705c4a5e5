"""A bounded LRU cache of decoded metadata tables (L2 tables, refcount blocks).

Entries can be marked dirty; evicting or flushing a dirty entry calls the owner's write-back
function, which is where the image enforces its metadata write order.
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable


class TableCache:
    """``TableCache[T]`` caches tables of type T (subscriptable as ``list`` is, without
    importing typing, which costs the CLI's start-up a few milliseconds)."""

    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self, capacity: int, load: Callable[[int], object],
                 write_back: Callable[[int, object], None] | None = None):
        self.capacity = max(2, capacity)
        self._load = load
        self._write_back = write_back
        self._entries: OrderedDict[int, object] = OrderedDict()
        self.dirty: set[int] = set()

    def get(self, offset: int) -> object:
        entries = self._entries
        table = entries.get(offset)
        if table is not None:
            entries.move_to_end(offset)
            return table
        table = self._load(offset)
        self._insert(offset, table)
        return table

    def put(self, offset: int, table: object, dirty: bool = True) -> None:
        """Install a table built in memory (a new or copied table)."""
        self._entries.pop(offset, None)
        self._insert(offset, table)
        if dirty:
            self.dirty.add(offset)

    def set_write_back(self, write_back: Callable[[int, object], None] | None) -> None:
        """Install the function that writes a dirty entry (the writer attaches itself)."""
        self._write_back = write_back

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def _insert(self, offset: int, table: object) -> None:
        self._entries[offset] = table
        while len(self._entries) > self.capacity:
            victim = next(iter(self._entries))
            if victim in self.dirty:
                self.write(victim)
            del self._entries[victim]

    def write(self, offset: int) -> None:
        """Write one dirty entry back now."""
        if offset in self.dirty and self._write_back is not None:
            self._write_back(offset, self._entries[offset])
        self.dirty.discard(offset)

    def write_all(self) -> None:
        for offset in sorted(self.dirty):
            self.write(offset)

    def drop(self, offset: int) -> None:
        """Forget an entry (its cluster was freed); a dirty one is discarded unwritten."""
        self._entries.pop(offset, None)
        self.dirty.discard(offset)

    def clear(self) -> None:
        self._entries.clear()
        self.dirty.clear()

    def __contains__(self, offset: int) -> bool:
        return offset in self._entries
