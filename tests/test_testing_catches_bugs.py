"""The shipped machine must fail on real allocator bugs, or it proves nothing."""

import pytest
from hypothesis import settings
from hypothesis.errors import Flaky

from pagedkv import BlockManager
from pagedkv.testing import block_manager_machine


class _NoCopyOnWrite:
    """Wraps a manager but drops the copy-on-write copies it returns (a classic engine bug)."""

    def __init__(self):
        self._mgr = BlockManager(num_pages=16, page_size=4, backend="python")

    def __getattr__(self, name):
        return getattr(self._mgr, name)

    def append(self, seq_id, num_tokens=1):
        self._mgr.append(seq_id, num_tokens)
        return []


class _LeakyFree:
    """Frees only the page table's first page back: a leak."""

    def __init__(self):
        self._mgr = BlockManager(num_pages=16, page_size=2, backend="python")
        self._leaked = 0

    def __getattr__(self, name):
        return getattr(self._mgr, name)

    @property
    def num_free_pages(self):
        return self._mgr.num_free_pages - self._leaked

    def free(self, seq_id):
        self._leaked += max(0, len(self._mgr.page_table(seq_id)) - 1)
        self._mgr.free(seq_id)


@pytest.mark.parametrize("factory", [_NoCopyOnWrite, _LeakyFree])
def test_machine_finds_the_bug(factory):
    machine = block_manager_machine(factory)
    machine.TestCase.settings = settings(max_examples=300, stateful_step_count=25, deadline=None, derandomize=True)
    with pytest.raises((AssertionError, Flaky, ExceptionGroup)) as info:
        machine.TestCase().runTest()
    if isinstance(info.value, ExceptionGroup):
        assert info.value.subgroup(AssertionError) is not None
