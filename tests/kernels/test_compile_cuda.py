"""Every kernel compiles for CUDA sm_80 and sm_90 with ``triton.compile`` (no GPU needed).

The interpreter accepts programs the GPU compiler rejects (e.g. ``tl.dot`` with K < 16), so
this is the check that the kernels build for real hardware. One worker process
(compile_worker.py) compiles every case through the real launchers with a fresh Triton cache;
each test checks its case, and the run ends with a table of shared memory, registers and
spill bytes per kernel (also attached to each test as junit properties).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HEAD_DIMS = (64, 80, 96, 128, 256)
DTYPES = ("fp16", "bf16", "fp32")
#: Largest shared memory per block (opt-in): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 166912, 90: 232448}


def _cases() -> list[dict]:
    # NOTE: every kernel x head_dim x dtype once; the arch alternates so each kernel, head dim
    # and dtype is built for both sm_80 and sm_90, and GQA ratio, page size, split-KV, sliding
    # window and soft cap rotate across the attention cases.
    cases = []
    combos = list(itertools.product(HEAD_DIMS, DTYPES))
    for kernel in ("decode", "prefill", "write_kv", "copy_pages"):
        for i, (head_dim, dtype) in enumerate(combos):
            case = dict(kernel=kernel, arch=(80, 90)[i % 2], dtype=dtype, head_dim=head_dim)
            if kernel in ("decode", "prefill"):
                case.update(group=(1, 4, 8, 16)[i % 4], page_size=(16, 1, 3, 256)[i % 4],
                            soft_cap=30.0 if i % 3 == 0 else None, window=4096 if i % 5 == 1 else None)
                if case["window"]:
                    case["first_page"] = True  # live-pages-only tables (BlockManager.window_tables)
            if kernel == "decode":
                case["num_splits"] = (1, 4)[(i // 2) % 2]
            cases.append(case)
    # head dims that are multiples of 8 but not of 16 (padded to a power of two >= 16)
    for i, (kernel, head_dim, dtype) in enumerate([("decode", 8, "fp16"), ("decode", 72, "bf16"),
                                                   ("prefill", 24, "fp16"), ("prefill", 72, "bf16")]):
        case = dict(kernel=kernel, arch=(80, 90)[i % 2], dtype=dtype, head_dim=head_dim, group=4, page_size=16,
                    soft_cap=None, window=None)
        if kernel == "decode":
            case["num_splits"] = 4
        cases.append(case)
    # gpt-oss's attention: learned sinks with a 128-token window or without, head dim 64, 8:1 GQA
    for i, (kernel, splits, window) in enumerate([("decode", 1, 128), ("decode", 4, None), ("prefill", None, 128),
                                                  ("prefill", None, None)]):
        for arch in (80, 90):
            case = dict(kernel=kernel, arch=arch, dtype=("bf16", "fp16")[i % 2], head_dim=64, group=8, page_size=16,
                        soft_cap=None, window=window, sinks=True)
            if kernel == "decode":
                case["num_splits"] = splits
            cases.append(case)
    # Llama 4's chunked-local attention: 8192-token chunks, head dim 128, 5:1 GQA (Scout)
    for i, (kernel, splits) in enumerate([("decode", 1), ("decode", 4), ("prefill", None)]):
        for arch in (80, 90):
            case = dict(kernel=kernel, arch=arch, dtype="bf16", head_dim=128, group=5, page_size=16,
                        soft_cap=None, window=None, chunk=8192, first_page=i == 1)
            if kernel == "decode":
                case["num_splits"] = splits
            cases.append(case)
    return cases


CASES = _cases()


def _case_id(case: dict) -> str:
    extras = "-".join(f"{k}{v}" for k, v in case.items() if k not in ("kernel", "arch", "dtype", "head_dim")
                      and v is not None)
    return f"{case['kernel']}-sm{case['arch']}-{case['dtype']}-d{case['head_dim']}" + (f"-{extras}" if extras else "")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> dict[str, dict]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # compile for real, every run
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("compile_worker.py"))],
                          input=json.dumps(CASES), capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        pytest.fail(f"compile worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return {_case_id(item["case"]): item for item in json.loads(proc.stdout)}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_compiles(compiled, case, record_property, request):
    item = compiled[_case_id(case)]
    assert "error" not in item, item.get("error")
    assert item["results"], "the launcher launched no kernel"
    report = request.config.__dict__.setdefault("pagedkv_compile_report", [])
    for result in item["results"]:
        assert result["ok"], f"{result['kernel']} failed to compile for sm_{case['arch']}:\n{result['error']}"
        assert result["has_cubin"]
        assert result["shared"] <= SHARED_LIMIT[case["arch"]], (
            f"{result['kernel']} needs {result['shared']} B of shared memory, more than sm_{case['arch']} has")
        record_property(f"{result['kernel']}_shared_bytes", result["shared"])
        record_property(f"{result['kernel']}_registers", result.get("registers"))
        record_property(f"{result['kernel']}_spill_bytes", result.get("stack"))
        report.append(dict(kernel=result["kernel"], arch=case["arch"], dtype=case["dtype"],
                           head_dim=case["head_dim"], shared=result["shared"], registers=result.get("registers"),
                           stack=result.get("stack"), seconds=result["seconds"], case=_case_id(case)))
