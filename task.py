"""The task: GSM8K / MATH500 data, the prompt, answer extraction and the reward.

What train_grpo.py, train_sft.py and eval.py share, so that training and evaluation read one prompt
and pay one reward:
  - rows: {"id", "question", "gold"} from the hub or a .jsonl (GSM8K question/answer rows, MATH500
    problem/answer rows; the first row's fields tell which), rows without a usable gold skipped
  - prompt: the question, a space, the instruction, in the model's chat template
  - reward (GSM8K, the paper authors' verl rule): the last "#### <number>" in the completion's last
    300 characters, commas removed, equal as a string to the gold; MATH500: the last \\boxed{}
    judged equal by math-verify. 1.0 or 0.0.
  - score: the three pass@1 columns of eval.py (strict = the reward, flexible = lm-eval-harness's
    gsm8k flexible-extract, math_verify), each equal to the reference it is named after

    python -m pytest tests/test_eval.py -k "reward or gold or extract"
"""
import json
import math
import os
import re
import sys

HUB = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}
QUESTION = {"gsm8k": "question", "math500": "problem"}  # the field holding the question
INSTRUCTION = {"gsm8k": "Let's think step by step and output the final answer after \"####\".",
               "math500": "Let's think step by step and output the final answer within \\boxed{}."}
SCORES = ("strict", "flexible", "math_verify")  # the columns of a pass@1 evaluation
MAX_NOTES = 10  # skipped rows named one by one; the rest counted
GOLD_RULE = {"gsm8k": " (a number alone after \"#### \"; MATH answers belong in problem/answer rows)",
             "math500": ""}

# -----------------------------------------------------------------------------
# data and the prompt


