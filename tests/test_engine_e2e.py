"""End-to-end proof: ``examples/engine.py`` on a Hugging Face Llama gives ``model.generate``'s tokens.

A tiny ``LlamaForCausalLM`` (random weights, GQA: 8 query heads, 2 KV heads, fp32) is driven by
the example engine (block manager + ``PagedKVCache``, continuous batching, chunked prefill) and
compared with ``model.generate(..., do_sample=False)`` run per prompt without pagedkv: with
several page sizes, under preemption (recompute and swap), with parallel sampling through fork
and copy-on-write, with prefix caching, and on the Triton kernels (interpreter on the CPU).

``PAGEDKV_TEST_DEVICE=cuda`` runs the same tests on a GPU (Triton kernels, compiled).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest

TEST_DEVICE = os.environ.get("PAGEDKV_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    # NOTE: read when a @triton.jit kernel is decorated, so before pagedkv.kernels' kernel modules
    # are imported (as tests/kernels/conftest.py does); only the Triton test launches kernels.
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _load_engine():
    # NOTE: loaded by path: putting the repository root on sys.path would shadow the installed
    # pagedkv (and its C++ core) with the source tree.
    path = Path(__file__).resolve().parents[1] / "examples" / "engine.py"
    spec = importlib.util.spec_from_file_location("pagedkv_example_engine", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


engine = _load_engine()
SamplingParams, EngineConfig = engine.SamplingParams, engine.EngineConfig

VOCAB = 256
MAX_NEW = 10
# Lengths: shorter than a page, longer than several, 48 a multiple of 1, 3 and 16, and long
# enough that chunks of 16 split them.
PROMPT_LENS = (2, 5, 23, 48, 37)
# NOTE: first-token logits differ from model.generate's only by fp32 rounding (paged attention
# sums in another order, and the linear layers see another batch shape): at most 6e-6 measured
# here, for logits of magnitude ~5 (fp32 epsilon 1.2e-7 times a few hundred accumulations).
# 1e-4 leaves ~20x headroom for other CPUs and math libraries; a real bug (a wrong position,
# page or mask) moves logits by enough to change the generated tokens.
LOGITS_ATOL = LOGITS_RTOL = 1e-4
# Token equality is only a fair check when no greedy step is a near-tie: the reference asserts
# every top-1/top-2 logit gap exceeds this (10x the tolerance; the smallest here is 0.023).
MIN_GREEDY_MARGIN = 1e-3


@pytest.fixture(scope="module")
def device():
    if TEST_DEVICE != "cpu" and not torch.cuda.is_available():
        pytest.skip(f"PAGEDKV_TEST_DEVICE={TEST_DEVICE} but no CUDA device")
    return torch.device(TEST_DEVICE)


@pytest.fixture(scope="module")
def model(device):
    return engine.tiny_llama(vocab_size=VOCAB, max_positions=128, seed=0, device=device)


@pytest.fixture(scope="module")
def reference(model, device):
    """``reference(prompt, max_new)`` -> (greedy tokens, first-token logits) from model.generate."""

    @lru_cache(maxsize=None)
    def run(prompt: tuple, max_new: int = MAX_NEW):
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=max_new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        for step_logits in out.logits:
            top2 = step_logits[0].topk(2).values
            assert top2[0] - top2[1] > MIN_GREEDY_MARGIN, "pick another seed: greedy decoding has a near-tie"
        return out.sequences[0, len(prompt):].tolist(), out.logits[0][0].float().cpu()

    return run


def _prompts(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def _engine(model, **config) -> "engine.Engine":
    """An engine on the default block manager backend (``PAGEDKV_IMPL`` picks it)."""
    return engine.Engine(model, EngineConfig(**config))


def _check_against_reference(outputs, prompts, reference):
    for prompt, out in zip(prompts, outputs):
        want_tokens, want_logits = reference(tuple(prompt))
        assert out.output_ids == [want_tokens], f"prompt of {len(prompt)} tokens"
        torch.testing.assert_close(out.first_logits, want_logits, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


def _check_drained(eng):
    """Every sequence freed: all pages back, invariants hold."""
    assert not eng.has_unfinished() and eng.mgr.num_sequences == 0
    assert eng.mgr.num_free_pages == eng.mgr.num_pages
    eng.mgr.check_invariants()


@pytest.mark.parametrize("page_size", [1, 16, 3])
def test_greedy_batch_matches_generate(model, reference, page_size):
    prompts = _prompts(PROMPT_LENS)
    assert any(n < page_size for n in PROMPT_LENS) or page_size == 1
    assert any(n > page_size for n in PROMPT_LENS) and any(n % page_size == 0 for n in PROMPT_LENS)
    eng = _engine(model, num_pages=math.ceil(256 / page_size), page_size=page_size, max_num_batched_tokens=40,
                  chunk_size=16)
    outputs = eng.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))

    _check_against_reference(outputs, prompts, reference)
    assert eng.stats.num_preemptions == 0
    assert eng.stats.num_prefill_tokens == sum(PROMPT_LENS)  # every prompt token computed once
    assert eng.stats.num_prefill_chunks >= sum(math.ceil(n / 16) for n in PROMPT_LENS) > len(PROMPT_LENS)
    _check_drained(eng)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_preemption_keeps_tokens(model, reference, preemption):
    prompts = _prompts(PROMPT_LENS)
    page_size, num_pages = 4, 24
    # The longest request (48 + 10 tokens) needs 15 pages alone; all of them together need 43.
    eng = _engine(model, num_pages=num_pages, page_size=page_size, max_num_batched_tokens=40, chunk_size=16,
                  preemption=preemption, num_cpu_pages=64 if preemption == "swap" else 0)
    outputs = eng.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))

    _check_against_reference(outputs, prompts, reference)
    assert eng.stats.num_preemptions > 0
    if preemption == "swap":
        assert eng.stats.num_swap_outs > 0 and eng.mgr.num_free_cpu_pages == eng.mgr.num_cpu_pages
    else:
        assert eng.stats.num_recomputes > 0 and eng.stats.num_prefill_tokens > sum(PROMPT_LENS)
    assert eng.stats.peak_pages_in_use <= num_pages
    _check_drained(eng)


def test_parallel_sampling_shares_prompt_pages(model):
    page_size, seed, n = 4, 1234, 4
    (prompt,) = _prompts([13], seed=1)  # 3 full pages and a partly filled one
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=n, seed=seed)
    eng = _engine(model, num_pages=64, page_size=page_size)
    request_id = eng.add_request(prompt, params)

    eng.step()  # the whole prompt, then fork: four children share every page of it
    children = eng.requests[request_id].sequences
    assert len(children) == n
    tables = [eng.mgr.page_table(s.seq_id) for s in children]
    assert all(t == tables[0] for t in tables) and len(tables[0]) == 4
    assert [eng.mgr.ref_count(p) for p in tables[0]] == [n] * 4
    assert eng.mgr.num_pages - eng.mgr.num_free_pages == 4

    eng.step()  # first decode token: copy-on-write of the shared, partly filled last page
    tables = [eng.mgr.page_table(s.seq_id) for s in children]
    assert all(t[:3] == tables[0][:3] for t in tables)
    assert [eng.mgr.ref_count(p) for p in tables[0][:3]] == [n] * 3  # full prompt pages stay shared
    assert len({t[3] for t in tables}) == n and all(eng.mgr.ref_count(t[3]) == 1 for t in tables)

    outputs = []
    while eng.has_unfinished():
        outputs += eng.step()
    (out,) = outputs
    assert len(out.output_ids) == n and all(len(o) == 8 for o in out.output_ids)
    assert len({tuple(o) for o in out.output_ids}) > 1  # they really sampled differently
    _check_drained(eng)

    for child, tokens in enumerate(out.output_ids):
        alone = _engine(model, num_pages=64, page_size=page_size)
        (solo,) = alone.generate([prompt], SamplingParams(max_new_tokens=8, temperature=1.0, n=1, seed=seed + child))
        assert solo.output_ids == [tokens], f"child {child}"


def test_prefix_caching_reuses_pages(model, reference):
    page_size = 4
    a, b_suffix = _prompts([48, 7], seed=2)
    b = a[:40] + b_suffix  # shares 40 tokens (10 full pages) with a
    prompts = [a, b, a]  # the repeat is cached whole: its last page is copied, not shared
    eng = _engine(model, num_pages=96, page_size=page_size, chunk_size=16, enable_prefix_caching=True)
    outputs = eng.generate(prompts, SamplingParams(max_new_tokens=MAX_NEW))

    assert [o.num_cached_tokens for o in outputs] == [0, 40, 47]
    assert eng.stats.num_prefill_tokens == 48 + 7 + 1
    assert eng.mgr.prefix_cache_stats().hit_tokens == 87
    _check_against_reference(outputs, prompts, reference)
    _check_drained(eng)


def test_triton_kernels_path(model, reference, device):
    """The same engine on the Triton kernels (compiled on CUDA, interpreted on the CPU)."""
    pytest.importorskip("triton")
    prompts = _prompts((5, 7), seed=3)
    eng = _engine(model, num_pages=8, page_size=4, backend="triton", chunk_size=4, max_num_batched_tokens=8,
                  max_num_seqs=2)
    outputs = eng.generate(prompts, SamplingParams(max_new_tokens=3))
    assert eng.cache.backend == "triton"
    for prompt, out in zip(prompts, outputs):
        want_tokens, want_logits = reference(tuple(prompt))
        assert out.output_ids == [want_tokens[:3]]
        torch.testing.assert_close(out.first_logits, want_logits, atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
    _check_drained(eng)


def test_prefix_hit_on_a_page_filled_in_the_same_step(model, reference):
    """A prompt cached whole, whose last page a running sequence fills in the step it is admitted."""
    page_size = 4
    (a,) = _prompts([47], seed=4)
    first_token = reference(tuple(a))[0][0]
    c = a + [first_token]  # a's first decode step fills page 11 (positions 44..47) with these tokens
    eng = _engine(model, num_pages=96, page_size=page_size, chunk_size=16, enable_prefix_caching=True)
    outputs = eng.generate([a, c], SamplingParams(max_new_tokens=MAX_NEW))

    assert [o.num_cached_tokens for o in outputs] == [0, 47]  # c's last page is a copy of a's page 11
    _check_against_reference(outputs, [a, c], reference)
    _check_drained(eng)


def test_concurrent_chunked_prefills_share_a_long_prefix(model, reference):
    """Two prefills in flight at once, the second reading the first one's committed pages."""
    page_size, chunk = 4, 16
    shared, x, y = _prompts([32, 48, 40], seed=5)
    y[0] = (x[0] + 1) % VOCAB  # the prompts part right after the shared prefix
    a, b = shared + x, shared + y
    eng = _engine(model, num_pages=96, page_size=page_size, chunk_size=chunk, enable_prefix_caching=True)
    id_a = eng.add_request(a, SamplingParams(max_new_tokens=MAX_NEW))
    eng.step()
    eng.step()  # a has computed, and committed, the shared prefix (and is still prefilling)
    assert eng.mgr.prefix_cache_stats().num_cached_pages == 32 // page_size
    id_b = eng.add_request(b, SamplingParams(max_new_tokens=MAX_NEW))
    done, concurrent = {}, 0
    while eng.has_unfinished():
        done.update((out.request_id, out) for out in eng.step())
        seqs = [eng.requests[i].sequences[0] for i in (id_a, id_b) if i in eng.requests]
        if len(seqs) == 2 and all(s.is_prefilling for s in seqs):
            concurrent += 1
            table_a, table_b = (eng.mgr.page_table(s.seq_id) for s in seqs)
            assert table_a[:8] == table_b[:8] and table_a[8:] != table_b[8:]  # the prefix's pages are shared
    assert concurrent >= 2
    assert done[id_b].num_cached_tokens == 32
    assert eng.stats.num_prefill_tokens == len(a) + len(b) - 32  # the shared prefix computed once
    _check_against_reference([done[id_a], done[id_b]], [a, b], reference)
    _check_drained(eng)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_preempting_a_prefill_with_prefix_caching_keeps_tokens(model, reference, preemption):
    """The latest arrival is preempted in the middle of its chunked prefill; with prefix caching
    its committed pages stay matchable and its re-admission (recompute) hits them."""
    page_size = 4
    short, long_ = _prompts([8, 48], seed=6)
    eng = _engine(model, num_pages=16, page_size=page_size, chunk_size=4, max_num_batched_tokens=8, max_num_seqs=4,
                  enable_prefix_caching=True, preemption=preemption, num_cpu_pages=32 if preemption == "swap" else 0)
    victims = []
    preempt = eng._preempt

    def spy(seq):
        victims.append(seq.is_prefilling)
        preempt(seq)

    eng._preempt = spy
    outputs = eng.generate([short, long_], SamplingParams(max_new_tokens=MAX_NEW))
    assert True in victims, "no sequence was preempted in the middle of its prefill"
    if preemption == "recompute":
        assert eng.mgr.prefix_cache_stats().hit_tokens > 0  # its committed pages were found again
    _check_against_reference(outputs, [short, long_], reference)
    _check_drained(eng)


