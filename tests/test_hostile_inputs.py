"""Hostile inputs: every public call with garbage arguments raises a typed PagedKVError,
never crashes, and leaves the manager exactly as it was (check_invariants still holds).

Runs on the default backend (CI runs it on both). The raw C++ binding gets garbage too.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pagedkv
from pagedkv import BlockManager, PagedKVError

GARBAGE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([-1, 0, 2**31, 2**63, 2**64, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.binary(max_size=3),
    st.lists(st.integers(-3, 2**65), max_size=3),
    st.sampled_from([
        np.array([1.5]), np.array([[1, 2]]), np.array([True]), np.array(["a"]), np.array([], dtype=np.float32),
        np.array([2**63], dtype=np.uint64), np.array([-1], dtype=np.int8), np.int64(-5), np.float64("nan"),
        (1, 1), {1: 2}, object(), float("nan"), math.inf, [None], [1, "a"],
    ]),
)

METHODS = {
    "allocate": 2, "append": 2, "append_batch": 2, "fork": 2, "free": 1, "can_allocate": 1, "can_append": 2,
    "page_table": 1, "num_tokens": 1, "ref_count": 1, "slots": 3, "page_tables": 2, "window_tables": 2, "csr": 1,
    "release_window": 2, "swap_out": 1, "swap_in": 1, "can_swap_out": 1, "can_swap_in": 1, "is_swapped": 1,
    "commit": 2, "pin_prefix": 2, "unpin_prefix": 2, "take_offload": 0,
    "bind_table": 2, "set_row": 2, "row_of": 1, "export_sequence": 1, "import_sequence": 2,
}


def _manager():
    mgr = BlockManager(16, 4, enable_prefix_caching=True, num_cpu_pages=8)
    mgr.allocate(0, token_ids=[1, 2, 3, 4, 5])
    mgr.allocate(1, 3)
    mgr.fork(1, 2)
    return mgr


@settings(max_examples=300, deadline=None)
@given(method=st.sampled_from(sorted(METHODS)), args=st.lists(GARBAGE, min_size=3, max_size=3))
def test_garbage_arguments_raise_typed_errors_and_change_nothing(method, args):
    mgr = _manager()
    before = mgr.snapshot()
    try:
        getattr(mgr, method)(*args[: METHODS[method]])
    except PagedKVError:
        assert mgr.snapshot() == before
    except (OverflowError, MemoryError) as exc:  # a huge max_pages/slots range asks numpy for huge memory
        assert method in ("page_tables", "window_tables", "slots"), f"{method}{tuple(args)} raised {exc!r}"
        assert mgr.snapshot() == before
    mgr.check_invariants()


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.free(0) or m.free(0),                     # freeing twice
        lambda m: m.fork(1, 2),                               # forking into an existing id
        lambda m: m.free(1) or m.append(1),                   # appending to a freed sequence
        lambda m: m.free(1) or m.fork(1, 9),                  # forking a freed sequence
        lambda m: m.append_batch([0, 1, 0], 1),               # duplicate ids in one batch
        lambda m: m.append_batch(np.array([0, 1], dtype=np.float64), 1),
        lambda m: m.append_batch(np.array([[0, 1]]), 1),
        lambda m: m.append_batch([0, 1], np.array([1, 2, 3])),
        lambda m: m.page_tables([0, 2**64]),
        lambda m: m.allocate(2**63, 1),
        lambda m: m.allocate(float("nan"), 1),
    ],
)
def test_named_misuses(call):
    mgr = _manager()
    with pytest.raises(PagedKVError):
        call(mgr)
    mgr.check_invariants()


def test_appending_to_a_swapped_out_sequence():
    mgr = _manager()
    mgr.swap_out([0])
    before = mgr.snapshot()
    for call in (lambda: mgr.append(0), lambda: mgr.append_batch([0], 1), lambda: mgr.fork(0, 7),
                 lambda: mgr.swap_out([0]), lambda: mgr.page_tables([0]), lambda: mgr.release_window(0, 1)):
        with pytest.raises(pagedkv.SequenceSwapped):
            call()
        assert mgr.snapshot() == before
    mgr.check_invariants()


@pytest.mark.skipif(pagedkv.backend != "cpp", reason="the raw binding exists only in the C++ backend")
@settings(max_examples=300, deadline=None)
@given(args=st.lists(GARBAGE, min_size=3, max_size=3), method=st.sampled_from(["allocate", "append", "fork", "free",
       "num_tokens", "page_table", "ref_count", "can_append", "slots", "append_batch", "page_tables", "window_tables",
       "csr",
       "swap_out", "swap_in", "release_window", "can_allocate"]))
def test_raw_binding_never_crashes(method, args):
    """Garbage straight into pagedkv._core: a TypeError from nanobind or a Failure value, never a crash."""
    from pagedkv import _core

    core = _core.BlockManager(8, 4, 0, True, 4, 64)
    core.allocate(0, 5, None, 0)
    fn = getattr(core, method)
    for n in (1, 2, 3, 4):
        try:
            fn(*args[:n])
        except (TypeError, ValueError, OverflowError):
            pass  # nanobind rejects the types; a Failure value is the other allowed outcome
    assert core.check_invariants() is None
