"""Bit-identity check across a refactoring: run a fixed sequence of gated training steps on many configurations
through the public API only, and dump every parameter, every inner-optimizer state tensor, the gate's checkpoint
entry and the per-step metrics; then compare two dumps bit for bit.

    PYTHONPATH=<old checkout> python tests/bit_identity.py dump old.pt
    PYTHONPATH=<new checkout> python tests/bit_identity.py dump new.pt
    python tests/bit_identity.py compare old.pt new.pt

Not collected by pytest (a tool, not a test): the dump of one tree is compared with the dump of another on the same
machine and torch.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dgg_fused import GateConfig, GatedOptimizer, drift_stats  # noqa: E402
from helpers import OPTIMIZERS, batch, make_model  # noqa: E402

K = 4
BATCHES = 6
SPIKES = {(2, 2), (3, 3), (4, 2), (5, 4)}  # (batch, k): the loss is scaled by 1e3 (energy x 1e6)
NAN_HEAD = {(5, 2)}  # a NaN in the lm_head gradient

GATES = {
    "paper": GateConfig(window=3, tau=0.3, max_reuse=K),
    "inc-acc": GateConfig(window=3, tau=1.0, statistic="increment", reference="accepted", max_reuse=K),
    "both-all": GateConfig(window=2, tau=2.0, statistic="both", reference="all", std_floor=0.0, max_reuse=K),
    "kl": GateConfig(energy=False, drift="approx_kl", drift_threshold=1e-4, max_reuse=K),
    "klz-any": GateConfig(window=3, drift="approx_kl", drift_rule="zscore", max_reuse=K),
    "clip-all": GateConfig(window=3, drift="clip_frac", drift_threshold=0.01, combine="all", max_reuse=K),
}
OPTS = ["adamw_fused", "adam_fused", "sgd_momentum_fused", "adagrad_fused", "adamw_foreach", "sgd_momentum", "rmsprop"]
VARIANTS = {
    "plain": {},
    "clip": {"max_grad_norm": 0.05},
    "fold": {"max_grad_norm": 0.05, "fold_clip": True},
    "hook": {"energy_hook": True},
    "host": {"skip_mode": "host"},
    "torch": {"backend": "torch"},
}


def cases():
    for (g, cfg), o, (v, kw) in itertools.product(GATES.items(), OPTS, VARIANTS.items()):
        if not cfg.energy and v in ("hook", "torch"):
            continue
        if v == "host" and o not in ("adamw_fused", "sgd_momentum_fused"):
            continue
        if v in ("hook", "torch") and g not in ("paper", "both-all"):
            continue
        yield f"{g}/{o}/{v}", cfg, o, kw, False
    for o in ("adamw_fused", "adamw_foreach"):  # GradScaler and record_energy()
        yield f"paper/{o}/scaler", GATES["paper"], o, {}, "scaler"
        yield f"paper/{o}/record", GATES["paper"], o, {"max_grad_norm": 0.05}, "record"


def run(name, cfg, opt_name, kw, mode):
    torch.manual_seed(0)
    model = make_model(bias=True)
    lm_head = model.lm_head if cfg.energy else None

    def build():
        return GatedOptimizer(OPTIMIZERS[opt_name](model.parameters()), lm_head=lm_head, config=cfg, **kw)

    opt = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3) if mode == "scaler" else None
    metrics = []
    for b in range(BATCHES):
        if b == 3:  # a checkpoint round trip into a fresh optimizer mid-run
            sd = opt.state_dict()
            opt = build()
            opt.load_state_dict(sd)
        for k in range(1, K + 1):  # every pass, stopped or not: steps on a stopped batch are exercised too
            opt.set_reuse_index(k)
            data = batch(100 * b + k)
            ids, tgt = data
            logits = model(ids)
            logp = torch.log_softmax(logits, -1).gather(-1, tgt[:, None])[:, 0]
            old = logp.detach() - 0.01 * (k - 1) * torch.linspace(-1, 1, logp.numel())
            loss = torch.nn.functional.cross_entropy(logits, tgt) * (1e3 if (b, k) in SPIKES else 1.0)
            if scaler is not None:
                loss = scaler.scale(loss)
            loss.backward()
            if (b, k) in NAN_HEAD:
                model.lm_head.weight.grad[0, 0] = float("nan")
            if cfg.uses_drift:
                opt.record_drift(**drift_stats(logp.detach(), old, torch.ones_like(logp)))
            if mode == "record":
                opt.record_energy()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            m = opt.get_metrics()
            gn = opt.grad_norm
            metrics.append(torch.tensor([float(v) for _, v in sorted(m.items())]
                                        + ([float(gn)] if gn is not None else []), dtype=torch.float64))
            opt.zero_grad()
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    names = {p: n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for key, v in st.items():
            out[f"state/{names[p]}/{key}"] = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(v)
    for key, v in opt.state_dict()["dgg"]["gate"].items():
        out[f"gate/{key}"] = v.clone()
    out["metrics"] = torch.stack(metrics)
    return out


def dump(path):
    res = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, cfg, o, kw, mode in cases():
            res[name] = run(name, cfg, o, kw, mode)
    torch.save(res, path)
    n_steps = BATCHES * K
    print(f"{len(res)} runs x {n_steps} steps -> {path}")


def _same(a, b):
    """Same dtype, shape and bits (NaN payloads and signed zeros included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))
    return torch.equal(a, b)


def compare(pa, pb):
    a, b = torch.load(pa), torch.load(pb)
    assert a.keys() == b.keys(), set(a) ^ set(b)
    bad, tensors = [], 0
    for name in a:
        ta, tb = a[name], b[name]
        if ta.keys() != tb.keys():
            bad.append(f"{name}: keys {set(ta) ^ set(tb)}")
            continue
        for key in ta:
            tensors += 1
            if not _same(ta[key], tb[key]):
                bad.append(f"{name}: {key}")
    print(f"{len(a)} runs, {tensors} tensors compared bit for bit: {len(bad)} differ")
    for line in bad[:40]:
        print("  ", line)
    return not bad


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "dump":
        dump(sys.argv[2])
    elif cmd == "compare":
        sys.exit(0 if compare(sys.argv[2], sys.argv[3]) else 1)
    else:
        raise SystemExit(__doc__)
