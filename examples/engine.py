"""How to put pagedkv into your engine: a compact continuous-batching loop around any Hugging Face decoder.

The engine keeps the model's own modules (embedding, norms, q/k/v/o projections, rotary
embedding, MLP or MoE, LM head) and replaces only attention's KV handling: K/V live in the pages of a
``PagedKVCache``, the ``BlockManager`` decides which pages each sequence owns, and attention
reads through page tables. Each ``Engine.step``:

1. grows every decoding sequence by one token with one ``append_batch`` (all or nothing); when
   pages run out it preempts the lowest-priority decoding sequence (swap it to the CPU tier, or
   free it and recompute it later) and retries;
2. continues chunked prefills (at most ``chunk_size`` prompt tokens per sequence per step);
3. admits waiting requests while ``can_allocate`` says their prompt fits (swapped sequences
   first), within a per-step token budget; ``allocate`` gives pages to the whole prompt, or
   finds part of it in the prefix cache;
4. commits every prefill chunk of the step (``commit``): with prefix caching, the full pages
   those chunks complete become matchable by prompts admitted in later steps;
5. executes the copy-on-write copies, plans the batch once (``cache.plan``, from the rows of
   a persistent page table that the block manager keeps current, into fixed plan buffers) and
   runs the model: per layer, ``cache.write`` then ``cache.decode`` (all decode) or ``cache.prefill``
   (any chunk in the batch);
6. samples, forks the ``n`` children of a parallel-sampling request when its prompt is done
   (they share the prompt's pages; copy-on-write splits the last one), and frees finished
   sequences.

Policies (each a ``# NOTE:`` below): first come, first served; the victim of a preemption is the
latest-arrived running sequence, decoding or in the middle of its prefill; prompts are
allocated with ``num_computed_tokens=0`` and their chunks committed step by step, so only pages
whose K/V is written (or written in the step that commits them) are ever matchable, and several
prefills run at once with prefix caching on; a prompt whose prefix a prefill in flight is still
computing waits for those pages instead of computing the prefix a second time.

The same code runs on the CPU (the torch reference kernels) and on CUDA (the Triton kernels).
Needs torch and ``transformers`` (the ``examples`` extra); pagedkv itself needs neither.
Run ``python examples/engine.py`` for a demo that checks itself against ``model.generate``;
``--tp 2`` (tensor parallel) and ``--disagg`` (prefill/decode in two processes) run the same
engine over ``torch.distributed`` (``examples/engine_dist.py``).
"""

from __future__ import annotations

import itertools
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from pagedkv import BlockManager, HybridBlockManager, OutOfPages
from pagedkv.cache import PagedKVCache
from pagedkv.errors import InvalidArgument

PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to sample one request.

    Attributes:
        max_new_tokens: tokens to generate per child (>= 1).
        temperature: 0 for greedy decoding (argmax), else the softmax temperature.
        top_k: keep only the ``top_k`` most likely tokens (``None``: all).
        n: parallel samples from one prompt (children share the prompt's pages).
        seed: child ``i`` samples with a ``torch.Generator`` seeded ``seed + i``, so child ``i``
            of a request equals a request with ``n=1`` and ``seed + i``. ``None``: unseeded.
        stop_token_ids: a child stops after sampling one of these.
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int | None = None
    n: int = 1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidArgument("max_new_tokens", self.max_new_tokens, "an int >= 1")
        if not self.temperature >= 0:
            raise InvalidArgument("temperature", self.temperature, "a float >= 0 (0 = greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InvalidArgument("top_k", self.top_k, "an int >= 1 or None")
        if not isinstance(self.n, int) or self.n < 1:
            raise InvalidArgument("n", self.n, "an int >= 1")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Sizes and policies of an ``Engine``.

    Attributes:
        num_pages: KV pages on the device; page_size: tokens per page.
        max_num_seqs: running sequences at most (children of ``n > 1`` included).
        max_num_batched_tokens: tokens per step (decode tokens + prefill chunks).
        chunk_size: prompt tokens one sequence computes per step at most (chunked prefill).
        preemption: ``"recompute"`` (free, then prefill prompt + output again) or ``"swap"``
            (move the pages to ``num_cpu_pages`` CPU pages; recompute when those are full).
        num_cpu_pages: pages of the CPU offload tier (``"swap"`` needs > 0).
        enable_prefix_caching: reuse the KV of full pages of earlier prompts.
        cpu_prefix_cache: with prefix caching and CPU pages, demote evicted cached pages to the
            CPU pool and promote them back on a hit (``BlockManager(cpu_prefix_cache=True)``).
        kv_events: a ZeroMQ endpoint (e.g. ``tcp://*:5557``): with prefix caching, publish the
            block manager's KV events there after every step, in vLLM's format (topic
            ``kv-events``, replay on the next port), for a KV-aware router.
        watermark: fraction of pages kept free when admitting (see ``BlockManager``).
        backend: ``PagedKVCache`` backend (``None``: Triton on CUDA, torch elsewhere).
        block_manager_backend: ``"cpp"`` / ``"python"`` / ``None`` (the best one built).
    """

    num_pages: int = 256
    page_size: int = 16
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 256
    chunk_size: int = 64
    preemption: str = "recompute"
    num_cpu_pages: int = 0
    enable_prefix_caching: bool = False
    cpu_prefix_cache: bool = False
    kv_events: str | None = None
    watermark: float = 0.0
    backend: str | None = None
    block_manager_backend: str | None = None

    def __post_init__(self):
        if self.preemption not in PREEMPTION_MODES:
            raise InvalidArgument("preemption", self.preemption, "'recompute' or 'swap'")
        if self.preemption == "swap" and self.num_cpu_pages < 1:
            raise InvalidArgument("num_cpu_pages", self.num_cpu_pages, "> 0 with preemption='swap'")
        if not 1 <= self.chunk_size <= self.max_num_batched_tokens:
            raise InvalidArgument("chunk_size", self.chunk_size,
                                  f"an int in [1, max_num_batched_tokens = {self.max_num_batched_tokens}]")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidArgument("max_num_batched_tokens", self.max_num_batched_tokens,
                                  f"at least max_num_seqs = {self.max_num_seqs} (one decode token each)")


class RequestOutput(NamedTuple):
    """A finished request.

    Attributes:
        request_id: as returned by ``add_request``.
        prompt_ids: the prompt's token ids.
        output_ids: one list of generated token ids per child (``n`` lists).
        num_cached_tokens: prompt tokens found in the prefix cache at first admission.
        first_logits: float32 ``[vocab_size]`` (CPU) logits that gave the first generated token.
    """

    request_id: int
    prompt_ids: list[int]
    output_ids: list[list[int]]
    num_cached_tokens: int
    first_logits: torch.Tensor


@dataclass(slots=True)
class EngineStats:
    """Counters since construction."""

    num_steps: int = 0
    num_prefill_tokens: int = 0  # prompt (or recomputed) tokens run through the model
    num_prefill_chunks: int = 0  # pieces those tokens ran in (chunked prefill)
    num_decode_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens skipped thanks to the prefix cache
    num_preemptions: int = 0
    num_swap_outs: int = 0
    num_recomputes: int = 0
    peak_pages_in_use: int = 0
    peak_running: int = 0


@dataclass(eq=False, slots=True)
class Sequence:
    """One stream of tokens: the block manager knows it only by ``seq_id``."""

    seq_id: int
    request: "Request"
    child: int  # index among the request's n children
    tokens: list[int]  # prompt + generated
    generator: torch.Generator | None
    num_computed: int = 0  # tokens whose K/V are in the cache
    prefill_end: int = 0  # tokens allocated at admission; computed in chunks up to here
    row: int = -1  # its row of the persistent page table while running

    @property
    def priority(self) -> tuple[int, int]:
        """Lower runs first; the highest is preempted first (first come, first served)."""
        return (self.request.request_id, self.child)

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed < self.prefill_end

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.request.prompt_ids):]


@dataclass(eq=False, slots=True)
class Request:
    """One prompt and its ``n`` sequences (one before the prompt is computed)."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    sequences: list[Sequence] = field(default_factory=list)
    num_cached_tokens: int | None = None
    first_logits: torch.Tensor | None = None
    num_finished: int = 0


_ATTENTION = "pagedkv"
#: The forward pass in flight: (runner, plans per group). The attention function reads it.
_ACTIVE: list = []


def _paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, s_aux=None, **kwargs):
    """Attention as ``transformers`` calls it (``AttentionInterface``), through pagedkv's pages.

    The model computes q/k/v, its norms and rotary embedding; this writes the new K/V into the
    layer's pages and attends through the page table of the layer's group. ``s_aux`` is
    gpt-oss's learned sinks, ``softcap`` Gemma 2's logit soft cap. The mask is the layer's
    group's: its sliding window, or its chunk (Llama 4's chunked-local layers), or neither.
    """
    runner, plans = _ACTIVE[-1]
    group, slot = runner.layer_group[module.layer_idx]
    plan = plans[group]
    kind = runner.groups[group]
    mask = dict(attention_chunk_size=kind.chunk) if kind.kind == "chunked" else dict(sliding_window=sliding_window)
    # [1, heads, tokens, head_dim] -> [tokens, heads, head_dim]
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))
    cache = runner.cache
    cache.write(slot, k, v, plan)
    run = cache.decode if plan.is_decode else cache.prefill
    out = run(slot, q, plan, sm_scale=scaling, logits_soft_cap=softcap, sinks=s_aux, **mask)
    return out[None], None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(_ATTENTION, _paged_attention)
    # NOTE: no mask: causality and windows come from the page tables and the kernels.
    AttentionMaskInterface.register(_ATTENTION, lambda *args, **kwargs: None)


