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
