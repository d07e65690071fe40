"""Tests of the command lines of tiny.py, plot.py and bench.py as a user runs them (subprocesses):
bad input is one line and exit code 2 before any work, no file of the user's or input is written
over, an interruption is one line and exit code 130 and leaves no half-written output.
(prepare.py's are in test_prepare.py.)

    python -m pytest tests/test_tools.py      # ~1 min on a 2-core CPU, offline
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import plot

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository
SCRIPTS = {"tiny": os.path.join(HERE, "tiny.py"), "plot": os.path.join(ROOT, "tools", "plot.py"),
           "bench": os.path.join(ROOT, "tools", "bench.py")}


def run(tool, *args, cwd=None):
    return subprocess.run([sys.executable, SCRIPTS[tool], *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def messages(stderr):
    """The lines of stderr, less progress bars."""
    lines = [x for x in re.split(r"[\r\n]+", stderr) if x.strip()]
    return [x for x in lines if not re.search(r"\d+%\|.*\| \d+/\d+ \[", x)]


def refused(r, text):
    """One line, exit code 2, saying text."""
    assert r.returncode == 2 and messages(r.stderr) == [messages(r.stderr)[0]], r.stderr
    assert text in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def interrupt_when(cmd, ready, sig, cwd=None):
    """Start cmd, send sig once ready() holds; (exit code, stderr)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    while p.poll() is None and not ready():
        time.sleep(0.01)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    return p.returncode, err


# -----------------------------------------------------------------------------
# tiny.py


def test_tiny_writes_its_three_files_into_a_new_dir(tmp_path):
    r = run("tiny", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "t")) == ["model", "test.jsonl", "train.jsonl"]
    assert sum(1 for _ in open(tmp_path / "t" / "train.jsonl")) == 256
    assert os.path.isfile(tmp_path / "t" / "model" / "config.json")


@pytest.mark.parametrize("name", ["model/model.safetensors", "train.jsonl", "test.jsonl"])
def test_tiny_refuses_a_dir_holding_a_model_or_data(tmp_path, name):
    """tiny.py DIR wrote its random model and rows over a converted model or the user's data."""
    mine = tmp_path / "d" / name
    mine.parent.mkdir(parents=True)
    mine.write_text("mine\n")
    r = run("tiny", tmp_path / "d")
    first = name.split("/")[0]
    refused(r, f"{tmp_path}/d/{first} already exists and tiny.py replaces no file")
    assert mine.read_text() == "mine\n" and os.listdir(tmp_path / "d") == [first]