def test_prompts_admitted_together_hit_only_written_pages(model, reference):
    """Admission without waiting for prefills in flight (as vLLM's scheduler admits): three
    prompts with a 40-token common prefix, two admitted in the same step and one a step later,
    all prefill at once; each may reuse only pages whose K/V an earlier step has written."""
    page_size, chunk = 4, 16
    prefix, x, y, z = _prompts([40, 9, 7, 5], seed=7)
    prompts = [prefix + x, prefix + y, prefix + z]
    eng = _engine(model, num_pages=96, page_size=page_size, chunk_size=chunk, enable_prefix_caching=True)
    eng._prefix_in_flight = lambda seq: False  # admit every prompt that fits
    ids = [eng.add_request(p, SamplingParams(max_new_tokens=MAX_NEW)) for p in prompts[:2]]
    done = {}
    done.update((out.request_id, out) for out in eng.step())  # both admitted, first chunks run
    in_flight = [eng.requests[i].sequences[0].is_prefilling for i in ids]
    ids.append(eng.add_request(prompts[2], SamplingParams(max_new_tokens=MAX_NEW)))
    while eng.has_unfinished():
        done.update((out.request_id, out) for out in eng.step())
    _check_against_reference([done[i] for i in ids], prompts, reference)
    assert in_flight == [True, True]
    # the second prompt found nothing (the first one's chunk was not written at its admission);
    # the third found the first chunk, written in step 1, and nothing the first prompt was
    # still computing
    assert [done[i].num_cached_tokens for i in ids] == [0, 0, chunk]
    _check_drained(eng)


