"""TRL GRPOTrainer with rollout reuse under DGG, offline on CPU: tiny Llama from a config, tokenizer built in
code, in-memory dataset, Python reward. Checks the reuse index the gate sees, regeneration after a trip, the
pre-clip energy, the scheduled LR reaching the inner optimizer, and the gate metrics in the trainer's logs."""

from __future__ import annotations

import os
import re
import sys
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

from dgg_fused import GateConfig, GatedOptimizer, TiedLmHeadWarning  # noqa: E402
from dgg_fused.integrations import unwrap_gated  # noqa: E402
from dgg_fused.integrations.trl import DGGGRPOConfig, DGGGRPOTrainer  # noqa: E402

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "yes", "no"]
K = 4
LR = 1e-3


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def make_model(tokenizer, tied: bool = False) -> LlamaForCausalLM:
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
        tie_word_embeddings=tied,
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


ARGS = dict(
    per_device_train_batch_size=4,
    num_generations=4,
    num_iterations=K,
    max_completion_length=4,
    learning_rate=LR,
    lr_scheduler_type="linear",
    warmup_steps=0,
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


def make_args(tmp_path, config_cls=GRPOConfig, **overrides):
    return config_cls(output_dir=str(tmp_path), **{**ARGS, **overrides})


def make_trainer(tmp_path, args=None, *, model=None, tok=None, callbacks=(), **kw):
    tok = tok or make_tokenizer()
    model = model if model is not None else make_model(tok)
    prompts = [" ".join(WORDS[(i + j) % 8] for j in range(3)) for i in range(16)]
    ds = datasets.Dataset.from_dict({"prompt": prompts})
    args = args if args is not None else make_args(tmp_path, max_steps=4)
    return DGGGRPOTrainer(
        model=model, reward_funcs=reward_yes, args=args, train_dataset=ds, processing_class=tok,
        callbacks=list(callbacks), **kw,
    )


def run(tmp_path, *, max_steps: int, max_grad_norm: float, gate: GateConfig, spike_at=None, accum: int = 1,
        user_optimizer: bool = False, **extra_args):
    tok = make_tokenizer()
    model = make_model(tok)
    # the user's own optimizer (wrapped by the trainer) or the one the Trainer builds (args.optim)
    optimizers = (torch.optim.AdamW(model.parameters(), lr=LR, fused=True), None) if user_optimizer else (None, None)
    # gradient_accumulation_steps: steps_per_generation defaults to it
    args = make_args(tmp_path, gradient_accumulation_steps=accum, max_steps=max_steps, max_grad_norm=max_grad_norm,
                     **extra_args)
    rec = Recorder(spike_at)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(tmp_path, args, model=model, tok=tok, callbacks=[rec], dgg_config=gate,
                               optimizers=optimizers)
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


# ---------------------------------------------------------------- settings under which the gate would do nothing


def test_user_gated_optimizer_max_reuse_checked_at_construction(tmp_path):
    # defect 1: num_iterations=8 with a user-built gate of max_reuse=4 crashed at pass 5 of the first batch
    tok = make_tokenizer()
    model = make_model(tok)
    gated = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, fused=True), lm_head=model.lm_head)
    args = make_args(tmp_path, num_iterations=8, max_steps=8)
    with pytest.raises(ValueError, match=r"max_reuse=4 is smaller than num_iterations=8"):
        make_trainer(tmp_path, args, model=model, tok=tok, optimizers=(gated, None))


@pytest.mark.parametrize("spg", [1, 3])
def test_steps_per_generation_must_be_a_multiple_of_accumulation(tmp_path, spg):
    # defect 2: steps_per_generation < / not a multiple of gradient_accumulation_steps mixed passes in one step
    args = make_args(tmp_path, gradient_accumulation_steps=2, steps_per_generation=spg, max_steps=4)
    with pytest.raises(ValueError, match=rf"steps_per_generation={spg} is not a multiple of gradient_accumulation"):
        make_trainer(tmp_path, args)


