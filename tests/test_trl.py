"""TRL GRPOTrainer with rollout reuse under DGG, offline on CPU: tiny Llama from a config, tokenizer built in
code, in-memory dataset, Python reward. Checks the reuse index the gate sees, regeneration after a trip, the
pre-clip energy, the scheduled LR reaching the inner optimizer, and the gate metrics in the trainer's logs."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

torch = pytest.importorskip("torch")
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from dgg_fused import GateConfig, GatedOptimizer  # noqa: E402
from dgg_fused.integrations import unwrap_gated  # noqa: E402
from dgg_fused.integrations.trl import DGGGRPOTrainer  # noqa: E402

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "yes", "no"]
K = 4
LR = 1e-3


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def make_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def reward_yes(completions, **kwargs):
    return [float(c.split().count("yes")) - 0.5 * len(c.split()) / 4 for c in completions]


class Recorder(TrainerCallback):
    """Per optimizer step: reuse index, gate decision, inner LR, lm_head energy after clipping, params."""

    def __init__(self, spike_at: int | None = None) -> None:
        self.spike_at = spike_at
        self.rows: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        gated = unwrap_gated(optimizer)
        head = model.lm_head.weight
        if self.spike_at is not None and state.global_step == self.spike_at:
            head.grad.mul_(1e4)  # an energy spike the gate must drop (clipping is off in that run)
        self.rows.append(
            {
                "step": state.global_step,
                "k": gated.reuse_index,
                "post_clip_energy": float(head.grad.double().square().sum()),
                "head_before": head.detach().clone(),
            }
        )

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        gated = unwrap_gated(optimizer)
        m = gated.get_metrics()
        row = self.rows[-1]
        row.update(
            gate_k=m["reuse_index"],
            energy=m["energy"],
            skipped=bool(m["skipped"]),
            gated=bool(m["gated"]),
            inner_lr=gated.optimizer.param_groups[0]["lr"],
            head_changed=not torch.equal(row.pop("head_before"), model.lm_head.weight.detach()),
        )


def run(tmp_path, *, max_steps: int, max_grad_norm: float, gate: GateConfig, spike_at=None, accum: int = 1,
        user_optimizer: bool = False):
    tok = make_tokenizer()
    model = make_model(tok)
    # the user's own optimizer (wrapped by the trainer) or the one the Trainer builds (args.optim)
    optimizers = (torch.optim.AdamW(model.parameters(), lr=LR, fused=True), None) if user_optimizer else (None, None)
    prompts = [" ".join(WORDS[(i + j) % 8] for j in range(3)) for i in range(16)]
    ds = datasets.Dataset.from_dict({"prompt": prompts})
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        num_generations=4,
        gradient_accumulation_steps=accum,  # steps_per_generation defaults to it
        num_iterations=K,
        max_completion_length=4,
        max_steps=max_steps,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=max_grad_norm,
        beta=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    rec = Recorder(spike_at)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DGGGRPOTrainer(
            model=model,
            reward_funcs=reward_yes,
            args=args,
            train_dataset=ds,
            processing_class=tok,
            callbacks=[rec],
            dgg_config=gate,
            optimizers=optimizers,
        )
        trainer.train()
    if user_optimizer:
        assert trainer.gated_optimizer.optimizer is optimizers[0]
    return trainer, rec.rows


def expected_lr(step: int, max_steps: int) -> float:
    return LR * (max_steps - step) / max_steps


def test_grpo_passes_preclip_energy_lr_and_logs(tmp_path):
    max_steps = 8
    never = GateConfig(window=2, tau=1e30, max_reuse=K)  # observe, never trip
    # two micro-batches per optimizer step: the gate must see one pass per optimizer step, not per micro-batch
    trainer, rows = run(tmp_path, max_steps=max_steps, max_grad_norm=1e-4, gate=never, accum=2)
    assert trainer.args.steps_per_generation == 2
    assert isinstance(trainer.gated_optimizer, GatedOptimizer)
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"  # the wrapper accelerate hides
    inner = trainer.gated_optimizer.optimizer  # built by the Trainer (args.optim): torch's fused AdamW, sync-free
    assert isinstance(inner, torch.optim.AdamW) and inner.defaults.get("fused")
    assert [r["k"] for r in rows] == [1, 2, 3, 4] * (max_steps // K)
    assert [r["gate_k"] for r in rows] == [r["k"] for r in rows]
    assert trainer.dgg_generations == [0, 4]  # TRL's own schedule when nothing trips
    assert not any(r["skipped"] for r in rows)
    assert all(r["head_changed"] for r in rows)
    # the scheduled (linear) LR reaches the inner optimizer at every step
    for r in rows:
        assert r["inner_lr"] == pytest.approx(expected_lr(r["step"], max_steps), rel=1e-12), r
    # the gate saw the energy before clipping: post-clip lm_head energy * (norm / max_norm)^2
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == max_steps
    for r, norm in zip(rows, norms):
        assert norm > 1e-4  # clipping really happened
        coef = 1e-4 / (norm + 1e-6)
        assert r["energy"] == pytest.approx(r["post_clip_energy"] / coef**2, rel=1e-4), r
        assert r["energy"] > 10 * r["post_clip_energy"]
    # gate metrics with the trainer's own logs
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == max_steps
    assert all("dgg/energy" in h and "dgg/gated_fraction" in h for h in logs)
    assert logs[-1]["dgg/steps"] == max_steps and logs[-1]["dgg/reuse_index"] == K


def test_grpo_forced_trip_regenerates_next_step(tmp_path):
    max_steps = 12
    # tau so large that only the injected spike (energy x 1e8) can trip; the first-pass window (size 2) is full
    # after the buffers generated at steps 0 and 4, so the k=2 pass of the third buffer (step 9) can be gated.
    gate = GateConfig(window=2, tau=1e6, max_reuse=K)
    trainer, rows = run(tmp_path, max_steps=max_steps, max_grad_norm=0.0, gate=gate, spike_at=9, user_optimizer=True)
    assert [r["k"] for r in rows] == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 1, 2]
    assert [r["step"] for r in rows if r["gated"]] == [9]
    assert [r["step"] for r in rows if r["skipped"]] == [9]
    assert not rows[9]["head_changed"]  # the gated step is exact
    assert all(r["head_changed"] for r in rows if r["step"] != 9)
    assert trainer.dgg_generations == [0, 4, 8, 10]  # the trip at step 9 regenerates at step 10
    for r in rows:  # gated or not, the schedule advances with global_step
        assert r["inner_lr"] == pytest.approx(expected_lr(r["step"], max_steps), rel=1e-12), r
    m = trainer.gated_optimizer.get_metrics()
    assert m["stopped_batches"] == 1 and m["gated_steps"] == 1 and m["steps"] == max_steps
