"""The shipped state machine, run against the default backend (PAGEDKV_IMPL selects it)."""

import pytest
from hypothesis import settings

from pagedkv import BlockManager
from pagedkv.testing import BlockManagerMachine, block_manager_machine


def _bound(machine, steps=30):
    machine.TestCase.settings = settings(settings.default, stateful_step_count=steps)
    return machine.TestCase


TestOddPageSize = _bound(block_manager_machine(lambda: BlockManager(num_pages=12, page_size=3)))
TestTokenPages = _bound(block_manager_machine(lambda: BlockManager(num_pages=24, page_size=1)))
TestWatermark = _bound(block_manager_machine(lambda: BlockManager(num_pages=10, page_size=4, watermark=0.2)))
TestBigPages = _bound(block_manager_machine(lambda: BlockManager(num_pages=6, page_size=16), max_seqs=5))
TestPrefixCache = _bound(
    block_manager_machine(lambda: BlockManager(num_pages=14, page_size=4, enable_prefix_caching=True))
)
TestPrefixCacheCollisions = _bound(
    block_manager_machine(lambda: BlockManager(num_pages=14, page_size=2, enable_prefix_caching=True, _hash_bits=2))
)
TestEverything = _bound(
    block_manager_machine(
        lambda: BlockManager(num_pages=12, page_size=3, enable_prefix_caching=True, num_cpu_pages=8, watermark=0.1)
    )
)

# NOTE: a pool small next to its prompts, so pages are evicted (demoted) and hit again (promoted).
TestCpuPrefixTier = _bound(
    block_manager_machine(
        lambda: BlockManager(num_pages=8, page_size=2, enable_prefix_caching=True, num_cpu_pages=6, cpu_prefix_cache=True)
    ),
    steps=40,
)
TestCpuPrefixTierCollisions = _bound(
    block_manager_machine(
        lambda: BlockManager(num_pages=10, page_size=4, enable_prefix_caching=True, num_cpu_pages=3,
                             cpu_prefix_cache=True, watermark=0.1, _hash_bits=3)
    )
)


def test_machine_requires_a_factory():
    with pytest.raises(TypeError, match="factory"):
        BlockManagerMachine()
