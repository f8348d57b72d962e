"""API rough edges, on both backends: copy types, membership, table bounds, long sequences,
presets in ``for_budget``, and a CUDA device on a machine without one."""

import numpy as np
import pytest

from pagedkv import BlockManager, InvalidArgument, InvalidType, StaticAllocator
from pagedkv._backend import resolve
from pagedkv.block_manager import MAX_TABLE_ENTRIES
from pagedkv.errors import SequenceTooLong
from pagedkv.spec import KVCacheSpec, model_preset

BACKENDS = ["python"] + (["cpp"] if resolve() == "cpp" else [])


def _is_copy_plan(copies) -> bool:
    return isinstance(copies, np.ndarray) and copies.dtype == np.int32 and copies.ndim == 2 and copies.shape[1] == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_call_returns_copies_as_one_type(backend):
    mgr = BlockManager(16, 4, enable_prefix_caching=True, num_cpu_pages=8, backend=backend)
    alloc = mgr.allocate(0, token_ids=[1, 2, 3, 4, 5, 6, 7, 8])
    assert _is_copy_plan(alloc.copies) and alloc.copies.shape == (0, 2)
    mgr.end_step()  # its KV is written
    hit = mgr.allocate(1, token_ids=[1, 2, 3, 4, 5, 6, 7, 8])  # whole prompt cached: last page copied
    assert _is_copy_plan(hit.copies) and hit.copies.tolist() == [[1, 2]]
    mgr.allocate(2, 3)
    mgr.fork(2, 3)
    cow = mgr.append(3)
    assert _is_copy_plan(cow) and cow.shape == (1, 2)
    assert _is_copy_plan(mgr.append(3))  # no copy this time
    assert _is_copy_plan(mgr.append_batch([0, 1], 1).copies)
    assert _is_copy_plan(mgr.swap_out([2]).copies)
    static = StaticAllocator(64, policy="oracle")
    assert _is_copy_plan(static.allocate(0, 4, final_tokens=8).copies)
    assert _is_copy_plan(static.append(0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [-1, 2**63, 2**64, "a", None, 1.5, True, b"1", object()])
def test_membership_of_anything_that_is_not_a_sequence_id_is_false(backend, value):
    mgr = BlockManager(4, 4, backend=backend)
    mgr.allocate(1, 3)
    assert (value in mgr) is False
    assert 1 in mgr and 0 not in mgr


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_tables_bound_the_table_size_with_a_typed_error(backend):
    mgr = BlockManager(2048, 1, backend=backend)
    ids = list(range(1000))
    for s in ids:
        mgr.allocate(s, 2)
    before = mgr.snapshot()
    with pytest.raises(InvalidArgument, match="max_pages must be at most 268435") as info:
        mgr.page_tables(ids, max_pages=2**31 - 1)
    assert not isinstance(info.value, MemoryError) and info.value.name == "max_pages"
    assert mgr.snapshot() == before
    with pytest.raises(InvalidArgument, match="max_pages"):  # one entry past the bound
        mgr.page_tables(ids, max_pages=MAX_TABLE_ENTRIES // 1000 + 1)
    assert mgr.page_tables(ids, max_pages=4096).page_table.shape == (1000, 4096)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sequence_past_int32_tokens_is_a_typed_error_and_slots_still_work(backend):
    mgr = BlockManager(4096, 2**20, backend=backend)
    mgr.allocate(0, 2**31 - 1)
    mgr.append(0, 10)
    with pytest.raises(SequenceTooLong) as info:
        mgr.page_tables([0])
    assert isinstance(info.value, OverflowError) and info.value.seq_id == 0 and info.value.num_tokens == 2**31 + 9
    assert "2147483657 tokens" in str(info.value)
    # positions beyond 2**31 - 1 are ordinary for slots(), like num_tokens
    page = mgr.page_table(0)[-1]
    assert mgr.slots(0, 2**31, 2**31 + 2).tolist() == [page * 2**20 + 2**31 % 2**20 + i for i in range(2)]
    with pytest.raises(InvalidArgument, match="stop"):
        mgr.slots(0, 0, 2**31 + 10)


def test_both_backends_raise_the_same_long_sequence_error():
    if len(BACKENDS) < 2:
        pytest.skip("the C++ core is not built")
    texts = set()
    for backend in BACKENDS:
        mgr = BlockManager(4096, 2**20, backend=backend)
        mgr.allocate(0, 2**31 - 1)
        mgr.append(0, 1)
        mgr.allocate(1, 1)
        with pytest.raises(SequenceTooLong) as info:
            mgr.page_tables([1, 0])
        texts.add(str(info.value))
    assert len(texts) == 1


def test_for_budget_takes_presets_names_and_hf_configs(tmp_path):
    preset = model_preset("llama-3-8b")
    budget = 2**30
    want = budget // preset.spec.page_bytes(16)
    assert BlockManager.for_budget(preset.spec, budget, 16).num_pages == want
    assert BlockManager.for_budget(preset, budget, 16).num_pages == want
    assert BlockManager.for_budget("llama-3-8b", budget, 16).num_pages == want
    config = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
              "torch_dtype": "bfloat16"}
    assert BlockManager.for_budget(config, budget, 16).num_pages == want
    (tmp_path / "config.json").write_text(__import__("json").dumps(config))
    assert BlockManager.for_budget(tmp_path, budget, 16).num_pages == want
    assert BlockManager.for_budget(str(tmp_path / "config.json"), budget, 16).num_pages == want
    with pytest.raises(InvalidArgument, match="llama-3-8b"):  # an unknown name lists the presets
        BlockManager.for_budget("llama-9", budget, 16)
    with pytest.raises(InvalidType, match="KVCacheSpec"):
        BlockManager.for_budget(42, budget, 16)
    assert isinstance(KVCacheSpec.from_hf_config(config), KVCacheSpec)


def test_cuda_cache_without_cuda_is_a_clear_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from pagedkv import PagedKVCache

    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(InvalidArgument, match="torch.cuda.is_available\\(\\) is False") as info:
            PagedKVCache(num_layers=1, num_pages=4, page_size=4, num_kv_heads=1, head_dim=64, device=device)
        assert info.value.name == "device"
