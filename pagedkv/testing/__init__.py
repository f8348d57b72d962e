"""Property-testing tools for block managers, shipped to users (requires ``hypothesis``: ``pip install 'pagedkv[testing]'``).

A user's test of their own engine's allocator is three lines::

    from pagedkv import BlockManager
    from pagedkv.testing import block_manager_machine
    TestMyAllocator = block_manager_machine(lambda: BlockManager(num_pages=16, page_size=4)).TestCase

The machine drives allocate / append / append_batch / fork / free through the public API and
checks, after every step, the invariants documented in ``machine.py``: among them a shadow KV
store that catches copy-on-write and slot-mapping bugs. ``import pagedkv`` never imports this
package (nor hypothesis).
"""

from .._optional import require

require("hypothesis", "pagedkv.testing")  # NOTE: before the submodules, for the message naming [testing]

from .hybrid_machine import HybridBlockManagerMachine, hybrid_block_manager_machine  # noqa: E402
from .machine import BlockManagerMachine, block_manager_machine  # noqa: E402
from .strategies import block_manager_configs, operations, token_counts  # noqa: E402

__all__ = [
    "BlockManagerMachine",
    "block_manager_machine",
    "HybridBlockManagerMachine",
    "hybrid_block_manager_machine",
    "block_manager_configs",
    "operations",
    "token_counts",
]
