"""Kernels on quantized pages compile for CUDA: fp8 and int8 for sm_90, int8 for sm_80.

Like test_compile_cuda.py, one worker process compiles every case through the real launchers
on ``meta`` tensors; the worker is this file run as a script (it reuses compile_worker.py's
compile and resource-usage helpers, adding the 1-byte pointer types). fp8 e4m3 is not a type
Triton offers for sm_80, which is why ``PagedKVCache`` and the launchers refuse fp8 pages on
GPUs of compute capability < 8.9; one case checks that premise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Largest shared memory per block (opt-in): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


def _cases() -> list[dict]:
    # NOTE: every attention kernel meets every (format, scale layout) on sm_90 and int8 on
    # sm_80; query dtype, head dim, GQA ratio, page size and split-KV rotate across them.
    cases = []
    layouts = [(90, "fp8", "per_tensor"), (90, "fp8", "per_token_head"), (90, "int8", "per_token_head"),
               (80, "int8", "per_token_head")]
    rotations = [("fp16", 128, 4, 16), ("bf16", 64, 8, 1), ("fp32", 256, 1, 3), ("fp16", 96, 16, 256)]
    for i, (arch, fmt, layout) in enumerate(layouts):
        for j, kernel in enumerate(("decode", "prefill", "write_kv")):
            q_dtype, head_dim, group, page_size = rotations[(i + j) % len(rotations)]
            case = dict(kernel=kernel, arch=arch, fmt=fmt, layout=layout, dtype=q_dtype, head_dim=head_dim)
            if kernel != "write_kv":
                case.update(group=group, page_size=page_size)
            if kernel == "decode":
                case["num_splits"] = (1, 4)[i % 2]
            cases.append(case)
    for arch in (80, 90):
        cases.append(dict(kernel="copy_pages", arch=arch, fmt="bytes", layout="-", dtype="u8", head_dim=128))
        cases.append(dict(kernel="copy_pages", arch=arch, fmt="scales", layout="-", dtype="fp32", head_dim=128))
    return cases


CASES = _cases()
#: Compiling e4m3 for sm_80 must fail (the premise of the capability check).
FP8_ON_SM80 = dict(kernel="decode", arch=80, fmt="fp8", layout="per_tensor", dtype="fp16", head_dim=128, group=4,
                   page_size=16, num_splits=1)


def _case_id(case: dict) -> str:
    extras = "-".join(f"{k}{v}" for k, v in case.items()
                      if k not in ("kernel", "arch", "fmt", "layout", "dtype", "head_dim"))
    return (f"{case['kernel']}-sm{case['arch']}-{case['fmt']}-{case['layout']}-q{case['dtype']}-d{case['head_dim']}"
            + (f"-{extras}" if extras else ""))


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict[str, dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache-quant"))  # compile for real, every run
    proc = subprocess.run([sys.executable, __file__], input=json.dumps(CASES + [FP8_ON_SM80]), capture_output=True,
                          text=True, env=env, timeout=900)
    if proc.returncode:
        pytest.fail(f"compile worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {_case_id(item["case"]): item for item in json.loads(proc.stdout)}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_compiles(compiled, case, record_property):
    item = compiled[_case_id(case)]
    assert "error" not in item, item.get("error")
    assert item["results"], "the launcher launched no kernel"
    for result in item["results"]:
        assert result["ok"], f"{result['kernel']} failed to compile for sm_{case['arch']}:\n{result['error']}"
        assert result["has_cubin"]
        assert result["shared"] <= SHARED_LIMIT[case["arch"]], (
            f"{result['kernel']} needs {result['shared']} B of shared memory, more than sm_{case['arch']} has")
        record_property(f"{result['kernel']}_shared_bytes", result["shared"])
        record_property(f"{result['kernel']}_registers", result.get("registers"))
        record_property(f"{result['kernel']}_spill_bytes", result.get("stack"))


def test_fp8_e4m3_does_not_compile_for_sm80(compiled):
    item = compiled[_case_id(FP8_ON_SM80)]
    results = item["results"]
    assert results and not any(r["ok"] for r in results), "e4m3 compiled for sm_80: the capability check is stale"
    assert "fp8e4nv" in results[0]["error"]


# ----------------------------------------------------------------------------- worker
def _call_quant_launcher(case: dict, modules: dict) -> None:
    """Call the launcher of ``case`` on meta tensors (replaces compile_worker._call_launcher)."""
    import torch

    meta = torch.device("meta")
    q_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(case["dtype"])
    cache_dtype = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}.get(case["fmt"])
    head_dim, group = case["head_dim"], case.get("group", 1)
    num_kv_heads, page_size, num_seqs, num_pages = 8, case.get("page_size", 16), 4, 1024
    if case["kernel"] == "copy_pages":
        if case["fmt"] == "bytes":  # PagedKVCache copies quantized pages as bytes
            caches = torch.empty((64, num_pages, page_size, num_kv_heads, head_dim), dtype=torch.uint8, device=meta)
        else:
            caches = torch.empty((64, num_pages, page_size, num_kv_heads), dtype=torch.float32, device=meta)
        modules["copy_pages"].copy_pages(caches, torch.empty((5, 2), dtype=torch.int32, device=meta))
        return
    k_cache = torch.empty((num_pages, page_size, num_kv_heads, head_dim), dtype=cache_dtype, device=meta)
    v_cache = torch.empty_like(k_cache)
    if case["layout"] == "per_token_head":
        scale_cache = torch.empty((num_pages, page_size, num_kv_heads), dtype=torch.float32, device=meta)
        scales = dict(k_scale_cache=scale_cache, v_scale_cache=torch.empty_like(scale_cache))
    else:
        scales = dict(k_scale=0.05, v_scale=0.02)
    table = torch.empty((num_seqs, 37), dtype=torch.int32, device=meta)
    seq_lens = torch.empty((num_seqs,), dtype=torch.int32, device=meta)
    if case["kernel"] == "decode":
        q = torch.empty((num_seqs, num_kv_heads * group, head_dim), dtype=q_dtype, device=meta)
        modules["decode"].paged_decode(q, k_cache, v_cache, table, seq_lens, num_splits=case["num_splits"], **scales)
    elif case["kernel"] == "prefill":
        q = torch.empty((300, num_kv_heads * group, head_dim), dtype=q_dtype, device=meta)
        qo_indptr = torch.empty((num_seqs + 1,), dtype=torch.int32, device=meta)
        modules["prefill"].paged_prefill(q, k_cache, v_cache, table, seq_lens, qo_indptr, max_q_len=200, **scales)
    elif case["kernel"] == "write_kv":
        k = torch.empty((300, num_kv_heads, head_dim), dtype=q_dtype, device=meta)
        slots = torch.empty((300,), dtype=torch.int64, device=meta)
        modules["write_kv"].write_kv(k, torch.empty_like(k), k_cache, v_cache, slots, **scales)
    else:
        raise ValueError(f"unknown kernel {case['kernel']!r}")


def _main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import compile_worker  # pops TRITON_INTERPRET before triton is imported
    import torch

    compile_worker._TRITON_TYPES.update({torch.int8: "i8", torch.uint8: "u8", torch.float8_e4m3fn: "fp8e4nv"})
    compile_worker._call_launcher = _call_quant_launcher
    compile_worker.main()


if __name__ == "__main__":
    _main()
