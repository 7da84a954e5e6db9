"""Outside oracle for the GGML quant formats: llama.cpp's own quantizers through ctypes.

The session fixture ``ggml_oracle`` downloads the ``llama-cpp-python`` source package (which
vendors llama.cpp), builds its ``ggml-base`` shared library once with cmake and caches it under
``${COMPRESS_CACHE_DIR:-~/.cache/compress}/oracle/ggml-base-<version>/``. Later sessions reuse the
cached library. If any step fails (no network, no cmake, no compiler) the oracle tests are
skipped with the reason. Nothing is written inside the repository.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DGGML_OPENMP=OFF",
    "-DCMAKE_C_FLAGS=-ffp-contract=off",
    "-DCMAKE_CXX_FLAGS=-ffp-contract=off",
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
]


def _cache_root() -> Path:
    root = os.environ.get("COMPRESS_CACHE_DIR") or os.path.join(Path.home(), ".cache", "compress")
    return Path(root) / "oracle"


def _lib_name() -> str:
    if sys.platform == "darwin":
        return "libggml-base.dylib"
    if sys.platform == "win32":
        return "ggml-base.dll"
    return "libggml-base.so"


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 1800) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def build_ggml_base(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Return the path of a cached (building it if needed) ``ggml-base`` shared library."""
    dest = _cache_root() / f"ggml-base-{version}"
    lib = dest / _lib_name()
    if lib.exists():
        return lib
    if shutil.which("cmake") is None:
        raise RuntimeError("cmake not found on PATH")
    with tempfile.TemporaryDirectory(prefix="ggml-oracle-") as tmp:
        tmp_path = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              "--quiet", "--retries", "1", "--timeout", "60", f"llama-cpp-python=={version}",
              "-d", str(tmp_path)],
             timeout=900)
        archives = list(tmp_path.glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            raise RuntimeError("pip download produced no llama_cpp_python source archive")
        with tarfile.open(archives[0]) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            try:
                tar.extractall(tmp_path, members=members, filter="data")
            except TypeError:                 # Python without extraction filters
                tar.extractall(tmp_path, members=members)
        # configure the whole vendored llama.cpp (ggml alone lacks files in the sdist), build one target
        src = next(tmp_path.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = tmp_path / "build"
        _run(["cmake", "-S", str(src), "-B", str(build), *_CMAKE_FLAGS])
        _run(["cmake", "--build", str(build), "--target", "ggml-base", "-j", str(os.cpu_count() or 2)])
        built = [p for p in build.rglob(_lib_name() + "*") if p.is_file() and not p.is_symlink()]
        if not built:
            raise RuntimeError(f"build finished but no {_lib_name()} was found under {build}")
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "SOURCE").write_text(
            f"llama-cpp-python=={version} vendored ggml, cmake {' '.join(_CMAKE_FLAGS)}\n")
        staged = dest / f".{_lib_name()}.{os.getpid()}.tmp"
        shutil.copy2(built[0], staged)
        os.replace(staged, lib)           # atomic publish; a concurrent builder's copy is identical
    return lib


class GGMLOracle:
    """ctypes wrapper around ``ggml_quantize_chunk`` and ``ggml_row_size``."""

    def __init__(self, lib_path: Path):
        self.path = lib_path
        self.lib = ctypes.CDLL(str(lib_path))
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_void_p]
        self.lib.ggml_row_size.restype = ctypes.c_size_t
        self.lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        self.lib.ggml_quantize_init.restype = None
        self.lib.ggml_quantize_init.argtypes = [ctypes.c_int]

    def row_size(self, type_id: int, n_per_row: int) -> int:
        return int(self.lib.ggml_row_size(type_id, n_per_row))

    def quantize(self, w: np.ndarray, type_id: int, imatrix: np.ndarray | None = None) -> np.ndarray:
        """Quantize float32 ``(rows, cols)`` with llama.cpp; returns uint8 ``(rows, row_size)``."""
        w = np.ascontiguousarray(w, dtype=np.float32)
        rows, cols = w.shape
        row_size = self.row_size(type_id, cols)
        out = np.zeros((rows, row_size), dtype=np.uint8)
        qw = None
        if imatrix is not None:
            qw = np.ascontiguousarray(imatrix, dtype=np.float32)
            assert qw.shape == (cols,)
        self.lib.ggml_quantize_init(type_id)
        n = self.lib.ggml_quantize_chunk(
            type_id, w.ctypes.data, out.ctypes.data, 0, rows, cols,
            None if qw is None else qw.ctypes.data)
        assert n == rows * row_size, (n, rows, row_size)
        return out


@pytest.fixture(scope="session")
def ggml_oracle() -> GGMLOracle:
    try:
        lib = build_ggml_base()
        return GGMLOracle(lib)
    except Exception as exc:  # noqa: BLE001 - any failure means "no oracle here"; say why
        pytest.skip(f"llama.cpp oracle unavailable: {type(exc).__name__}: {exc}".splitlines()[0][:500])
