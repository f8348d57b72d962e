"""The shipped hybrid state machine: KV cache groups over one pool, on both backends, with a
shadow KV store of the whole pool (see pagedkv/testing/hybrid_machine.py)."""

from hypothesis import settings

from pagedkv import HybridBlockManager, KVCacheGroup as G
from pagedkv.testing import hybrid_block_manager_machine

from test_parity import HAVE_CPP

BACKENDS = ["python"] + (["cpp"] if HAVE_CPP else [])


def _bound(groups, backend, steps=30, **options):
    machine = hybrid_block_manager_machine(
        lambda: HybridBlockManager(groups, options.pop("num_pages", 40), options.pop("page_size", 2), backend=backend,
                                   enable_prefix_caching=True, **options))
    machine.TestCase.settings = settings(settings.default, stateful_step_count=steps)
    return machine.TestCase


for _backend in BACKENDS:
    globals()[f"TestFullSliding_{_backend}"] = _bound([G.full(), G.sliding(3)], _backend)
    globals()[f"TestSlidingChunkedState_{_backend}"] = _bound([G.sliding(5), G.chunked(4), G.state(2)], _backend,
                                                               num_cpu_pages=30)
    globals()[f"TestTightPool_{_backend}"] = _bound([G.full(), G.sliding(2), G.full()], _backend, num_pages=18,
                                                     num_cpu_pages=8)
    globals()[f"TestSingleFull_{_backend}"] = _bound([G.full()], _backend, num_pages=14, page_size=3)


def _fails(machine_case) -> bool:
    case = machine_case("runTest")
    try:
        case.runTest()
    except AssertionError:
        return True
    except Exception as exc:  # hypothesis re-raises the falsifying example's error
        return "Falsifying" in str(exc) or isinstance(exc, AssertionError)
    return False


def test_the_machine_catches_a_window_that_releases_too_much(monkeypatch):
    def eager(self, seq_id, start):
        end = self._num_tokens[seq_id]
        return sum(self._mgr.release_window(self._inner(seq_id, g), max(1, end - self.groups[g].first_needed(start) - 2))
                   for g in self._windowed)

    monkeypatch.setattr(HybridBlockManager, "_release", eager)
    assert _fails(_bound([G.full(), G.sliding(4)], "python", steps=25))


def test_the_machine_catches_groups_sharing_cached_pages(monkeypatch):
    monkeypatch.setattr(HybridBlockManager, "_salt", lambda self, group, cache_salt: cache_salt)
    assert _fails(_bound([G.full(), G.full()], "python", steps=25))
