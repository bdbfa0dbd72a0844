"""verl 0.9.1 (FSDP2 engine) under DGG, on CPU with gloo, 1 and 2 ranks (runs in its own venv: `make test-verl`).

In spawned processes: a tiny Llama saved to disk, verl's TrainingWorker built through the plugin's classes on a CPU
platform (tests/verl_cpu_platform.py), PPO updates of 4 epochs (= K passes) over 2 mini-batches per pass. A loss
x1000 on pass 2 makes the gate trip there. Checked: the reuse index of every micro-batch, the early exit (the
remaining mini-batches run no forward/backward), the inner step count = steps - gated, parameters bit-identical to
an update that stopped before the tripped step, identical decisions on every rank, dgg/* in verl's metrics, the
gate state through verl's checkpoint, and verl's behaviour unchanged without a dgg config.
"""

from __future__ import annotations

import datetime
import os

import pytest

pytest.importorskip("verl")
torch = pytest.importorskip("torch")
from multiproc import run_ranks  # noqa: E402

K = 4
B, T, R = 8, 12, 6  # sequences per update, tokens per sequence, response tokens
MINI = 4  # global mini-batch size: 2 mini-batches per pass
TIMEOUT_S = 240
GATE = {"window": 2, "tau": 50.0, "std_floor": 0.5, "reference": "all", "max_reuse": K}


def _make_model(path: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, **{f"w{i}": i + 3 for i in range(29)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)


def _worker_cfg(path: str, dgg: dict | None, ckpt: bool = False):
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine_workers import TrainingWorkerConfig

    over = {"fused": True}
    if dgg is not None:
        over["dgg"] = dgg
    fp32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    return TrainingWorkerConfig(
        model_type="language_model",
        model_config=HFModelConfig(path=path, use_remove_padding=True, override_config={"attn_implementation": "sdpa"}),
        engine_config=FSDPEngineConfig(forward_only=False, strategy="fsdp2", use_torch_compile=False,
                                       use_dynamic_bsz=False, micro_batch_size_per_gpu=2, max_token_len_per_gpu=1000,
                                       model_dtype="fp32", mixed_precision=fp32),
        optimizer_config=FSDPOptimizerConfig(lr=1e-2, clip_grad=1.0, override_optimizer_config=over),
        checkpoint_config=CheckpointConfig(save_contents=["model", "optimizer", "extra"],
                                           load_contents=["model", "optimizer", "extra"]) if ckpt else None,
    )


def _rollout_log_probs(path: str) -> torch.Tensor:
    """The log-probabilities of the responses under the initial model (what the rollout policy would report)."""
    from transformers import LlamaForCausalLM

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32, (B, T), generator=g)
    with torch.no_grad():
        logits = LlamaForCausalLM.from_pretrained(path).float()(ids).logits[:, T - R - 1 : T - 1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, T - R :, None])[..., 0]


def _data(rank: int, world: int, epochs: int, old: torch.Tensor | None = None):
    from verl import DataProto
    from verl.utils import tensordict_utils as tu
    from verl.utils.model import compute_position_id_with_mask
    from verl.workers.utils.padding import left_right_2_no_padding

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 32, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    full = {"input_ids": ids, "prompts": ids[:, : T - R], "attention_mask": mask,
            "position_ids": compute_position_id_with_mask(mask), "responses": ids[:, T - R :],
            "response_mask": mask[:, T - R :], "old_log_probs": -torch.rand(B, R, generator=g) - 2.0,
            "advantages": torch.randn(B, R, generator=g), "ref_log_prob": -torch.rand(B, R, generator=g) - 2.0}
    if old is not None:
        full["old_log_probs"] = old
    n = B // world  # this rank's share of the rollout batch
    data = DataProto.from_single_dict({k: v[rank * n : (rank + 1) * n] for k, v in full.items()},
                                      meta_info={"temperature": 1.0})
    td = left_right_2_no_padding(data.to_tensordict())
    tu.assign_non_tensor(td, global_batch_size=MINI, mini_batch_size=MINI, epochs=epochs, seed=0,
                         dataloader_kwargs={"shuffle": False}, compute_loss=True, calculate_entropy=False)
    return td


def _build(path: str, dgg: dict | None, ks: list, ckpt: bool = False):
    from functools import partial

    from verl.workers.config import ActorConfig
    from verl.workers.utils.losses import ppo_loss

    from dgg_fused.integrations.verl import DGGTrainingWorker

    worker = DGGTrainingWorker(_worker_cfg(path, dgg, ckpt))
    worker.reset()

    def loss_fn(config, model_output, data, dp_group=None):  # loss x1000 on pass 2: an energy spike there
        gated = worker.gated_optimizer
        k = gated.reuse_index if gated is not None else 0
        ks.append(k)
        loss, metrics = ppo_loss(config, model_output, data, dp_group)
        return (loss * 1e3 if k == 2 else loss), metrics

    actor = ActorConfig(strategy="fsdp2", rollout_n=1, ppo_micro_batch_size_per_gpu=2, use_torch_compile=False)
    worker.set_loss_fn(partial(loss_fn, actor))
    return worker


