"""Helpers shared by the benchmark CLIs: environment record and JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path


def environment() -> dict:
    """Versions and machine facts recorded beside every benchmark point."""
    import numpy

    import pagedkv

    return {
        "pagedkv": pagedkv.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_records(path: str | os.PathLike, records: list[dict]) -> Path:
    """Write one JSON record per line (JSON Lines) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print(f"wrote {len(records)} records to {path}", file=sys.stderr)
    return path
