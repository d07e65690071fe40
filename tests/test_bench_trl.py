"""Tests of tools/bench_trl.py's CPU part: bad input refused in one line before anything heavy, the
recipe as TRL's GRPOConfig and PEFT's TinyLoRA, the medians and their spread, TRL's "dapo" divisor as
it runs, and two tiny steps of both sides (Hugging Face generate, the tiny model) that see the same
rows and prompt ids, with the positions each trainer's forwards computed against what they were fed.
No timing is asserted beyond the clocks' order.

    python -m pytest tests/test_bench_trl.py
"""
import importlib.util
import json
import math
import os
import re
import statistics

import pytest
import torch

import bench_trl
import tiny


def trl_installed():
    return importlib.util.find_spec("trl") is not None and importlib.util.find_spec("peft.tuners.tinylora") is not None


needs_trl = pytest.mark.skipif(not trl_installed(), reason="trl or peft's tinylora tuner not installed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(tiny.write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", tiny.problems(32, seed=1)))


def tiny_flags(tiny_dir, data, out, *extra):
    """The CPU smoke's size: 2 prompts x 2 samples, 4 new tokens, one step, a reward with signal."""
    return ["--model", tiny_dir, "--data", data, "--device", "cpu", "--steps", "1", "--prompts-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "4", "--trl-micro-batch", "2", "--reward", "signal",
            "--out", str(out), *extra]