def test_steps_per_generation_two_optimizer_steps_per_pass(tmp_path):
    # steps_per_generation = 2 * accumulation: every pass has two optimizer steps, each labelled with its pass
    never = GateConfig(window=2, tau=1e30, max_reuse=K)
    trainer, rows = run(tmp_path, max_steps=8, max_grad_norm=1.0, gate=never, accum=2, steps_per_generation=4)
    assert [r["k"] for r in rows] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert trainer.dgg_generations == [0]


def test_gate_configured_in_two_places_raises(tmp_path):
    # defect 3: dgg_config= was silently ignored next to a user's GatedOptimizer
    tok = make_tokenizer()
    model = make_model(tok)
    gated = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, fused=True), lm_head=model.lm_head)
    with pytest.raises(ValueError, match=r"configured in 2 places"):
        make_trainer(tmp_path, model=model, tok=tok, optimizers=(gated, None), dgg_config=GateConfig(tau=0.5))
    args = make_args(tmp_path, DGGGRPOConfig, max_steps=4, dgg_tau=0.2)
    with pytest.raises(ValueError, match=r"configured in 2 places"):
        make_trainer(tmp_path, args, dgg_config=GateConfig(tau=0.5, max_reuse=K))
    # the same settings in two places are fine
    t = make_trainer(tmp_path, model=model, tok=tok, optimizers=(gated, None), dgg_config=GateConfig())
    assert t.dgg_config == gated.config


def test_num_iterations_one_raises(tmp_path):
    # defect 6: GRPOConfig's default num_iterations=1 has no reuse pass: the gate would never act
    with pytest.raises(ValueError, match=r"num_iterations=1: there is no reuse pass"):
        make_trainer(tmp_path, make_args(tmp_path, num_iterations=1, max_steps=4))


def test_warmup_is_visible(tmp_path):
    # defect 4: window=4 first-pass observations = 4 rollout batches of K=4 steps: the gate can act from step 13
    gate = GateConfig(window=4, tau=1e30, max_reuse=K)
    trainer = make_trainer(tmp_path, make_args(tmp_path, max_steps=6), dgg_config=gate)
    with pytest.warns(UserWarning, match=r"can act only from optimizer step 13 .* max_steps=6") as rec:
        line = sys._getframe().f_lineno + 1
        trainer.train()
    # issue 18, edge 5: it points at the user's trainer.train(), not at transformers' callback handler, and says
    # what would let the gate act
    (w,) = [w for w in rec if "can act only" in str(w.message)]
    assert (w.filename, w.lineno) == (__file__, line)
    assert "--dgg_window 2 (GateConfig(window=2)), can act from step 5" in str(w.message)
    assert "--max_steps 14 or more" in str(w.message) and "--dgg_preset recommended" in str(w.message)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["dgg/window_filled"] for h in logs] == [1, 1, 1, 1, 2, 2]  # one first-pass observation per batch
    assert not any("dgg/window_fill" in h for h in logs)  # issue 18, edge 10: one name per meaning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # long enough: no warm-up warning
        from dgg_fused.integrations.trl import _WarmupCheck

        class _S:
            max_steps = 14

        _WarmupCheck(trainer).on_train_begin(trainer.args, _S(), None)


# ---------------------------------------------------------------- PEFT


def _lora(**kw):
    peft = pytest.importorskip("peft")
    return peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw)


def test_peft_frozen_lm_head_fails_at_construction_with_advice(tmp_path):
    # defect 5: a frozen lm_head failed late, at train(), with an error that did not say what to do
    with pytest.raises(ValueError, match=r"none of them is trainable.*modules_to_save=\['lm_head'\]"):
        make_trainer(tmp_path, peft_config=_lora(target_modules=["q_proj", "v_proj"]))


def test_peft_modules_to_save_watches_the_trainable_copy(tmp_path):
    gate = GateConfig(window=2, tau=1e30, max_reuse=K)
    cfg = _lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(tmp_path, make_args(tmp_path, max_steps=2), peft_config=cfg, dgg_config=gate)
        trainer.train()
    wrapper = trainer.model.base_model.model.lm_head
    copy = wrapper.modules_to_save["default"].weight
    assert copy.requires_grad and not wrapper.original_module.weight.requires_grad
    gated = trainer.gated_optimizer
    assert [id(p) for p in gated.lm_head_params] == [id(copy)]
    assert gated.get_metrics()["steps"] == 2 and gated.get_metrics()["energy"] > 0


