"""A bounded run of the soak benchmark on the default backend (the full run is the benchmark)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import pagedkv  # noqa: E402
from soak import soak  # noqa: E402


def test_soak_bounded():
    result = soak(pagedkv.backend, num_ops=30_000, seed=1, check_every=500)
    assert result["final_state_equals_new"]
    # every kind of call ran, and the failure paths were exercised too
    assert set(result["op_counts"]) >= {"allocate", "append", "append_batch", "fork", "free", "swap_out",
                                         "swap_in", "release_window", "misuse"}
    assert result["errors"].get("OutOfPages", 0) > 0 and result["errors"].get("InvalidType", 0) > 0
