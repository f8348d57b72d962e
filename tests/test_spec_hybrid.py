"""Hybrid KVCacheSpec: layer kinds from Hugging Face configs, the group layout, and the bytes a
sequence holds, checked against a HybridBlockManager that runs the same sequence."""

from __future__ import annotations

import json

import pytest

from pagedkv import HybridBlockManager, KVCacheSpec
from pagedkv.cli import main
from pagedkv.errors import InvalidArgument
from pagedkv.spec import MODEL_PRESETS, model_preset

BASE = dict(num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=64, hidden_size=512)


def test_layer_kinds_from_each_config_dialect():
    cases = [
        (dict(layer_types=["sliding_attention", "full_attention"] * 4, sliding_window=128),
         ("sliding", "full") * 4),
        (dict(sliding_window=1024, sliding_window_pattern=4, model_type="gemma3_text"),
         ("sliding",) * 3 + ("full",) + ("sliding",) * 3 + ("full",)),
        (dict(attention_chunk_size=8192, no_rope_layers=[1, 1, 1, 0] * 2), ("chunked",) * 3 + ("full",) + ("chunked",) * 3 + ("full",)),
        (dict(model_type="mistral", sliding_window=4096), ("sliding",) * 8),
    ]
    for extra, kinds in cases:
        spec = KVCacheSpec.from_hf_config({**BASE, **extra})
        assert spec.layer_types == kinds, extra
        assert spec.num_layers == 8 and spec.is_hybrid
    # a Qwen2 config sets a window it does not use; a bare window of an unknown type stays full
    for extra in (dict(model_type="qwen2", sliding_window=131072, use_sliding_window=False),
                  dict(model_type="gemma2", sliding_window=4096)):
        spec = KVCacheSpec.from_hf_config({**BASE, **extra})
        assert not spec.is_hybrid and spec.layer_types == ()


def test_state_layers_from_a_qwen3_next_config():
    spec = model_preset("qwen3-next-80b").spec
    assert spec.num_layers == 12 and spec.layer_types.count("state") == 36
    # recurrent state 32 x 128 x 128 plus conv state (2*16*128 + 32*128) x 3, bf16
    assert spec.state_bytes == (32 * 128 * 128 + (2 * 16 * 128 + 32 * 128) * 3) * 2
    assert spec.state_pages(16) == -(-spec.state_bytes // (16 * 2 * 2 * 256 * 2))


def test_bad_layer_types_are_named():
    with pytest.raises(InvalidArgument) as info:
        KVCacheSpec.from_hf_config({**BASE, "layer_types": ["full_attention"] * 7})
    assert "layer_types" in info.value.args[0]
    with pytest.raises(InvalidArgument) as info:
        KVCacheSpec.from_hf_config({**BASE, "layer_types": ["full_attention"] * 7 + ["dense"]})
    assert info.value.args[0] == "config.json field 'layer_types[7]'"
    with pytest.raises(InvalidArgument) as info:
        KVCacheSpec(2, 1, 64, layer_types=("full", "sliding"))  # no window
    assert info.value.args[0] == "sliding_window"
    with pytest.raises(InvalidArgument):
        KVCacheSpec(3, 1, 64, layer_types=("full", "sliding"), sliding_window=4)


def test_layout_pads_the_groups_to_one_size():
    spec = model_preset("gemma-3-27b").spec
    layout = spec.hybrid_layout()
    assert layout.layers_per_group == 10
    assert [k for k, _ in layout.groups] == ["full"] + ["sliding"] * 6
    assert layout.padded_slots == 60 - 52
    assert layout.group_of(5) == (0, 0) and layout.group_of(0) == (1, 0)
    every = sorted(layer for _, layers in layout.groups for layer in layers)
    assert every == list(range(62))


@pytest.mark.parametrize("name", ["gpt-oss-20b", "gemma-3-27b", "llama-4-scout"])
@pytest.mark.parametrize("page_size", [16, 64])
def test_hybrid_pages_match_what_the_manager_holds(name, page_size):
    """Decode a sequence one token at a time and compare the pages each group holds with the
    spec's count at every length (scaled down: a smaller window and chunk, same layout)."""
    spec = model_preset(name).spec
    small = KVCacheSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim, layer_types=spec.layer_types,
                        sliding_window=min(spec.sliding_window, 200) if spec.sliding_window else 0,
                        attention_chunk_size=4 * page_size if spec.attention_chunk_size else 0)
    groups = small.kv_cache_groups(page_size)
    mgr = HybridBlockManager(groups, 4000, page_size)
    mgr.allocate(0, 1)
    for n in range(2, 900):
        mgr.append_batch([0], [1])
        if n % 7 == 0 or n > 880:
            assert mgr.group_pages() == small.hybrid_pages_for(n, page_size), n
    held = (mgr.num_pages - mgr.num_free_pages) * small.group_page_bytes(page_size)
    assert held == small.hybrid_bytes_for(899, page_size)


