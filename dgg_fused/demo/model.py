"""The demo's policy: a small ``transformers`` Llama built from a config, and a word-level tokenizer built in code.

Nothing is downloaded. The vocabulary is LLM-like: a few special tokens, the task's words, then filler tokens up
to ``vocab_size`` (thousands) that no task ever uses — so, as in a real policy, the lm_head has many rows whose
tokens are essentially never sampled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

__all__ = ["ModelConfig", "SPECIAL_TOKENS", "build_tokenizer", "build_model", "task_token_ids"]

#: pad, unknown, beginning and end of sequence.
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


@dataclass(frozen=True)
class ModelConfig:
    """Size of the demo policy (a ``LlamaForCausalLM`` with an untied lm_head)."""

    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    max_positions: int = 64

    def to_dict(self) -> dict:
        return asdict(self)


def build_tokenizer(words: Sequence[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` with one token per whitespace-separated word.

    Ids: the special tokens first, then ``words`` (deduplicated, in order), then fillers ``<w{i}>`` up to
    ``vocab_size``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in list(SPECIAL_TOKENS) + list(words):
        vocab.setdefault(w, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the {len(vocab)} tokens the task needs")
    i = 0
    while len(vocab) < vocab_size:
        vocab.setdefault(f"<w{i}>", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
        padding_side="left",
    )


def task_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """Ids of the task's words plus the special tokens: the lm_head rows the task "uses"."""
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS) + list(words))
    return sorted(set(int(i) for i in ids))


def build_model(cfg: ModelConfig, tokenizer, seed: int):
    """A freshly initialised ``LlamaForCausalLM`` (eager attention, fp32, untied lm_head), seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(conf)
    model.config.use_cache = False
    return model