class PagedModel:
    """Runs any ``transformers`` decoder-only causal LM over a flat batch with a paged KV cache.

    The model runs its own forward pass (embeddings, norms, rotary, MoE, sinks, the LM head);
    pagedkv enters only as its attention implementation (``AttentionInterface.register`` and
    ``set_attn_implementation``). Each layer's KV cache group comes from the config's layer
    types (``KVCacheSpec.from_hf_config``): full, sliding window, chunked local (Llama 4), or
    state (linear attention: Qwen3-Next's Gated DeltaNet). A state layer's mixer runs per
    sequence (decodes batched) against a cache object with transformers' conv/recurrent-state
    API whose states live in the pages of the sequence's state group (``StateStore``).

    Args:
        model: e.g. ``LlamaForCausalLM``, ``Qwen3ForCausalLM``, ``MistralForCausalLM``,
            ``Gemma3ForCausalLM``, ``GptOssForCausalLM``, ``Llama4ForCausalLM``,
            ``Qwen3NextForCausalLM``, or a tensor-parallel shard of one.
        page_size: the pool's page size (a group needs it for its pages).
    """

    def __init__(self, model, page_size: int):
        from pagedkv import KVCacheGroup, KVCacheSpec

        self.model = model.eval()
        config = model.config
        text = getattr(config, "text_config", None) or config
        spec = KVCacheSpec.from_hf_config(text.to_dict(), dtype="fp32")
        self.head_dim = spec.head_dim
        layers = model.model.layers
        kinds = spec.layer_types or ("full",) * len(layers)
        # NOTE: counted from the projections, not the config: a tensor-parallel shard
        # (examples/engine_dist.py) has num_heads / N query and num_kv_heads / N KV heads.
        attn = next(layers[i].self_attn for i, kind in enumerate(kinds) if kind != "state")
        self.num_heads = attn.o_proj.in_features // self.head_dim  # q_proj may also hold a gate (Qwen3-Next)
        self.num_kv_heads = attn.k_proj.out_features // self.head_dim
        self.layout = spec.hybrid_layout()
        self.groups = spec.kv_cache_groups(page_size) if spec.is_hybrid else [KVCacheGroup.full()]
        if "state" in kinds:
            # NOTE: the spec counts state in fp32 (the recurrent state stays fp32 in a bf16
            # model), but the pages hold the model's dtype: count pages of those bytes
            dtype_bytes = next(model.parameters()).element_size()
            page_bytes = page_size * spec.layer_bytes_per_token // 4 * dtype_bytes
            pages = -(-spec.state_bytes // page_bytes)
            self.groups = [KVCacheGroup.state(pages) if g.kind == "state" else g for g in self.groups]
        self.layer_group = {layer: self.layout.group_of(layer) for layer in range(text.num_hidden_layers)}
        self.num_layers = self.layout.layers_per_group  # K/V tensors: one per layer slot of a group
        self.cache = None
        self.states = StateStore(self, [i for i, kind in enumerate(kinds) if kind == "state"])
        _register_attention()
        # NOTE: pagedkv's attention only inside this runner's forward passes: the model keeps
        # its own implementation for everything else (model.generate, as the tests compare).
        self._configs = [c for c in {id(config): config, id(text): text}.values()]

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, cache: PagedKVCache, plans: list,
                logits_rows: torch.Tensor, state: "StateBatch | None" = None) -> torch.Tensor:
        """One forward pass over the new tokens of a batch.

        Args:
            token_ids, positions: int64 ``[num_tokens]``, ordered as the plans' query rows.
            cache, plans: the cache and this batch's ``cache.plan(...)``, one per group
                (``None`` for a state group).
            logits_rows: int64 ``[R]``; rows whose next-token logits are wanted.
            state: the batch's rows and state pages (a model with state layers only).

        Returns:
            ``[R, vocab_size]`` logits in the model's dtype.
        """
        self.cache = cache
        _ACTIVE.append((self, plans))
        saved = [c._attn_implementation for c in self._configs]
        try:
            for c in self._configs:
                c._attn_implementation = _ATTENTION
            with self.states.active(state):
                out = self.model(input_ids=token_ids[None], position_ids=positions[None], use_cache=False,
                                 logits_to_keep=logits_rows)
        finally:
            for c, value in zip(self._configs, saved):
                c._attn_implementation = value
            _ACTIVE.pop()
        return out.logits[0]


