"""Fixtures of the GGUF test modules: every GGUF written while a module here runs (through the CLI,
the API or a test; model files and imatrix files) is read back with gguf's ``GGUFReader`` as soon
as it is written and compared with what our writer was handed (``read_back_every_gguf``); a tiny
model's F32 GGUF and importance matrix; llama.cpp's llama-quantize where it is built."""
from __future__ import annotations

import inspect

import pytest

from tests.export.gguf_helpers import _ROUND_TRIP_PROBLEMS, _record, check_imatrix_round_trip, check_model_round_trip
from tests.llamacpp import llama_bin
from tests.test_cli import run


@pytest.fixture(scope="module", autouse=True)
def read_back_every_gguf():
    """Wrap both GGUF writers (models: ``compress.export.gguf.write_gguf``; importance matrices:
    ``compress.imatrix.write_gguf``) so that each file they finish is read back and compared."""
    from compress import imatrix as imx
    from compress.export import gguf as gx
    write_model, write_imatrix = gx.write_gguf, imx.write_gguf
    sig = inspect.signature(write_model)

    def model(*args, **kwargs):
        out = write_model(*args, **kwargs)
        a = sig.bind(*args, **kwargs).arguments
        _record(a["path"], lambda: check_model_round_trip(a["path"], a["kvs"], a["tensors"], a["hp"]))
        return out

    def imatrix(path, im):
        out = write_imatrix(path, im)
        _record(path, lambda: check_imatrix_round_trip(path, im))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gx, "write_gguf", model)
        mp.setattr(imx, "write_gguf", imatrix)
        yield


@pytest.fixture(autouse=True)
def round_trips_hold():
    yield
    problems, _ROUND_TRIP_PROBLEMS[:] = list(_ROUND_TRIP_PROBLEMS), []
    assert not problems, "GGUF round trip: " + "; ".join(problems)


@pytest.fixture(scope="module")
def f32_gguf(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    res = run(["export", "gguf", tiny_llama, "--type", "F32", "-o", out])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def imatrix_file(tiny_llama, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    res = run(["imatrix", tiny_llama, "--nsamples", 4, "--seqlen", 64, "--data-dir", tiny_data, "-o", out])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def llama_quantize():
    p = llama_bin("llama-quantize")
    if p is None:
        pytest.skip("llama.cpp's llama-quantize is not built (docs/GGUF.md says how)")
    return p
