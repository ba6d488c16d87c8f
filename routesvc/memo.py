"""``Memo``: a bounded, least-recently-used map from a text's digest to what was computed from it.

Routing stages compute things from a prompt (its embedding, its task label, an LLM's answer)
that the same prompt would give again: retries, templated requests, a conversation resent turn
after turn. The keys are digests, so a memo holds no prompt text, and it holds at most ``size``
entries (0: nothing is kept).

A memo may be shared between threads: the WordLlama encoders of a process share one, and a reload
builds its policy (encoding a text to check each fitted router) in a worker thread while Routes
encode on the event loop. Each lookup and each store hold its lock (for a dictionary step: never
while the value is made), so one thread's eviction cannot come between another's lookup and its
move to most recent (a KeyError mid-Route).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


def text_key(text: str) -> bytes:
    """The digest a memo files ``text`` under."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Memo(Generic[V]):
    """Values by text digest, the least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> V | None:
        """The value filed under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: bytes, value: V) -> None:
        """File ``value`` under ``key``, dropping the least recently used past ``size``."""
        if not self._size:
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)

    def compute(self, text: str, make: Callable[[str], V]) -> V:
        """The value for ``text``: remembered, or ``make(text)`` remembered now (made outside the
        lock: two threads missing the same text at once may both make it, the later kept)."""
        key = text_key(text)
        value = self.get(key)
        if value is None:
            value = make(text)
            self.put(key, value)
        return value
