"""The transformers-major differences the suite absorbs: the tokenizer class written with a folder,
and the rotary settings read from a config."""
from __future__ import annotations

import json

from transformers import AutoTokenizer, Gemma3TextConfig, LlamaConfig

from compress.compat import rope_parameters, rope_scaling
from compress.models import save_tokenizer, settle_tokenizer_class
from tests.conftest import _tokenizer, synthetic_text


def test_a_saved_fast_tokenizer_is_read_from_its_tokenizer_json(tmp_path):
    """Folders the suite writes record ``PreTrainedTokenizerFast``, so transformers 5 reads
    tokenizer.json as written instead of rebuilding the class's own pipeline; a folder an earlier
    version wrote with another class is settled the same way, and reads the same ids."""
    tok = _tokenizer()
    save_tokenizer(tok, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = synthetic_text(50, seed=3)
    assert AutoTokenizer.from_pretrained(tmp_path / "a")(text)["input_ids"] == tok(text)["input_ids"]
    tok.save_pretrained(tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizer"}))
    settle_tokenizer_class(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert AutoTokenizer.from_pretrained(tmp_path / "b")(text)["input_ids"] == tok(text)["input_ids"]


def test_rotary_settings_of_either_config_layout():
    c = LlamaConfig(rope_theta=500000.0)
    assert rope_parameters(c)["rope_theta"] == 500000.0 and rope_scaling(c) is None
    c = LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert rope_scaling(c)["factor"] == 4.0
    g = Gemma3TextConfig(rope_theta=1e6, rope_local_base_freq=1e4)
    assert rope_parameters(g)["rope_theta"] == 1e6 and rope_parameters(g, "sliding_attention")["rope_theta"] == 1e4

    class V5:                          # transformers 5: one dict, per layer type for mixed attention
        rope_parameters = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                           "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    assert rope_parameters(V5())["rope_theta"] == 1e6 and rope_scaling(V5())["factor"] == 8.0
    assert rope_parameters(V5(), "sliding_attention")["rope_theta"] == 1e4