def test_peft_lm_head_by_name_after_wrapping(tmp_path):
    # with peft_config= the user cannot hold the wrapped head: a name is looked up after PEFT wrapped the model
    cfg = _lora(target_modules=["q_proj"], modules_to_save=["lm_head"])
    args = make_args(tmp_path, DGGGRPOConfig, max_steps=4, dgg_lm_head="lm_head")
    trainer = make_trainer(tmp_path, args, peft_config=cfg)
    trainer.create_optimizer()
    copy = trainer.model.base_model.model.lm_head.modules_to_save["default"].weight
    assert [id(p) for p in trainer.gated_optimizer.lm_head_params] == [id(copy)]
    with pytest.raises(ValueError, match=r"no such submodule"):
        make_trainer(tmp_path, peft_config=cfg, lm_head="not_a_module")


# ---------------------------------------------------------------- defect 7: metrics, tied warning, config


def test_resume_gated_fraction_and_no_gate_keys_in_summary(tmp_path):
    # window=2 over every step ("all"): the spike at step 2 (k=3) trips; the checkpoint at step 4 holds 1 gated step
    gate = GateConfig(window=2, tau=1e6, max_reuse=K, reference="all")
    ckpt_args = dict(save_strategy="steps", save_steps=4, max_grad_norm=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t1 = make_trainer(tmp_path, make_args(tmp_path, max_steps=4, **ckpt_args), dgg_config=gate,
                          callbacks=[Recorder(spike_at=2)])
        t1.train()
    assert t1.gated_optimizer.get_metrics()["gated_steps"] == 1
    summary = t1.state.log_history[-1]
    assert "train_runtime" in summary and not any(k.startswith("dgg/") for k in summary)  # defect 7b
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t2 = make_trainer(tmp_path, make_args(tmp_path, max_steps=6, **ckpt_args), dgg_config=gate)
        t2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    logs = [h for h in t2.state.log_history if "loss" in h and h["step"] > 4]
    assert [h["dgg/steps"] for h in logs] == [5, 6]  # the gate's counters came back with the checkpoint
    assert [h["dgg/gated_fraction"] for h in logs] == [0.0, 0.0]  # defect 7a: was 1/5 on the first log


def test_tied_warning_points_at_the_caller_and_can_be_silenced(tmp_path):
    tok = make_tokenizer()
    with pytest.warns(TiedLmHeadWarning, match=r"DGGGRPOTrainer\(\.\.\., warn_tied=False\)") as rec:
        make_trainer(tmp_path, model=make_model(tok, tied=True), tok=tok)
    assert {w.filename for w in rec if w.category is TiedLmHeadWarning} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error", TiedLmHeadWarning)
        make_trainer(tmp_path, model=make_model(tok, tied=True), tok=tok, warn_tied=False)
        args = make_args(tmp_path, DGGGRPOConfig, max_steps=4, dgg_warn_tied=False)
        make_trainer(tmp_path, args, model=make_model(tok, tied=True), tok=tok)


def test_dgg_grpo_config_from_cli_and_yaml(tmp_path):
    from trl import TrlParser

    cli = ["--output_dir", str(tmp_path), "--num_iterations", "3", "--dgg_tau", "0.25", "--dgg_window", "5",
           "--dgg_statistic", "both", "--dgg_warn_tied", "false", "--use_cpu", "true", "--report_to", "none"]
    (args,) = TrlParser((DGGGRPOConfig,)).parse_args_and_config(args=cli)
    assert args.gate_config() == GateConfig(window=5, tau=0.25, max_reuse=3, statistic="both")
    assert args.dgg_warn_tied is False
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path}\nnum_iterations: 4\ndgg_tau: 0.4\ndgg_reference: accepted\n"
                         "dgg_max_reuse: 6\nuse_cpu: true\nreport_to: none\n")
    (args,) = TrlParser((DGGGRPOConfig,)).parse_args_and_config(args=["--config", str(yaml_file)])
    assert args.gate_config() == GateConfig(tau=0.4, reference="accepted", max_reuse=6)
    with pytest.raises(ValueError, match=r"dgg_\* fields.*GateConfig.tau"):
        DGGGRPOConfig(output_dir=str(tmp_path), num_iterations=4, dgg_tau=-1.0, use_cpu=True, report_to=[])
    # the trainer takes the gate from the config
    t = make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=4, dgg_tau=0.7))
    assert t.dgg_config == GateConfig(tau=0.7, max_reuse=K)


