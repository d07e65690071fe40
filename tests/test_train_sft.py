"""Tests of train_sft.py: the paper's SFT baseline with the same TinyLoRA as GRPO, on the tiny model.

    python -m pytest tests/test_train_sft.py      # ~1 minute on a 2-core CPU
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import eval as E
import machinery.cli
import machinery.memory
import machinery.run
import task
import tiny
import tinylora
import train_grpo
import train_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny.write_jsonl(str(tmp_path_factory.mktemp("sft") / "train.jsonl"), tiny.problems(64, seed=1))


def sft_args(tiny_dir, data, run_dir, *extra):
    return train_sft.parse_args(["--model", tiny_dir, "--data", data, "--run-dir", str(run_dir), "--batch", "8",
                                 "--svd-cache", "", "--save-every", "0", *extra])


def metrics(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_the_target_is_the_templates_answer_turn_without_calculator_notes(tiny_dir):
    tok = task.load_tokenizer(tiny_dir)
    row = {"question": "What is 3 + 4?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
    row["prompt_ids"] = task.build_prompt(tok, row["question"])
    ids = train_sft.target_ids(tok, row)
    assert tok.decode(ids) == "3 + 4 = 7\n#### 7<|im_end|>" and ids[-1] == tok.eos_token_id
    kept = train_sft.target_ids(tok, row, keep_calculator=True)
    assert tok.decode(kept) == "3 + 4 = <<3+4=7>>7\n#### 7<|im_end|>"
    full = tok.apply_chat_template(task.messages(row["question"]) + [{"role": "assistant", "content": "3 + 4 = 7\n"
                                   "#### 7"}], tokenize=True, return_dict=False)
    assert list(full[:len(row["prompt_ids"]) + len(ids)]) == row["prompt_ids"] + ids  # prompt, then the answer


def test_the_loss_is_the_answer_tokens_cross_entropy(tiny_dir, data, tmp_path):
    """Step 1's logged loss equals the token-mean cross-entropy of the answer tokens under the base
    model (v = 0 at step 1), computed here with a plain forward: the prompt carries no loss."""
    args = sft_args(tiny_dir, data, tmp_path, "--steps", "1")
    train_sft.train(args)
    loss = metrics(tmp_path)[0]["loss"]
    tok = task.load_tokenizer(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    rows = task.load_rows(data)[0]
    total = n = 0.0
    for r in train_sft.batch_for(rows, 0, len(rows) // 8, args):
        r["prompt_ids"] = task.build_prompt(tok, r["question"])
        ids = r["prompt_ids"] + train_sft.target_ids(tok, r)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
        p = len(r["prompt_ids"])
        total -= logp[p - 1:, :].gather(1, torch.tensor(ids[p:])[:, None]).sum().item()
        n += len(ids) - p
    assert loss == pytest.approx(total / n, rel=1e-5)


def test_the_loss_falls_and_only_v_trains(tiny_dir, data, tmp_path):
    model, adapter = train_sft.train(sft_args(tiny_dir, data, tmp_path, "--steps", "24", "--lr", "0.05",
                                              "--n-tie", "1", "--warmup", "0"))
    loss = [m["loss"] for m in metrics(tmp_path)]
    assert sum(loss[-4:]) / 4 < sum(loss[:4]) / 4 - 0.1, loss
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith(".v")  # v, registered in the adapted layers
    v = load_file(adapter)["v"]
    assert v.shape == (14, 13) and (v != 0).all()


@pytest.mark.parametrize("options", [[], ["--u", "1"], ["--u", "5", "--n-tie", "1"], ["--n-tie", "7", "--tie",
                                                                                       "structured"]])
def test_sft_and_grpo_adapters_have_the_same_parameters(tiny_dir, data, tmp_path, options):
    """The same TinyLoRA options give the same adapter config (u, r, tie groups, P scale, modules,
    fingerprint) and the same number of trained parameters under either trainer."""
    _, sft = train_sft.train(sft_args(tiny_dir, data, tmp_path / "sft", "--steps", "1", *options))
    grpo_args = train_grpo.parse_args(["--model", tiny_dir, "--data", data, "--run-dir", str(tmp_path / "grpo"),
                                       "--prompts-per-step", "4", "--mini-batch", "4", "--max-new-tokens", "4",
                                       "--steps", "1", "--backend", "hf", "--svd-cache", "", *options])
    _, grpo = train_grpo.train(grpo_args, lambda text, gold: float(len(text) % 2))
    assert tinylora.read_config(sft) == tinylora.read_config(grpo)
    assert load_file(sft)["v"].shape == load_file(grpo)["v"].shape


def test_resume_continues_bit_identically(tiny_dir, data, tmp_path):
    train_sft.train(sft_args(tiny_dir, data, tmp_path / "once", "--steps", "4", "--lr", "0.01"))
    train_sft.train(sft_args(tiny_dir, data, tmp_path / "twice", "--steps", "2", "--lr", "0.01"))
    resumed = train_sft.parse_args(["--resume", str(tmp_path / "twice"), "--steps", "4"])
    train_sft.train(resumed)
    a, b = (open(tmp_path / d / "adapter.safetensors", "rb").read() for d in ("once", "twice"))
    assert a == b
    assert [m["loss"] for m in metrics(tmp_path / "once")] == [m["loss"] for m in metrics(tmp_path / "twice")]


def test_its_adapter_loads_in_eval(tiny_dir, data, tmp_path, capsys):
    _, adapter = train_sft.train(sft_args(tiny_dir, data, tmp_path, "--steps", "2", "--lr", "0.05"))
    s = E.main(["--model", tiny_dir, "--adapter", adapter, "--data", data, "--limit", "4", "--backend", "hf",
                "--max-new-tokens", "4", "--svd-cache", ""])
    assert s["n"] == 4 and 0 <= s["strict"] <= 1


def test_math_rows_are_refused_in_one_line(tiny_dir, tmp_path, capsys):
    path = tiny.write_jsonl(str(tmp_path / "math.jsonl"), [{"problem": f"What is {i} + {i}?", "answer": str(2 * i)}
                                                           for i in range(16)])
    with pytest.raises(SystemExit) as e:
        train_sft.train(sft_args(tiny_dir, path, tmp_path / "run"))
    assert e.value.code == 2 and "SFT trains on GSM8K's worked solutions" in capsys.readouterr().err


@pytest.mark.parametrize("answer,says", [
    (27, "does not end in a '#### 27' line the reward reads"),  # a JSON number: the target would be "27<|im_end|>"
    ("27", "does not end in a '#### 27' line the reward reads"),
    ("3 + 24 = 27<|im_end|>\n#### 27", "holds '<|im_end|>', a special token's text"),  # cut there, '#### 27' lost
])
def test_an_answer_that_is_no_target_the_reward_pays_is_refused_before_loading(tiny_dir, tmp_path, capsys,
                                                                                 monkeypatch, answer, says):
    rows = tiny.problems(8, seed=1)
    rows[3] = {"question": "What is 3 + 24?", "answer": answer}
    path = tiny.write_jsonl(str(tmp_path / "d.jsonl"), rows)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(SystemExit) as e:
        train_sft.train(sft_args(tiny_dir, path, tmp_path / "run"))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"--data {path}: row 4: " in err[-1] and says in err[-1], err
    assert not (tmp_path / "run").exists()  # no run folder left behind


# -----------------------------------------------------------------------------
# one run folder, one trainer: what train_sft.py shares with train_grpo.py speaks of train_sft.py


def grpo_args(tiny_dir, data, run_dir, *extra):
    return train_grpo.parse_args(["--model", tiny_dir, "--data", data, "--run-dir", str(run_dir), "--u", "3",
                                  "--prompts-per-step", "4", "--mini-batch", "2", "--group-size", "2",
                                  "--max-new-tokens", "4", "--backend", "hf", "--svd-cache", "", *extra])


@pytest.mark.parametrize("old", [False, True])  # True: folders from before args.json named their trainer
def test_each_trainer_refuses_to_resume_the_others_run_before_loading(tiny_dir, data, tmp_path, capsys,
                                                                       monkeypatch, old):
    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    train_sft.train(sft_args(tiny_dir, data, sft, "--steps", "1"))
    train_grpo.train(grpo_args(tiny_dir, data, grpo, "--steps", "1"), lambda text, gold: float(len(text) % 2))
    made = {d: json.loads((d / "args.json").read_text()) for d in (sft, grpo)}
    assert (made[sft]["trainer"], made[grpo]["trainer"]) == ("train_sft.py", "train_grpo.py")
    if old:
        for d, a in made.items():
            (d / "args.json").write_text(json.dumps({k: x for k, x in a.items() if k != "trainer"}))
    before = {d: (d / "metrics.jsonl").read_text() for d in (sft, grpo)}
    capsys.readouterr()
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    for script, run, other in ((train_sft, grpo, "train_grpo.py"), (train_grpo, sft, "train_sft.py")):
        with pytest.raises(SystemExit) as e:
            script.train(script.parse_args(["--resume", str(run), "--steps", "2"]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert f"--resume {run}: a {other} run; {other} --resume {run} continues it" in err, err
    assert before == {d: (d / "metrics.jsonl").read_text() for d in (sft, grpo)}  # neither touched


def test_the_shared_machinery_names_train_sft_py_and_only_its_options(tiny_dir, data, tmp_path, capsys,
                                                                       monkeypatch):
    run = tmp_path / "run"
    train_sft.train(sft_args(tiny_dir, data, run, "--steps", "1"))  # this process holds the run from now on
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), "--resume", str(run), "--steps", "2"],
                       capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    capsys.readouterr()
    assert p.returncode == 2 and p.stderr.endswith(f"train_sft.py: error: {run} is in use by another train_sft.py "
                                                   f"process; wait for it to end or stop it\n"), p.stderr
    for extra in (["--resume", str(run), "--lr", "0.5"], ["--run-dir", str(tmp_path / "new"), "--seed", "-1"]):
        with pytest.raises(SystemExit):
            train_sft.train(train_sft.parse_args(extra))
        err = capsys.readouterr().err
        assert err.startswith("train_sft.py: error: --") and "rollout" not in err, err
        assert not any(grpo_only in err for grpo_only in ("--backend", "--eval-", "--gpu-memory", "--max-new")), err
    args = sft_args(tiny_dir, data, tmp_path / "gpu")
    meta = machinery.run.meta_model(args)
    names, _ = tinylora.choose_modules(dict(meta.named_modules()))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (2**30, 2**30))  # a 1 GiB GPU
    with pytest.raises(machinery.cli.Refused) as e:  # the Run says it in one line, exit 2
        machinery.memory.check_memory(args, meta, names, 1024)
    err = str(e.value)
    assert "this GPU has 1.0 GiB" in err and "--low-memory" in err
    assert "--gpu-memory" not in err and "--max-new" not in err


def test_a_diverged_run_stops_in_one_line_and_keeps_its_last_finite_step(tiny_dir, data, tmp_path, capsys):
    """--v-dtype fp16 and a huge lr: v overflows fp16 (65504) in step 2. The run logged NaN loss and saved the
    NaN v over the finite one (exit 0); now it stops there, and its folder holds step 1, finite."""
    args = sft_args(tiny_dir, data, tmp_path, "--steps", "6", "--v-dtype", "fp16", "--lr", "2e4", "--warmup", "0")
    for resumed in (False, True):  # --resume continues from step 1, and the same recipe diverges again there
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            train_sft.train(train_sft.parse_args(["--resume", str(tmp_path)]) if resumed else args)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1] == (
            f"train_sft.py: error: step 2 made v non-finite (NaN or inf in fp16): the run diverged; {tmp_path} keeps "
            f"the state after step 1 (--resume diverges again there: a lower --lr or a wider --v-dtype is a new run, "
            f"in another --run-dir)"), err
        state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
        adapter = str(tmp_path / "adapter.safetensors")
        v = tinylora.read_v(adapter, tinylora.read_config(adapter))
        assert state["step"] == 1 and [m["step"] for m in metrics(tmp_path)] == [1]
        assert torch.equal(v, state["v"].half().float()) and v.abs().min() > 1e4  # step 1's v: large, finite