def _params(worker) -> dict:
    return {n: p.full_tensor().detach().clone() for n, p in worker.engine.module.named_parameters()}  # collective


def _scenario(rank: int, world: int, path: str, ckpt_dir: str) -> dict:
    from verl.utils import tensordict_utils as tu

    from dgg_fused import GatedOptimizer

    out: dict = {}
    # 1) K = 4 passes, the gate trips on pass 2
    ks: list = []
    w = _build(path, GATE, ks, ckpt=True)
    assert type(w.engine).__name__ == "DGGFSDPEngine"
    res = w.train_mini_batch(_data(rank, world, K))
    gated = w.gated_optimizer
    out["ks"] = ks
    metrics = tu.get(res, "metrics") if res is not None else None
    out["metrics"] = {k: v for k, v in metrics.items() if k.startswith("dgg/")} if metrics is not None else None
    out["gate"] = gated.get_metrics()
    out["inner_steps"] = sorted({float(s["step"]) for s in gated.optimizer.state.values()})
    out["params"] = _params(w)
    w.engine.save_checkpoint(ckpt_dir, global_step=1)
    out["dgg_saved"] = gated.state_dict()["dgg"]
    # 2) the same update stopped before the tripped step: 1 pass (2 mini-batches) only
    w1 = _build(path, GATE, [], ckpt=False)
    w1.train_mini_batch(_data(rank, world, 1))
    out["params_one_pass"] = _params(w1)
    # 3) resume: the gate state comes back through verl's checkpoint
    w2 = _build(path, GATE, [], ckpt=True)
    w2.engine.load_checkpoint(ckpt_dir)
    out["dgg_loaded"] = w2.gated_optimizer.state_dict()["dgg"]
    # 4) no dgg entry: verl's own optimizer and loop, every mini-batch of every pass
    ks_plain: list = []
    wp = _build(path, None, ks_plain)
    out["plain_optimizer_is_gated"] = isinstance(wp.engine.optimizer, GatedOptimizer)
    wp.train_mini_batch(_data(rank, world, K))
    out["plain_calls"] = len(ks_plain)
    # 5) a drift gate (approx KL against the rollout policy's log-probs, no energy rule): trips on pass 2
    drift_gate = {"energy": False, "drift": "approx_kl", "drift_threshold": 1e-6, "max_reuse": K}
    ks_drift: list = []
    wd = _build(path, drift_gate, ks_drift)
    seen: list = []
    record = wd.gated_optimizer.record_drift

    def spy(**stats):  # test instrumentation: what the gate is handed (a sync per step is fine here)
        seen.append(float(stats["approx_kl"]))
        record(**stats)

    wd.gated_optimizer.record_drift = spy
    wd.train_mini_batch(_data(rank, world, K, old=_rollout_log_probs(path)))
    out["drift_seen"] = seen
    out["drift_ks"] = ks_drift
    out["drift_gate"] = wd.gated_optimizer.get_metrics()
    return out


def _worker(rank: int, d: str, world: int) -> dict:
    import torch.distributed as dist

    import verl_cpu_platform  # noqa: F401  (registers the "cpu" platform)
    from dgg_fused.integrations import verl as dgg_verl

    dgg_verl.register_device("cpu")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    path = os.path.join(d, "model")
    if rank == 0:
        _make_model(path)
    dist.barrier()
    return _scenario(rank, world, path, os.path.join(d, "ckpt"))


def _run(world: int) -> list[dict]:
    return run_ranks(_worker, world, TIMEOUT_S, world, env={"VERL_PLATFORM": "cpu"},
                     what=f"verl workers ({world} ranks)")


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def ranks(request):
    return _run(request.param)


