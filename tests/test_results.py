"""The committed results agree with themselves: results/sft-vs-rl/analyze.py, which draws the RL-vs-SFT
table and figure, reads each learning rate apart, and every committed test completion file re-scores to
the summary line eval_many wrote for it.

    python -m pytest tests/test_results.py
"""
import contextlib
import gzip
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "results", "sft-vs-rl")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(HERE, "analyze.py")), reason="no results/sft-vs-rl")


def analyze():
    spec = importlib.util.spec_from_file_location("analyze", os.path.join(HERE, "analyze.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summaries(folder):
    """{name: summary row} of eval_many's summary.jsonl in results/sft-vs-rl/<folder> (the last row of a name)."""
    with open(os.path.join(HERE, folder, "summary.jsonl")) as f:
        return {r["name"]: r for r in map(json.loads, f)}


def args_and_steps(run):
    """A committed run's args.json and the steps its metrics.jsonl logs, in order."""
    with open(os.path.join(HERE, "runs", run, "args.json")) as f:
        args = json.load(f)
    with open(os.path.join(HERE, "runs", run, "metrics.jsonl")) as f:
        return args, [json.loads(line)["step"] for line in f]


def recorded(name):
    """{budget: lr} of a chosen-*.txt file here ("budget lr" lines)."""
    with open(os.path.join(HERE, name)) as f:
        return dict(line.split() for line in f)


def test_each_test_completion_file_rescores_to_its_summary_line():
    rows = summaries("test")
    files = sorted(f for f in os.listdir(os.path.join(HERE, "test")) if f.endswith(".jsonl.gz"))
    assert files
    a = analyze()
    for name in files:
        s = a.scores(os.path.join(HERE, "test", name))
        row = rows[name[:-len(".jsonl.gz")]]
        assert len(s) == row["n"] == 1319, name
        for col in a.COLS:
            assert sum(x[col] for x in s.values()) / len(s) == pytest.approx(row[col], abs=1e-12), (name, col)


def test_the_table_keeps_each_learning_rate_apart():
    """Seeds pool only within one (method, budget, lr) (GRPO's fixed-lr rows, read with ../qwen-coder-1.5b's
    runs, are left out here): SFT at 196 parameters has a 1e-3 row of 2 seeds and a 3e-3 row of 1, each the mean
    of its own files."""
    a = analyze()
    out = a.runs()
    names = [f[:-len(".jsonl.gz")] for f in os.listdir(os.path.join(HERE, "test")) if f.endswith(".jsonl.gz")]
    for (method, budget, lr), seeds in out.items():
        if method != "GRPO":
            prefix = {a.SFT_EPOCH: "ep1-", a.GRPO_FIT: "grpo-ep1-"}.get(method, "")
            mine = [n for n in names if n.replace("sel-", "").startswith(f"{prefix}p{budget}-lr{lr}")]
            assert len(seeds) == len(mine), (method, budget, lr, mine)
    rows = summaries("test")
    for lr, files in (("1e-3", ["sel-p196-lr1e-3", "p196-lr1e-3-seed1"]), ("3e-3", ["sel-p196-lr3e-3"])):
        got = sum(a.accuracy(out[(a.SFT_30, 196, lr)], "strict")) / len(files)
        assert got == pytest.approx(100 * sum(rows[n]["strict"] for n in files) / len(files)), lr


def test_the_protocols_rule_on_the_selection_set_picks_what_the_results_say():
    """protocol.sh's rule (strict first, math-verify breaks ties; analyze.chosen, which rest.sh calls) over
    every SFT selection row: 3e-3, the grid's largest, at every budget, as docs/results.md says."""
    got = analyze().chosen(os.path.join(HERE, "select", "summary.jsonl"), "sel-")
    assert got == {b: "3e-3" for b in ("p1", "p13", "p196", "p2548", "p12544")}


def test_the_one_epoch_runs_are_what_one_epoch_sh_says_and_their_seeds_at_the_chosen_lr():
    """Every ep1- run: 108 steps of 64 rows of fit.jsonl (one pass of the fit set), its metrics steps 1..108
    once each (the selection runs were stopped and continued with --resume); the seeds at the lr the rule
    picks on the selection set, which ep1-chosen.txt records, as math-verify's choice is in its file."""
    a = analyze()
    select = os.path.join(HERE, "select", "summary.jsonl")
    for column, name in (("strict", "ep1-chosen.txt"), ("math_verify", "ep1-chosen-math-verify.txt")):
        assert recorded(name) == a.chosen(select, "ep1-sel-", column), name
    chose = a.chosen(select, "ep1-sel-")
    runs = sorted(d for d in os.listdir(os.path.join(HERE, "runs")) if d.startswith("ep1-"))
    assert len(runs) == 14
    for run in runs:
        args, steps = args_and_steps(run)
        assert steps == list(range(1, 109)), run
        assert (args["trainer"], args["steps"], args["epochs"], args["batch"], os.path.basename(args["data"])) == (
            "train_sft.py", 108, 3, 64, "fit.jsonl"), run
        budget, lr, seed = re.fullmatch(r"ep1-(?:sel-)?(p\d+)-lr(\de-\d)(?:-seed(\d))?", run).groups()
        assert float(args["lr"]) == float(lr) and args["seed"] == int(seed or 0), run
        assert seed is None or chose[budget] == lr, run


def test_grpo_more_runs_have_the_committed_grpo_runs_recipe():
    """Every grpo-<budget>-lr1e-4-seed<s> run (rest.sh's grpo-more), pooled with the GRPO run of its budget in
    ../qwen-coder-1.5b, has that run's args but for the seed, where files lie, the engine's memory and
    context, and the every-20-steps evaluation; at 12,544 parameters, which has no such run, it is the
    2,548 run's but for u, r (64, 8) as well. It trained on all 7,473 train rows in GSM8K's order (fit
    then select: GSM8K train, byte-equal) and its metrics hold steps 1..116 once; its test file is there."""
    same_but = {"seed", "model", "data", "eval_data", "eval_every", "svd_cache", "gpu_memory_utilization",
                "max_model_len", "trainer"}
    shape = {"12544": {"u": 64, "r": 8, "n_tie": 1}}  # rest.sh's BUDGET[p12544]
    runs = sorted(d for d in os.listdir(os.path.join(HERE, "runs")) if re.fullmatch(r"grpo-p\d+-lr1e-4-seed\d", d))
    assert {"grpo-p196-lr1e-4-seed1", "grpo-p2548-lr1e-4-seed1", "grpo-p12544-lr1e-4-seed0"} <= set(runs)
    for run in runs:
        budget, seed = re.fullmatch(r"grpo-p(\d+)-lr1e-4-seed(\d)", run).groups()
        args, steps = args_and_steps(run)
        with open(os.path.join(ROOT, "results", "qwen-coder-1.5b", "p2548" if budget in shape else f"p{budget}",
                               "args.json")) as f:
            first = json.load(f)
        first.update(shape.get(budget, {}))
        assert {k: v for k, v in args.items() if k not in same_but} == {
            k: v for k, v in first.items() if k not in same_but}, run
        assert (args["seed"], first["seed"], os.path.basename(args["data"])) == (int(seed), 0, "train.jsonl"), run
        assert steps == list(range(1, 117)), run
        assert os.path.isfile(os.path.join(HERE, "test", f"{run}.jsonl.gz")), run


def test_grpo_selection_runs_are_rest_sh_s_and_choose_what_chosen_grpo_txt_says(tmp_path):
    """Every grpo-sel- run (rest.sh's grpo-select and grpo-edge): 40 steps of the one-epoch schedule of the fit
    set, seed 0, its budget's shape and its lr, metrics steps 1..40 once (two were stopped and continued with
    --resume), scored on the selection set. The grid {5e-5, 1e-4, 2e-4} ran at both budgets; the rule over it
    chose 2e-4, its top, at both, so the edge stage added 5e-4 at both and no 2e-5; over all rows the rule
    (and math-verify alone) chooses 5e-4 at both, as chosen-grpo.txt and docs/results.md say."""
    a = analyze()
    shape = {"p13": (13, 2, None), "p196": (1, 2, 1)}  # rest.sh's BUDGET: u, r, n_tie
    rows = summaries("select")
    runs = sorted(d for d in os.listdir(os.path.join(HERE, "runs")) if d.startswith("grpo-sel-"))
    assert runs == sorted(f"grpo-sel-{b}-lr{lr}" for b in shape for lr in ("5e-5", "1e-4", "2e-4", "5e-4"))
    for run in runs:
        budget, lr = re.fullmatch(r"grpo-sel-(p\d+)-lr(.+)", run).groups()
        args, steps = args_and_steps(run)
        assert steps == list(range(1, 41)), run
        assert (args["trainer"], os.path.basename(args["data"]), args["epochs"], args["steps"], args["seed"]) == (
            "train_grpo.py", "fit.jsonl", 1, 40, 0), run
        assert (args["u"], args["r"], args["n_tie"]) == shape[budget] and float(args["lr"]) == float(lr), run
        assert (args["max_new_tokens"], args["max_model_len"]) == (1024, 2048), run
        assert os.path.isfile(os.path.join(HERE, "runs", run, "adapter.safetensors")), run
        row = rows[run]
        assert (os.path.basename(row["data"]), row["n"]) == ("select.jsonl", 500), run
    summary = os.path.join(HERE, "select", "summary.jsonl")
    grid = tmp_path / "summary.jsonl"  # the rows grpo-select alone had scored
    grid.write_text("".join(json.dumps(rows[r]) + "\n" for r in runs if not r.endswith("lr5e-4")))
    assert a.chosen(str(grid), "grpo-sel-") == {"p13": "2e-4", "p196": "2e-4"}
    assert recorded("chosen-grpo.txt") == a.chosen(summary, "grpo-sel-") == {"p13": "5e-4", "p196": "5e-4"}
    assert a.chosen(summary, "grpo-sel-", "math_verify") == {"p13": "5e-4", "p196": "5e-4"}


def test_grpo_runs_named_by_rest_sh_are_read_as_grpo_at_their_lr(tmp_path):
    """rest.sh names GRPO's runs grpo-<budget>-lr<lr>-seed<s> (grpo-more: the committed runs' recipe, read with
    them) and grpo-ep1-<budget>-lr<lr>-seed<s> (grpo-seeds: one epoch of the fit set, a row of its own)."""
    import gzip
    a = analyze()
    (tmp_path / "test").mkdir()
    rows = [{"id": i, "strict": i % 2, "flexible": 1, "math_verify": 0, "extracted": "1"} for i in range(1320)][1:]
    for name in ("grpo-p13-lr2e-4-seed0", "grpo-p13-lr2e-4-seed1", "sel-p13-lr1e-2", "ep1-p13-lr1e-2-seed1",
                 "grpo-ep1-p13-lr1e-4-seed0", "grpo-p196-lr1e-4-seed1"):
        with gzip.open(tmp_path / "test" / f"{name}.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    a.HERE = str(tmp_path)
    out = a.runs()
    assert len(out[("GRPO", 13, "2e-4")]) == 2 and len(out[(a.SFT_30, 13, "1e-2")]) == 1
    assert len(out[(a.SFT_EPOCH, 13, "1e-2")]) == 1  # one_epoch.sh's runs: their own row
    assert a.accuracy(out[("GRPO", 13, "2e-4")], "strict") == [100 * 660 / 1319] * 2
    assert len(out[("GRPO", 13, "1e-4")]) == 2  # the one-epoch runs of ../qwen-coder-1.5b, as before
    assert len(out[(a.GRPO_FIT, 13, "1e-4")]) == 1  # grpo-seeds' recipe differs: not pooled with them
    assert len(out[("GRPO", 196, "1e-4")]) == 2  # grpo-more's seed 1 beside the committed seed 0


def test_grpo_selection_rows_print_their_own_table_and_mark_the_one_epoch_grpo_row_they_choose(tmp_path):
    """rest.sh's grpo-select rows (grpo-sel-<budget>-lr<lr>, cut-short runs) get a selection table of their own,
    and the grpo-ep1- seeds at the lr they choose are marked "strict" (math-verify's choice: "math-verify");
    with no such rows nothing about them is printed."""
    a = analyze()
    (tmp_path / "select").mkdir()
    rows = [("sel-p13-lr1e-3", 0.1, 0.5), ("grpo-sel-p13-lr5e-5", 0.2, 0.6), ("grpo-sel-p13-lr1e-4", 0.3, 0.4),
            ("grpo-sel-p13-lr2e-4", 0.1, 0.7)]
    (tmp_path / "select" / "summary.jsonl").write_text("".join(json.dumps(
        {"name": n, "data": "/d/select.jsonl", "strict": s, "flexible": 0, "math_verify": m}) + "\n" for n, s, m in rows))
    a.HERE = str(tmp_path)
    got = a.choices()
    assert got[(a.GRPO_FIT, 13, "1e-4")] == "strict" and got[(a.GRPO_FIT, 13, "2e-4")] == "math-verify"
    assert got[(a.SFT_30, 13, "1e-3")] == "both"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        a.selection(str(tmp_path / "select" / "summary.jsonl"), "grpo-sel-")
    assert printed.getvalue().splitlines()[2] == "| 13 | 20.0 / 60.0 | **30.0 / 40.0** | 10.0 / 70.0 |"
    one = {i: {"strict": 1.0, "flexible": 1.0, "math_verify": 1.0, "formatted": 1.0} for i in range(4)}
    printed = io.StringIO()  # the GRPO rows' lr (1e-4) was fixed: beside it, the rule's choice where there is one
    with contextlib.redirect_stdout(printed):
        a.table({("GRPO", 13, "1e-4"): [one], ("GRPO", 196, "1e-4"): [one]}, one, got)
    grpo = [line.split(" | ")[:4] for line in printed.getvalue().splitlines() if line.startswith("| GRPO |")]
    assert grpo == [["| GRPO", "13", "1e-4", "none (the rule: 1e-4)"], ["| GRPO", "196", "1e-4", "none"]]


def test_grpo_one_epoch_seeds_at_the_chosen_lr_meet_sft_in_the_contrast(tmp_path):
    """Once rest.sh's grpo-seeds has run, its grpo-ep1- seeds at the lr the selection set chose are a curve of
    their own: the contrast sets them against SFT of one epoch beside GRPO at 1e-4, and the reach table
    gets their column; a grpo-ep1- row at an lr not chosen is in neither."""
    a = analyze()
    (tmp_path / "select").mkdir()
    (tmp_path / "test").mkdir()
    sel = [("grpo-sel-p13-lr2e-4", 0.0, 0.4), ("grpo-sel-p13-lr5e-4", 0.0, 0.5), ("ep1-sel-p13-lr3e-3", 0.1, 0.4)]
    (tmp_path / "select" / "summary.jsonl").write_text("".join(
        json.dumps({"name": n, "data": "/d/select.jsonl", "strict": s, "flexible": 0, "math_verify": m}) + "\n"
        for n, s, m in sel))
    right = [{"id": i, "strict": 1, "flexible": 1, "math_verify": 1, "extracted": "1"} for i in range(1319)]
    wrong = [{**r, "strict": 0, "math_verify": 0, "extracted": None} for r in right]
    files = [*((f"grpo-ep1-p13-lr5e-4-seed{s}", right) for s in range(3)), ("grpo-ep1-p13-lr2e-4-seed0", right),
             ("ep1-sel-p13-lr3e-3", wrong), ("ep1-p13-lr3e-3-seed1", wrong), ("ep1-p13-lr3e-3-seed2", wrong)]
    for name, rows in files:
        write_gz(tmp_path / "test" / f"{name}.jsonl.gz", rows)
    a.HERE = str(tmp_path)
    out, chose = a.runs(), a.choices()
    base = a.scores(os.path.join(a.GRPO, "base", "eval_gsm8k.jsonl.gz"))
    assert a.curve(out, a.GRPO_FIT, chose) == {13: out[(a.GRPO_FIT, 13, "5e-4")]}
    assert len(out[(a.GRPO_FIT, 13, "5e-4")]) == 3 and len(out[(a.GRPO_FIT, 13, "2e-4")]) == 1
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        a.contrast(out, base, chose)
    lines = printed.getvalue().splitlines()
    assert [line for line in lines if line.startswith("| 13 |")] == [
        "| 13 | lr 1e-4, fixed | SFT, 1 epoch | GRPO | GRPO |",  # the committed runs against all wrong
        "| 13 | 1 epoch of the fit set, lr 5e-4, chosen | SFT, 1 epoch | GRPO | GRPO |"]
    head = f"| column | best gain over base (points) | 90 % of it: GRPO | 90 % of it: {a.GRPO_FIT} |"
    assert lines[-4].startswith(head)
    assert lines[-2].startswith("| strict | 100.0 |")  # all right at 13 by the fit-set seeds: the best gain


def test_grpo_one_epoch_seeds_are_rest_sh_s_at_the_lr_chosen_for_13_parameters():
    """Every committed grpo-ep1- run (rest.sh's grpo-seeds) is a seed 0-2 at 13 parameters and the lr
    chosen-grpo.txt gives p13, one epoch of the fit set (108 steps of 64 prompts), its metrics steps 1..k once
    (a run stopped and continued with --resume logs each step once) and its adapter there. Finished (k = 108):
    its GSM8K test file scored on all 1,319 rows. Stopped short (rest.sh continues it with --resume): its
    trainer_state.pt there, saved after its last logged step, and no test yet. Seed 0 is finished."""
    lr = recorded("chosen-grpo.txt")["p13"]
    runs = sorted(d for d in os.listdir(os.path.join(HERE, "runs")) if d.startswith("grpo-ep1-"))
    assert set(runs) <= {f"grpo-ep1-p13-lr{lr}-seed{s}" for s in range(3)}, runs
    assert f"grpo-ep1-p13-lr{lr}-seed0" in runs, runs
    rows = summaries("test")
    for run in runs:
        args, steps = args_and_steps(run)
        assert steps == list(range(1, len(steps) + 1)) and 0 < len(steps) <= 108, run
        assert (args["trainer"], os.path.basename(args["data"]), args["epochs"], args["steps"]) == (
            "train_grpo.py", "fit.jsonl", 1, 108), run
        assert f"-seed{args['seed']}" == run[run.rindex("-seed"):], run
        assert (args["u"], args["r"], args["n_tie"], float(args["lr"])) == (13, 2, None, float(lr)), run
        assert (args["prompts_per_step"], args["max_new_tokens"], args["max_model_len"]) == (64, 1024, 2048), run
        assert os.path.isfile(os.path.join(HERE, "runs", run, "adapter.safetensors")), run
        tested = os.path.isfile(os.path.join(HERE, "test", f"{run}.jsonl.gz"))
        if len(steps) == 108:
            assert tested and (os.path.basename(rows[run]["data"]), rows[run]["n"]) == ("test.jsonl", 1319), run
        else:
            state = torch.load(os.path.join(HERE, "runs", run, "trainer_state.pt"), map_location="cpu",
                               weights_only=True)
            assert state["step"] == len(steps) and not tested and run not in rows, run
        assert len(steps) == 108 or not run.endswith("-seed0"), run


def test_chosen_refuses_rows_of_more_than_one_data_file(tmp_path):
    """A test-set line in the selection summary must never choose an lr: one ValueError naming the files."""
    a = analyze()
    line = {"flexible": 0, "n": 500}
    rows = [{"name": "sel-p13-lr1e-3", "data": "/a/select.jsonl", "strict": 0.5, "math_verify": 0.5, **line},
            {"name": "sel-p13-lr3e-3", "data": "/b/select.jsonl", "strict": 0.4, "math_verify": 0.4, **line}]
    summary = tmp_path / "summary.jsonl"
    summary.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert a.chosen(str(summary), "sel-") == {"p13": "1e-3"}  # one file by name, in two folders: as before
    rows.append({"name": "sel-p13-lr1e-2", "data": "/b/test.jsonl", "strict": 0.9, "math_verify": 0.9, **line})
    summary.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"sel- rows were scored on 2 data files \(select.jsonl, test.jsonl\)"):
        a.chosen(str(summary), "sel-")


def completions(n=1319, drop=None):
    return [{k: v for k, v in {"id": i, "completion": "#### 1", "gold": "1", "extracted": "1", "strict": 1,
                               "flexible": 1, "math_verify": 1}.items() if k != drop} for i in range(n)]


def write_gz(path, rows):
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def cut_gz(path):
    write_gz(path, completions())
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.parametrize("name,make,says", [
    ("notes.txt", lambda p: open(p, "w").write("x"), "not a completions file analyze.py reads"),
    ("sel-p13-lr3e-3.jsonl", lambda p: open(p, "w").write("{}\n"), "not a completions file analyze.py reads"),
    ("p7-lr1e-3-seed1.jsonl.gz", lambda p: write_gz(p, completions()), "not a completions file analyze.py reads"),
    ("grpo-sel-p13-lr1e-4.jsonl.gz", lambda p: write_gz(p, completions()), "not a completions file analyze.py reads"),
    ("p13-lr1e-3-seed1.jsonl.gz", cut_gz, "cannot be read"),
    ("p13-lr1e-3-seed1.jsonl.gz", lambda p: write_gz(p, completions(1000)), "1000 rows"),
    ("p13-lr1e-3-seed1.jsonl.gz", lambda p: write_gz(p, completions(drop="math_verify")), "without the column 'math_verify'"),
    ("../select/summary.jsonl", os.remove, "cannot be read"),
])
def test_a_file_it_cannot_read_rightly_is_one_line_and_exit_1(tmp_path, name, make, says):
    """analyze.py run on a copy of its folder (the GRPO runs beside it, linked) holding one bad file: one line
    naming the file, exit code 1, nothing printed."""
    here = tmp_path / "sft-vs-rl"
    (here / "test").mkdir(parents=True)
    (here / "select").mkdir()
    shutil.copy(os.path.join(HERE, "analyze.py"), here)
    os.symlink(os.path.join(HERE, "..", "qwen-coder-1.5b"), tmp_path / "qwen-coder-1.5b")
    write_gz(here / "test" / "sel-p13-lr1e-3.jsonl.gz", completions())
    (here / "select" / "summary.jsonl").write_text(json.dumps(
        {"name": "sel-p13-lr1e-3", "data": "select.jsonl", "strict": 1, "flexible": 1, "math_verify": 1}) + "\n")
    path = os.path.normpath(here / "test" / name)
    make(path)
    p = subprocess.run([sys.executable, str(here / "analyze.py")], capture_output=True, text=True)
    assert p.returncode == 1 and p.stdout == "", p.stderr[-2000:]
    assert p.stderr.count("\n") == 1 and says in p.stderr and path in p.stderr, p.stderr


def seed(correct, n=100):
    """One seed's scores: the first `correct` of n problems right in every column."""
    return {i: {"strict": float(i < correct), "math_verify": float(i < correct)} for i in range(n)}


def test_a_winner_needs_the_paired_difference_and_the_seeds_apart():
    a = analyze()
    assert a.winner([seed(60), seed(62)], [seed(40), seed(41)], "strict") == "GRPO"
    assert a.winner([seed(40)], [seed(60), seed(61)], "strict") == "SFT (1 seed)"
    assert a.winner([seed(70), seed(30)], [seed(40), seed(41)], "strict") == "no winner (the seeds overlap)"
    assert a.winner([seed(50), seed(51)], [seed(50), seed(50)], "strict") == "no winner"  # 0.5 +- 0.5 points


def test_reach_names_the_smallest_budget_at_90_percent_of_the_best_gain():
    """Gains over a base of 10 %: GRPO 40 at 13, 50 at 196 (the best); SFT 20 at 13, 44 at 196 (88 % of it)."""
    a = analyze()
    base = seed(10)
    curves = {"GRPO": {13: [seed(50)], 196: [seed(60)]}, "SFT": {13: [seed(30)], 196: [seed(54)]}}
    best, got = a.reach(curves, base, "strict")
    assert best == pytest.approx(50) and got["GRPO"] == ("196", 1.0)
    assert got["SFT"][0] == "not reached" and got["SFT"][1] == pytest.approx(0.88)
    best, got = a.reach(curves, base, "strict", share=0.8)
    assert got["GRPO"][0] == "13" and got["SFT"][0] == "196"
