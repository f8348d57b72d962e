"""The example engine beyond one device: tensor parallel (``--tp N``) and disaggregated
prefill/decode (``--disagg``), over ``torch.distributed`` (gloo on the CPU, NCCL on GPUs).

Run it through ``examples/engine.py``::

    python examples/engine.py --tp 2       # starts 2 processes (torch.multiprocessing)
    torchrun --nproc-per-node 2 examples/engine.py --tp 2
    python examples/engine.py --disagg     # a prefill process and a decode process

**Tensor parallel.** Rank 0 owns the ``BlockManager`` and schedules, as the single-process
engine does; its ``Engine`` drives a ``TPDriver`` instead of a local ``Worker``. The driver
queues the step's device work (copy-on-write and admission copies, swaps, CPU-tier moves, the
forward pass's plan inputs: page-table rows, lengths, slot mapping, token ids, positions) and
sends it to every rank in one ``pagedkv.distributed.broadcast_arrays`` per step; every rank,
rank 0 included, then executes the same message on its own ``Worker``. Each rank's
``PagedKVCache`` holds ``num_kv_heads / N`` heads. q/k/v and the MLP's gate/up projections are
split by output rows (heads), o_proj and down_proj by input columns, each followed by an
``all_reduce``. The embedding and LM head are replicated (vLLM splits the vocabulary too).
Rank 0 samples; the sampled tokens reach the other ranks as the next step's token ids.

**Disaggregated prefill/decode.** Rank 0 runs a prefill engine (one output token per request)
that keeps each finished sequence's pages (``Engine.on_finish``) and ships it: the
``export_sequence`` descriptor, the first token. Rank 1's decode engine imports it
(``Engine.import_request``: pages its prefix cache already holds stay, ``recv_pages`` fills
the others) and sends the transfer plan back, so rank 0 sends only those pages
(``send_pages``) and then frees its copy.

Each run compares its tokens with a single-process engine's on the same prompts, prints the
result, and exits non-zero when they differ.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine import Engine, EngineConfig, ModelInput, SamplingParams, Worker, tiny_llama
from pagedkv.distributed import broadcast_arrays

# What a step message asks each rank to do, in order (each op's arrays follow the op codes).
STOP, CONFIGURE, COPY, SWAP_OUT, SWAP_IN, FORWARD = range(6)
NUM_ARRAYS = {STOP: 0, CONFIGURE: 1, COPY: 1, SWAP_OUT: 1, SWAP_IN: 1, FORWARD: len(ModelInput._fields)}
SIZES = ("num_pages", "page_size", "num_cpu_pages", "max_num_seqs", "max_num_batched_tokens")
TIMEOUT = datetime.timedelta(seconds=120)  # NOTE: a rank that dies cannot hang the others long
MAX_NEW = 12
NUM_KV_HEADS = 4  # the demo model's: --tp 1, 2 or 4


# ------------------------------------------------------------------ tensor parallel
class ColumnParallelLinear(nn.Module):
    """Rows ``[rank * out / N, (rank + 1) * out / N)`` of a linear layer (whole heads)."""

    def __init__(self, linear: nn.Linear, rank: int, world: int):
        super().__init__()
        part = linear.out_features // world
        rows = slice(rank * part, (rank + 1) * part)
        self.in_features, self.out_features = linear.in_features, part
        self.weight = nn.Parameter(linear.weight.detach()[rows].clone(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach()[rows].clone(),
                                                                   requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Columns ``[rank * in / N, ...)`` of a linear layer, then ``all_reduce`` of the partial sums."""

    def __init__(self, linear: nn.Linear, rank: int, world: int, group=None):
        super().__init__()
        part = linear.in_features // world
        self.in_features, self.out_features, self.group = part, linear.out_features, group
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * part:(rank + 1) * part].clone(),
                                   requires_grad=False)
        # NOTE: the bias is added once, by rank 0, not N times by the all-reduce.
        self.bias = None if linear.bias is None or rank else nn.Parameter(linear.bias.detach().clone(),
                                                                           requires_grad=False)

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        dist.all_reduce(y, group=self.group)
        return y