def test_the_demo_shows_preemption_prefix_caching_and_forking(tmp_path):
    # NOTE: the README's `python examples/engine.py`, as a new user runs it (a subprocess, outside
    # the source tree so the installed pagedkv is imported).
    path = Path(__file__).resolve().parents[1] / "examples" / "engine.py"
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "DIFFER" not in out and "all greedy outputs equal model.generate" in out
    preemptions = [int(m) for m in re.findall(r"(\d+) preemptions", out)]
    assert len(preemptions) == 2 and all(n > 0 for n in preemptions)
    assert int(re.search(r"(\d+) swapped out", out)[1]) > 0
    assert sum(int(m) for m in re.findall(r"swapped out, (\d+) recomputed", out)) > 0
    assert int(re.search(r"(\d+) prompt tokens found cached in all", out)[1]) > 0
    assert int(re.search(r"share (\d+) of its pages", out)[1]) > 0


@pytest.mark.parametrize("tier", [False, True])
def test_cpu_tier_brings_an_evicted_prefix_back(model, reference, tier):
    # a's pages are evicted by b; with the tier they are demoted, and a's repeat is promoted.
    a, b = _prompts([40, 48], seed=5)
    eng = _engine(model, num_pages=16, page_size=4, chunk_size=16, enable_prefix_caching=True, num_cpu_pages=32,
                  cpu_prefix_cache=tier)
    outputs = [eng.generate([p], SamplingParams(max_new_tokens=MAX_NEW))[0] for p in (a, b, a)]
    _check_against_reference(outputs, [a, b, a], reference)
    stats = eng.mgr.prefix_cache_stats()
    if tier:
        # NOTE: 39 of 40: the last token is always computed (a whole-prompt hit copies its page)
        assert outputs[2].num_cached_tokens == 39 and stats.promotions > 0 and stats.cpu_hit_tokens > 0
    else:
        assert outputs[2].num_cached_tokens < 39 and stats.promotions == 0
    _check_drained(eng)


