"""accelerate and the plain Hugging Face Trainer: the gated optimizer behind AcceleratedOptimizer, gradient
accumulation, the pre-clip energy, the scheduler, and gate metrics in the Trainer's logs."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")
accelerate = pytest.importorskip("accelerate")

from dgg_fused import GateConfig, GatedOptimizer  # noqa: E402
from dgg_fused.integrations import gate_metrics, unwrap_gated  # noqa: E402
from helpers import assert_bit_identical, batch, loss_fn, make_model, snapshot  # noqa: E402

K = 4
NEVER = GateConfig(window=2, tau=1e30, max_reuse=K)
SPIKY = GateConfig(window=2, tau=50.0, std_floor=0.5, max_reuse=K)
ACCUM = 2


def _accelerate_run(wrap: bool, cfg: GateConfig, spike_step: int | None = None, micro_steps: int = 24):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=ACCUM)
    model = make_model()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    opt = GatedOptimizer(inner, lm_head=model.lm_head, config=cfg) if wrap else inner
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    model, aopt, asched = accelerator.prepare(model, opt, sched)
    gated = unwrap_gated(aopt)
    lrs, decisions = [], []
    for micro in range(micro_steps):
        step = micro // ACCUM  # optimizer step index
        if gated is not None:
            gated.set_reuse_index(step % K + 1)
        with accelerator.accumulate(model):
            scale = 1e3 if step == spike_step else 1.0
            accelerator.backward(loss_fn(model, batch(100 + micro), scale) / ACCUM)
            if accelerator.sync_gradients:
                if gated is not None:
                    gated.record_energy()  # before clipping
                accelerator.clip_grad_norm_(model.parameters(), 1e-3)
            aopt.step()
            asched.step()
            aopt.zero_grad()
            if accelerator.sync_gradients:
                lrs.append(inner.param_groups[0]["lr"])
                if gated is not None:
                    m = gated.get_metrics()
                    decisions.append((m["reuse_index"], m["gated"], m["skipped"], m["steps"]))
    return accelerator.unwrap_model(model), inner, lrs, decisions


def test_accelerate_loop_parity_accumulation_and_schedule():
    model_b, inner_b, lrs_b, _ = _accelerate_run(False, NEVER)
    model_g, inner_g, lrs_g, dec = _accelerate_run(True, NEVER)
    assert_bit_identical(snapshot(model_b, inner_b), snapshot(model_g, inner_g), "accelerate, never gated")
    n = 24 // ACCUM
    assert [d[3] for d in dec] == list(range(1, n + 1))  # one gate step per accumulation cycle
    assert [d[0] for d in dec] == [s % K + 1 for s in range(n)]
    assert lrs_g == lrs_b == pytest.approx([1e-2 / (2 + s) for s in range(n)])  # the schedule reaches the inner opt


def test_accelerate_gated_step_is_exact_and_schedule_advances():
    model_g, inner_g, lrs, dec = _accelerate_run(True, SPIKY, spike_step=9)
    assert [i for i, d in enumerate(dec) if d[1]] == [9]
    assert [i for i, d in enumerate(dec) if d[2]] == [9, 10, 11]  # the rest of the batch is skipped
    assert lrs == pytest.approx([1e-2 / (2 + s) for s in range(len(lrs))])  # gated steps still advance the LR
    # exactness: the same run stopped right before the spike leaves identical params and state
    model_s, inner_s, _, _ = _accelerate_run(True, SPIKY, spike_step=9, micro_steps=9 * ACCUM)
    # steps 9-11 were skipped, so the parameters after step 11 equal those after step 8
    assert_bit_identical(snapshot(model_s, inner_s), snapshot(model_g, inner_g), "gated steps under accelerate")


class _Reg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, ids, labels):
        logits = self.net(ids)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_hf_trainer_metrics_callback_logs_with_trainer_logs(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from dgg_fused.integrations.hf import DGGMetricsCallback, add_metrics_callback

    class Reporter(TrainerCallback):  # stands in for wandb/tensorboard: registered after ours
        def __init__(self):
            self.seen = []

        def on_log(self, args, state, control, logs=None, **kw):
            self.seen.append(dict(logs))

    model = _Reg()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), lm_head=model.net.lm_head)
    ids, tgt = batch(0, n=16)
    ds = [{"ids": ids[i], "labels": tgt[i]} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, remove_unused_columns=False,
    )
    rep = Reporter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=ds, optimizers=(opt, None), callbacks=[rep])
        cb = add_metrics_callback(trainer)
        assert add_metrics_callback(trainer) is cb and trainer.callback_handler.callbacks[0] is cb
        assert isinstance(cb, DGGMetricsCallback)
        trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    assert [h["dgg/steps"] for h in train_logs] == [1, 2, 3]
    assert all("dgg/energy" in h and h["dgg/gated_fraction"] == 0.0 for h in train_logs)
    assert [r["dgg/steps"] for r in rep.seen if "loss" in r] == [1, 2, 3]  # later callbacks see the metrics
    d = gate_metrics(trainer.optimizer)  # through the AcceleratedOptimizer
    assert d["dgg/steps"] == 3 and isinstance(d["dgg/energy"], float)
    assert gate_metrics(torch.optim.SGD(model.parameters(), lr=0.1)) == {}


def test_metrics_callback_reads_the_device_once_per_log_call():
    """Issue 17: hf.py's on_log synced twice per log call (the metrics, then the window fill); now one copy."""
    pytest.importorskip("transformers")
    from types import SimpleNamespace

    from dgg_fused.integrations.hf import DGGMetricsCallback
    from dgg_fused.testing import record_syncs

    model = make_model()
    opt = GatedOptimizer(torch.optim.AdamW(model.parameters(), fused=True), lm_head=model.lm_head,
                         config=GateConfig(window=4))
    opt.set_reuse_index(1)
    loss_fn(model, batch(0)).backward()
    opt.step()
    cb = DGGMetricsCallback()
    logs = {"loss": 1.0}
    with record_syncs() as one:
        opt.get_metrics()
    with record_syncs() as rec:
        cb.on_log(None, SimpleNamespace(log_history=[], global_step=1), None, logs=logs, optimizer=opt)
    assert rec.events == one.events, rec.events  # exactly one get_metrics() worth of host reads
    assert logs["dgg/window_filled"] == 1 and logs["dgg/steps"] == 1 and "dgg/window_fill" not in logs