def shard_llama(model, rank: int, world: int, group=None):
    """Make ``model`` (a Llama-family causal LM) rank ``rank``'s shard of ``world``, in place."""
    config = model.config
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if getattr(config, name) % world:
            raise SystemExit(f"--tp {world}: the model's {name} ({getattr(config, name)}) is not a multiple of it")
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), rank, world))
        attn.o_proj = RowParallelLinear(attn.o_proj, rank, world, group)
        mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, rank, world)
        mlp.up_proj = ColumnParallelLinear(mlp.up_proj, rank, world)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, rank, world, group)
    return model


def _pairs(copies) -> np.ndarray:
    return np.asarray(copies, dtype=np.int64).reshape(-1, 2)


class TPDriver:
    """Rank 0's worker: queues the device work of a step, broadcasts it, and executes it here too.

    Every rank executes each message in the same order, so all ranks' caches hold the same
    pages of their own heads, and the forward pass's all-reduces line up.
    """

    def __init__(self, model, config: EngineConfig, group=None):
        self.group = group
        self.local = Worker(model, config)
        self.cache, self.device = self.local.cache, self.local.device
        self.groups, self.max_pages = self.local.groups, self.local.max_pages  # one full group: Llama
        self.pending: list[tuple[int, list]] = []
        self.num_messages = 0
        self.num_ops = dict.fromkeys(("copy", "swap out", "swap in", "forward"), 0)
        self._send([(CONFIGURE, [np.array([getattr(config, name) for name in SIZES])])])

    def copy(self, copies) -> None:
        if len(copies):
            self.pending.append((COPY, [_pairs(copies)]))

    def swap(self, swap_plan) -> None:
        direction = {"out": SWAP_OUT, "in": SWAP_IN}[swap_plan.direction]
        if len(swap_plan.copies):
            self.pending.append((direction, [_pairs(swap_plan.copies)]))

    def offload(self, offload_plan) -> None:
        # NOTE: demotions first, then promotions, as PagedKVCache.offload runs them.
        if len(offload_plan.demotions):
            self.pending.append((SWAP_OUT, [_pairs(offload_plan.demotions)]))
        if len(offload_plan.promotions):
            self.pending.append((SWAP_IN, [_pairs(offload_plan.promotions)]))

    def execute(self, step: ModelInput) -> torch.Tensor:
        self.pending.append((FORWARD, [np.asarray(a) for a in step]))
        return self.flush()

    def flush(self):
        ops, self.pending = self.pending, []
        return self._send(ops) if ops else None

    def stop(self) -> None:
        self._send([(STOP, [])])

    def _send(self, ops):
        arrays = [np.array([code for code, _ in ops], dtype=np.int64)] + [a for _, args in ops for a in args]
        self.num_messages += 1
        for code, _ in ops:
            name = {COPY: "copy", SWAP_OUT: "swap out", SWAP_IN: "swap in", FORWARD: "forward"}.get(code)
            if name:
                self.num_ops[name] += 1
        _, logits = execute_message(self.local, broadcast_arrays(arrays, 0, self.group), None, rank=0)
        return logits


def execute_message(worker: Worker | None, arrays: list, model, rank: int):
    """Run one step message on this rank's worker; returns ``(worker, logits)``, ``worker`` None after STOP."""
    codes, args = arrays[0], iter(arrays[1:])
    logits = None
    for code in codes.tolist():
        got = [next(args) for _ in range(NUM_ARRAYS[code])]
        if code == STOP:
            return None, None
        if code == CONFIGURE:
            if rank:  # NOTE: rank 0's TPDriver built its worker from the full config already
                sizes = dict(zip(SIZES, (int(v) for v in got[0])))
                worker = Worker(model, EngineConfig(chunk_size=1, **sizes))
        elif code == COPY:
            worker.cache.copy(got[0])
        elif code == SWAP_OUT:
            worker.cache.swap_out(got[0])
        elif code == SWAP_IN:
            worker.cache.swap_in(got[0])
        else:
            step = ModelInput(*got)
            if rank:  # NOTE: only rank 0 samples: the others skip the LM head's rows
                step = step._replace(logits_rows=step.logits_rows[:0])
            logits = worker.execute(step)
    return worker, logits


def serve_worker(model, rank: int, group=None) -> int:
    """Ranks > 0: execute rank 0's step messages until it says stop; returns the messages run."""
    worker, count = None, 0
    while True:
        count += 1
        worker, _ = execute_message(worker, broadcast_arrays(None, 0, group), model, rank)
        if worker is None:
            return count