def refused(argv, capsys):
    """(exit code, stderr) of bench_trl.main(argv), which must stop before running any side."""
    with pytest.raises(SystemExit) as e:
        bench_trl.main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("edit,match", [
    ({"--model": "/nonexistent/model"}, "--model /nonexistent/model: not a model folder"),
    ({"--data": "/nonexistent/train.jsonl"}, "--data /nonexistent/train.jsonl: no such file"),
    ({"--sides": "ours,peft"}, "--sides ours,peft: a comma list of distinct sides from ours,trl"),
    ({"--sides": "ours,ours"}, "--sides ours,ours: a comma list of distinct sides"),
    ({"--group-size": "1"}, "--group-size 1: GRPO needs >= 2 samples per prompt"),
    ({"--prompts-per-step": "3"}, "--prompts-per-step 3: must be even"),
    ({"--trl-micro-batch": "3"}, "--trl-micro-batch 3 must divide the 2 completions of an update"),
    ({"--memory-share": "1.5"}, r"--memory-share 1.5: must be in \(0, 1\)"),
    ({"--lr": "nan"}, "--lr nan: must be a finite number > 0"),
    ({"--steps": "0"}, "--steps 0: must be >= 1"),
    ({"--max-model-len": "4096"}, "--max-model-len 4096 must be <= the model's context, 1024"),
    ({"--max-model-len": "4"}, "--max-model-len 4 leaves no room for a prompt"),
])
def test_bad_input_is_one_line_before_any_side_runs(tiny_dir, data, tmp_path, edit, match, capsys, monkeypatch):
    monkeypatch.setattr(bench_trl, "run_side", lambda *a: pytest.fail("a side ran"))
    argv = tiny_flags(tiny_dir, data, tmp_path / "b.json")
    for flag, value in edit.items():
        argv = [*argv, flag, value]  # argparse: the last one given wins
    code, err = refused(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("bench_trl.py: error: ") and re.search(match, err), err
    assert not os.path.exists(tmp_path / "b.json")


@pytest.mark.parametrize("name,content,match", [
    ("run/metrics.jsonl", '{"step": 1}\n', "a .json path"),
    ("run/args.json", '{"lr": 0.001}', "run/args.json exists and is not an earlier bench_trl.py result"),
    ("b.json", "", "b.md exists and is not an earlier bench_trl.py result"),  # a table whose JSON is gone
])
def test_out_replaces_only_an_earlier_bench_result(tiny_dir, data, tmp_path, name, content, match, capsys,
                                                   monkeypatch):
    """--out never replaces a run's files (or a table it did not write): one line, exit 2, nothing changed."""
    monkeypatch.setattr(bench_trl, "run_side", lambda *a: pytest.fail("a side ran"))
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    if content:
        path.write_text(content)
    else:
        (tmp_path / "b.md").write_text("| a table |\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, err = refused(tiny_flags(tiny_dir, data, path), capsys)
    assert code == 2 and err.count("\n") == 1 and match in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_out_may_replace_an_earlier_bench_result(tiny_dir, data, tmp_path, monkeypatch):
    (tmp_path / "b.json").write_text('{"sides": {}, "summary": {}}')
    (tmp_path / "b.md").write_text("| a table |\n")
    monkeypatch.setattr(bench_trl, "run_side", lambda *a: (_ for _ in ()).throw(RuntimeError("checks passed")))
    with pytest.raises(RuntimeError, match="checks passed"):
        bench_trl.main(tiny_flags(tiny_dir, data, tmp_path / "b.json"))


def test_cuda_without_a_gpu_is_one_line(tiny_dir, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = refused(tiny_flags(tiny_dir, data, tmp_path / "b.json", "--device", "cuda"), capsys)
    assert code == 2 and err.count("\n") == 1 and "--device cuda: CUDA is not available here" in err, err


def test_trl_or_peft_missing_is_one_line(tiny_dir, data, tmp_path, capsys, monkeypatch):
    find = importlib.util.find_spec
    for missing, words in [("trl", "trl is not installed (pip install trl==1.16.0)"),
                           ("peft.tuners.tinylora", "peft with the tinylora tuner is not installed")]:
        present = lambda name, *a: find("json") if name == "trl" else find(name, *a)  # trl there, or not
        fake = lambda name, *a: None if name == missing else present(name, *a)
        monkeypatch.setattr(importlib.util, "find_spec", fake)
        code, err = refused(tiny_flags(tiny_dir, data, tmp_path / "b.json"), capsys)
        assert code == 2 and err.count("\n") == 1 and f"--sides trl: {words}" in err, err
    # our side alone needs neither: it gets past the checks (to the side, stubbed here)
    monkeypatch.setattr(bench_trl, "run_side", lambda side, argv, path, device: (None, 7))
    assert bench_trl.main(tiny_flags(tiny_dir, data, tmp_path / "b.json", "--sides", "ours")) == 1
    assert json.load(open(tmp_path / "b.json"))["failed"] == {"ours": 7}


def test_medians_are_of_steps_two_on_and_of_the_only_step_alone():
    step = lambda t, g, tok: dict(t_step=t, t_generate=g, t_trainer=t - g - 0.5, t_sync=0.5, tokens=tok)
    m = bench_trl.summarize([step(100.0, 90.0, 10), step(10.0, 6.0, 600), step(12.0, 8.0, 800), step(11.0, 5.0, 700)])
    # each column its own median, of steps 2..4
    assert (m["t_step"], m["t_generate"], m["t_trainer"], m["tokens"]) == (11.0, 6.0, 3.5, 700)
    assert m["gen_tokens_per_s"] == 700 / 6.0 and m["median_of_steps"] == "2..4"
    # the spread: min..max over the same steps 2..4 (step 1's 100 s is out)
    assert m["range"]["t_step"] == [10.0, 12.0] and m["range"]["tokens"] == [600, 800]
    assert m["padded_tokens"] is None and m["range"]["padded_tokens"] is None  # a column no step has
    one = bench_trl.summarize([step(3.0, 2.0, 30)])
    assert (one["t_step"], one["tokens"], one["median_of_steps"]) == (3.0, 30, "1..1")
    assert one["range"]["t_step"] == [3.0, 3.0]


def test_ratio_range_is_ours_extremes_over_trls_opposite_extremes():
    step = lambda t: dict(t_step=t, t_generate=t / 2, t_trainer=t / 2, t_sync=0.0, tokens=10)
    ours = bench_trl.summarize([step(99.0), step(4.0), step(6.0), step(5.0)])
    trl = bench_trl.summarize([step(99.0), step(20.0), step(10.0), step(16.0)])
    q = bench_trl.ratios(ours, trl)
    assert q["t_step"] == 5.0 / 16.0 and q["range"]["t_step"] == [4.0 / 20.0, 6.0 / 10.0]
    assert q["t_sync"] is None and q["range"]["t_sync"] == [None, None]  # 0 / 0: no ratio


def test_default_medians_are_of_at_least_8_steps(tiny_dir, data):
    args = bench_trl.parse_args(["--model", tiny_dir, "--data", data, "--device", "cpu"])
    assert args.steps - 1 >= 8  # steps 2..N


@needs_trl
def test_trl_config_is_the_recipe(tiny_dir, data, tmp_path):
    args = bench_trl.parse_args(["--model", tiny_dir, "--data", data, "--device", "cpu"])  # the GPU recipe's sizes
    c = bench_trl.trl_config(args, str(tmp_path))
    per_step = c.per_device_train_batch_size * c.steps_per_generation  # completions per generation
    assert per_step == 64 * 4 and c.num_generations == 4 and c.max_completion_length == 1024
    assert c.steps_per_generation == 2 * c.gradient_accumulation_steps  # 2 optimizer updates per generation
    assert c.max_steps == 9 * 2 and c.num_iterations == 1 and not c.shuffle_dataset  # 9 steps by default
    assert (c.beta, c.epsilon, c.epsilon_high, c.loss_type, c.scale_rewards) == (0.0, 0.2, 0.4, "dapo", "group")
    assert c.vllm_importance_sampling_correction and c.vllm_importance_sampling_mode == "token_truncate"
    assert c.vllm_importance_sampling_clip_max == 2.0 and (c.temperature, c.top_p, c.top_k) == (1.0, 1.0, 0)
    assert (c.vllm_mode, c.vllm_gpu_memory_utilization, c.learning_rate) == ("colocate", 0.4, 1e-4)
    assert not c.use_vllm and c.use_cpu  # --device cpu: Hugging Face generate


@needs_trl
def test_peft_tinylora_trains_u_numbers_and_starts_at_the_base_model(tiny_dir, data):
    from transformers import AutoModelForCausalLM

    args = bench_trl.parse_args(["--model", tiny_dir, "--data", data, "--device", "cpu"])
    model = bench_trl.peft_tinylora(args)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 13
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)  # v = 0: dW = 0, as on our side


@needs_trl
def test_trl_dapo_divides_each_update_by_half_the_generations_tokens(tiny_dir, data, monkeypatch):
    """The divisor the docstring names, as TRL runs it (one tiny step in this process): every micro-batch
    is divided by num_items_in_batch (the completion tokens of all P x G completions) x A / (2 A), and
    the Trainer backpropagates that loss as it is (no further division by the A accumulated
    micro-batches): an update's tokens over half the generation's tokens."""
    timed, seen = bench_trl.timed_trainer_class, []

    def recording():
        Trainer, Clock = timed()

        class Recording(Trainer):
            def compute_loss(self, model, inputs, *a, **k):
                loss = super().compute_loss(model, inputs, *a, **k)
                seen.append(dict(n=int(inputs["num_items_in_batch"]), loss=loss.item(),
                                 a=self.current_gradient_accumulation_steps, spg=self.args.steps_per_generation))
                return loss

            def training_step(self, *a, **k):
                seen[-1]["backpropagated"] = (out := super().training_step(*a, **k)).item()
                return out
        return Recording, Clock
    monkeypatch.setattr(bench_trl, "timed_trainer_class", recording)
    args = bench_trl.parse_args(tiny_flags(tiny_dir, data, "unused.json", "--prompts-per-step", "4",
                                           "--group-size", "4", "--max-new-tokens", "8"))
    bench_trl.check(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as run_side gives each side: two threads stall the tiny model's small ops
    try:
        (step,) = bench_trl.run_trl(args)["steps"]
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 4 * 4 // 2 and all(s["a"] == 4 and s["spg"] == 8 for s in seen)  # 2 updates of A = 4
    assert all(s["n"] == step["tokens"] for s in seen)  # the whole generation's completion tokens
    assert all(s["backpropagated"] == s["loss"] for s in seen) and any(s["loss"] != 0 for s in seen)


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, data, tmp_path_factory):
    """Both sides on the tiny model, 2 steps (2 prompts x 2 samples, 4 new tokens): the JSON and the table."""
    out = tmp_path_factory.mktemp("run") / "b.json"
    assert bench_trl.main(tiny_flags(tiny_dir, data, out, "--steps", "2")) == 0
    return json.load(open(out)), open(out.with_suffix(".md")).read()


@needs_trl
def test_both_sides_run_a_tiny_step_on_the_same_prompts(tiny_run):
    r, table = tiny_run
    assert r["failed"] == {} and set(r["sides"]) == {"ours", "trl"}
    for side in ("ours", "trl"):
        steps = r["sides"][side]["steps"]
        assert len(steps) == 2
        for step in steps:
            assert all(math.isfinite(step[k]) and step[k] >= 0 for k in ("t_step", "t_generate", "t_trainer", "t_sync"))
            assert step["t_step"] > 0 and 0 < step["tokens"] <= 2 * 2 * 4  # P x G completions of <= 4 tokens
            if side == "trl":  # Hugging Face generate: no engine, TRL never syncs (ours times an empty call)
                assert step["t_sync"] == 0
        assert r["sides"][side]["peak_gib"] is None and r["sides"][side]["peak_rss_gib"] > 0  # no CUDA here
        for seen in r["sides"][side]["seen"]:
            assert len(seen["rows"]) == 2 and len(seen["prompts"]) == 2
    assert r["sides"]["ours"]["seen"] == r["sides"]["trl"]["seen"]
    # --reward signal draws from the rows' golds in scoring order: the same rewards on both sides
    assert [s["reward"] for s in r["sides"]["ours"]["steps"]] == [s["reward"] for s in r["sides"]["trl"]["steps"]]
    assert r["same_work"] == {"rows": True, "prompt_ids": True, "steps": 2}
    assert r["ratio"]["t_step"] == r["summary"]["ours"]["t_step"] / r["summary"]["trl"]["t_step"]
    for side in ("ours", "trl"):  # the medians and spreads of steps 2..2: step 2's own values
        assert r["summary"][side]["range"]["t_step"] == [r["sides"][side]["steps"][1]["t_step"]] * 2
    assert "| ours / TRL |" in table and "same rows at every step: yes; same prompt token ids: yes" in table
    assert f"TRL {r['versions']['trl']} + PEFT {r['versions']['peft']} TinyLoRA" in table


@needs_trl
def test_ours_step_clock_runs_log_step_to_log_step_and_holds_train_grpos_own(tiny_run):
    """Both clocks run from the end of one step to the end of the next, each side's logging included:
    ours from log_step's return to the next, so it holds train_grpo's t_step (which ends before
    log_step) and the metrics line."""
    r, _ = tiny_run
    for step in r["sides"]["ours"]["steps"][1:]:
        assert step["t_step"] >= step["t_step_train_grpo"] > 0
        assert step["t_trainer"] == step["t_step"] - step["t_generate"] - step["t_sync"]


@needs_trl
def test_trl_pads_every_micro_batch_to_the_longest_prompt_plus_the_longest_completion(tiny_run):
    """What TRL's model forward was fed (a hook on it): every micro-batch of 2 completions padded to the
    generation batch's longest prompt + longest completion, in two passes (logp_old, then the loss)."""
    r, _ = tiny_run
    for step in r["sides"]["trl"]["steps"]:
        fw = step["forwards"]
        assert step["width"] == step["longest"]  # the padded tensors' width, from the real lengths
        assert all(f["batch"] == 2 and f["length"] == step["width"] for f in fw)
        assert [f["grad"] for f in fw] == [False] * 2 + [True] * 2  # 4 completions / 2: logp_old, then loss
        assert step["padded_tokens"] == sum(f["batch"] * f["length"] for f in fw) == 2 * 4 * step["width"]
        assert step["real_tokens"] == 2 * step["batch_real"] <= step["padded_tokens"]  # each completion twice


@needs_trl
def test_ours_feeds_each_micro_batch_padded_to_its_own_longest_sequence(tiny_run):
    """What our decoder was fed (a hook on it) against the sequences our packing handed it: one (B, L)
    forward per micro-batch, L its longest prompt + completion; the gradient pass's micro-batches are
    the ones the step logged, holding the samples with an advantage."""
    r, _ = tiny_run
    for step in r["sides"]["ours"]["steps"]:
        fw = step["forwards"]
        assert fw and all(f["batch"] == len(f["lens"]) and f["length"] == max(f["lens"]) for f in fw)
        grad = [f for f in fw if f["grad"]]
        assert len(grad) == step["micro_batches"]
        if step["signal"]:  # the trained samples, each once in the gradient pass
            assert sum(f["batch"] for f in grad) == round(step["signal"] * 2 * 2)
        assert step["padded_tokens"] == sum(f["batch"] * f["length"] for f in fw)
        assert step["real_tokens"] == sum(sum(f["lens"]) for f in fw) <= step["padded_tokens"]


@needs_trl
def test_table_shows_padded_and_real_tokens_and_their_ratio(tiny_run):
    r, table = tiny_run
    assert "| trainer positions / step (padded) | real tokens in them | padded / real |" in table
    for side, label in (("ours", "| ours (train_grpo.train) |"), ("trl", "| TRL ")):
        m = r["summary"][side]
        later = r["sides"][side]["steps"][1:]  # the medians' steps: 2..N
        assert m["padded_tokens"] == statistics.median(s["padded_tokens"] for s in later)
        assert m["padded_per_real"] == statistics.median(s["padded_tokens"] / s["real_tokens"] for s in later) >= 1
        row = next(line for line in table.splitlines() if line.startswith(label))
        cell = lambda k, f: f"{m[k]:{f}} ({m['range'][k][0]:{f}}..{m['range'][k][1]:{f}})"
        cells = [cell("padded_tokens", ",.0f"), cell("real_tokens", ",.0f"), cell("padded_per_real", ".2f")]
        assert " | ".join(cells) in row
    assert r["ratio"]["padded_tokens"] == r["summary"]["ours"]["padded_tokens"] / r["summary"]["trl"]["padded_tokens"]
