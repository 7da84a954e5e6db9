"""GPTQModel, an outside reader of our ``gptq-int`` checkpoints, loads them to the suite's own weights.

What is checked, with GPTQModel's own code (nothing of it is copied here):

* ``test_packing_is_the_librarys``: GPTQModel's packer (``TorchQuantLinear.pack_block``, its
  pure-Python path) given the same codes, zero points minus one (the v1 convention), scales and
  an act-order ``g_idx`` writes ``qweight`` and ``qzeros`` bit for bit equal to ours, for 2, 3,
  4 and 8 bits and group sizes 32 and 128 (also a last, narrower group).
* ``test_dequantization_is_the_librarys``: our packed tensors put into a ``TorchQuantLinear`` (the
  CPU torch kernel), converted by GPTQModel's ``convert_gptq_v1_to_v2_format_module`` (what its
  loader does to ``checkpoint_format: "gptq"`` files) and dequantized by its ``dequantize_weight``
  give exactly ``QuantLinear.dequantize()`` (float32, bit for bit). 3 bits is an expected failure
  before GPTQModel 7.0.0: its INT3 v1->v2 zero-point conversion adds the +1 at the wrong bit
  offsets (7.0.0 replaced it by ``_correct_gptq_v1_qzeros``); its INT3 unpacking itself agrees
  with ours (the packer test, and v2 zero points read back exactly).
* ``test_gptqmodel_loads_our_checkpoint``: ``compress quantize --method gptq|rtn`` on a tiny
  Llama, then ``GPTQModel.load(..., backend=BACKEND.TORCH, device="cpu", dtype=float32)``: every
  quantized linear is a ``TorchQuantLinear`` whose dequantized weight equals ours bit for bit, and
  the logits equal ``compress.models.load(...)``'s within atol 1e-5 (both float32 with the same
  weights; only the summation order of a matmul could differ; they are equal in practice).
  The tiny model is 128 wide (FFN 256, k/v projections 64), not the ``tiny_llama`` fixture's 96
  (k/v 48): GPTQModel 5.x sizes its buffers as ``features // 32 * bits`` words, so it cannot
  hold a layer whose width is not a multiple of 32 (7.x uses ceil, as our format does).
  Asymmetric files get ``quantization_config.meta.quantizer = ["gptqmodel:<version>"]`` in a
  copy: GPTQModel refuses every ``sym: false`` ``checkpoint_format: "gptq"`` file without that
  producer stamp (it distrusts old asymmetric v1 writers), whatever its tensors hold.

GPTQModel 5.7.0 is the version checked; it is not installed in the project's environment. Its
newer releases need transformers 5 (5.8.0: >= 5.2.0; 6.0.3 and 7.0.0: >= 5.4.0; 7.7.0: >= 5.20.2
and torch >= 2.14.1); 5.7.0, the newest accepting torch 2.13 and transformers 4.57.6, pins
``numpy==2.2.6`` (constraints.txt: 2.4.1), as 5.0.0, 5.2.0, 5.4.2 and 5.6.12 do, and pulls in
Hugging Face's ``kernels`` package, whose top-level name is our own ``kernels`` package's. So
this module is skipped unless ``gptqmodel`` imports; to run it (under a minute on 2 cores), in a
separate environment::

    .venv/bin/python -m venv /tmp/gqvenv
    /tmp/gqvenv/bin/pip install -c constraints.txt /opt/wheels/torch-2.13.0+cpu-*.whl 'setuptools>=80.9' ninja wheel
    grep -v '^numpy' constraints.txt > /tmp/c.txt
    BUILD_CUDA_EXT=0 GPTQMODEL_FORCE_BUILD=1 /tmp/gqvenv/bin/pip install --no-build-isolation \
        -c /tmp/c.txt gptqmodel==5.7.0 triton onnx click gguf pytest
    /tmp/gqvenv/bin/python -m pytest -q tests/readers     # from the repository root
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

gptqmodel = pytest.importorskip(
    "gptqmodel",
    reason="GPTQModel is not installed (its pins conflict with the project's: see this module's docstring)")

from packaging.version import Version  # noqa: E402  (a dependency of gptqmodel)

from compress import models  # noqa: E402
from compress.formats import gptq_int  # noqa: E402
from compress.qlinear import QuantLinear  # noqa: E402
from tests.conftest import build_tiny  # noqa: E402
from tests.test_cli import run  # noqa: E402

GQ_VERSION = Version(gptqmodel.__version__)
INT3_V1_FIXED = Version("7.0.0")
LOGITS_ATOL = 1e-5


@pytest.fixture(autouse=True)
def _no_pack_extension(monkeypatch):
    # GPTQModel's packer would otherwise try its native CPU extension first (built on demand).
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")


def _torch_linear(bits, group_size, k, n):
    from gptqmodel.nn_modules.qlinear.torch import TorchQuantLinear
    return TorchQuantLinear(bits=bits, group_size=group_size, sym=False, desc_act=True, in_features=k,
                            out_features=n, bias=False, pack_dtype=torch.int32)


def _finish(m):
    """GPTQModel's post_init (its unpacking shift tables) without torch.compile of the dequantizer."""
    m.optimized = True
    m.eval()
    m.post_init()
    return m


