"""Outside oracle for the GGML quant formats: llama.cpp's own quantizers through ctypes.

The session fixture ``ggml_oracle`` downloads the ``llama-cpp-python`` source package (which
vendors llama.cpp), builds its ``ggml-base`` shared library once with cmake and caches it under
``${COMPRESS_CACHE_DIR:-~/.cache/compress}/oracle/ggml-base-<version>/``. Later sessions reuse the
cached library; ``make test`` builds it first (``python -m tests.formats.conftest``).

The oracle tests skip only when the build cannot start: no cmake, no C or C++ compiler, or the
source package cannot be downloaded; the skip says which. Anything else (the archive lacks
llama.cpp, cmake fails, the library does not load or lacks a symbol) fails the tests, so the
byte-exact comparisons never vanish quietly. With ``COMPRESS_REQUIRE_ORACLE=1`` (CI) a missing
prerequisite fails too. Nothing is written inside the repository.
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


class OracleUnavailable(Exception):
    """A prerequisite of the build cannot be obtained here (tool or source package): a reason to skip."""


def _run(cmd: list[str], cwd: Path | None = None, timeout: float = 1800) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def _compiler(env: str, names: tuple[str, ...]) -> str | None:
    """The compiler cmake would pick: ``$CC``/``$CXX`` if set, else the first of ``names`` on PATH."""
    given = os.environ.get(env)
    if given:
        return shutil.which(given.split()[0])
    return next((p for p in map(shutil.which, names) if p), None)


def check_build_tools() -> None:
    """Raise OracleUnavailable naming what is missing: cmake, a C compiler, a C++ compiler."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if _compiler("CC", ("cc", "gcc", "clang")) is None:
        missing.append("a C compiler (cc, gcc or clang; or $CC)")
    if _compiler("CXX", ("c++", "g++", "clang++")) is None:
        missing.append("a C++ compiler (c++, g++ or clang++; or $CXX)")
    if missing:
        raise OracleUnavailable(f"{' and '.join(missing)} not found on PATH")


def download_source(version: str, dest: Path) -> Path:
    """The llama-cpp-python source archive, through pip; OracleUnavailable when pip cannot get it."""
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--quiet",
         "--retries", "1", "--timeout", "60", f"llama-cpp-python=={version}", "-d", str(dest)],
        capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        last = ((proc.stderr or proc.stdout).strip().splitlines() or ["pip failed"])[-1]
        raise OracleUnavailable(f"cannot download the source package llama-cpp-python=={version}: {last}")
    archives = list(dest.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise RuntimeError(f"pip download of llama-cpp-python=={version} produced no source archive "
                           f"(got {sorted(p.name for p in dest.iterdir())})")
    return archives[0]


def cached_lib(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return _cache_root() / f"ggml-base-{version}" / _lib_name()


def build_ggml_base(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Return the path of a cached (building it if needed) ``ggml-base`` shared library.

    Raises OracleUnavailable when cmake, a compiler or the source package cannot be obtained,
    RuntimeError when the build itself fails."""
    lib = cached_lib(version)
    dest = lib.parent
    if lib.exists():
        return lib
    check_build_tools()
    with tempfile.TemporaryDirectory(prefix="ggml-oracle-") as tmp:
        tmp_path = Path(tmp)
        archive = download_source(version, tmp_path)
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            if not members:
                raise RuntimeError(f"{archive.name} holds no vendor/llama.cpp folder")
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


def _required() -> bool:
    return os.environ.get("COMPRESS_REQUIRE_ORACLE", "") not in ("", "0")


@pytest.fixture(scope="session")
def ggml_oracle() -> GGMLOracle:
    try:
        lib = build_ggml_base()
    except OracleUnavailable as exc:
        if _required():
            pytest.fail(f"llama.cpp oracle required (COMPRESS_REQUIRE_ORACLE=1) but unavailable: {exc}",
                        pytrace=False)
        pytest.skip(f"llama.cpp oracle unavailable: {exc}")
    except Exception as exc:  # noqa: BLE001 - a build that was possible and failed is a test failure
        pytest.fail(f"building the llama.cpp oracle failed: {type(exc).__name__}: {exc}", pytrace=False)
    try:
        return GGMLOracle(lib)
    except (OSError, AttributeError) as exc:   # ctypes: unloadable library, missing symbol
        pytest.fail(f"the llama.cpp oracle {lib} does not load: {type(exc).__name__}: {exc} "
                    f"(delete {lib.parent} to rebuild it)", pytrace=False)


def main() -> int:
    """``python -m tests.formats.conftest``: build (or find) the cached oracle, for ``make test``.
    Exit 0 when built or when a prerequisite is missing (the tests will skip and say why) unless
    COMPRESS_REQUIRE_ORACLE=1; exit 1 when the build fails or the library does not load."""
    cached = cached_lib().exists()
    try:
        if not cached:
            check_build_tools()
            print(f"building the llama.cpp oracle (llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}, ~90 s once) ...",
                  file=sys.stderr)
        lib = build_ggml_base()
        GGMLOracle(lib)
    except OracleUnavailable as exc:
        print(f"llama.cpp oracle unavailable: {exc}; its tests will "
              f"{'fail (COMPRESS_REQUIRE_ORACLE=1)' if _required() else 'skip'}", file=sys.stderr)
        return 1 if _required() else 0
    except Exception as exc:  # noqa: BLE001
        print(f"building the llama.cpp oracle failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"llama.cpp oracle: {lib}{' (cached)' if cached else ''}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
