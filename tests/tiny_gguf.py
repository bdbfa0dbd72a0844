"""A tiny Llama GGUF file written with the ``gguf`` package's writer: the real-LM policy's loading path in tests,
without the 93 MB download.

The metadata is what ``transformers`` reads from a llama GGUF file (``general.architecture``, the ``llama.*``
hyper-parameters, ``tokenizer.ggml.*``: a byte-level BPE vocabulary with token types and merges, and the special
token ids). The vocabulary is small enough to enumerate every completion: three control tokens (as SmolLM2's:
``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``), the characters the demo's tasks use, and three merges, so
that some texts have several token sequences (``"12"`` is ``1 2`` or ``12``; ``" 12"`` is ``Ġ 1 2``, ``Ġ 12`` or
``Ġ1 2``). No ``output.weight``: the lm_head is tied to the embedding, as in SmolLM2.
"""

from __future__ import annotations

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Single characters, spelled in the byte-level alphabet (``Ġ`` is a space, ``Ċ`` a newline).
CHARS = tuple("0123456789") + ("+", "*", "=", "-", ">", "Ġ", "Ċ")
MERGES = ("1 2", "Ġ 1", "Ċ Ċ")
TOKENS = SPECIALS + CHARS + tuple(m.replace(" ", "") for m in MERGES)

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 16, 2, 4, 2, 32


def write_tiny_gguf(path: str, seed: int = 0, scale: float = 0.5) -> str:
    """Write the tiny model to ``path`` (random float32 weights from ``seed``) and return ``path``."""
    import gguf

    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("dgg-fused tiny test llama")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(TOKENS))
    w.add_file_type(0)  # all float32
    w.add_tokenizer_model("gpt2")  # byte-level BPE
    w.add_tokenizer_pre("smollm")
    w.add_token_list(list(TOKENS))
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))  # 3: control, 1: normal
    w.add_token_merges(list(MERGES))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    def weight(name: str, *shape: int) -> None:
        w.add_tensor(name, (scale * rng.standard_normal(shape)).astype(np.float32))

    weight("token_embd.weight", len(TOKENS), HIDDEN)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
        weight(f"blk.{i}.attn_q.weight", HEADS * head_dim, HIDDEN)
        weight(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        weight(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        weight(f"blk.{i}.attn_output.weight", HIDDEN, HEADS * head_dim)
        weight(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        weight(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        weight(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def any_digit_task():
    """A few-shot task the tiny random model solves now and then, so that a quick run on it has rewards to learn
    from: after ``a+b=``, one digit or nothing is accepted (eleven texts)."""
    from dgg_fused.demo.lmtasks import FewShotTask

    class AnyDigitTask(FewShotTask):
        name, max_answer = "anydigit", 1

        def draw(self, rng):
            return f"{rng.randint(0, 9)}+{rng.randint(0, 9)}="

        def solve(self, question):
            return ""

        def answers(self, example):
            return [""] + list("0123456789")

        def verify(self, example, completion):
            return float(completion in self.answers(example))

    return AnyDigitTask()