class StateBatch(NamedTuple):
    """What the state layers need of a step, per row of the batch (the plans' row order).

    Attributes:
        starts, query_lens: the row's first token (in the flat batch) and its new tokens.
        has_state: whether the sequence has state from earlier steps (tokens computed before).
        pages: ``{group: int64 [B, state_pages]}``: each state group's pages of every row.
    """

    starts: list
    query_lens: list
    has_state: list
    pages: dict


class StateStore:
    """The recurrent state of a model's state layers, kept in the pages of their KV cache group.

    A sequence's state in a state layer (Gated DeltaNet: a convolution state and a recurrent
    state) lives in the ``k`` pages its state group holds, in that layer's slot of the
    ``PagedKVCache``: the raw bytes of ``cache.kv[slot, :, pages]`` (the sector scheme of
    ``KVCacheSpec.state_pages``; full precision whatever the KV dtype). So the block manager's
    swaps, copies (``fork`` copies state pages) and frees carry the state with no extra code.

    During a forward pass each state layer's mixer (the decoder layer's child module with the
    layer's ``layer_idx``: ``linear_attn`` in Qwen3-Next) is called once for the step's decodes
    together and once per prefill chunk, each time with a ``_SequenceStates`` as its cache:
    transformers' conv/recurrent-state methods over states loaded from the rows' pages, which
    are written back after the call. The byte layout of a layer (the states it keeps, their
    shapes and dtypes) is learned from its first prefill.
    """

    def __init__(self, runner: PagedModel, layers: list[int]):
        import inspect

        self.runner = runner
        self.mixers = {}
        for i in layers:
            found = [m for _, m in runner.model.model.layers[i].named_children() if getattr(m, "layer_idx", None) == i]
            if len(found) != 1:
                raise InvalidArgument("model", type(runner.model).__name__,
                                      f"state layer {i} with one mixer module carrying layer_idx={i} "
                                      f"(found {len(found)})")
            params = inspect.signature(found[0].forward).parameters
            name = next((n for n in ("cache", "cache_params", "past_key_values") if n in params), None)
            if name is None:
                raise InvalidArgument("model", type(runner.model).__name__,
                                      f"a state mixer in layer {i} that takes a cache (cache= or cache_params=)")
            self.mixers[i] = (found[0], name)
        self.formats: dict[int, list] = {}  # layer -> [(key, shape per row, dtype, bytes per row)]
        self._batch = None

    def active(self, batch: StateBatch | None):
        """A context in which the state mixers run over ``batch`` (nothing without state layers)."""
        import contextlib

        @contextlib.contextmanager
        def installed():
            if not self.mixers:
                yield
                return
            if batch is None:
                raise InvalidArgument("state", None, "the batch's StateBatch (the model has state layers)")
            self._batch = batch
            saved = {}
            try:
                for layer, (module, name) in self.mixers.items():
                    saved[layer] = module.__dict__.get("forward")
                    original = module.forward
                    module.forward = (lambda *args, _layer=layer, _fwd=original, _name=name, **kw:
                                      self._run(_layer, _fwd, _name, *args, **kw))
                yield
            finally:
                for layer, value in saved.items():
                    module = self.mixers[layer][0]
                    if value is None:
                        del module.forward
                    else:
                        module.forward = value
                self._batch = None

        return installed()

    def _run(self, layer: int, forward, cache_name: str, hidden_states: torch.Tensor, *args, **kwargs):
        batch = self._batch
        for name in ("cache", "cache_params", "past_key_values", "attention_mask"):
            kwargs.pop(name, None)  # NOTE: no padding in a flat batch; the cache is ours
        group, slot = self.runner.layer_group[layer]
        pages = batch.pages[group]
        flat = hidden_states[0]
        # NOTE: the step's decodes (1 token on top of a state) in one call; each prefill chunk
        # alone, since the mixer runs a recurrence over its sequence axis.
        rows = [b for b in range(len(batch.query_lens)) if batch.query_lens[b] > 0]
        decodes = [b for b in rows if batch.query_lens[b] == 1 and batch.has_state[b]]
        calls = ([decodes] if decodes else []) + [[b] for b in rows if b not in set(decodes)]
        out = None
        for call in calls:
            n = batch.query_lens[call[0]]
            index = torch.tensor([batch.starts[b] + i for b in call for i in range(n)], device=flat.device)
            x = flat[index].reshape(len(call), n, -1)
            view = _SequenceStates(layer, self._load(layer, slot, pages[call]) if batch.has_state[call[0]] else None)
            y = forward(x, *args, **{cache_name: view}, **kwargs)
            if isinstance(y, tuple):
                y = y[0]
            self._store(layer, slot, pages[call], view.states)
            if out is None:
                out = flat.new_empty((flat.shape[0], y.shape[-1]), dtype=y.dtype)
            out[index] = y.reshape(len(call) * n, -1)
        return torch.zeros_like(hidden_states) if out is None else out[None]

    def _capacity(self, pages: torch.Tensor) -> int:
        kv = self.runner.cache.kv
        return 2 * pages.shape[1] * kv[0, 0, 0].numel() * kv.element_size()

    def _load(self, layer: int, slot: int, pages: torch.Tensor) -> dict:
        if layer not in self.formats:
            raise InvalidArgument("state", layer, "a state layer whose first prefill ran in this process")
        kv = self.runner.cache.kv[slot]  # [2, num_pages, page_size, heads, head_dim]
        raw = kv[:, pages].transpose(0, 1).reshape(pages.shape[0], -1).view(torch.uint8)
        states, offset = {}, 0
        for key, shape, dtype, size in self.formats[layer]:
            states[key] = raw[:, offset:offset + size].view(dtype).reshape(pages.shape[0], *shape).clone()
            offset += size
        return states

    def _store(self, layer: int, slot: int, pages: torch.Tensor, states: dict) -> None:
        fmt = [(key, tuple(t.shape[1:]), t.dtype, t[0].numel() * t.element_size()) for key, t in sorted(states.items())]
        known = self.formats.setdefault(layer, fmt)
        if fmt != known:
            raise InvalidArgument("state", layer, f"the states {known} of its first prefill (got {fmt})")
        size, capacity = sum(f[3] for f in fmt), self._capacity(pages)
        if size > capacity:
            raise InvalidArgument("state", layer, f"a state that fits its {pages.shape[1]} pages ({capacity} B per "
                                  f"sequence); it keeps {size} B: KVCacheSpec.state_bytes undercounts this model")
        kv = self.runner.cache.kv[slot]
        raw = torch.zeros((pages.shape[0], capacity), dtype=torch.uint8, device=kv.device)
        offset = 0
        for key, _, _, nbytes in fmt:
            raw[:, offset:offset + nbytes] = states[key].reshape(pages.shape[0], -1).contiguous().view(torch.uint8)
            offset += nbytes
        kv[:, pages] = raw.view(kv.dtype).reshape(pages.shape[0], 2, pages.shape[1], *kv.shape[2:]).transpose(0, 1)