# ---------------------------------------------------------------- the drift signal (GateConfig.drift)


class DriftRecorder(TrainerCallback):
    """Per optimizer step: k, the gate's metrics, and an independent approx KL of the step's micro-batch."""

    def __init__(self) -> None:
        self.trainer = None
        self.rows: list[dict] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        from dgg_fused import drift_stats

        t = self.trainer
        inputs = t._buffered_inputs[0]  # steps_per_generation == 1: the buffer is this step's micro-batch
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        with torch.no_grad():
            new = t._get_per_token_logps_and_entropies(model, ids, att, inputs["completion_ids"].size(1))[0]
        ref = drift_stats(new, inputs["old_per_token_logps"], inputs["completion_mask"])
        self.rows.append({"step": state.global_step, "k": t.gated_optimizer.reuse_index,
                          "ref": {k: float(v) for k, v in ref.items()}})

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        m = unwrap_gated(optimizer).get_metrics()
        self.rows[-1].update(drift=m["drift"], gated=m["gated"], skipped=m["skipped"])


@pytest.mark.parametrize("stat", ["approx_kl", "log_ratio_m2"])
def test_drift_signal_reaches_the_gate_and_stops_reuse(tmp_path, stat):
    # a pure drift early stop: the first reuse pass whose statistic exceeds the threshold is dropped and ends reuse
    gate = GateConfig(energy=False, drift=stat, drift_threshold=1e-9, max_reuse=K)
    rec = DriftRecorder()
    trainer = make_trainer(tmp_path, make_args(tmp_path, max_steps=6, max_grad_norm=1.0), dgg_config=gate,
                           callbacks=[rec])
    rec.trainer = trainer
    trainer.train()
    rows = rec.rows
    assert [r["k"] for r in rows] == [1, 2] * 3
    assert trainer.dgg_generations == [0, 2, 4]
    assert [r["gated"] for r in rows] == [0.0, 1.0] * 3
    for r in rows:  # the gate saw the step's statistic against the rollout policy TRL kept
        assert r["drift"] == pytest.approx(r["ref"][stat], rel=1e-4, abs=1e-12), r
        if r["k"] == 1:
            assert r["drift"] < 1e-9  # the policy has not moved since generation
        else:
            assert r["drift"] > 1e-9


def test_drift_settings_from_the_command_line(tmp_path):
    from trl import TrlParser

    cli = ["--output_dir", str(tmp_path), "--num_iterations", "4", "--dgg_energy", "false", "--dgg_drift",
           "approx_kl", "--dgg_drift_threshold", "0.01", "--use_cpu", "true", "--report_to", "none"]
    (args,) = TrlParser((DGGGRPOConfig,)).parse_args_and_config(args=cli)
    assert args.gate_config() == GateConfig(energy=False, drift="approx_kl", drift_threshold=0.01, max_reuse=4)
    # a drift-only gate needs no lm_head: a PEFT model with a frozen head is fine
    t = make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=4, dgg_energy=False,
                                         dgg_drift="approx_kl"), peft_config=_lora(target_modules=["q_proj"]))
    t.create_optimizer()
    assert t.gated_optimizer.lm_head_params == ()


# ---------------------------------------------------------------- issue 18: the rough edges met on a real model


def test_peft_frozen_head_advice_works_as_given(tmp_path):
    """Edge 1: the frozen-head error advised LoRA on the lm_head, which TRL then refuses. Each advice it gives now
    trains; the old one is still refused by TRL (so the error must not give it)."""
    frozen = _lora(target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError) as err:
        make_trainer(tmp_path, peft_config=frozen)
    msg = str(err.value)
    assert "target_modules" not in msg
    assert "modules_to_save=['lm_head']" in msg and "GateConfig.recommended()" in msg
    assert "--dgg_preset recommended" in msg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = make_trainer(tmp_path, make_args(tmp_path, max_steps=2),
                         peft_config=_lora(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
        a.train()
        b = make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=2, dgg_preset="recommended"),
                         peft_config=frozen)
        b.train()
    assert a.gated_optimizer.get_metrics()["energy"] > 0
    assert b.dgg_config == GateConfig.recommended(max_reuse=K) and b.gated_optimizer.get_metrics()["steps"] == 2
    with pytest.raises(Exception, match=r"lm_head"):  # what the old advice led to
        make_trainer(tmp_path, peft_config=_lora(target_modules=["q_proj", "lm_head"]))


