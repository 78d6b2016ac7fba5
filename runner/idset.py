"""A set of custom_ids that costs 16 to 32 bytes an id, however many lines a file has.

A Python set of 200,000 strings holds 200,000 objects (about 20 MB, which the allocator
keeps after the set is gone). `IdSet` keeps each id as a 32-bit hash and the place it was
read from (a byte offset in the input or the journal), in two flat arrays that make an
open-addressing hash table, at most half full. It stays exact: when two hashes are equal,
the earlier id is read again from its place and compared in full, so a hash collision can
never make a line a duplicate or hide a finished request. Equal hashes are rare (real
duplicates, mostly), so the re-reads cost nothing in the usual run.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Set

EMPTY = 0


def id_hash(custom_id: str) -> int:
    """A 32-bit hash of an id, never EMPTY. Python's own, cut: cached in the string, fast."""
    return (hash(custom_id) & 0xFFFFFFFF) or 1


class IdSet(Set):
    """Exact membership of strings, with `recall(place)` giving back the string at a place."""

    def __init__(
        self, recall: Callable[[int], str | None], expected: int = 0, wide: bool = False
    ) -> None:
        """`expected` ids are held without regrowing; `wide` places may pass 32 bits."""
        self.recall = recall
        self.place_type = "q" if wide else "I"
        capacity = 1024
        while capacity < 2 * expected:  # sized at once when the count is known: no regrowth
            capacity *= 2
        self.hashes = array("I", [EMPTY]) * capacity
        self.places = array(self.place_type, [EMPTY]) * capacity
        self.mask = capacity - 1
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str | None]:
        for hashed, place in zip(self.hashes, self.places, strict=True):
            if hashed != EMPTY:
                yield self.recall(place)

    def _slot(self, custom_id: str, hashed: int) -> int:
        """The slot that holds `custom_id`, or the empty slot where it would go."""
        hashes, mask = self.hashes, self.mask
        slot = hashed & mask
        while (held := hashes[slot]) != EMPTY:
            if held == hashed and self.recall(self.places[slot]) == custom_id:
                return slot
            slot = (slot + 1) & mask
        return slot

    def __contains__(self, custom_id: str) -> bool:
        return self.hashes[self._slot(custom_id, id_hash(custom_id))] != EMPTY

    def add(self, custom_id: str, place: int) -> bool:
        """Add an id read from `place`; False when it was there already."""
        hashed = id_hash(custom_id)
        slot = self._slot(custom_id, hashed)
        if self.hashes[slot] != EMPTY:
            return False
        self.hashes[slot] = hashed
        self.places[slot] = place
        self.count += 1
        if 2 * self.count > len(self.hashes):
            self._grow()
        return True

    def _grow(self) -> None:
        hashes, places = self.hashes, self.places
        capacity = 2 * len(hashes)
        self.hashes = array("I", [EMPTY]) * capacity
        self.places = array(self.place_type, [EMPTY]) * capacity
        self.mask = capacity - 1
        for hashed, place in zip(hashes, places, strict=True):
            if hashed != EMPTY:
                # every id is already unique here: only an empty slot is needed
                slot = hashed & self.mask
                while self.hashes[slot] != EMPTY:
                    slot = (slot + 1) & self.mask
                self.hashes[slot] = hashed
                self.places[slot] = place
