"""The method registry: the CLI's choices and option checks come from it, and a new method is one class."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from compress import api, models
from compress.config import IntOptions, flag_of, opt
from compress.errors import CompressError
from compress.formats import gptq_int
from compress.quantizer import dequantize_values, quantize_rtn
from compress.registry import REGISTRY, Method, methods, register
from tests.test_cli import assert_clean_error, run

BUILT_IN = {"quantize": ["rtn", "gptq", "awq", "awq+gptq", "smoothquant", "kquant", "kquant-gptq"],
            "prune": ["magnitude", "wanda", "sparsegpt", "structured"]}


@pytest.mark.parametrize("kind", list(BUILT_IN))
def test_every_method_is_registered_and_offered_by_the_cli(kind):
    assert list(methods(kind)) == BUILT_IN[kind]
    res = run([kind, "--help"])
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    for other in BUILT_IN:
        if other != kind:
            assert not any(f"{n}:" in text for n in BUILT_IN[other] if n not in BUILT_IN[kind])
    for name, m in methods(kind).items():
        assert name in text and " ".join(m.summary.split())[:30] in text
        for f in m.config.option_fields():
            assert flag_of(f).split("/")[0] in text


def _foreign_options():
    """Every (method, option of another method) pair, with a value the option's own method accepts."""
    values = {"bits": "4", "group_size": "64", "damp": "0.05", "block_size": "64", "grid": "mse", "alpha": "0.5",
              "act_scheme": "static", "objective": "linear", "n_grid": "10", "max_shrink": "0.3",
              "search_windows": "2", "type": "Q4_K_M", "imatrix": "x.gguf", "sparsity": "0.5", "pattern": "2:4",
              "profile": "owl", "owl_lambda": "0.1", "owl_m": "3", "heads": "0.25", "mlp": "0.25",
              "layers": "1", "hidden": "0.1", "importance": "gradient", "multiple_of": "64"}
    out = []
    for kind in BUILT_IN:
        for name, m in methods(kind).items():
            own = {f.name for f in m.config.option_fields()}
            for other in methods(kind).values():
                for f in other.config.option_fields():
                    if f.name in own or any(f.name == o[2].name for o in out if o[1] == name):
                        continue
                    flag = flag_of(f).split("/")[0]
                    out.append((kind, name, f, [flag] if f.name not in values else [flag, values[f.name]]))
    return out


@pytest.mark.parametrize("kind,method,field,args", _foreign_options(),
                         ids=lambda v: v if isinstance(v, str) else getattr(v, "name", None))
def test_an_option_of_another_method_is_refused(tiny_llama, tmp_path, kind, method, field, args):
    res = run([kind, tiny_llama, "--method", method, *args, "-o", tmp_path / "o"])
    assert_clean_error(res, flag_of(field), f"not to {method}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method,args,needle", [
    ("gptq", ["--damp", "0"], "--damp must be > 0"),
    ("gptq", ["--damp", "1.5"], "--damp must be < 1"),
    ("gptq", ["--block-size", "0"], "--block-size must be >= 1"),
    ("gptq", ["--group-size", "0"], "group size"),
    ("awq", ["--awq-max-shrink", "1"], "--awq-max-shrink must be < 1"),
    ("smoothquant", ["--alpha", "-0.1"], "--alpha must be >= 0"),
    ("kquant", [], "--type is required"),
    ("kquant", ["--type", "Q9_K"], "unknown GGUF type"),
])
def test_bad_values_are_refused_before_loading(tiny_llama, tmp_path, method, args, needle):
    assert_clean_error(run(["quantize", tiny_llama, "--method", method, *args, "-o", tmp_path / "o"]), needle)


def test_calibration_options_need_a_calibrated_method(tiny_llama, tmp_path):
    assert_clean_error(run(["quantize", tiny_llama, "--nsamples", "4", "-o", tmp_path / "o"]),
                       "--nsamples", "calibrated methods", "rtn")


@dataclass(frozen=True)
class HalfOptions(IntOptions):
    shrink: float = opt(0.5, "How much of each weight to keep before rounding.", min=0, max=1, open_min=True)


class HalfRTN(Method):
    """A method written the way a new one is added: a config, what it does to each group."""

    name = "test-shrunk-rtn"
    summary = "round-to-nearest of shrunken weights (a test method)"
    config = HalfOptions
    calibrated = False

    def apply(self, blk, group, stats):
        for name in blk.targeted(group):
            scheme = blk.scheme(name)
            q, s, z, g = quantize_rtn(blk.linear(name).weight.detach() * self.cfg.shrink, scheme)
            blk.record.add(blk.full(name), gptq_int.pack(q, s, z, g, scheme.bits), scheme.to_dict())


def test_a_new_method_is_one_class(tiny_llama, tmp_path):
    register(HalfRTN)
    try:
        with pytest.raises(CompressError, match="--shrink must be > 0"):
            api.make_step("test-shrunk-rtn", shrink=0.0)
        with pytest.raises(CompressError, match="unknown option 'damp'"):
            api.make_step("test-shrunk-rtn", damp=0.1)
        loaded = models.load(str(tiny_llama))
        w = loaded.model.model.layers[1].mlp.up_proj.weight.detach().clone()
        info = api.quantize(loaded, "test-shrunk-rtn", shrink=0.25, bits=3, group_size=32, progress=False,
                            ignore=["re:.*self_attn\\..*"])
        assert len(info["modules"]) == 2 * 3
        lin = loaded.model.model.layers[1].mlp.up_proj
        from compress.scheme import IntScheme
        q, s, z, g = quantize_rtn(w * 0.25, IntScheme(3, 32))
        assert torch.equal(lin.dequantize(), dequantize_values(q, s, z, g))
        assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
        out = tmp_path / "o"
        res = api.quantize_to_folder(str(tiny_llama), out, "test-shrunk-rtn", progress=False, shrink=0.25,
                                     group_size=32)
        assert res["modules"] == 14
        assert models.load(str(out)).quant["method"] == "test-shrunk-rtn"
        with pytest.raises(TypeError, match="already registered"):
            register(type("Other", (HalfRTN,), {}))
    finally:
        REGISTRY.pop("test-shrunk-rtn", None)