def test_recommended_gate_with_dgggrpoconfig_and_the_preset_flag(tmp_path):
    """Edge 2: dgg_config=GateConfig.recommended() with a DGGGRPOConfig raised, the dgg_* defaults counting as
    settings. Only fields the user set conflict; --dgg_preset recommended is the one-flag way."""
    from trl import TrlParser

    t = make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=4), dgg_config=GateConfig.recommended())
    assert t.dgg_config == GateConfig.recommended()
    # fields set to what dgg_config says are fine; one set otherwise is the conflict, named
    kl_args = dict(dgg_energy=False, dgg_drift="approx_kl")
    make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=4, **kl_args),
                 dgg_config=GateConfig.recommended())
    with pytest.raises(ValueError, match=r"configured in 2 places with different settings "
                                         r"\(dgg_config=: drift_threshold=0\.02; the "
                                         r"DGGGRPOConfig's dgg_\* fields: drift_threshold=0\.05\)"):
        make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=4, dgg_drift_threshold=0.05, **kl_args),
                     dgg_config=GateConfig.recommended())
    with pytest.raises(ValueError, match=r"configured in 2 places.*energy"):
        make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=4, dgg_preset="paper"),
                     dgg_config=GateConfig.recommended())
    base = ["--output_dir", str(tmp_path), "--num_iterations", "4", "--use_cpu", "true", "--report_to", "none"]
    (args,) = TrlParser((DGGGRPOConfig,)).parse_args_and_config(args=[*base, "--dgg_preset", "recommended"])
    assert args.gate_config() == GateConfig.recommended(max_reuse=4)
    (args,) = TrlParser((DGGGRPOConfig,)).parse_args_and_config(
        args=[*base, "--dgg_preset", "recommended", "--dgg_drift_threshold", "0.05", "--dgg_window", "3"])
    assert args.gate_config() == GateConfig.recommended(drift_threshold=0.05, window=3, max_reuse=4)
    (args,) = TrlParser((DGGGRPOConfig,)).parse_args_and_config(args=[*base, "--dgg_preset", "paper"])
    assert args.gate_config() == GateConfig.paper(max_reuse=4)
    with pytest.raises(SystemExit):
        TrlParser((DGGGRPOConfig,)).parse_args_and_config(args=[*base, "--dgg_preset", "bogus"])
    with pytest.raises(ValueError, match=r"tau=0\.5 does nothing here"):  # the preset's own checks still apply
        DGGGRPOConfig(output_dir=str(tmp_path), num_iterations=4, dgg_preset="recommended", dgg_tau=0.5,
                      use_cpu=True, report_to=[])


def test_drift_only_gate_logs_only_what_its_rule_uses(tmp_path):
    """Edge 3: dgg/energy and dgg/statistic were NaN and dgg/window_fill 1.0 from step 1 for a drift-only gate."""
    for gate, window_key in ((GateConfig.recommended(max_reuse=K), None),
                             (GateConfig(energy=False, drift="approx_kl", drift_rule="zscore", window=2, tau=1e30,
                                         max_reuse=K), "dgg/drift_window_filled")):
        trainer = make_trainer(tmp_path, make_args(tmp_path, max_steps=5), dgg_config=gate)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        dgg = [{k: v for k, v in h.items() if k.startswith("dgg/")} for h in logs]
        for d in dgg:
            assert not {"dgg/energy", "dgg/statistic", "dgg/window_filled", "dgg/window_fill"} & d.keys(), d
            assert all(v == v for v in d.values()), d  # no NaN
            assert {"dgg/drift", "dgg/drift_statistic", "dgg/gated"} <= d.keys()
        if window_key:  # the drift statistic's own window: first-pass observations only, one per batch
            assert [d[window_key] for d in dgg] == [1, 1, 1, 1, 2]
        else:
            assert not any("window" in k for d in dgg for k in d)