class _SequenceStates:
    """The cache a state mixer sees: transformers' conv/recurrent-state methods (``Cache``'s
    ``get_conv_state``, ``update_conv_state``, ``get_recurrent_state``, ...) over the states
    of the sequences in one call, loaded from their pages (``None``: a prompt's first chunk)."""

    def __init__(self, layer: int, loaded: dict | None):
        self.layer = layer
        self.has_state = loaded is not None
        self.states = dict(loaded or {})

    def _check(self, layer_idx: int) -> None:
        if layer_idx != self.layer:
            raise InvalidArgument("layer_idx", layer_idx, f"this mixer's layer ({self.layer})")

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.has_state

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        self._check(layer_idx)
        return self.states.get(("conv", state_idx)) if self.has_state else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        self._check(layer_idx)
        return self.states.get(("recurrent", state_idx)) if self.has_state else None

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                          conv_kernel_size: int | None = None, **kwargs) -> torch.Tensor:
        """Returns the earlier state followed by ``conv_states`` (the convolution's left context
        and the new inputs) and keeps the last ``conv_kernel_size - 1`` inputs: all a causal
        convolution of that kernel needs next (vLLM keeps as many; transformers keeps one more)."""
        self._check(layer_idx)
        key = ("conv", state_idx)
        prior = self.states.get(key) if self.has_state else None
        full = conv_states if prior is None else torch.cat([prior, conv_states], dim=-1)
        if conv_kernel_size is not None:
            width = conv_kernel_size - 1
        else:
            width = prior.shape[-1] if prior is not None else conv_states.shape[-1]
        kept = full[..., max(0, full.shape[-1] - width):]
        if kept.shape[-1] < width:
            kept = torch.nn.functional.pad(kept, (width - kept.shape[-1], 0))
        self.states[key] = kept.clone()
        return full

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx: int, state_idx: int = 0,
                               **kwargs) -> torch.Tensor:
        self._check(layer_idx)
        self.states[("recurrent", state_idx)] = recurrent_states.clone()
        return self.states[("recurrent", state_idx)]


class ModelInput(NamedTuple):
    """What one forward pass needs, as host arrays: the scheduler's output for a step.

    Attributes:
        table: int32 ``[B, W]``: the batch's page-table rows (``W`` covers the longest); with
            several KV cache groups ``[G, B, W]``, one table per group.
        seq_lens, query_lens: int ``[B]``: K/V tokens after the step; new tokens per row.
        slot_mapping: int ``[num_tokens]``: where each new token's K/V goes (``[G, num_tokens]``
            with several groups).
        token_ids, positions: int ``[num_tokens]``, in the plan's query-row order.
        logits_rows: int ``[R]``: the token rows whose next-token logits are wanted.
    """

    table: np.ndarray
    seq_lens: np.ndarray
    query_lens: np.ndarray
    slot_mapping: np.ndarray
    token_ids: np.ndarray
    positions: np.ndarray
    logits_rows: np.ndarray


class Worker:
    """The device side of an engine: the model, its ``PagedKVCache`` and plan buffers.

    The ``Engine`` decides (block manager, scheduling, sampling); a worker only executes:
    copies, swaps and CPU-tier moves in the order given, then forward passes. Under tensor
    parallelism every rank has a worker over its shard of the heads, and all of them execute
    the same calls (``examples/engine_dist.py``).

    Args:
        model: a ``transformers`` decoder-only causal LM (see ``PagedModel``), or a tensor-parallel shard of one.
        config: the ``EngineConfig`` the pool and buffers are sized from.
    """

    def __init__(self, model, config: EngineConfig):
        self.runner = PagedModel(model, config.page_size)
        self.groups = self.runner.groups
        param = next(model.parameters())
        self.device = param.device
        self.cache = PagedKVCache(self.runner.num_layers, config.num_pages, config.page_size, self.runner.num_kv_heads,
                                  self.runner.head_dim, dtype=param.dtype, device=self.device,
                                  backend=config.backend, num_cpu_pages=config.num_cpu_pages)
        # NOTE: a sliding group's table keeps every position (released entries read -1), so a
        # row must cover the longest sequence, which may hold more pages than the pool has.
        self.max_pages = config.num_pages
        if any(g.kind != "full" for g in self.groups):
            text = getattr(model.config, "text_config", None) or model.config
            self.max_pages = max(config.num_pages, -(-text.max_position_embeddings // config.page_size))
        # NOTE: one set of plan buffers per group: each group has its own page tables and slots
        self.buffers = [self.cache.plan_buffers(config.max_num_seqs, config.max_num_batched_tokens, self.max_pages)
                        for _ in self.groups]

    def copy(self, copies) -> None:
        """Copy-on-write / admission copies, rows ``(src_page, dst_page)``."""
        self.cache.copy(copies)

    def swap(self, swap_plan) -> None:
        """A ``SwapPlan`` of ``BlockManager.swap_out`` / ``swap_in``."""
        self.cache.swap(swap_plan)

    def offload(self, offload_plan) -> None:
        """An ``OffloadPlan`` of ``BlockManager.take_offload`` (prefix-cache CPU tier)."""
        self.cache.offload(offload_plan)

    def execute(self, step: ModelInput) -> torch.Tensor:
        """Plan the batch once (into the fixed buffers) and run the model; returns the logits
        of ``step.logits_rows``."""
        tables, slots = step.table, step.slot_mapping
        if tables.ndim == 2:
            tables = tables[None]
        if slots.ndim == 1:
            slots = slots[None]
        def as_tensor(values):
            return torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device)

        plans, state_pages = [], {}
        for g, group in enumerate(self.groups):
            if group.kind == "state":  # NOTE: no attention reads it: the state layers read its pages
                pages = tables[g][:, :group.state_pages]
                if pages.shape[1] < group.state_pages or (pages < 0).any():
                    raise InvalidArgument("step.table", f"state group {g} rows {pages.tolist()}",
                                          f"{group.state_pages} pages per row")
                state_pages[g] = as_tensor(pages)
                plans.append(None)
                continue
            # NOTE: a sliding (chunked) group's rows hold released (-1) entries before its
            # window (chunk)
            window = group.window if group.kind == "sliding" else None
            chunk = group.chunk if group.kind == "chunked" else None
            plans.append(self.cache.plan(tables[g], step.seq_lens, query_lens=step.query_lens, slot_mapping=slots[g],
                                         buffers=self.buffers[g], sliding_window=window, attention_chunk_size=chunk))
        state = None
        if state_pages:
            query_lens = np.asarray(step.query_lens, dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(query_lens)[:-1]])
            state = StateBatch(starts.tolist(), query_lens.tolist(),
                               (np.asarray(step.seq_lens) > query_lens).tolist(), state_pages)
        return self.runner.forward(as_tensor(step.token_ids), as_tensor(step.positions), self.cache, plans,
                                   as_tensor(step.logits_rows), state)

    def flush(self) -> None:
        """The end of a step without a forward pass (a local worker has nothing queued)."""