def test_tiny_help_builds_nothing(tmp_path):
    """`tiny.py --help` built a model in a folder named --help."""
    r = run("tiny", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "usage: tiny.py [-h] [--taught] [dir]" in r.stdout and "default: tiny" in r.stdout
    assert os.listdir(tmp_path) == []


def test_tiny_refuses_a_dir_it_cannot_make(tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(run("tiny", tmp_path / "afile" / "d"), f"could not write in {tmp_path}/afile/d: [Errno 20] Not a directory")
    refused(run("tiny", tmp_path / "afile"), f"DIR {tmp_path}/afile is a file")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_tiny_interrupted_says_one_line_exits_130_and_leaves_nothing(tmp_path, sig):
    out = tmp_path / "d"
    rc, err = interrupt_when([sys.executable, SCRIPTS["tiny"], str(out)], out.exists, getattr(signal, sig))
    assert rc == 130 and messages(err) == [f"tiny.py: interrupted; nothing was left in {out}"]
    assert not out.exists()


@pytest.mark.parametrize("tool", ["tiny", "prepare"])
def test_a_signal_inside_an_import_is_noted_not_raised_there(tmp_path, tool):
    """A KeyboardInterrupt raised inside `import torch` can abort the process (no cleanup) or be caught
    by transformers' import guards (tiny.py then went on and exited 0: CI of 2026-12-06)."""
    (tmp_path / "slow.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nDONE = True\n")
    code = (f"import os, signal, sys\nsys.path[:0] = [{HERE!r}, {os.path.join(ROOT, 'tools')!r}, {str(tmp_path)!r}]\n"
            f"import {tool}\nsignal.signal(signal.SIGTERM, {tool}.interrupted)\n"
            "import slow\nprint(slow.DONE, {tool}.SIGNALS == [signal.SIGTERM])\n"
            "try:\n    os.kill(os.getpid(), signal.SIGTERM)\n    print('not raised')\n"
            "except KeyboardInterrupt:\n    print('raised outside an import')\n").replace("{tool}", tool)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == "True True\nraised outside an import\n", r.stderr


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("module", ["torch.nn", "numpy.lib.npyio"])
def test_tiny_interrupted_inside_an_import_exits_130_and_leaves_nothing(tmp_path, sig, module):
    """The signal lands (every time) as `module` is imported. numpy.lib.npyio is imported inside
    transformers' lazy import of Qwen2ForCausalLM, whose guard caught the KeyboardInterrupt: tiny.py
    then failed later with an ImportError."""
    out = tmp_path / "d"
    code = ("import importlib.abc, os, runpy, signal, sys\n"
            "class Hook(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            f"        if name == {module!r} and self in sys.meta_path:\n"
            f"            sys.meta_path.remove(self)\n            os.kill(os.getpid(), signal.{sig})\n"
            "sys.meta_path.insert(0, Hook())\n"
            f"sys.argv = ['tiny.py', {str(out)!r}]\nrunpy.run_path({SCRIPTS['tiny']!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 130 and messages(r.stderr) == [f"tiny.py: interrupted; nothing was left in {out}"], r.stderr
    assert not out.exists()


# -----------------------------------------------------------------------------
# plot.py


def write_run(folder, cut=False):
    """A run folder whose metrics.jsonl has 20 steps and two evals (and a line cut off if cut)."""
    folder.mkdir(parents=True)
    rows = [{"step": 0, "eval_strict": 0.1, "eval_flexible": 0.2}]
    rows += [{"step": s, "reward": s / 20, "dw_kept": 0.9} for s in range(1, 21)]
    rows += [{"step": 20, "eval_strict": 0.4, "eval_flexible": 0.5}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + ('{"step": 21, "rew' if cut else "")
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_plot_skips_a_cut_last_line_and_plots_the_rest(tmp_path):
    """A live or killed run's metrics.jsonl may end in a cut line: it was a traceback."""
    run_dir = write_run(tmp_path / "run", cut=True)
    r = run("plot", run_dir, "--out", tmp_path / "c.png")
    assert r.returncode == 0 and r.stdout == f"wrote {tmp_path}/c.png\n", r.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    fig = plot.plot([str(run_dir)], str(tmp_path / "d.png"))
    assert list(fig.axes[0].lines[1].get_xdata()) == list(range(1, 21))


def test_plot_takes_a_metrics_file_for_its_run(tmp_path):
    write_run(tmp_path / "u13")
    r = run("plot", tmp_path / "u13" / "metrics.jsonl", "--out", tmp_path / "c.svg")
    assert r.returncode == 0 and (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")
    fig = plot.plot([str(tmp_path / "u13" / "metrics.jsonl")], str(tmp_path / "d.png"))
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["u13"]


def test_plot_draws_an_sft_runs_loss_and_refuses_metrics_with_no_panel(tmp_path):
    """train_sft.py's metrics have loss and dw_kept, no reward and no evals: those two panels, no empty ones."""
    (tmp_path / "sft").mkdir()
    rows = [{"step": s, "loss": 2.0 / s, "grad_norm": 0.5, "v_norm": 0.1 * s, "dw_kept": 0.9} for s in range(1, 6)]
    (tmp_path / "sft" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot.plot([str(tmp_path / "sft")], str(tmp_path / "s.png"))
    assert [a.get_title() for a in fig.axes] == ["training loss (10-step mean)", "dw_kept: dW surviving bf16 rounding"]
    assert list(fig.axes[0].lines[1].get_ydata()) == [r["loss"] for r in rows]
    assert list(fig.axes[1].lines[0].get_ydata()) == [0.9] * 5
    fig = plot.plot([str(tmp_path / "sft"), str(write_run(tmp_path / "grpo"))], str(tmp_path / "both.png"))
    assert len(fig.axes) == 4  # reward, loss, pass@1, dw_kept
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text('{"step": 1, "t_step": 2.0}\n')
    r = run("plot", tmp_path / "other", "--out", tmp_path / "o.png")
    refused(r, "the metrics hold none of reward, loss")
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("case", ["no metrics", "empty metrics", "no run", "missing folder",
                                  "no extension", "a folder", "an input"])
def test_plot_refuses_bad_input_in_one_line_writing_nothing(tmp_path, case):
    run_dir = write_run(tmp_path / "run")
    (tmp_path / "bare").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    (tmp_path / "m.png").write_text((run_dir / "metrics.jsonl").read_text())  # metrics, oddly named
    runs, out, text = {
        "no metrics": ("bare", "c.png", "bare: no metrics.jsonl there"),
        "empty metrics": ("empty", "c.png", "empty/metrics.jsonl holds no metrics lines yet"),
        "no run": ("nosuch", "c.png", "nosuch: no metrics.jsonl there"),
        "missing folder": ("run", "plots/c.png", "--out plots/c.png: no folder plots (make it first)"),
        "no extension": ("run", "plots_x", "--out plots_x: name a .png, .pdf or .svg file"),
        "a folder": ("run", "run", "--out run is a folder"),
        "an input": ("m.png", "m.png", "--out m.png is one of the inputs"),
    }[case]
    before = sorted(os.listdir(tmp_path))
    refused(run("plot", runs, "--out", out, cwd=tmp_path), f"plot.py: error: {text}")
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / "m.png").read_text() == (run_dir / "metrics.jsonl").read_text()


def test_plot_interrupted_while_saving_leaves_no_file(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    def cut(self, f, **kw):
        f.write(b"\x89PNG half")
        raise KeyboardInterrupt
    monkeypatch.setattr(Figure, "savefig", cut)
    run_dir = write_run(tmp_path / "run")
    with pytest.raises(SystemExit) as e:
        plot.main([str(run_dir), "--out", str(tmp_path / "c.png")])
    assert e.value.code == 130 and capsys.readouterr().err == f"plot.py: interrupted; {tmp_path}/c.png not written\n"
    assert sorted(os.listdir(tmp_path)) == ["run"]


# -----------------------------------------------------------------------------
# bench.py


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here")
def test_bench_refuses_cuda_without_cuda_before_any_work(tmp_path):
    r = run("bench", "--device", "cuda", "--out", tmp_path / "b.json")
    refused(r, "bench.py: error: --device cuda: torch sees no CUDA device here; --device cpu runs on the CPU")
    assert "bench:" not in r.stdout and os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv,text", [
    (["--reps", "0"], "--reps 0: must be >= 1"),
    (["--batch", "0"], "--batch 0: must be >= 1"),
    (["--layers", "-1"], "--layers -1: must be >= 1"),
    (["--rollout", "64x4"], "--rollout '64x4': 3 positive integers separated by 'x'"),
    (["--step-tokens", "300,0"], "--step-tokens '300,0': one or more positive integers"),
    (["--step-accuracy", "1.5"], "--step-accuracy 1.5: a share, from 0 to 1"),
    (["--step-cases", "some"], "--step-cases some: signal, all, or signal,all"),
    (["--sections", "trian"], "--sections: unknown trian; choose from init,train"),
    (["--sections", "grpo"], "--sections grpo needs --grpo-metrics"),
    (["--sections", "grpo", "--grpo-metrics", "no.jsonl"], "--grpo-metrics no.jsonl: no such file"),
    (["--sections", "step", "--step-data", "no.jsonl"], "--step-data no.jsonl: no such file"),
    (["--sections", "grpo", "--grpo-metrics", "empty.jsonl"], "--grpo-metrics empty.jsonl: no step lines"),
    (["--out", "d"], "--out d is a folder: name the JSON file, e.g. d/bench.json"),
    (["--out", "afile/b.json"], "afile cannot be written (read-only, no permission, or a file)"),
    (["--out", "notes.json"], "--out notes.json exists and is not a bench.py result"),
    (["--sections", "grpo", "--grpo-metrics", "m.jsonl", "--out", "m.jsonl"],
     "--grpo-metrics m.jsonl is a file bench.py writes"),
    (["--sections", "step", "--step-model", "d"], "--step-model d holds files but no model"),
])
def test_bench_refuses_bad_input_in_one_line_before_any_work(tmp_path, monkeypatch, capsys, argv, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("mine\n")
    for name, content in (("afile", "x\n"), ("notes.json", '{"mine": 1}\n'), ("empty.jsonl", ""),
                          ("m.jsonl", '{"step": 1, "t_step": 2.0, "t_generate": 1.5}\n')):
        (tmp_path / name).write_text(content)
    before = {f: open(f).read() for f in ("afile", "notes.json", "m.jsonl", "d/mine.txt")}
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("bench.py: error: --") and text in err
    assert {f: open(f).read() for f in before} == before and sorted(os.listdir("d")) == ["mine.txt"]


def test_bench_grpo_section_skips_a_cut_last_line_and_replaces_its_own_result(tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "t_step": 2.0, "t_generate": 1.5, "t_sync": 0.01}\n{"step": 2, "t_st')
    for _ in range(2):  # the second run replaces the first's result
        bench.main(["--sections", "grpo", "--grpo-metrics", str(metrics), "--out", str(tmp_path / "b.json")])
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["grpo"]["steps"] == 1 and result["grpo"]["share"]["t_sync"] == pytest.approx(0.005)
    assert sorted(os.listdir(tmp_path)) == ["b.json", "metrics.jsonl"]


def test_bench_interrupted_says_one_line_exits_130_and_writes_no_out(tmp_path):
    out = tmp_path / "b.json"
    log = tmp_path / "log"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, SCRIPTS["bench"], "--shape", "tiny", "--sections", "train",
                              "--reps", "100000", "--out", str(out)], stdout=f, stderr=subprocess.PIPE, text=True)
        while p.poll() is None and "train rep 1/" not in log.read_text():
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and messages(err)[-1:] == ["bench.py: interrupted; no --out written"], err
    assert "Traceback" not in err and sorted(os.listdir(tmp_path)) == ["log"]