def test_memory_saving_at_128k():
    """The figures the README quotes (bf16, page 16, 131,072 tokens)."""
    oss, gemma = model_preset("gpt-oss-120b").spec, model_preset("gemma-3-27b").spec
    n = 131072
    assert oss.all_full_bytes_for(n, 16) == 36 * 2 * 8 * 64 * 2 * n
    assert oss.hybrid_bytes_for(n, 16) == (8192 + 8) * 18 * 16 * 2 * 8 * 64 * 2
    assert gemma.hybrid_bytes_for(n, 16) == (8192 + 6 * 64) * 10 * 16 * 2 * 16 * 128 * 2
    assert 5.9 < gemma.all_full_bytes_for(n, 16) / gemma.hybrid_bytes_for(n, 16) < 6.0


def test_size_cli_reports_hybrid_and_all_full(capsys):
    assert main(["size", "--model", "gpt-oss-120b", "--gpu", "h100", "--context", "128k", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    h = report["hybrid"]
    assert h["groups"] == ["full", "sliding"] and h["pages_per_group"] == [8192, 8]
    assert h["max_sequences"] > h["max_sequences_all_full"] == report["max_sequences"]
    assert main(["size", "--model", "gemma-3-27b", "--context", "128k"]) == 0
    text = capsys.readouterr().out
    assert "groups need 5.92x less" in text
    assert all(MODEL_PRESETS[m].spec.is_hybrid for m in ("gpt-oss-20b", "llama-4-scout", "qwen3-next-80b"))


def test_v1_scheduler_on_one_full_group_is_the_block_manager_run():
    """simulate_v1 over HybridBlockManager([full]) and over BlockManager: the same run."""
    from pagedkv import BlockManager, KVCacheGroup
    from pagedkv.scheduler import simulate_v1
    from pagedkv.workload import synthetic

    work = synthetic("sharegpt", 200, seed=3, rate=8.0)
    a = simulate_v1(work, BlockManager(600, 16), max_num_batched_tokens=1024, max_num_seqs=64, max_len=2048)
    b = simulate_v1(work, HybridBlockManager([KVCacheGroup.full()], 600, 16), max_num_batched_tokens=1024,
                    max_num_seqs=64, max_len=2048)
    assert a.to_dict() == b.to_dict()
    assert a.preemptions > 0 and a.group_pages_mean is None


def test_v1_scheduler_reports_per_group_memory():
    """Full + sliding over one pool: the sliding group's mean pages stay near the window's per
    running request, the full group's grow with the context, and fewer preemptions than all-full
    layers in the same bytes (the same page size: twice the pages, since a page holds half the
    layers)."""
    from pagedkv import BlockManager, KVCacheGroup
    from pagedkv.scheduler import simulate_v1
    from pagedkv.workload import synthetic

    work = synthetic("sharegpt", 200, seed=3, rate=8.0)
    options = dict(max_num_batched_tokens=1024, max_num_seqs=64, max_len=2048)
    full = simulate_v1(work, BlockManager(600, 16), **options)
    groups = [KVCacheGroup.full(), KVCacheGroup.sliding(64)]
    hybrid = simulate_v1(work, HybridBlockManager(groups, 1200, 16), **options)
    assert hybrid.completed == full.completed == 200
    mean_full, mean_sliding = hybrid.group_pages_mean
    assert mean_sliding < mean_full and hybrid.group_pages_peak[1] <= hybrid.peak_pages_used
    assert hybrid.preemptions < full.preemptions


def test_frag_cli_runs_a_hybrid_model(capsys, tmp_path):
    args = ["frag", "--model", "gpt-oss-20b", "--gpu", "a100-40gb", "--page-sizes", "16", "--num-requests", "120",
            "--out", str(tmp_path)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "page 16 groups" in text and "KV cache groups (layers: 12 full + 12 sliding (window 128))" in text
    report = json.loads((tmp_path / "frag.json").read_text())
    grouped = [s for s in report["serving"] if s.get("groups")]
    assert grouped and grouped[0]["groups"] == ["full", "sliding"] and len(grouped[0]["group_pages_mean"]) == 2