def test_kv_events_reach_a_router_over_zmq(model, reference):
    # `examples/engine.py --kv-events`: every step's events go out on loopback; a router-side
    # index fed from the subscriber ends up with exactly the manager's cached blocks.
    pytest.importorskip("zmq")
    pytest.importorskip("cbor2")
    from pagedkv.events import PrefixIndex, ZmqSubscriber, block_hashes

    a, b = _prompts([40, 7], seed=6)
    eng = _engine(model, num_pages=64, page_size=4, chunk_size=16, enable_prefix_caching=True,
                  kv_events="tcp://127.0.0.1:*")
    sub = ZmqSubscriber(eng.publisher.endpoint, replay_endpoint=eng.publisher.replay_endpoint, from_seq=0)
    outputs = eng.generate([a, a[:24] + b], SamplingParams(max_new_tokens=MAX_NEW))
    _check_against_reference(outputs, [a, a[:24] + b], reference)
    eng.close()
    router = PrefixIndex(4, prefix_hash="sha256_cbor")
    got, deadline = [], time.monotonic() + 10
    while len(got) < eng.publisher.num_sent and time.monotonic() < deadline:
        got.extend(sub.poll(50))
    sub.close()
    assert [seq for seq, *_ in got] == list(range(eng.publisher.num_sent))
    for _, _, events, _ in got:
        router.apply("engine", events)
    # NOTE: the snapshot's node hashes are the index's own; the events carry vLLM's sha256_cbor
    held = sum(1 for *_, pages, _ in eng.mgr.snapshot()["nodes"].values() if pages)
    assert len(router.blocks("engine")) == held > 0
    # the router finds the first prompt where the engine has it, by vLLM's hashes of its tokens
    assert set(block_hashes(a, 4, prefix_hash="sha256_cbor")) <= router.blocks("engine")
    assert router.match(a) == {"engine": 40}
