import os

from hypothesis import HealthCheck, settings

# NOTE: "ci" bounds the run time of the suite; "dev" is quicker for local edits. Select with
# HYPOTHESIS_PROFILE (the .ci/run script sets ci).
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_addoption(parser):
    parser.addoption("--kernel-report", action="store_true", default=False,
                     help="print the Triton compile report (shared memory, registers, spills per kernel "
                     "config) and the quantized-cache accuracy figures after the run")


import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def run_python(tmp_path):
    """Run ``code`` in a fresh interpreter, outside the source tree.

    NOTE: ``python -c`` puts the current directory first on sys.path; from the repository root
    that would import the source tree (without the built C++ core) instead of the installed
    package, so these subprocesses run in a temporary directory.
    """

    def run(code: str, check: bool = True, **kwargs):
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                              check=check, **kwargs)

    return run


@pytest.fixture
def run_ranks(tmp_path):
    """Run ``script`` as ranks 0 and 1 (``argv``: rank, a free loopback port); returns their
    stdouts once both exited 0. torch.distributed tests use it (gloo on 127.0.0.1 only)."""
    import socket

    def run(script: str, timeout: float = 120) -> list[str]:
        torch = pytest.importorskip("torch")
        if not torch.distributed.is_available():
            pytest.skip("torch.distributed is not available")
        path = tmp_path / "worker.py"
        path.write_text(script)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = [subprocess.Popen([sys.executable, str(path), str(rank), str(port)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, cwd=tmp_path) for rank in range(2)]
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err
            outs.append(out)
        return outs

    return run
