"""Compile pagedkv's Triton kernels for a CUDA target without a GPU (run by test_compile_cuda.py).

Runs in its own process because the tests around it run the kernels in the interpreter
(``TRITON_INTERPRET=1`` turns every ``@triton.jit`` function into an interpreted one when it
is decorated, and those cannot be compiled). Reads a JSON list of cases on stdin and writes a
JSON list of results on stdout.

For each case the real launcher (``paged_decode``, ...) is called on ``meta`` tensors with the
kernel objects replaced by recorders, so the compiled signature, constexprs, tile sizes,
warps and stages are exactly what a CUDA launch would use. Integer arguments divisible by 16
and all pointers get Triton's ``tt.divisibility`` hint, as at a real launch.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pagedkv.kernels import _common  # noqa: E402

_common.check_device = lambda name, tensor: None  # meta tensors stand in for CUDA ones

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                 torch.int64: "i64"}


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, fn, calls: list):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def _launches(case: dict) -> list:
    """Call the launcher of ``case`` on meta tensors; return its recorded kernel launches."""
    modules = {name: importlib.import_module(f"pagedkv.kernels.{name}")
               for name in ("write_kv", "decode", "prefill", "copy_pages")}
    calls: list = []
    patched = []
    for module in modules.values():
        for attr, value in list(vars(module).items()):
            if isinstance(value, triton.runtime.JITFunction) and attr.endswith("_kernel"):
                setattr(module, attr, _Recorder(value, calls))
                patched.append((module, attr, value))
    try:
        _call_launcher(case, modules)
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)
    return calls


def _call_launcher(case: dict, modules: dict) -> None:
    meta = torch.device("meta")
    dtype = _DTYPES[case["dtype"]]
    head_dim, group = case["head_dim"], case.get("group", 1)
    num_kv_heads, page_size, num_seqs = case.get("num_kv_heads", 8), case.get("page_size", 16), 4
    num_pages = 1024
    k_cache = torch.empty((num_pages, page_size, num_kv_heads, head_dim), dtype=dtype, device=meta)
    v_cache = torch.empty_like(k_cache)
    table = torch.empty((num_seqs, 37), dtype=torch.int32, device=meta)
    seq_lens = torch.empty((num_seqs,), dtype=torch.int32, device=meta)
    options = dict(sliding_window=case.get("window"), logits_soft_cap=case.get("soft_cap"),
                   attention_chunk_size=case.get("chunk"))
    if case.get("first_page"):
        options["first_page"] = torch.empty((num_seqs,), dtype=torch.int32, device=meta)
    if case.get("sinks"):
        options["sinks"] = torch.empty((num_kv_heads * group,), dtype=torch.float32, device=meta)
    kernel = case["kernel"]
    if kernel == "decode":
        q = torch.empty((num_seqs, num_kv_heads * group, head_dim), dtype=dtype, device=meta)
        modules["decode"].paged_decode(q, k_cache, v_cache, table, seq_lens, num_splits=case.get("num_splits", 1),
                                       **options)
    elif kernel == "prefill":
        q = torch.empty((300, num_kv_heads * group, head_dim), dtype=dtype, device=meta)
        qo_indptr = torch.empty((num_seqs + 1,), dtype=torch.int32, device=meta)
        modules["prefill"].paged_prefill(q, k_cache, v_cache, table, seq_lens, qo_indptr, max_q_len=200, **options)
    elif kernel == "write_kv":
        k = torch.empty((300, num_kv_heads, head_dim), dtype=dtype, device=meta)
        slots = torch.empty((300,), dtype=torch.int64, device=meta)
        modules["write_kv"].write_kv(k, torch.empty_like(k), k_cache, v_cache, slots)
    elif kernel == "copy_pages":
        caches = torch.empty((64, num_pages, page_size, num_kv_heads, head_dim), dtype=dtype, device=meta)
        copies = torch.empty((5, 2), dtype=torch.int32, device=meta)
        modules["copy_pages"].copy_pages(caches, copies)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")


def _compile(fn, args, kwargs, arch: int):
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages") if key in kwargs}
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{param.name}: cannot type {value!r}")
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _resource_usage(cubin: bytes | None) -> dict:
    """Registers and stack (spill) bytes per thread from ``cuobjdump``, when it is available."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not cubin or not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        text = subprocess.run([tool, "--dump-resource-usage", handle.name], capture_output=True, text=True,
                              timeout=60).stdout
    finally:
        os.unlink(handle.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return dict(registers=int(found.group(1)), stack=int(found.group(2))) if found else {}


def run(case: dict) -> list[dict]:
    results = []
    for fn, args, kwargs in _launches(case):
        start = time.perf_counter()
        try:
            compiled = _compile(fn, args, dict(kwargs), case["arch"])
        except Exception:  # the test reports the compiler's message
            results.append(dict(kernel=fn.__name__, ok=False, error=traceback.format_exc(limit=3)))
            continue
        seconds = time.perf_counter() - start
        results.append(dict(kernel=fn.__name__, ok=True, shared=compiled.metadata.shared,
                            num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                            seconds=seconds, has_cubin=bool(compiled.asm.get("cubin")),
                            **_resource_usage(compiled.asm.get("cubin"))))
    return results


def main() -> None:
    cases = json.load(sys.stdin)
    out = []
    for case in cases:
        try:
            out.append(dict(case=case, results=run(case)))
        except Exception:
            out.append(dict(case=case, results=[], error=traceback.format_exc()))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
