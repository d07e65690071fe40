"""Greedy pass@1 of many TinyLoRA adapters of one base model, on one vLLM engine.

eval.py starts an engine per call (tens of seconds on a GPU); a learning-rate sweep has dozens of
adapters. Here one engine serves them all: each adapter's W + dW is synced in, the rows are scored
exactly as eval.py scores them (eval.evaluate), then the adapted modules' base weights go back in
before the next adapter. Writes OUT_DIR/<name>.jsonl per adapter (name: its run folder's name, or
"base") and one summary line per adapter to OUT_DIR/summary.jsonl and stdout. A rerun into the same
OUT_DIR replaces the summary lines of the names it scores (the others stay, in order); summary.jsonl
is rewritten whole (a temp file renamed) as each adapter finishes, from the file as it is then, under a
lock on OUT_DIR: two evaluations into one OUT_DIR at once keep each other's lines. Every adapter is
checked against --model (its modules, its base weights' fingerprint) before the engine starts.

    python tools/eval_many.py --model qwen/model --data select.jsonl --out-dir evals \\
        --base runs/*/adapter.safetensors --max-new-tokens 1024
"""
import argparse
import fcntl
import functools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]  # the project's modules

import torch  # noqa: E402

import engine  # noqa: E402
import eval as E  # noqa: E402
import machinery.cli  # noqa: E402
import task  # noqa: E402
import tinylora  # noqa: E402


def name_of(adapter):
    return os.path.basename(os.path.dirname(os.path.abspath(adapter))) or "adapter"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapters", nargs="*", help="TinyLoRA adapter files of --model")
    p.add_argument("--model", required=True, help="base model: hub id or local directory")
    p.add_argument("--data", required=True, help="gsm8k, math500 or a .jsonl (as eval.py)")
    p.add_argument("--out-dir", required=True, help="folder for <name>.jsonl and summary.jsonl (made if missing)")
    p.add_argument("--base", action="store_true", help="score the base model first")
    p.add_argument("--limit", type=int, help="the first N rows only")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="per completion")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="vLLM's share of the GPU")
    p.add_argument("--svd-cache", default=tinylora.CACHE_DIR, help="cached SVD factors ('' disables)")
    args = p.parse_args(argv)
    names = [name_of(a) for a in args.adapters]
    if len(set(names)) < len(names) or "base" in names:
        p.error("two adapters share a run-folder name (or one is named 'base'): their files would collide")
    for a in args.adapters:
        try:
            tinylora.read_v(a, tinylora.read_config(a))
        except Exception as e:
            p.error(f"{a}: not a readable TinyLoRA adapter ({machinery.cli.first_line(e)})")
    if not (args.adapters or args.base):
        p.error("nothing to score: give adapters, --base, or both")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        p.error(f"--out-dir {args.out_dir} is a file")
    outs = [os.path.join(args.out_dir, f"{n}.jsonl") for n in ["base", "summary", *names]]
    for path in [args.data, *args.adapters]:  # never write over an input
        if any(os.path.exists(o) and os.path.exists(path) and os.path.samefile(o, path) for o in outs):
            p.error(f"--out-dir {args.out_dir}: its output files would overwrite {path}")
    try:
        rows, skipped, task_name = task.load_rows(args.data, "test", args.limit)
    except (OSError, ValueError) as e:
        p.error(f"--data {args.data}: {machinery.cli.first_line(e)}")
    todo = ([("base", None)] if args.base else []) + list(zip(names, args.adapters))
    try:
        kept_summary(os.path.join(args.out_dir, "summary.jsonl"), {n for n, _ in todo})  # readable, or one line now
    except ValueError as e:
        p.error(str(e))
    os.makedirs(args.out_dir, exist_ok=True)
    tokenizer = task.load_tokenizer(args.model)
    from transformers import AutoConfig, AutoModelForCausalLM
    max_len = task.context_length(AutoConfig.from_pretrained(args.model))
    rows, prompts, long = task.prompts_within(tokenizer, rows, task_name, max_len)
    context = min(max_len, max(map(len, prompts)) + args.max_new_tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()  # on the CPU: merges only
    for a in args.adapters:  # before the engine: an adapter of another base model is refused, not met midway
        try:
            tinylora.check_base(model, a)
        except ValueError as e:
            p.error(machinery.cli.first_line(e))
    llm = engine.make_llm(args.model, str(model.dtype).removeprefix("torch."), 0, args.gpu_memory_utilization,
                          context)
    gen_fn = E.checked(functools.partial(engine.generate_vllm, llm, n=1, temperature=0.0,
                                         max_new_tokens=args.max_new_tokens))  # failures in one line
    try:
        score_all(args, todo, model, llm, gen_fn, tokenizer, rows, prompts, task_name, skipped + long, context)
    except E.Refused as e:
        p.error(str(e))


def kept_summary(path, names):
    """The lines of an earlier summary.jsonl at path whose name is not rescored now (names), in order;
    ValueError (one line) for a line that is not a summary line."""
    if not os.path.exists(path):
        return []
    kept = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                name = json.loads(line)["name"]
            except (ValueError, TypeError, KeyError):
                raise ValueError(f"{path}: line {i} is not a summary line of eval_many.py; move the file away") from None
            if name not in names:
                kept.append(line if line.endswith("\n") else line + "\n")
    return kept


def write_summary(out_dir, lines, names):
    """OUT_DIR/summary.jsonl: its lines of other names as they are now (another evaluation may have added
    some), then lines (this one's, for names); under an exclusive lock on OUT_DIR, renamed into place."""
    path, fd = os.path.join(out_dir, "summary.jsonl"), os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept_summary(path, names) + lines)
        os.replace(tmp, path)  # atomic: a kill never leaves half a summary
    finally:
        os.close(fd)  # and the lock with it


def score_all(args, todo, model, llm, gen_fn, tokenizer, rows, prompts, task_name, skipped, context):
    """Each (name, adapter) in turn: synced in, scored, the base weights synced back; summary.jsonl
    rewritten after each: the lines of other names, then those scored so far."""
    lines, names = [], {n for n, _ in todo}
    for name, adapter in todo:
        if adapter:
            tinylora.load(model, adapter, cache_dir=args.svd_cache or None, verbose=False, keep_merged=False)
            engine.sync_weights(llm, tinylora.merged_weights(model))
        s = E.evaluate(gen_fn, tokenizer, rows, task_name, args.max_new_tokens,
                       os.path.join(args.out_dir, f"{name}.jsonl"), 512, skipped, context, prompts)
        print(f"{name}: {E.summary_line(task_name, 'vllm', s)}", flush=True)
        lines.append(json.dumps({"name": name, "adapter": adapter, "data": args.data, **s}) + "\n")
        write_summary(args.out_dir, lines, names)
        if adapter:
            engine.sync_weights(llm, tinylora.unapply(model))  # the base weights back in
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
