"""The example engine serves any Hugging Face decoder through ``AttentionInterface``: tiny
random-weight Llama, Qwen3, Mistral (sliding window), Gemma 3 (5 local layers per global one)
gpt-oss (alternating sliding/full layers with sinks and MoE), Llama 4 (chunked-local layers
beside a NoPE full one, MoE) and Qwen3-Next (Gated DeltaNet state layers beside full ones, MoE)
give ``model.generate``'s greedy tokens, with prefix caching
on and under preemption, on both block-manager backends. Hybrid models run on a
``HybridBlockManager`` (one KV cache group per layer group, one pool); a state layer's
recurrent state lives in its state group's pages."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_engine_e2e import MIN_GREEDY_MARGIN, engine  # noqa: E402
from test_parity import HAVE_CPP  # noqa: E402

from pagedkv import HybridBlockManager  # noqa: E402

VOCAB = 128
SEEDS = {"mistral": 1}
WINDOW = 8
CHUNK = 8
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def tiny(arch: str):
    """A random-weight causal LM of ``arch`` (nothing downloaded), fp32, in eval mode."""
    t = transformers
    if arch == "llama":
        config, cls = t.LlamaConfig(num_hidden_layers=2, **COMMON), t.LlamaForCausalLM
    elif arch == "qwen3":
        config, cls = t.Qwen3Config(num_hidden_layers=2, **COMMON), t.Qwen3ForCausalLM
    elif arch == "mistral":
        config, cls = t.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **COMMON), t.MistralForCausalLM
    elif arch == "gemma3":
        config = t.Gemma3TextConfig(num_hidden_layers=6, sliding_window=WINDOW, query_pre_attn_scalar=16,
                                    layer_types=["sliding_attention"] * 5 + ["full_attention"], **COMMON)
        cls = t.Gemma3ForCausalLM
    elif arch == "gpt_oss":
        config = t.GptOssConfig(num_hidden_layers=4, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                                layer_types=["sliding_attention", "full_attention"] * 2, **COMMON)
        cls = t.GptOssForCausalLM
    elif arch == "llama4":
        config = t.Llama4TextConfig(num_hidden_layers=4, attention_chunk_size=CHUNK, no_rope_layers=[1, 1, 1, 0],
                                    intermediate_size_mlp=96, num_local_experts=4, num_experts_per_tok=1,
                                    interleave_moe_layer_step=1, **COMMON)
        cls = t.Llama4ForCausalLM
    elif arch == "qwen3_next":
        config = t.Qwen3NextConfig(num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
                                   linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
                                   linear_value_head_dim=8, linear_conv_kernel_dim=4, num_experts=4,
                                   num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                   **COMMON)
        cls = t.Qwen3NextForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(SEEDS.get(arch, 0))  # NOTE: seeds whose greedy decoding has no near-tie here
    model = cls(config).eval()
    if arch == "gpt_oss":
        with torch.no_grad():  # learned sinks: make them matter
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


ARCHS = ["llama", "qwen3", "mistral", "gemma3", "gpt_oss", "llama4", "qwen3_next"]
#: pages per KV cache group in the test's pool: small enough that the engine preempts
POOL = {"qwen3_next": 10, "llama4": 11}
BACKENDS = ["python"] + (["cpp"] if HAVE_CPP else [])


def _prompts():
    gen = torch.Generator().manual_seed(7)
    system = torch.randint(0, VOCAB, (20,), generator=gen).tolist()
    tails = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (3, 11, 6, 17)]
    return [system + t for t in tails] + [system[:9]]


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, tiny(request.param)


def _reference(model, prompt, max_new):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    margins = [float(l[0].topk(2).values[0] - l[0].topk(2).values[1]) for l in out.logits]
    return out.sequences[0, len(prompt):].tolist(), min(margins)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_equal_generate_with_prefix_caching_and_preemption(arch_model, backend):
    arch, model = arch_model
    prompts, max_new = _prompts(), 10
    preemption = "swap" if backend == "cpp" else "recompute"
    groups = len(engine.PagedModel(model, 4).groups)  # a page per group per page of tokens
    config = engine.EngineConfig(num_pages=POOL.get(arch, 15) * groups, page_size=4, max_num_seqs=8,
                                 max_num_batched_tokens=32, chunk_size=12,
                                 enable_prefix_caching=True, preemption=preemption,
                                 num_cpu_pages=64 if preemption == "swap" else 0, block_manager_backend=backend)
    eng = engine.Engine(model, config)
    hybrid = arch in ("mistral", "gemma3", "gpt_oss", "llama4", "qwen3_next")
    assert isinstance(eng.mgr, HybridBlockManager) == hybrid
    # the first request alone, so the others find its prompt in the prefix cache
    first = eng.generate(prompts[:1], engine.SamplingParams(max_new_tokens=max_new))
    rest = eng.generate(prompts[1:], engine.SamplingParams(max_new_tokens=max_new))
    outputs = first + rest
    for prompt, out in zip(prompts, outputs):
        want, margin = _reference(model, prompt, max_new)
        assert margin > MIN_GREEDY_MARGIN, f"{arch}: a near-tie in greedy decoding; pick another seed"
        assert out.output_ids == [want], f"{arch}: prompt of {len(prompt)} tokens"
    if arch == "qwen3_next":
        # NOTE: a state group accepts no hit (a recurrent state cannot start mid-prompt from
        # cached K/V), so every prompt is computed in full, and correctly
        assert sum(o.num_cached_tokens for o in outputs) == 0
    else:
        assert sum(o.num_cached_tokens for o in rest) > 0, "no prefix-cache hit"
    if arch == "mistral":
        # NOTE: every layer slides, so a decoding sequence never needs more than its window's
        # pages and nothing is preempted; the pool is smaller than all-full layers would need.
        need = sum(-(-(len(p) + max_new) // 4) for p in prompts)
        assert eng.stats.peak_pages_in_use <= config.num_pages < need
    else:
        assert eng.stats.num_preemptions > 0, "no preemption"
    assert not eng.has_unfinished() and eng.mgr.num_free_pages == eng.mgr.num_pages
    eng.mgr.check_invariants()


def test_sliding_groups_release_pages_while_decoding():
    """gpt-oss: during a long decode the sliding group holds its window's pages only, so the
    pool holds about half of what all-full layers would."""
    model = tiny("gpt_oss")
    config = engine.EngineConfig(num_pages=64, page_size=4, max_num_seqs=2, max_num_batched_tokens=32, chunk_size=16)
    eng = engine.Engine(model, config)
    eng.add_request(list(range(30)), engine.SamplingParams(max_new_tokens=60))
    for _ in range(40):
        eng.step()
    (seq,) = eng.running
    full, sliding = eng.mgr.group_pages()
    n = eng.mgr.num_tokens(seq.seq_id)
    assert full == -(-n // 4) and sliding <= -(-WINDOW // 4) + 1
    while eng.has_unfinished():
        eng.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_layers_fork_copies_the_state(backend):
    """Qwen3-Next, parallel sampling: the children of one prompt start from copies of its state
    pages (``fork`` copies a state group's pages), so child ``i`` samples what a request of its
    own with ``seed + i`` samples; a recurrent state shared between children would diverge."""
    model = tiny("qwen3_next")
    config = engine.EngineConfig(num_pages=64, page_size=4, max_num_seqs=8, max_num_batched_tokens=32, chunk_size=8,
                                 block_manager_backend=backend)
    prompt = _prompts()[1]
    params = dict(max_new_tokens=8, temperature=1.0, seed=3)
    (both,) = engine.Engine(model, config).generate([prompt], engine.SamplingParams(n=2, **params))
    eng = engine.Engine(model, config)
    alone = [eng.generate([prompt], engine.SamplingParams(**{**params, "seed": 3 + i}))[0].output_ids[0]
             for i in range(2)]
    assert both.output_ids == alone
    assert alone[0] != alone[1], "the two seeds sample the same tokens; pick others"


def test_state_layers_keep_their_state_in_the_state_groups_pages():
    """Qwen3-Next: a sequence's conv and recurrent states are bytes of its state group's pages:
    zeroing those pages once the prompt is computed changes the tokens decoded after it, and
    leaving them gives ``model.generate``'s."""
    model = tiny("qwen3_next")
    config = engine.EngineConfig(num_pages=64, page_size=4, max_num_seqs=2, max_num_batched_tokens=32, chunk_size=16)
    prompt, max_new = _prompts()[3], 8
    outputs = []
    for wipe in (False, True):
        eng = engine.Engine(model, config)
        eng.add_request(prompt, engine.SamplingParams(max_new_tokens=max_new))
        while not eng.running or eng.running[0].is_prefilling:
            eng.step()
        (seq,) = eng.running
        (group,) = [g for g, kind in enumerate(eng.mgr.groups) if kind.kind == "state"]
        pages = eng.mgr.page_table(seq.seq_id, group)
        assert len(pages) == eng.mgr.groups[group].state_pages and min(pages) >= 0
        if wipe:
            eng.cache.kv[:, :, torch.as_tensor(pages)] = 0
        finished = []
        while eng.has_unfinished():
            finished += eng.step()
        outputs.append(finished[0].output_ids[0])
    assert outputs[0] == _reference(model, prompt, max_new)[0]
    assert outputs[1][0] == outputs[0][0]  # sampled from the prompt's logits, before the wipe
    assert outputs[1] != outputs[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_child_without_pages_for_its_state_recomputes_the_prompt(backend):
    """Qwen3-Next, n=2 in a pool too small for every child's copy of the state at once: a child
    whose fork finds no pages computes the prompt itself later; each child still samples what a
    request of its own with ``seed + i`` samples, and nothing leaks."""
    model = tiny("qwen3_next")
    config = engine.EngineConfig(num_pages=14, page_size=4, max_num_seqs=8, max_num_batched_tokens=32, chunk_size=8,
                                 block_manager_backend=backend)
    prompts = [p[:8] for p in _prompts()[:3]]
    params = dict(max_new_tokens=6, temperature=1.0, seed=11)
    eng = engine.Engine(model, config)
    outputs = eng.generate(prompts, engine.SamplingParams(n=2, **params))
    alone = engine.Engine(model, config)
    for prompt, out in zip(prompts, outputs):
        want = [alone.generate([prompt], engine.SamplingParams(**{**params, "seed": 11 + i}))[0].output_ids[0]
                for i in range(2)]
        assert out.output_ids == want
    assert eng.mgr.num_free_pages == eng.mgr.num_pages
    eng.mgr.check_invariants()


def test_state_layers_in_bf16_fit_their_pages():
    """The recurrent state stays fp32 in a bf16 model: the state group's pages are counted in
    the pool's dtype, so the state fits; greedy tokens equal ``model.generate``'s."""
    model = tiny("qwen3_next").to(torch.bfloat16)
    config = engine.EngineConfig(num_pages=64, page_size=4, max_num_seqs=4, max_num_batched_tokens=32, chunk_size=8)
    eng = engine.Engine(model, config)
    (state,) = [g for g in eng.mgr.groups if g.kind == "state"]
    assert state.state_pages == 2 * engine.PagedModel(tiny("qwen3_next"), 4).groups[1].state_pages
    prompt = _prompts()[2][:12]
    (out,) = eng.generate([prompt], engine.SamplingParams(max_new_tokens=3))
    assert out.output_ids == [_reference(model, prompt, 3)[0]]
