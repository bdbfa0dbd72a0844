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
    with pytest.warns(UserWarning, match=r"can act only from optimizer step 13 .* max_steps=6"):
        trainer = make_trainer(tmp_path, make_args(tmp_path, max_steps=6), dgg_config=gate)
        trainer.train()
    fills = [h["dgg/window_fill"] for h in trainer.state.log_history if "loss" in h]
    assert fills == [0.25, 0.25, 0.25, 0.25, 0.5, 0.5]  # one first-pass observation per rollout batch
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
                          "ref_kl": float(ref["approx_kl"])})

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        m = unwrap_gated(optimizer).get_metrics()
        self.rows[-1].update(drift=m["drift"], gated=m["gated"], skipped=m["skipped"])


def test_drift_signal_reaches_the_gate_and_stops_reuse(tmp_path):
    # a pure KL early stop: the first reuse pass whose approx KL exceeds the threshold is dropped and ends reuse
    gate = GateConfig(energy=False, drift="approx_kl", drift_threshold=1e-9, max_reuse=K)
    rec = DriftRecorder()
    trainer = make_trainer(tmp_path, make_args(tmp_path, max_steps=6, max_grad_norm=1.0), dgg_config=gate,
                           callbacks=[rec])
    rec.trainer = trainer
    trainer.train()
    rows = rec.rows
    assert [r["k"] for r in rows] == [1, 2] * 3
    assert trainer.dgg_generations == [0, 2, 4]
    assert [r["gated"] for r in rows] == [0.0, 1.0] * 3
    for r in rows:  # the gate saw the step's KL against the rollout policy TRL kept
        assert r["drift"] == pytest.approx(r["ref_kl"], rel=1e-4, abs=1e-12), r
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
