"""Hypothesis strategies for block-manager workloads: small, shrinkable, keyword-only knobs."""

from __future__ import annotations

from typing import NamedTuple

from hypothesis import strategies as st


class ManagerConfig(NamedTuple):
    """Arguments for ``BlockManager(num_pages, page_size, watermark=...)``."""

    num_pages: int
    page_size: int
    watermark: float


class Op(NamedTuple):
    """One block-manager call: ``name`` is a method, ``args`` its positional arguments.

    Its repr reads as code, so a failing example can be pasted into a regression test.
    """

    name: str
    args: tuple

    def __repr__(self) -> str:
        return f"mgr.{self.name}({', '.join(map(repr, self.args))})"

    def apply(self, mgr):
        return getattr(mgr, self.name)(*self.args)


def block_manager_configs(
    *, max_pages: int = 32, page_sizes: tuple[int, ...] = (1, 2, 3, 4, 16), watermarks: tuple[float, ...] = (0.0, 0.1)
) -> st.SearchStrategy[ManagerConfig]:
    """Small pools, including odd page sizes, so that running out of pages is common."""
    return st.builds(
        ManagerConfig,
        num_pages=st.integers(1, max_pages),
        page_size=st.sampled_from(page_sizes),
        watermark=st.sampled_from(watermarks),
    )


def token_counts(*, max_tokens: int = 40) -> st.SearchStrategy[int]:
    """Token counts for allocate/append, shrinking towards 1."""
    return st.integers(1, max_tokens)


def operations(*, max_seqs: int = 6, max_tokens: int = 40, max_ops: int = 40) -> st.SearchStrategy[list[Op]]:
    """Lists of calls over a few sequence ids; some are invalid on purpose (unknown ids, ...).

    Use with a manager and ``Op.apply``; every call either succeeds or raises a
    ``PagedKVError`` and leaves the manager unchanged.
    """
    ids = st.integers(0, max_seqs - 1)
    counts = token_counts(max_tokens=max_tokens)
    one = st.one_of(
        st.builds(lambda s, n: Op("allocate", (s, n)), ids, counts),
        st.builds(lambda s, n: Op("append", (s, n)), ids, st.integers(1, 8)),
        st.builds(
            lambda ss, n: Op("append_batch", (ss, n)),
            st.lists(ids, min_size=1, max_size=4, unique=True),
            st.integers(1, 4),
        ),
        st.builds(lambda p, c: Op("fork", (p, c)), ids, ids),
        st.builds(lambda s: Op("free", (s,)), ids),
    )
    return st.lists(one, max_size=max_ops)