class Engine:
    """Continuous batching over a ``BlockManager`` + ``PagedKVCache``.

    Args:
        model: a ``transformers`` decoder-only causal LM (see ``PagedModel``; its dtype and device are the cache's).
        config: ``EngineConfig``.
        worker: what executes the device work (default: a ``Worker`` of ``model`` in this
            process; ``examples/engine_dist.py`` passes one that broadcasts each step to the
            tensor-parallel ranks).

    Attributes:
        mgr: the ``BlockManager`` (page tables, ref counts: inspect it between steps).
        cache: the ``PagedKVCache`` (this process's; a shard of the heads under TP).
        stats: ``EngineStats``.
    """

    def __init__(self, model, config: EngineConfig = EngineConfig(), *, worker: Worker | None = None):
        self.config = config
        self.worker = worker if worker is not None else Worker(model, config)
        self.cache = self.worker.cache
        self.device = self.worker.device
        options = dict(watermark=config.watermark, enable_prefix_caching=config.enable_prefix_caching,
                       num_cpu_pages=config.num_cpu_pages, cpu_prefix_cache=config.cpu_prefix_cache,
                       enable_kv_events=config.kv_events is not None,
                       prefix_hash="sha256_cbor" if config.kv_events is not None else "pagedkv",
                       backend=config.block_manager_backend)
        # NOTE: one group of full-attention layers is today's BlockManager; a hybrid model
        # (sliding-window layers beside full ones) gets one KV cache group per layer group, all
        # in one pool: the sliding groups release the pages their window has passed.
        groups = self.worker.groups
        self.num_groups = len(groups)
        if self.num_groups == 1 and groups[0].kind == "full":
            self.mgr = BlockManager(config.num_pages, config.page_size, **options)
        else:
            self.mgr = HybridBlockManager(groups, config.num_pages, config.page_size, **options)
        self.hybrid = isinstance(self.mgr, HybridBlockManager)
        self.state_pages = max((g.state_pages for g in groups if g.kind == "state"), default=0)
        self.publisher = None
        if config.kv_events is not None:
            from pagedkv.events import ZmqPublisher

            self.publisher = ZmqPublisher(config.kv_events, topic="kv-events",
                                          replay_endpoint=_next_port(config.kv_events))
        # NOTE: the serving path of a GPU engine: each running sequence has a row of a persistent
        # page table that the block manager keeps current (no page_tables call per step), and
        # every plan is written into fixed buffers (the same device addresses every step).
        self.table = np.full((config.max_num_seqs * self.num_groups, getattr(self.worker, "max_pages", config.num_pages)),
                             -1, dtype=np.int32)
        self.mgr.bind_table(self.table)
        self.free_rows = list(range(config.max_num_seqs - 1, -1, -1))
        self.stats = EngineStats()
        self.waiting: deque[Sequence] = deque()  # new and recompute-preempted, in priority order
        self.running: list[Sequence] = []
        self.swapped: list[Sequence] = []
        self.requests: dict[int, Request] = {}
        self._request_ids = itertools.count()
        self._seq_ids = itertools.count()
        # NOTE: set it to keep a finished sequence's pages (a prefill instance of a
        # disaggregated engine ships them first, then calls ``release``).
        self.on_finish = None

    # ------------------------------------------------------------------ API
    def add_request(self, prompt_ids, params: SamplingParams = SamplingParams(), *,
                    cache_salt: str | None = None) -> int:
        """Queue a prompt (token ids, non-empty); returns its request id."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidArgument("prompt_ids", prompt, "at least one token id")
        request = Request(next(self._request_ids), prompt, params, cache_salt)
        self.requests[request.request_id] = request
        self.waiting.append(self._new_sequence(request, 0, prompt))
        return request.request_id

    def release(self, seq: Sequence) -> None:
        """Free a finished sequence that ``on_finish`` kept."""
        self._free(seq)

    def import_request(self, descriptor, first_token: int, params: SamplingParams, *, receive,
                       first_logits: torch.Tensor | None = None, num_cached_tokens: int = 0) -> int | None:
        """Take over a request whose prompt another engine computed (disaggregated decode).

        The block manager imports the prompt's pages (``import_sequence``: the ones its prefix
        cache holds stay, the others are to move), ``receive(plan)`` moves them here (e.g.
        ``cache.recv_pages``), and the sequence joins the running batch with ``first_token``,
        sampled by the prefill engine, as its first output.

        Returns:
            The request id, or ``None`` when the prompt's pages or a sequence slot are not free
            now (nothing changed, ``receive`` not called: step the engine and try again).
        """
        if params.n != 1:
            raise InvalidArgument("params.n", params.n, "1 for an imported request")
        if params.max_new_tokens < 2 or int(first_token) in params.stop_token_ids:
            raise InvalidArgument("params.max_new_tokens", params.max_new_tokens,
                                  ">= 2 and a first token that is not a stop token: otherwise the prefill engine's "
                                  "output is already complete, and there is nothing to import")
        if descriptor.token_ids is None:
            raise InvalidArgument("descriptor.token_ids", None, "the prompt's token ids (export_sequence(..., token_ids=))")
        if len(self.running) >= self.config.max_num_seqs:
            return None
        prompt = [int(t) for t in descriptor.token_ids]
        request = Request(next(self._request_ids), prompt, params, descriptor.cache_salt)
        seq = self._new_sequence(request, 0, prompt)
        try:
            plan = self.mgr.import_sequence(seq.seq_id, descriptor)
        except OutOfPages:
            return None  # NOTE: the import is all or nothing
        self._offload()
        self.requests[request.request_id] = request
        self._bind(seq)
        self.worker.copy(plan.copies)  # a whole-prompt hit's last page, before the transfer lands
        receive(plan)
        if self.config.enable_prefix_caching:
            self.mgr.commit(seq.seq_id, len(prompt))  # its K/V has arrived: matchable from now
        seq.num_computed = seq.prefill_end = len(prompt)
        seq.tokens.append(int(first_token))
        request.first_logits, request.num_cached_tokens = first_logits, num_cached_tokens
        self.stats.num_cached_tokens += plan.num_cached_tokens
        self.running.append(seq)  # decodes from the next step
        return request.request_id

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def generate(self, prompts, params: SamplingParams = SamplingParams()) -> list[RequestOutput]:
        """Run ``prompts`` (lists of token ids) to completion; outputs in prompt order."""
        ids = [self.add_request(p, params) for p in prompts]
        done = {}
        while self.has_unfinished():
            done.update((out.request_id, out) for out in self.step())
        return [done[i] for i in ids]

    def step(self) -> list[RequestOutput]:
        """Schedule, run and sample one batch; returns the requests that finished in it."""
        budget = self.config.max_num_batched_tokens
        decoders, decode_slots, cow_copies, preempted = self._grow_decoders()
        budget -= len(decoders)
        chunks: list[tuple[Sequence, int]] = []  # (sequence, tokens computed this step)
        for seq in sorted(self.running, key=lambda s: s.priority):
            if seq.is_prefilling and budget > 0:
                chunks.append((seq, min(self.config.chunk_size, seq.prefill_end - seq.num_computed, budget)))
                budget -= chunks[-1][1]
        if not preempted:  # NOTE: admitting right after a preemption would only thrash
            self._swap_in()
            self._admit(chunks, budget)
        if not decoders and not chunks:
            self.worker.flush()
            self.mgr.end_step()  # the copies of this step (swaps) have run
            self._publish()
            return []
        # NOTE: each chunk's K/V is written by this step's forward pass, before any attention
        # reads it, so its pages may become matchable now. Committed after the admissions, so a
        # prompt admitted in this step never finds them: a whole-prompt hit copies its last page
        # at admission, before the forward pass would have written it.
        for seq, n in chunks:
            self.mgr.commit(seq.seq_id, seq.num_computed + n)

        in_use = self.mgr.num_pages - self.mgr.num_free_pages
        self.stats.peak_pages_in_use = max(self.stats.peak_pages_in_use, in_use)
        self.stats.peak_running = max(self.stats.peak_running, len(self.running))
        self.stats.num_steps += 1
        self.worker.copy(cow_copies)  # copy-on-write before this step's writes
        logits, batch = self._run(decoders, decode_slots, chunks)
        # NOTE: every copy of this step has run: the pages only they held can be reused. (The
        # next step's append_batch would release them too; a step without decoders has none.)
        self.mgr.end_step()
        outputs = self._process(logits, batch)
        self._publish()
        return outputs

    def _publish(self) -> None:
        """The step's KV events (its allocations, appends, evictions and frees) to the router."""
        if self.publisher is not None:
            self.publisher.publish(self.mgr.take_events())

    def close(self) -> None:
        """Send the queued KV events and close the publisher."""
        if self.publisher is not None:
            self.publisher.close()

    # ------------------------------------------------------------- scheduling
    def _offload(self) -> None:
        """Run the prefix cache's CPU-tier moves of the last manager call, before its copies.

        NOTE: this engine executes each call's copies at once, so the moves of each call that
        may take a GPU page (append_batch, swap_in, allocate) run right after it: a demotion
        reads a page the call handed out again, and an admission copy may read a promoted page.
        """
        if self.config.cpu_prefix_cache:
            self.worker.offload(self.mgr.take_offload())

    def _new_sequence(self, request: Request, child: int, tokens: list[int]) -> Sequence:
        gen = None
        if request.params.temperature > 0:
            gen = torch.Generator(device=self.device)
            if request.params.seed is None:
                gen.seed()
            else:
                gen.manual_seed(request.params.seed + child)
        seq = Sequence(next(self._seq_ids), request, child, list(tokens), gen)
        request.sequences.append(seq)
        return seq

    def _grow_decoders(self):
        """One ``append_batch`` for every decoding sequence, preempting until it fits."""
        preempted = False
        while True:
            decoders = sorted((s for s in self.running if not s.is_prefilling), key=lambda s: s.priority)
            if not decoders:
                empty = np.zeros((self.num_groups, 0) if self.hybrid else 0, np.int64)
                return [], empty, np.zeros((0, 2), np.int32), preempted
            ids = [s.seq_id for s in decoders]
            # NOTE: the appended token is the last sampled one; with prefix caching its id makes
            # the page it fills matchable by later prompts.
            token_ids = [s.tokens[-1] for s in decoders] if self.config.enable_prefix_caching else None
            try:
                step = self.mgr.append_batch(ids, 1, token_ids=token_ids)
                self._offload()
            except OutOfPages:
                # NOTE: the victim is the latest arrival, even in the middle of its prefill:
                # only its committed pages are matchable, and their K/V was written by earlier
                # steps, so freeing it leaves no matchable page without K/V.
                if len(self.running) == 1:
                    raise  # one sequence alone does not fit: the cache is too small for it
                self._preempt(max(self.running, key=lambda s: s.priority))
                preempted = True
                continue
            return decoders, step.slot_mapping, step.copies, preempted

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.stats.num_preemptions += 1
        if self.config.preemption == "swap" and self.mgr.can_swap_out([seq.seq_id]):
            self.worker.swap(self.mgr.swap_out([seq.seq_id]))  # before any page is reused
            self._unbind(seq)
            self.swapped.append(seq)
            self.stats.num_swap_outs += 1
            return
        self._free(seq)
        seq.num_computed = seq.prefill_end = 0  # prompt + output so far are prefilled again
        self.waiting.appendleft(seq)  # victims go lowest priority first, so this keeps the order
        self.stats.num_recomputes += 1

    def _swap_in(self) -> None:
        self.swapped.sort(key=lambda s: s.priority)
        while self.swapped and len(self.running) < self.config.max_num_seqs:
            seq = self.swapped[0]
            if not self.mgr.can_swap_in([seq.seq_id]):
                return
            plan = self.mgr.swap_in([seq.seq_id])
            self._offload()
            self.worker.swap(plan)
            self._bind(seq)
            self.running.append(self.swapped.pop(0))  # decodes from the next step

    def _prefix_in_flight(self, seq: Sequence) -> bool:
        """Whether a prefill in flight will commit full pages of ``seq``'s prefix that are not
        matchable yet (same salt): ``seq`` would find more of its prompt cached by waiting."""
        if self.state_pages:
            return False  # NOTE: a state group accepts no hit, so waiting would find nothing
        ps = self.config.page_size
        for other in self.running:
            if not other.is_prefilling or other.request.cache_salt != seq.request.cache_salt:
                continue
            shared = _common_prefix_len(seq.tokens, other.tokens[:other.prefill_end])
            if shared // ps > other.num_computed // ps:
                return True
        return False

    def _admit(self, chunks: list, budget: int) -> None:
        """Allocate waiting prompts that fit and append their first chunk to ``chunks``."""
        while self.waiting and not self.swapped and budget > 0:
            seq = self.waiting[0]
            params, request = seq.request.params, seq.request
            fork_room = params.n - 1 if request.num_cached_tokens is None else 0
            if len(self.running) + 1 + fork_room > self.config.max_num_seqs:
                break
            # NOTE: in-batch prefix sharing (as SGLang's scheduler does): a prompt whose prefix
            # another prefill is still computing waits until those pages are committed, rather
            # than computing the same prefix again alongside it. Prompts that share nothing
            # not yet cached with a prefill in flight are admitted at once.
            if self.config.enable_prefix_caching and self._prefix_in_flight(seq):
                break
            prompt = dict(token_ids=seq.tokens, cache_salt=request.cache_salt)
            if not self.mgr.can_allocate(**prompt) and (self.running or self.swapped):
                break  # otherwise allocate raises OutOfPages: the prompt can never fit
            # NOTE: nothing of the prompt is computed yet: with prefix caching, only the pages
            # found cached count as committed; ``step`` commits the chunks as they are scheduled.
            allocation = self.mgr.allocate(seq.seq_id, **prompt, num_computed_tokens=0)
            self._bind(seq)
            self._offload()
            self.waiting.popleft()
            seq.num_computed, seq.prefill_end = allocation.num_cached_tokens, len(seq.tokens)
            if request.num_cached_tokens is None:
                request.num_cached_tokens = allocation.num_cached_tokens
            self.stats.num_cached_tokens += allocation.num_cached_tokens
            # NOTE: copied now, while the source page is surely intact (a later allocation could
            # evict it). A copy means the whole prompt was cached. The source page was committed
            # by an earlier step's chunk (this step's chunks are committed after admission), so
            # its K/V is written; if a decode token of this step filled it, its one unwritten
            # slot is the prompt's last position, which this sequence computes and writes itself
            # after the copy.
            self.worker.copy(allocation.copies)
            self.running.append(seq)
            chunks.append((seq, min(self.config.chunk_size, seq.prefill_end - seq.num_computed, budget)))
            budget -= chunks[-1][1]

    # ---------------------------------------------------------------- running
    def _run(self, decoders, decode_slots, chunks):
        """Plan the batch once, run the model; returns logits and the rows' sequences."""
        batch = [(s, 1) for s in decoders] + chunks
        slots = [decode_slots] + [self.mgr.slots(s.seq_id, s.num_computed, s.num_computed + n) for s, n in chunks]
        query_lens = np.array([n for _, n in batch])
        seq_lens = np.array([s.num_computed + n for s, n in batch])  # K/V present after this step
        width = max(-(-int(seq_lens.max()) // self.config.page_size), self.state_pages)
        g = self.num_groups
        if not self.hybrid:
            table = self.table[[s.row for s, _ in batch], :width]  # the rows the block manager keeps current
        else:  # group j of the sequence in row r is row r * g + j
            table = np.stack([self.table[[s.row * g + j for s, _ in batch], :width] for j in range(g)])

        token_ids = [s.tokens[-1] for s in decoders]
        positions = [s.num_computed for s in decoders]
        rows, finishing, row = list(range(len(decoders))), list(decoders), len(decoders)
        for seq, n in chunks:
            token_ids += seq.tokens[seq.num_computed:seq.num_computed + n]
            positions += range(seq.num_computed, seq.num_computed + n)
            row += n
            if seq.num_computed + n == seq.prefill_end:  # its last prompt token: sample from it
                rows.append(row - 1)
                finishing.append(seq)
        for seq, n in batch:
            seq.num_computed += n
        self.stats.num_decode_tokens += len(decoders)
        self.stats.num_prefill_tokens += int(query_lens.sum()) - len(decoders)
        self.stats.num_prefill_chunks += len(chunks)
        step = ModelInput(table, seq_lens, query_lens, np.concatenate(slots, axis=-1),
                          np.array(token_ids, dtype=np.int64),
                          np.array(positions, dtype=np.int64), np.array(rows, dtype=np.int64))
        return self.worker.execute(step), finishing

    def _process(self, logits: torch.Tensor, finishing: list[Sequence]) -> list[RequestOutput]:
        finished = []
        greedy = logits.argmax(dim=-1).tolist()  # NOTE: one device sync per step, not one per row
        for row, best, seq in zip(logits, greedy, finishing):
            request = seq.request
            targets = [seq]
            if request.first_logits is None:
                request.first_logits = row.float().cpu()
                # Parallel sampling: the children share every page of the prompt (ref_count += 1).
                later = []
                for child in range(1, request.params.n):
                    sibling = self._new_sequence(request, child, seq.tokens)
                    try:
                        copies = self.mgr.fork(seq.seq_id, sibling.seq_id)
                    except OutOfPages:
                        # NOTE: no pages for the child's own copy of the state (a state group's
                        # pages are copied, not shared): it computes the prompt itself later,
                        # and samples its first token from those (equal) logits.
                        later.append(sibling)
                        continue
                    if copies is not None and len(copies):
                        self.worker.copy(copies)  # NOTE: a state group's pages are copied, not shared
                    self._bind(sibling)
                    sibling.num_computed, sibling.prefill_end = seq.num_computed, seq.prefill_end
                    self.running.append(sibling)
                    targets.append(sibling)
                self.waiting.extendleft(reversed(later))  # NOTE: first in line: the oldest request
            for target in targets:
                token = best if request.params.temperature == 0 else self._sample(row, target)
                target.tokens.append(token)
                if len(target.output_ids) >= request.params.max_new_tokens or token in request.params.stop_token_ids:
                    self.running.remove(target)
                    if self.on_finish is None:
                        self._free(target)
                    else:
                        self.on_finish(target)  # NOTE: it owns the pages now, until release()
                    request.num_finished += 1
                    if request.num_finished == request.params.n:
                        finished.append(self._output(request))
        return finished

    def _bind(self, seq: Sequence) -> None:
        """Give a sequence that starts running a row of the persistent page table."""
        seq.row = self.free_rows.pop()
        self.mgr.set_row(seq.seq_id, seq.row)

    def _unbind(self, seq: Sequence) -> None:
        self.mgr.set_row(seq.seq_id, None)
        self.free_rows.append(seq.row)
        seq.row = -1

    def _free(self, seq: Sequence) -> None:
        self.mgr.free(seq.seq_id)  # NOTE: clears and unbinds its row
        self.free_rows.append(seq.row)
        seq.row = -1

    def _sample(self, logits: torch.Tensor, seq: Sequence) -> int:
        """One token from ``logits`` ``[vocab_size]`` with the sequence's own generator."""
        params = seq.request.params
        scaled = logits.float() / params.temperature
        if params.top_k is not None and params.top_k < scaled.shape[0]:
            kth = torch.topk(scaled, params.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=seq.generator))

    def _output(self, request: Request) -> RequestOutput:
        del self.requests[request.request_id]
        children = sorted(request.sequences, key=lambda s: s.child)
        return RequestOutput(request.request_id, request.prompt_ids, [s.output_ids for s in children],
                             request.num_cached_tokens or 0, request.first_logits)


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


# --------------------------------------------------------------------------- demo model
def tiny_llama(*, vocab_size: int = 256, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 8,
               num_kv_heads: int = 2, head_dim: int = 16, max_positions: int = 512, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A small ``LlamaForCausalLM`` with random weights and GQA, built locally (nothing downloaded).

    NOTE: ``initializer_range=0.2`` (Llama's default is 0.02) makes the random model's logits
    peaked enough that greedy decoding is well separated from the runner-up token and the
    generated text is not one repeated token.
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ModuleNotFoundError:
        raise SystemExit("examples/engine.py needs transformers: pip install torch==2.13.0 && "
                         "pip install '.[examples]' (the CPU build of torch first, see the README)") from None

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, head_dim=head_dim, max_position_embeddings=max_positions,
                         initializer_range=0.2, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def _next_port(endpoint: str) -> str:
    """The replay endpoint beside a tcp publisher endpoint: the next port (a wildcard stays)."""
    base, _, port = endpoint.rpartition(":")
    return f"{base}:{int(port) + 1}" if port.isdigit() else f"{base}:*"


def _demo(kv_events: str | None = None) -> int:
    """Three runs that show what the engine does, each checked against ``model.generate``.

    1. Tight memory: four requests whose pages cannot all fit, so sequences are preempted
       (swapped to the CPU tier, or freed and recomputed) and resumed.
    2. Prefix caching: requests that share a system prompt, and a second turn that resends a
       first turn's prompt and answer, find those pages cached.
    3. Parallel sampling: one prompt with ``n=3`` forks three children that share its pages.

    Returns the exit code: 0 when every greedy output equals ``model.generate``'s.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llama(device=device)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=12)
    failures = 0

    def check(title: str, prompts, outputs) -> None:
        nonlocal failures
        print(title)
        for prompt, out in zip(prompts, outputs):
            want = model.generate(torch.tensor([prompt], device=device), max_new_tokens=12, do_sample=False)
            same = want[0, len(prompt):].tolist() == out.output_ids[0]
            failures += not same
            print(f"  prompt {len(prompt):3d} tokens, {out.num_cached_tokens:3d} found cached -> "
                  f"{out.output_ids[0]}  {'== model.generate' if same else 'DIFFERS from model.generate'}")

    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 40, 17, 64)]
    for preemption in ("swap", "recompute"):
        engine = Engine(model, EngineConfig(num_pages=19, page_size=4, max_num_batched_tokens=48, chunk_size=16,
                                            preemption=preemption, num_cpu_pages=32))
        check(f"1. 19 pages of 4 tokens for 4 requests that need 41 in all: preemption by {preemption}", prompts,
              engine.generate(prompts, params))
        s = engine.stats
        print(f"  {s.num_preemptions} preemptions ({s.num_swap_outs} swapped out, {s.num_recomputes} recomputed), "
              f"peak {s.peak_pages_in_use} of 19 pages in use, {s.num_steps} steps")

    system = torch.randint(0, 256, (32,), generator=gen).tolist()
    turn1 = [system + torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 11)]
    engine = Engine(model, EngineConfig(num_pages=128, page_size=4, enable_prefix_caching=True, kv_events=kv_events))
    if kv_events is not None:
        import time

        print(f"  publishing KV events on {engine.publisher.endpoint} (replay {engine.publisher.replay_endpoint})")
        time.sleep(0.5)  # NOTE: a subscriber that starts now sees the first batch live
    first = engine.generate(turn1, params)
    turn2 = [prompt + out.output_ids[0] + torch.randint(0, 256, (5,), generator=gen).tolist()
             for prompt, out in zip(turn1, first)]
    check("2. prefix caching: two requests share a 32-token system prompt, then each sends a second turn",
          turn1 + turn2, first + engine.generate(turn2, params))
    print(f"  {engine.stats.num_cached_tokens} prompt tokens found cached in all, "
          f"hit rate {engine.mgr.prefix_cache_stats().hit_rate:.2f}")
    engine.close()
    if kv_events is not None:
        print(f"  {engine.publisher.num_sent} KV event batches published ({engine.publisher.num_dropped} dropped)")

    engine = Engine(model, EngineConfig(num_pages=64, page_size=4))
    request_id = engine.add_request(prompts[1], SamplingParams(max_new_tokens=8, temperature=1.0, n=3, seed=7))
    shared = 0
    while engine.has_unfinished():
        outputs = engine.step()
        running = engine.running
        if len(running) == 3 and not shared:
            tables = [engine.mgr.page_table(seq.seq_id) for seq in running]
            shared = sum(engine.mgr.ref_count(p) == 3 for p in tables[0])
    (out,) = [o for o in outputs if o.request_id == request_id]
    print(f"3. parallel sampling: n=3 children of a {len(prompts[1])}-token prompt share {shared} of its "
          "pages (ref count 3)")
    for i, ids in enumerate(out.output_ids):
        print(f"  child {i}: {ids}")
    print("all greedy outputs equal model.generate" if not failures else f"{failures} outputs DIFFER")
    return 1 if failures else 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="pagedkv's example engine: three runs checked against model.generate")
    parser.add_argument("--kv-events", metavar="ENDPOINT", default=None,
                        help="publish the prefix-caching run's KV events in vLLM's format on this ZeroMQ endpoint "
                        "(e.g. 'tcp://*:5557', which binds; replay on the next port); see examples/kv_events_subscriber.py")
    parser.add_argument("--tp", metavar="N", type=int, default=None,
                        help="tensor parallel over N processes (gloo on the CPU, NCCL on GPUs; or run under torchrun): "
                        "checks that the tokens equal a single-process run's (examples/engine_dist.py)")
    parser.add_argument("--disagg", action="store_true",
                        help="disaggregated prefill/decode: a prefill process ships each prompt's KV pages to a decode "
                        "process; checks that the tokens equal a single engine's")
    args = parser.parse_args()
    if args.tp is not None or args.disagg:
        if args.tp is not None and args.disagg:
            parser.error("--tp and --disagg are separate demos: give one")
        import engine_dist  # NOTE: beside this file; imports this module as ``engine``

        sys.exit(engine_dist.main("tp", args.tp) if args.tp is not None else engine_dist.main("disagg", 2))
    sys.exit(_demo(args.kv_events))