def load_rows(data: str, split: str = "test", limit: int | None = None) -> tuple[list[dict], int, str]:
    """(rows [{"id", "question", "gold", "answer"}], n_skipped, task) from a hub name or a .jsonl path (its
    first row's fields tell the task). id: the 0-based row / line index. Rows without a question or
    a usable gold are skipped, noted and counted."""
    task = task_of(data)
    if data in HUB:
        from datasets import load_dataset
        records, unit = load_dataset(*HUB[data], split=split), "row"
    else:
        with open(data, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not row 1's text
            records, unit = [_json_or_none(line) for line in f], "line"
    rows, skipped = [], 0
    for i, r in enumerate(records):
        if limit is not None and len(rows) >= limit:  # checked first: limit 0 gives no rows
            break
        q, a = (r.get(QUESTION[task]), r.get("answer")) if isinstance(r, dict) else (None, None)
        gold = None if a is None else gold_of(task, a)
        if isinstance(q, str) and q.strip() and gold:
            rows.append({"id": i, "question": q, "gold": gold, "answer": str(a)})  # answer: SFT's target
            continue
        skipped += 1
        if skipped <= MAX_NOTES:  # the first few by line; all of them in the count below
            why = (f"no {QUESTION[task]} or no answer" if not (isinstance(q, str) and q.strip()) or a is None else
                   f"its answer {str(a)[-40:]!r} holds no gold the reward can pay" + GOLD_RULE[task])
            note(f"{data}: {unit} {i + 1}: {why}; skipped")
    if skipped > MAX_NOTES:
        note(f"{data}: {skipped} {unit}s skipped in all")
    return rows, skipped, task


def note(msg: str) -> None:
    """A fact about the data (rows skipped) on stderr: information, not a warning of the code's, so
    PYTHONWARNINGS=error does not turn it into a crash."""
    print(f"note: {msg}", file=sys.stderr)


def task_of(data: str) -> str:
    """'gsm8k' or 'math500': a hub name says it; a .jsonl's first JSON row tells by its fields."""
    if data in HUB:
        return data
    if not os.path.isfile(data):
        raise FileNotFoundError(f"--data {data!r}: not a file (expected gsm8k, math500, a .jsonl)")
    with open(data, encoding="utf-8-sig") as f:
        first = next((r for r in map(_json_or_none, f) if isinstance(r, dict)), {})
    task = next((t for t, k in QUESTION.items() if k in first), None)
    if task is None:
        raise ValueError(f"--data {data!r}: rows need question+answer (GSM8K) or problem+answer "
                         f"(MATH500), the first has {sorted(first)}")
    return task


def needs_math_verify(*data: str | None) -> bool:
    """Whether any of these data sets is MATH (judged by math-verify); unreadable ones say no."""
    try:
        return any(d is not None and task_of(d) == "math500" for d in data)
    except (OSError, ValueError):
        return False


def _json_or_none(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def load_tokenizer(model: str):
    """The model's tokenizer, checked to be usable: it has a chat template and encodes text to
    tokens (transformers quietly builds an empty tokenizer where tokenizer.json is missing)."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:  # no tokenizer files at all
        raise ValueError(f"cannot load its tokenizer ({str(e).strip().splitlines()[0]})") from e
    if not getattr(tok, "chat_template", None):
        raise ValueError("its tokenizer has no chat template (the prompt is a chat message)")
    if not tok("What is 3 + 4?")["input_ids"]:
        raise ValueError("its tokenizer encodes text to no tokens (is tokenizer.json missing?)")
    return tok


def messages(question: str, task: str = "gsm8k") -> list[dict]:
    """The chat of a prompt: one user turn, the question, a space, the task's instruction (as the
    paper authors' data preprocessing writes it)."""
    return [{"role": "user", "content": question + " " + INSTRUCTION[task]}]  # one space


def build_prompt(tokenizer, question: str, task: str = "gsm8k") -> list[int]:
    """Token ids of the chat-templated prompt, ready for the assistant's answer."""
    ids = tokenizer.apply_chat_template(messages(question, task), add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(ids)


def context_length(config, max_model_len: int | None = None) -> int | None:
    """The context a run uses: max_model_len if given, else the model's max_position_embeddings.
    Raises ValueError for a max_model_len past the model's own."""
    context = getattr(config, "max_position_embeddings", None)
    if max_model_len and context and max_model_len > context:
        raise ValueError(f"--max-model-len {max_model_len} must be <= the model's context, "
                         f"{context}")
    return max_model_len or context


def prompts_within(tokenizer, rows: list[dict], task: str,
                   max_len: int | None) -> tuple[list[dict], list[list[int]], int]:
    """drop_long_prompts of the rows' prompts, made here (max_len None: no limit). A question of
    more than 16 * max_len characters is judged by its start first: if that alone is over max_len
    tokens, the row is dropped untokenized (a 10 MB row then costs milliseconds, not half a minute).
    """
    def too_long(q):
        if not max_len or len(q) <= 16 * max_len:
            return False  # tokenized whole below
        return len(tokenizer(q[:16 * max_len], add_special_tokens=False).input_ids) > max_len
    long = [too_long(r["question"]) for r in rows]
    if any(long):
        note(f"{sum(long)} of {len(rows)} rows skipped: the question alone is longer than the "
             f"context length {max_len}")
    rows = [r for r, x in zip(rows, long) if not x]
    prompts = [build_prompt(tokenizer, r["question"], task) for r in rows]
    rows, prompts, dropped = drop_long_prompts(rows, prompts, max_len)
    return rows, prompts, dropped + sum(long)


def drop_long_prompts(rows: list[dict], prompts: list[list[int]], max_len: int | None,
                      min_new_tokens: int = 1) -> tuple[list[dict], list[list[int]], int]:
    """(rows, prompts, n_dropped): the rows, with their prompt ids, whose prompt leaves room for at
    least min_new_tokens new tokens within the context length max_len (vLLM's: its model_config's
    max_model_len). Call it before generating: vLLM refuses a longer prompt, failing the whole
    generate call. Notes how many were dropped and why."""
    keep = [i for i, p in enumerate(prompts) if not max_len or len(p) + min_new_tokens <= max_len]
    dropped = len(prompts) - len(keep)
    if dropped:
        note(f"{dropped} of {len(prompts)} rows skipped: their prompt leaves no room for "
             f"{min_new_tokens} new token(s) within the context length {max_len}")
    return [rows[i] for i in keep], [prompts[i] for i in keep], dropped


# -----------------------------------------------------------------------------
# answers and the reward. GSM8K has three scores, each equal to the reference it is named after:
#   strict       the paper's training reward, the authors' verl GSM8K reward ("strict"): the
#                last "#### <number>" in the completion's last 300 characters, commas removed, equal
#                as a string to the gold (read from the data's answer by the same pattern)
#   flexible     lm-evaluation-harness's gsm8k "flexible-extract": its last number anywhere,
#                equal to the gold after the harness's normalisation (commas, $, final "." removed)
#   math_verify  math-verify: verify(parse(gold), parse(completion))
# MATH500: strict is the last \boxed{...} equal to the gold for math-verify; math_verify is
# math-verify's own search of the whole completion. The reward is strict, 1.0 or 0.0.

GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")  # the paper's (and lm-eval's strict-match)
TAIL = 300  # the paper's reward reads the last 300 characters only
HARNESS_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # lm-eval's gsm8k flexible-extract
HARNESS_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # lm-eval's gsm8k exact_match normalisation


def gold_of(task: str, answer: object) -> str | None:
    """The gold answer in a data row's answer text, or None: no gold the reward can pay rightly.
    GSM8K: by the paper's pattern, as completions are read (the first "#### <number>", commas
    removed; a bare answer is read as "#### " + it), so a completion ending in "#### " + the row's
    answer earns the reward. The number must be all of its line and hold a digit: the pattern would
    read "#### 1e5" as 1, "3/4" as 3, "3\\sqrt{2}" (a MATH answer) as 3 and "#### ." as "." -- golds
    that pay wrong answers. A JSON number is read as its text: 1234567.0 as "1234567"; a float that
    has no plain decimal text (1e+30) is no gold."""
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = _number_text(answer)
        if answer is None:
            return None
    text = str(answer).strip()
    if task == "math500":
        return text or None
    text = text if "####" in text else "#### " + text
    m = GSM8K_ANSWER.search(text)
    if not m or text[m.end():].split("\n")[0].strip() or not re.search("[0-9]", m.group(1)):
        return None  # the number is not all of its line, or holds no digit
    return m.group(1).replace(",", "")


def _number_text(x: int | float) -> str | None:
    """A JSON number as the text a completion would write: integers (and integer-valued floats below
    2**53, exact) without ".0", other floats as Python writes them unless in e-notation (None)."""
    if isinstance(x, int):
        return str(x)
    if math.isfinite(x) and x.is_integer() and abs(x) < 2 ** 53:
        return str(int(x))
    text = repr(x)
    return None if not math.isfinite(x) or "e" in text else text


def extract_strict(text: str) -> str | None:
    """GSM8K, the paper's rule: the last "#### <number>" within the last 300 characters, commas
    removed (the paper also strips "$", which its pattern never captures); None without one. Prose
    after "####" ("#### The answer is 7"), "#### $90" and "####90" earn nothing; "#### 31.00" is
    not "31", and "#### 3/4" reads as "3": the rule compares strings, as the paper's reward does."""
    found = GSM8K_ANSWER.findall(text[-TAIL:])
    return found[-1].replace(",", "") if found else None


def extract_flexible(text: str) -> str | None:
    """lm-evaluation-harness's gsm8k flexible-extract: the last match of its pattern, or None."""
    found = HARNESS_NUMBER.findall(text)
    return next(g for g in found[-1] if g).strip() if found else None


def harness_normal(s: str) -> str:
    """lm-eval's normalisation before its gsm8k exact match, for the answer and the gold alike."""
    for pattern in HARNESS_IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower()


def extract_boxed(text: str) -> str | None:
    """The last \\boxed{...}'s content, braces balanced (\\boxed{\\frac{1}{2}} -> \\frac{1}{2})."""
    i = text.rfind("\\boxed")
    m = re.match(r"\\boxed\s*{", text[i:]) if i >= 0 else None
    if not m:
        return None
    depth, start = 0, i + m.end() - 1
    for k in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[start + 1:k]
    return None  # unbalanced: cut off mid-answer


def math_verify(gold: str, completion: str, task: str = "gsm8k") -> bool:
    """math-verify's judgement: does `completion` (its own answer search) equal `gold`?"""
    from math_verify import parse, verify
    return bool(verify(parse(gold if task == "gsm8k" else f"${gold}$"), parse(completion)))


def strict_answer(task: str, completion: str, gold: str) -> tuple[str | None, bool]:
    """(extracted answer, correct) under the task's strict rule, the one definition that both the
    reward and evaluate()'s "strict" use."""
    if task == "gsm8k":
        extracted = extract_strict(completion)
        return extracted, extracted is not None and extracted == gold
    if task != "math500":
        raise ValueError(f"unknown task {task!r}: expected one of {sorted(QUESTION)}")
    from math_verify import parse, verify
    extracted = extract_boxed(completion)
    boxed = f"\\boxed{{{extracted}}}"
    return extracted, extracted is not None and bool(verify(parse(f"${gold}$"), parse(boxed)))


def reward(task: str, completion: str, gold: str) -> float:
    """THE training reward of either task: 1.0 if the completion is strictly correct, else 0.0."""
    return float(strict_answer(task, completion, gold)[1])


def score(task: str, completion: str, gold: str) -> dict:
    """{"extracted", "strict", "flexible" (GSM8K; else None), "math_verify"} of a completion."""
    extracted, strict = strict_answer(task, completion, gold)
    flexible = None
    if task == "gsm8k":
        found = extract_flexible(completion)
        flexible = found is not None and harness_normal(found) == harness_normal(gold)
    return {"extracted": extracted, "strict": strict, "flexible": flexible,
            "math_verify": math_verify(gold, completion, task)}
