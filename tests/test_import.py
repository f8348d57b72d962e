import subprocess
import sys


# NOTE: subprocesses run in tmp_path so that they import the installed pagedkv, not the source
# tree in the current directory.


def test_import_pagedkv_pulls_no_heavy_modules(tmp_path):
    code = (
        "import sys, pagedkv, pagedkv.cli\n"
        "heavy = [m for m in ('torch', 'triton', 'hypothesis', 'matplotlib') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "", f"import pagedkv imported {out.stdout.strip()}"


def test_backend_is_reported():
    import pagedkv

    assert pagedkv.backend in ("cpp", "python")
    assert pagedkv.BlockManager(4, 4).backend == pagedkv.backend


def test_unknown_backend_fails_loudly(tmp_path):
    code = "import pagedkv"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PAGEDKV_IMPL": "fortran", "PATH": ""})
    assert out.returncode != 0
    assert "fortran" in out.stderr and "BackendUnavailable" in out.stderr


def test_a_missing_optional_dependency_names_the_extra(tmp_path):
    # NOTE: a None entry in sys.modules makes `import torch` fail as if torch were not installed.
    code = (
        "import sys\n"
        "sys.modules['torch'] = sys.modules['triton'] = sys.modules['hypothesis'] = None\n"
        "sys.modules['matplotlib'] = None\n"
        "import pagedkv\n"
        "from pagedkv.errors import MissingDependency\n"
        "def message(fn):\n"
        "    try:\n"
        "        fn()\n"
        "    except MissingDependency as exc:\n"
        "        assert isinstance(exc, ModuleNotFoundError)\n"
        "        return str(exc)\n"
        "    return 'no error'\n"
        "import importlib\n"
        "print(message(lambda: pagedkv.PagedKVCache))\n"
        "print(message(lambda: importlib.import_module('pagedkv.cache')))\n"
        "print(message(lambda: importlib.import_module('pagedkv.kernels').paged_decode))\n"
        "print(message(lambda: importlib.import_module('pagedkv.testing')))\n"
        "from pagedkv import plot\n"
        "print(message(lambda: plot.plot_frag({}, 'x.png')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    lines = out.stdout.splitlines()
    assert len(lines) == 5, out.stdout
    for line in lines[:3]:
        assert "needs torch" in line and "pip install 'pagedkv[kernels]'" in line
    assert "needs hypothesis" in lines[3] and "pagedkv[testing]" in lines[3]
    assert "needs matplotlib" in lines[4] and "pagedkv[plot]" in lines[4] and "--no-plot" in lines[4]
