"""Perplexity on any text: sliding windows with a stride, bits per byte, the text's hash, and
one-line errors for text that cannot be evaluated."""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from compress import models
from evals.perplexity import evaluate, predicted_bytes, strided_windows, tokenize, windows
from tests.test_cli import assert_clean_error, run


@pytest.fixture(scope="module")
def model_and_tokens(tiny_llama, tiny_data):
    m = models.load(str(tiny_llama))
    text = (tiny_data / "wikitext-2" / "valid.txt").read_text()
    return m, tokenize(m.tokenizer, text)


def test_stride_equal_to_seqlen_is_the_non_overlapping_protocol(model_and_tokens):
    m, tokens = model_and_tokens
    wins, skip = strided_windows(tokens, 48, 48, 5)
    assert torch.equal(wins, windows(tokens, 48, 5)) and skip == [0] * 5
    a = evaluate(m.model, wins, progress=False, skip=skip)
    b = evaluate(m.model, windows(tokens, 48, 5), progress=False)
    assert a.nll == b.nll and a.tokens == b.tokens == 5 * 47


def test_sliding_windows_score_every_token_once_with_more_context(model_and_tokens):
    m, tokens = model_and_tokens
    wins, skip = strided_windows(tokens, 48, 16, 6)
    assert skip == [0] + [31] * 5
    # window i covers tokens [16 i, 16 i + 48): its scored targets are exactly the tokens no earlier window scored
    scored = []
    for i, s in enumerate(skip):
        scored += list(range(16 * i + 1 + s, 16 * i + 48))
    assert scored == list(range(1, 48 + 5 * 16))
    res = evaluate(m.model, wins, progress=False, skip=skip)
    assert res.tokens == 47 + 5 * 16
    # the same tokens scored one by one from the full windows agree
    nll = 0.0
    for ids, s in zip(wins, skip):
        with torch.no_grad():
            logp = torch.log_softmax(m.model(ids[None]).logits[0, :-1].float(), -1)
        nll -= float(logp[s:].gather(1, ids[1 + s:, None]).sum())
    assert res.nll == pytest.approx(nll / res.tokens, rel=1e-6)
    with pytest.raises(Exception, match="stride"):
        strided_windows(tokens, 48, 49, None)


def test_predicted_bytes_are_the_bytes_of_the_scored_text(model_and_tokens, tiny_data):
    """The scored targets spell a piece of the text exactly, spaces before punctuation included
    (a tokenizer config asking for clean-up does not shrink the count)."""
    m, tokens = model_and_tokens
    wins, skip = strided_windows(tokens, 160, 160, 1)
    text = m.tokenizer.decode(tokens[1:160].tolist(), clean_up_tokenization_spaces=False)
    assert " ." in text and text in (tiny_data / "wikitext-2" / "valid.txt").read_text()
    m.tokenizer.clean_up_tokenization_spaces = True
    assert predicted_bytes(m.tokenizer, wins, skip) == len(text.encode("utf-8")) > 0


def test_eval_on_a_text_file_records_its_hash_and_bits_per_byte(tiny_llama, tiny_data, tmp_path):
    text = tiny_data / "wikitext-2" / "valid.txt"
    out = tmp_path / "r.json"
    res = run(["eval", "ppl", tiny_llama, "--text", text, "--seqlen", 64, "--stride", 32, "--max-windows", 3,
               "--base", tiny_llama, "--json", out])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["protocol"] == "text" and d["stride"] == 32 and d["tokens"] == 63 + 2 * 32
    assert d["text_sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert d["bits_per_byte"] == pytest.approx(math.log(d["ppl"]) * d["tokens"] / math.log(2) / d["predicted_bytes"])
    assert d["kld"] == pytest.approx(0, abs=1e-9) and d["top1"] == 1.0
    assert "bits/byte" in res.output


@pytest.mark.parametrize("content,args,needle", [
    (b"", [], "is empty"),
    (b"\x00\x01binary\x00", [], "binary"),
    (b"\xff\xfe\xfd", [], "not UTF-8"),
    (b"short text", [], "fewer than one window"),
    (None, ["--stride", 65, "--seqlen", 64], "--stride"),
    (None, ["--seqlen", 1], "--seqlen"),
])
def test_bad_text_is_a_one_line_error(content, args, needle, tiny_llama, tiny_data, tmp_path):
    path = tiny_data / "wikitext-2" / "valid.txt"
    if content is not None:
        path = tmp_path / "t.txt"
        path.write_bytes(content)
    assert_clean_error(run(["eval", "ppl", tiny_llama, "--text", path, *args]), needle)


def test_seqlen_without_text_is_refused(tiny_llama, tiny_data):
    assert_clean_error(run(["eval", "ppl", tiny_llama, "--seqlen", 64, "--data-dir", tiny_data]), "apply to --text")
