"""Supervised warm start with label noise, cached on disk.

RLVR starts from a policy that can already do the task sometimes. Training on answers whose words are randomised
with probability ``label_noise`` (25% by default) gives a policy that is usually right when decoding greedily but
diffuse when sampling — the "sharpening" regime RLVR lives in. The learning rate is warmed up linearly over the
first ``warmup`` steps: without it the first Adam step (a full-size step in every coordinate) wrecks the freshly
initialised model.

The result is cached as ``<cache_dir>/warm-<task>-<hash>.pt`` keyed by everything that determines it: the task
(class, name, words, its parameters), model size, seed, schedule, the torch version, the number of intra-op
threads it was trained with (always one: :func:`warm_start` pins it, so a warm start is the same whichever process
or machine setting trained it), the numerics mode of the process that trained it
(:func:`dgg_fused.demo.numerics.current`: the pinned portable mode in a testbed worker, which makes it the same on
every x86-64 CPU) and a format version. Repeated runs and every arm of a run start from the same
weights without retraining.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, asdict

import torch

from . import numerics
from .model import ModelConfig, build_model
from .tasks import Task

__all__ = ["WarmStartConfig", "warm_start", "default_cache_dir", "cache_key", "WARM_THREADS"]

_FORMAT = 3
#: Intra-op threads every warm start is trained with (part of the cache key).
WARM_THREADS = 1


@dataclass(frozen=True)
class WarmStartConfig:
    steps: int = 1200
    batch: int = 64
    lr: float = 3e-3
    warmup: int = 10
    label_noise: float = 0.25


def default_cache_dir() -> str:
    """``$DGG_DEMO_CACHE``, else ``$XDG_CACHE_HOME/dgg_fused/demo``, else ``~/.cache/dgg_fused/demo``."""
    env = os.environ.get("DGG_DEMO_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dgg_fused", "demo")


def _task_params(task: Task) -> dict:
    return {k: v for k, v in sorted(vars(task).items()) if isinstance(v, (int, float, str, bool, tuple, list))
            and not k.startswith("_")} if hasattr(task, "__dict__") else {}


def cache_key(task: Task, mcfg: ModelConfig, wcfg: WarmStartConfig, seed: int) -> str:
    """The warm start's cache key: a hash of everything its weights depend on (see the module doc)."""
    blob = json.dumps(
        {"format": _FORMAT, "task": task.name, "class": f"{type(task).__module__}.{type(task).__qualname__}",
         "params": _task_params(task), "words": list(task.words), "answer_words": list(task.answer_words),
         "max_new": task.max_new_tokens, "model": mcfg.to_dict(), "warm": asdict(wcfg), "seed": seed,
         "torch": torch.__version__, "threads": WARM_THREADS, "numerics": numerics.current()},
        sort_keys=True, default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def warm_start(
    task: Task, tokenizer, mcfg: ModelConfig, wcfg: WarmStartConfig, seed: int, cache_dir: str | None
) -> tuple[dict[str, torch.Tensor], bool]:
    """Return ``(state_dict, from_cache)`` of the warm-started policy for ``(task, seed)``.

    ``cache_dir=None`` disables the cache. Trained with :data:`WARM_THREADS` intra-op threads (restored after).
    """
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, f"warm-{task.name}-{cache_key(task, mcfg, wcfg, seed)}.pt")
        if os.path.exists(path):
            return torch.load(path, map_location="cpu", weights_only=True), True
    before = torch.get_num_threads()
    torch.set_num_threads(WARM_THREADS)
    try:
        state = _train(task, tokenizer, mcfg, wcfg, seed)
    finally:
        torch.set_num_threads(before)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        torch.save(state, tmp)
        os.replace(tmp, path)
    return state, False


def _train(task: Task, tokenizer, mcfg: ModelConfig, wcfg: WarmStartConfig, seed: int) -> dict[str, torch.Tensor]:
    model = build_model(mcfg, tokenizer, seed)
    model.train()
    rng = random.Random(seed * 7919 + 17)
    opt = torch.optim.AdamW(model.parameters(), lr=wcfg.lr, weight_decay=0.0)
    eos = tokenizer.eos_token
    for step in range(wcfg.steps):
        for g in opt.param_groups:
            g["lr"] = wcfg.lr * min(1.0, (step + 1) / max(1, wcfg.warmup))
        exs = task.make_prompts(rng, wcfg.batch)
        texts, n_prompt = [], []
        for ex in exs:
            ans = [rng.choice(task.answer_words) if rng.random() < wcfg.label_noise else w for w in ex.target.split()]
            p = ex.prompt.split()
            texts.append(" ".join(p + ans + [eos]))
            n_prompt.append(len(p))
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ids.clone()
        width = ids.shape[1]
        for i, npr in enumerate(n_prompt):
            pad = width - int(mask[i].sum())
            labels[i, : pad + npr] = -100  # loss on the answer and EOS only
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        h = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
        tgt = labels[:, 1:]
        sel = tgt != -100  # logits only where there is a label (the lm_head is the big matrix)
        logits = model.lm_head(h[:, :-1][sel])
        loss = torch.nn.functional.cross_entropy(logits.float(), tgt[sel])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