def _workloads():
    """(title, config, prompts) runs, each checked against a single-process engine."""
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 40, 17, 64)]
    system = torch.randint(0, 256, (32,), generator=gen).tolist()
    shared = [system + torch.randint(0, 256, (n,), generator=gen).tolist() for n in (6, 11, 3, 20)]
    tight = dict(num_pages=19, page_size=4, max_num_batched_tokens=48, chunk_size=16, num_cpu_pages=32)
    return [
        ("preemption by swap", EngineConfig(preemption="swap", **tight), prompts),
        ("preemption by recompute", EngineConfig(preemption="recompute", **tight), prompts),
        ("prefix caching with a CPU tier, tight pool", EngineConfig(num_pages=40, page_size=4, enable_prefix_caching=True,
                                                                    num_cpu_pages=32, cpu_prefix_cache=True,
                                                                    max_num_batched_tokens=64, chunk_size=16),
         shared + prompts[:2] + shared),
    ]


def _tokens(outputs) -> list[list[int]]:
    return [out.output_ids[0] for out in outputs]


def run_tp(rank: int, world: int, device: torch.device) -> int:
    """One rank of ``--tp world``; rank 0 returns the exit code (0: every run's tokens identical)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    torch.set_num_threads(1)  # NOTE: N processes share the machine's cores
    model = tiny_llama(num_kv_heads=NUM_KV_HEADS, device=device)  # the same random weights on every rank
    params = SamplingParams(max_new_tokens=MAX_NEW)
    reference = [_tokens(Engine(model, config).generate(prompts, params)) for _, config, prompts in _workloads()] \
        if rank == 0 else None
    shard_llama(model, rank, world)
    if rank:
        serve_worker(model, rank)
        dist.destroy_process_group()
        return 0
    failures = 0
    for (title, config, prompts), want in zip(_workloads(), reference):
        driver = TPDriver(model, config)
        engine = Engine(None, config, worker=driver)
        got = _tokens(engine.generate(prompts, params))
        s = engine.stats
        same = got == want
        failures += not same
        print(f"TP={world} {title}: {len(prompts)} requests, {s.num_preemptions} preemptions "
              f"({s.num_swap_outs} swapped out, {s.num_recomputes} recomputed), {s.num_cached_tokens} prompt tokens "
              f"found cached; {driver.num_messages} step messages ("
              + ", ".join(f"{n} {name}" for name, n in driver.num_ops.items()) + ") -> tokens "
              f"{'identical to TP=1' if same else 'DIFFER from TP=1'}")
    driver.stop()
    dist.destroy_process_group()
    print(f"tensor parallel over {world} ranks ({backend}): "
          + ("every run's tokens are identical to TP=1" if not failures else f"{failures} runs DIFFER from TP=1"))
    return 1 if failures else 0


# ------------------------------------------------------------------ disaggregated prefill/decode
def _disagg_workload():
    gen = torch.Generator().manual_seed(1)
    system = torch.randint(0, 256, (24,), generator=gen).tolist()
    prompts = [system + torch.randint(0, 256, (n,), generator=gen).tolist() for n in (7, 30, 1, 13, 40)]
    prompts += [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 50)]
    config = EngineConfig(num_pages=96, page_size=4, enable_prefix_caching=True, max_num_batched_tokens=64, chunk_size=32)
    return config, prompts


def run_disagg(rank: int, device: torch.device) -> int:
    """Rank 0 prefills and ships KV; rank 1 imports and decodes. Rank 0 returns the exit code."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=2, timeout=TIMEOUT)
    torch.set_num_threads(1)
    model = tiny_llama(device=device)
    config, prompts = _disagg_workload()
    return (_prefill_side if rank == 0 else _decode_side)(model, config, prompts, backend)