def test_which_rule_tripped_when_energy_and_drift_combine(tmp_path):
    """Edge 4: with both rules on, the logs count the trips of each (dgg/energy_trips, dgg/drift_trips)."""
    gate = GateConfig(window=2, tau=1e30, max_reuse=K, drift="approx_kl", drift_threshold=1e-9)
    trainer = make_trainer(tmp_path, make_args(tmp_path, max_steps=6, max_grad_norm=1.0), dgg_config=gate)
    trainer.train()
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["dgg/stopped_batches"] == 3 and last["dgg/drift_trips"] == 3 and last["dgg/energy_trips"] == 0


def test_changing_the_window_on_resume_says_how_to_fix_it(tmp_path):
    """Edge 6: a bare "checkpoint gate window is 2, this optimizer's is 8" from deep inside the Trainer."""
    import torch as th

    ckpt_args = dict(save_strategy="steps", save_steps=2, max_grad_norm=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=2, dgg_window=2, **ckpt_args)).train()
        ckpt = tmp_path / "checkpoint-2"
        t = make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=3, dgg_window=8, **ckpt_args))
        with pytest.raises(ValueError, match=r"saved with window 2, this run's gate has window 8\. Resume it with "
                                             r"--dgg_window 2.*start the gate fresh") as err:
            t.train(resume_from_checkpoint=str(ckpt))
        # the second way out, as the message writes it, works
        path = re.search(r"torch\.load\('([^']+)'", str(err.value))[1]
        sd = th.load(path, weights_only=True)
        del sd["dgg"]
        th.save(sd, path)
        t = make_trainer(tmp_path, make_args(tmp_path, DGGGRPOConfig, max_steps=3, dgg_window=8, **ckpt_args))
        t.train(resume_from_checkpoint=str(ckpt))
    assert t.gated_optimizer.get_metrics()["steps"] == 1  # a fresh gate, one step after the resume


def test_dgg_drift_none_switches_a_yaml_drift_gate_off(tmp_path):
    """Edge 7: --dgg_drift none was rejected, so a drift gate set in YAML could not be switched off."""
    from trl import TrlParser

    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(f"output_dir: {tmp_path}\nnum_iterations: 4\ndgg_drift: approx_kl\nuse_cpu: true\n"
                         "report_to: none\n")
    (args,) = TrlParser((DGGGRPOConfig,)).parse_args_and_config(args=["--config", str(yaml_file)])
    assert args.gate_config().drift == "approx_kl"
    (args,) = TrlParser((DGGGRPOConfig,)).parse_args_and_config(
        args=["--config", str(yaml_file), "--dgg_drift", "none"])
    assert args.dgg_drift is None and args.gate_config() == GateConfig(max_reuse=4)


def test_lm_head_typo_message(tmp_path):
    """Edge 8: "...LlamaForCausalLM / LlamaModel Or gate on policy drift alone...": no punctuation, and drift advice
    for a typo."""
    with pytest.raises(ValueError) as err:
        make_trainer(tmp_path, lm_head="lm_haed")
    assert str(err.value) == ("lm_head='lm_haed': no such submodule in LlamaForCausalLM or LlamaModel; its output "
                              "projection is 'lm_head'")


def test_tied_head_warns_once_for_the_trainer_and_a_users_optimizer(tmp_path):
    """Edge 9: one warning, not per step, whether the trainer finds the head or the user's GatedOptimizer got
    lm_head=model.lm_head (the README one-liner) through optimizers=."""
    tok = make_tokenizer()
    for own_optimizer in (False, True):
        model = make_model(tok, tied=True)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            opts = (GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=LR, fused=True), lm_head=model.lm_head,
                                   config=GateConfig(window=2, max_reuse=K)), None) if own_optimizer else (None, None)
            make_trainer(tmp_path, make_args(tmp_path, max_steps=3), model=model, tok=tok, optimizers=opts).train()
        tied = [w for w in rec if w.category is TiedLmHeadWarning]
        assert len(tied) == 1 and tied[0].filename == __file__, (own_optimizer, [str(w.message) for w in tied])