def test_k_sequence_trip_and_early_exit(ranks):
    world = len(ranks)
    micro_per_mb = (MINI // world) // 2  # micro-batches of 2 per mini-batch
    for x in ranks:
        # pass 1 (2 mini-batches), then the first mini-batch of pass 2 trips: nothing else runs
        assert x["ks"] == [1] * (2 * micro_per_mb) + [2] * micro_per_mb
        m = x["metrics"]
        assert m["dgg/gated"] == [1.0] and m["dgg/stopped_batches"] == [1] and m["dgg/steps"] == [3]
        assert m["dgg/skipped_mini_batches"] == [2 * K - 3] and m["dgg/passes_run"] == [2]
        assert x["gate"]["gated_steps"] == 1 and x["gate"]["reuse_index"] == 2
        assert x["inner_steps"] == [2.0]  # steps - gated
    # the plain engine runs every mini-batch of every pass
    assert all(not x["plain_optimizer_is_gated"] and x["plain_calls"] == 2 * K * micro_per_mb for x in ranks)


def test_gated_update_is_exact_and_ranks_agree(ranks):
    for x in ranks:
        for name, p in x["params"].items():
            assert torch.equal(p, x["params_one_pass"][name]), name  # the gated step changed nothing
    first = ranks[0]
    for x in ranks[1:]:
        assert x["gate"] == first["gate"] and x["metrics"] == first["metrics"]  # bit-identical decisions


def test_gate_state_in_verl_checkpoint(ranks):
    for x in ranks:
        saved, loaded = x["dgg_saved"], x["dgg_loaded"]
        assert loaded["reuse_index"] == saved["reuse_index"] == 2 and loaded["config"] == saved["config"]
        for name, t in saved["gate"].items():
            assert torch.equal(loaded["gate"][name], t), name


def test_drift_signal_reaches_the_gate(ranks):
    world = len(ranks)
    micro_per_mb = (MINI // world) // 2
    for x in ranks:
        seen = x["drift_seen"]
        assert len(seen) == 3  # two steps of pass 1, the tripped first step of pass 2
        assert seen[0] < 1e-6  # nothing has moved yet: verl's log-probs equal the rollout policy's
        assert seen[1] > 1e-6 and seen[2] > 1e-6
        assert x["drift_ks"] == [1] * (2 * micro_per_mb) + [2] * micro_per_mb  # the early exit after the trip
        assert x["drift_gate"]["gated_steps"] == 1 and x["drift_gate"]["drift"] == pytest.approx(seen[2])
    assert all(x["drift_seen"] == ranks[0]["drift_seen"] for x in ranks)  # reduced over ranks: one decision


def test_loaded_by_verls_plugin_mechanism():
    """VERL_USE_EXTERNAL_MODULES=dgg_fused.integrations.verl: `import verl` registers the engine and the worker."""
    import subprocess
    import sys

    code = (
        "import verl\n"
        "from verl.workers.engine import EngineRegistry\n"
        "from verl.workers.engine_workers import ActorRolloutRefWorker\n"
        "engines = EngineRegistry._engines['language_model']\n"  # before this script imports dgg_fused itself
        "names = {c.__module__ + '.' + c.__name__ for b in ('fsdp', 'fsdp2') for c in engines[b].values()}\n"
        "assert names == {'dgg_fused.integrations.verl.DGGFSDPEngine'}, names\n"
        "w = ActorRolloutRefWorker.actor_worker_cls\n"
        "assert w.__module__ + '.' + w.__name__ == 'dgg_fused.integrations.verl.DGGTrainingWorker', w\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode != 0 and "AssertionError" in r.stderr  # without the plugin: verl's own classes
    env["VERL_USE_EXTERNAL_MODULES"] = "dgg_fused.integrations.verl"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_example_config_composes_with_verls_own():
    """examples/verl_grpo.yaml works as written: Hydra composes it with verl's ppo_trainer config (the file's
    searchpath), verl turns its optimizer section into verl's FSDPOptimizerConfig, and the plugin reads the gate from
    it; the command-line form of docs/integrations.md gives the same gate."""
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    from dgg_fused import GateConfig
    from dgg_fused.integrations.verl import gate_config_from

    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples")
    with initialize_config_dir(config_dir=os.path.abspath(examples), version_base=None):
        cfg = compose(config_name="verl_grpo", overrides=["actor_rollout_ref.model.path=/nowhere"])
    actor = cfg.actor_rollout_ref.actor
    assert actor.strategy == "fsdp2" and actor.ppo_epochs == 4 and cfg.algorithm.adv_estimator == "grpo"
    optim = omega_conf_to_dataclass(actor.optim)
    gate = gate_config_from(optim)
    assert gate == GateConfig(window=8, tau=0.3, max_reuse=4, drift="approx_kl", drift_threshold=0.02)
    assert optim.override_optimizer_config["fused"] is True and actor.ppo_epochs <= gate.max_reuse
    verl_config = os.path.dirname(__import__("verl.trainer.config", fromlist=["x"]).__file__)
    with initialize_config_dir(config_dir=verl_config, version_base=None):
        cli = compose(config_name="ppo_trainer", overrides=[
            "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.actor.ppo_epochs=4",
            "+actor_rollout_ref.actor.optim.override_optimizer_config.fused=true",
            "+actor_rollout_ref.actor.optim.override_optimizer_config.dgg.tau=0.3",
            "+actor_rollout_ref.actor.optim.override_optimizer_config.dgg.window=8",
            "+actor_rollout_ref.actor.optim.override_optimizer_config.dgg.max_reuse=4"])
    assert gate_config_from(omega_conf_to_dataclass(cli.actor_rollout_ref.actor.optim)) == GateConfig(max_reuse=4)