def _prefill_side(model, config, prompts, backend) -> int:
    want = _tokens(Engine(model, config).generate(prompts, SamplingParams(max_new_tokens=MAX_NEW)))
    engine = Engine(model, config)
    held = []
    engine.on_finish = held.append  # NOTE: keep the finished prompt's pages until they are shipped
    tags = {engine.add_request(p, SamplingParams(max_new_tokens=1)): i for i, p in enumerate(prompts)}
    moved = 0
    while engine.has_unfinished():
        engine.step()
        for seq in held:
            prompt = seq.request.prompt_ids
            descriptor = engine.mgr.export_sequence(seq.seq_id, token_ids=prompt)
            message = [(tags[seq.request.request_id], descriptor, seq.tokens[-1], seq.request.first_logits)]  # one object
            dist.send_object_list(message, dst=1)
            transfers = [None]
            dist.recv_object_list(transfers, src=1)  # the pages the decode side lacks
            engine.cache.send_pages(transfers[0], 1)
            moved += len(transfers[0])
            engine.release(seq)
        held.clear()
        dist.send_object_list([None], dst=1)  # this step's shipments are done: decode one step
    dist.send_object_list(["done"], dst=1)
    result = [None]
    dist.recv_object_list(result, src=1)
    got, num_cached = result[0]
    same = got == want
    pages = sum(-(-len(p) // config.page_size) for p in prompts)
    print(f"disaggregated: {len(prompts)} prompts prefilled on rank 0, decoded on rank 1; {moved} of their {pages} "
          f"pages sent ({num_cached} prompt tokens found in the decode side's prefix cache) over {backend} -> tokens "
          f"{'identical to a single engine' if same else 'DIFFER from a single engine'}")
    dist.destroy_process_group()
    return 0 if same else 1


def _decode_side(model, config, prompts, backend) -> int:
    engine = Engine(model, config)
    params = SamplingParams(max_new_tokens=MAX_NEW)
    tags, done = {}, {}
    finished = False
    while not finished or engine.has_unfinished():
        while not finished:
            message = [None]
            dist.recv_object_list(message, src=0)
            if message[0] is None:
                break
            if message[0] == "done":
                finished = True
                break
            tag, descriptor, first_token, first_logits = message[0]

            def receive(plan):
                dist.send_object_list([plan.transfers], dst=0)
                engine.cache.recv_pages(plan.transfers, 0)

            while (request_id := engine.import_request(descriptor, first_token, params, receive=receive,
                                                       first_logits=first_logits)) is None:
                if not engine.has_unfinished():
                    raise SystemExit("the decode engine's pool cannot hold one imported prompt")
                done.update((out.request_id, out) for out in engine.step())
            tags[request_id] = tag
        done.update((out.request_id, out) for out in engine.step())
    got = [None] * len(prompts)
    for request_id, out in done.items():
        got[tags[request_id]] = out.output_ids[0]
    dist.send_object_list([(got, engine.stats.num_cached_tokens)], dst=0)
    dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------ launching
def _device(rank: int, world: int) -> torch.device:
    if torch.cuda.is_available() and torch.cuda.device_count() >= world:
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _entry(rank: int, mode: str, world: int) -> None:
    """A spawned process: run its rank and exit with rank 0's verdict."""
    code = (run_tp if mode == "tp" else lambda r, w, d: run_disagg(r, d))(rank, world, _device(rank, world))
    sys.exit(code)


def main(mode: str, world: int) -> int:
    """``--tp world`` or ``--disagg`` (world 2): under torchrun, this process's rank; otherwise
    start ``world`` processes on loopback and return the first non-zero exit code."""
    if world < 1 or NUM_KV_HEADS % world:
        raise SystemExit(f"--tp {world}: the demo model's {NUM_KV_HEADS} KV heads (and 8 query heads) split over "
                         "1, 2 or 4 ranks")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        rank = int(os.environ["RANK"])
        if int(os.environ["WORLD_SIZE"]) != world:
            raise SystemExit(f"torchrun started {os.environ['WORLD_SIZE']} processes but the run needs {world}")
        device = _device(int(os.environ.get("LOCAL_RANK", rank)), world)
        return run_tp(rank, world, device) if mode == "tp" else run_disagg(rank, device)
    import torch.multiprocessing as mp

    with socket.socket() as s:  # NOTE: loopback only
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        mp.spawn(_entry, args=(mode, world), nprocs=world, join=True)
    except mp.ProcessExitedException as e:
        print(f"rank {e.error_index} exited with code {e.exit_code}", file=sys.stderr)
        return e.exit_code or 1
    except mp.ProcessRaisedException as e:
        print(f"a rank failed:\n{e}", file=sys.stderr)
        return 1
    return 0
