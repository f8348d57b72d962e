"""``LockedBlockManager``: a ``BlockManager`` shared by several threads.

The plain ``BlockManager`` takes no lock, so the single-threaded scheduler path pays nothing.
This wrapper serialises every call with a re-entrant lock; hold ``mgr.lock`` yourself around a
check-then-act pair (``can_allocate`` then ``allocate``) so no other thread acts in between.
"""

from __future__ import annotations

import functools
import threading

from .block_manager import BlockManager


class LockedBlockManager:
    """Every public method of ``BlockManager``, each call under ``self.lock`` (an RLock).

    Args:
        *args, **kwargs: passed to ``BlockManager``.
    """

    def __init__(self, *args, **kwargs):
        self._mgr = BlockManager(*args, **kwargs)
        self.lock = threading.RLock()

    def __getattr__(self, name: str):
        attr = getattr(self._mgr, name)
        if not callable(attr):
            with self.lock:
                return getattr(self._mgr, name)

        @functools.wraps(attr)
        def locked(*args, **kwargs):
            with self.lock:
                return attr(*args, **kwargs)

        return locked

    def __contains__(self, seq_id: object) -> bool:
        with self.lock:
            return seq_id in self._mgr

    def __repr__(self) -> str:
        return f"Locked{self._mgr!r}"
