"""Kernel tests: Triton kernels against the torch reference, and compilation for sm_80/sm_90.

By default the kernels run in Triton's CPU interpreter. ``TRITON_INTERPRET`` is read when a
``@triton.jit`` function is *decorated*, so it is set here, before any test module imports
``pagedkv.kernels``. ``PAGEDKV_TEST_DEVICE=cuda`` runs the same tests on a GPU instead.
"""

from __future__ import annotations

import os

TEST_DEVICE = os.environ.get("PAGEDKV_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
# Triton 3.9 warns when this is unset; 1 is its current default (fused multiply-add on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

@pytest.fixture(scope="session")
def device() -> torch.device:
    if TEST_DEVICE != "cpu" and not torch.cuda.is_available():
        pytest.skip(f"PAGEDKV_TEST_DEVICE={TEST_DEVICE} but no CUDA device")
    return torch.device(TEST_DEVICE)


_TOLERANCES = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
               torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture
def assert_close():
    """``assert_close(got, want)`` with the tolerance of ``want``'s dtype (vs the fp32 reference)."""

    def check(got: torch.Tensor, want: torch.Tensor) -> None:
        assert not got.isnan().any(), "NaN in the kernel's output (an unused page tail leaked?)"
        torch.testing.assert_close(got, want, **_TOLERANCES[want.dtype])

    return check


@pytest.fixture
def paged_batch(device):
    """Factory: a K/V page pool holding ``seq_lens`` random tokens, NaN everywhere else.

    Pages are handed out in a random order (a fragmented pool), every page-table row is padded
    with -1 beyond its pages plus ``extra_cols`` more, and the unused tail of each last page
    (and every unused page) is NaN, so a kernel that reads past ``seq_len`` fails the test.
    """

    def make(seq_lens, *, page_size, num_kv_heads, head_dim, dtype, spare_pages=3, extra_cols=2, seed=0):
        gen = torch.Generator().manual_seed(seed)
        pages_per_seq = [math.ceil(n / page_size) for n in seq_lens]
        num_pages = sum(pages_per_seq) + spare_pages
        order = torch.randperm(num_pages, generator=gen).tolist()
        width = max(pages_per_seq, default=0) + extra_cols
        table = torch.full((len(seq_lens), width), -1, dtype=torch.int32)
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        k_cache = torch.full(shape, float("nan"), dtype=dtype)
        v_cache = torch.full(shape, float("nan"), dtype=dtype)
        for i, (n, count) in enumerate(zip(seq_lens, pages_per_seq)):
            table[i, :count] = torch.tensor(order[:count], dtype=torch.int32)
            order = order[count:]
            for pos in range(n):
                page, offset = table[i, pos // page_size].item(), pos % page_size
                k_cache[page, offset] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
                v_cache[page, offset] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
        return SimpleNamespace(
            k_cache=k_cache.to(device), v_cache=v_cache.to(device), page_table=table.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), gen=gen,
        )

    return make


def pytest_terminal_summary(terminalreporter, config):
    # NOTE: the figures are for reading on purpose (`pytest --kernel-report`), not in every run.
    if not config.getoption("--kernel-report"):
        return
    accuracy = getattr(config, "pagedkv_accuracy_report", None)  # set by test_quant_kernels.py
    if accuracy:
        terminalreporter.section("quantized KV accuracy (decode vs fp32 attention)")
        for line in accuracy:
            terminalreporter.write_line(line)
    report = getattr(config, "pagedkv_compile_report", None)  # set by test_compile_cuda.py
    if not report:
        return
    terminalreporter.section("Triton compile report (per kernel launch config)")
    terminalreporter.write_line(f"{'kernel':<24}{'arch':>5}{'dtype':>6}{'hdim':>5}{'shared B':>9}{'regs':>5}"
                                f"{'spill B':>8}{'s':>5}  case")
    for row in sorted(report, key=lambda r: (r["kernel"], r["arch"], r["dtype"], r["head_dim"])):
        terminalreporter.write_line(
            f"{row['kernel']:<24}{row['arch']:>5}{row['dtype']:>6}{row['head_dim']:>5}{row['shared']:>9}"
            f"{row['registers'] or '?':>5}{row['stack'] if row['stack'] is not None else '?':>8}"
            f"{row['seconds']:>5.1f}  {row['case']}"
        )
