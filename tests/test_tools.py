"""Tests of the command lines of tiny.py, plot.py and bench.py as a user runs them (subprocesses):
bad input is one line and exit code 2 before any work, no file of the user's or input is written
over, an interruption is one line and exit code 130 and leaves no half-written output.
(prepare.py's are in test_prepare.py.)

    python -m pytest tests/test_tools.py      # ~1 min on a 2-core CPU, offline
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest


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
    assert r.returncode == 0 and "usage: tiny.py [-h] [dir]" in r.stdout and "default: tiny" in r.stdout
    assert os.listdir(tmp_path) == []


def test_tiny_refuses_a_dir_it_cannot_make(tmp_path):
    (tmp_path / "afile").write_text("x")
    refused(run("tiny", tmp_path / "afile" / "d"), f"cannot write in {tmp_path}/afile/d: Not a directory")
    refused(run("tiny", tmp_path / "afile"), f"DIR {tmp_path}/afile is a file")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_tiny_interrupted_says_one_line_exits_130_and_leaves_nothing(tmp_path, sig):
    out = tmp_path / "d"
    rc, err = interrupt_when([sys.executable, SCRIPTS["tiny"], str(out)], out.exists, getattr(signal, sig))
    assert rc == 130 and messages(err) == [f"tiny.py: interrupted; nothing was left in {out}"]
    assert not out.exists()