def _random_layer(bits, k, n, group_size, seed):
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    q = torch.randint(0, 1 << bits, (n, k), generator=g)
    zeros = torch.randint(1, 1 << bits, (groups, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) * 0.02 + 0.001).half()
    perm = torch.randperm(k, generator=g)                     # act-order: groups follow a permutation
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = (torch.arange(k) // group_size).to(torch.int32)
    return q, zeros, scales, g_idx


LAYOUTS = [(128, 96, 32), (256, 64, 128), (160, 96, 128)]   # (K, N, group): the last has a 32-wide group


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,n,group_size", LAYOUTS)
def test_packing_is_the_librarys(bits, k, n, group_size):
    q, zeros, scales, g_idx = _random_layer(bits, k, n, group_size, seed=bits * 7 + k)
    ours = gptq_int.pack(q, scales, zeros, g_idx, bits)
    # GPTQModel packs round((W + z * s) / s) with the zeros it is given; handing it z - 1 and the
    # weight those imply gives its v1 ("zero minus one") tensors.
    gl = g_idx.long()
    s = scales.float()
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = s[gl].t() * (q - (zeros - 1)[gl].t()).float()
    m = _torch_linear(bits, group_size, k, n)
    m.pack_block(lin, s.t(), (zeros - 1).t(), g_idx)
    assert torch.equal(m.qweight, ours.qweight)
    assert torch.equal(m.qzeros, ours.qzeros)
    assert torch.equal(m.g_idx.to(torch.int32), ours.g_idx)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k,n,group_size", LAYOUTS)
def test_dequantization_is_the_librarys(bits, k, n, group_size, request):
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    if bits == 3 and GQ_VERSION < INT3_V1_FIXED:
        request.applymarker(pytest.mark.xfail(
            strict=True, reason=f"GPTQModel {GQ_VERSION}: INT3 v1->v2 zero-point conversion is wrong (fixed in 7.0.0)"))
    q, zeros, scales, g_idx = _random_layer(bits, k, n, group_size, seed=bits * 11 + k)
    p = gptq_int.pack(q, scales, zeros, g_idx, bits)
    want = QuantLinear.from_packed(p, None).dequantize(torch.float32)
    m = _torch_linear(bits, group_size, k, n)
    m.qweight.copy_(p.qweight)
    m.qzeros.copy_(p.qzeros)
    m.scales = p.scales.float()   # float16 values; s * (q - z) is then exact in float32 on both sides
    m.g_idx.copy_(p.g_idx)
    convert_gptq_v1_to_v2_format_module(m, bits=bits, pack_dtype=torch.int32)
    got = _finish(m).dequantize_weight().t()
    assert got.dtype == torch.float32
    assert torch.equal(got, want)


def test_int3_unpacking_reads_v2_zeros():
    """The 3-bit case above fails only in GPTQModel's v1->v2 step: given v2 zero points (its own
    packer's), its INT3 unpacking reads our codes to our weights exactly."""
    bits, k, n, group_size = 3, 128, 96, 32
    q, zeros, scales, g_idx = _random_layer(bits, k, n, group_size, seed=5)
    p = gptq_int.pack(q, scales, zeros, g_idx, bits)
    want = QuantLinear.from_packed(p, None).dequantize(torch.float32)
    gl = g_idx.long()
    s = scales.float()
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = s[gl].t() * (q - zeros[gl].t()).float()
    m = _torch_linear(bits, group_size, k, n)
    m.pack_block(lin, s.t(), zeros.t(), g_idx)
    assert torch.equal(m.qweight, p.qweight)
    m.scales = s
    m.qzero_format(format=2)
    assert torch.equal(_finish(m).dequantize_weight().t(), want)


@pytest.fixture(scope="module")
def tiny_llama128(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama128", "llama", hidden=128, ffn=256)


CASES = {
    "gptq-int4-sym-actorder": ["--method", "gptq", "--bits", 4, "--sym", "--no-static-groups"],
    "gptq-int2-sym-actorder": ["--method", "gptq", "--bits", 2, "--sym", "--no-static-groups"],
    "gptq-int8-sym": ["--method", "gptq", "--bits", 8, "--sym"],
    "gptq-int4-asym-actorder": ["--method", "gptq", "--bits", 4, "--asym", "--no-static-groups"],
    "rtn-int4-asym": ["--method", "rtn", "--bits", 4, "--asym"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_gptqmodel_loads_our_checkpoint(case, tiny_llama128, tiny_data, tmp_path, monkeypatch):
    from gptqmodel import BACKEND, GPTQModel
    from gptqmodel.nn_modules.qlinear.torch import TorchQuantLinear
    monkeypatch.setenv("COMPRESS_DATA_DIR", str(tiny_data))
    monkeypatch.chdir(tmp_path)                  # GPTQModel may create ./gptqmodel_offload
    out = tmp_path / case
    cal = [] if "rtn" in case else ["--nsamples", 8, "--seqlen", 64]
    res = run(["quantize", tiny_llama128, *CASES[case], "--group-size", 32, *cal, "-o", out])
    assert res.exit_code == 0, res.output
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["checkpoint_format"] == "gptq"

    ours = models.load(str(out)).model.eval()
    folder = out
    if not qcfg["sym"]:
        folder = tmp_path / f"{case}-stamped"
        shutil.copytree(out, folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["quantization_config"]["meta"] = {"quantizer": [f"gptqmodel:{GQ_VERSION}"]}
        (folder / "config.json").write_text(json.dumps(cfg))
    theirs = GPTQModel.load(str(folder), device="cpu", backend=BACKEND.TORCH, dtype=torch.float32).model.eval()

    quantized = qcfg["compress"]["quantized_modules"]
    mods = dict(theirs.named_modules())
    ours_mods = dict(ours.named_modules())
    for name in quantized:
        m = mods[name]
        assert isinstance(m, TorchQuantLinear), (name, type(m))
        with torch.no_grad():
            w = type(m).dequantize_weight(m).t().to(torch.float32)   # the method itself, not its compiled copy
        assert torch.equal(w, ours_mods[name].dequantize(torch.float32)), name

    ids = torch.arange(1, 65).unsqueeze(0)
    with torch.no_grad():
        a = theirs(ids).logits.float()
        b = ours(ids).logits.float()
    torch.testing.assert_close(a, b, rtol=0, atol=LOGITS_ATOL)
