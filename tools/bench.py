"""Benchmarks of TinyLoRA against its peers: init, training speed and memory, weight sync, file size.

Numbers, not tests. Every method adapts the same modules (all 7 linear types of every decoder
block: q,k,v,o,gate,up,down) of one random-weight Qwen2 built from a config in code (no hub):

    floor          the frozen base, gradient to the input embeddings only: no adapter can be faster
    tinylora       this project: u=13, r=2, every module tied to one v (13 trainable numbers),
                   merged W + dW kept (the default; recomputed once per optimizer update)
    tinylora_lowmem  the same with keep_merged=False: low-rank term added per call, no extra weights
    peft_tinylora  PEFT's TinyLoRA: r=2, u=13, weight_tying=1.0 (one v for all modules)
    peft_lora      PEFT LoRA r=1 on the same targets

All methods share the base weights (one copy in memory) and are timed in the same process,
interleaved (the order rotates every repetition), so machine noise hits all of them alike;
ratios are medians of per-repetition ratios to the floor.

    python tools/bench.py                                  # CPU: Qwen2.5-0.5B shapes (vocab cut to 32000), fp32
    python tools/bench.py --device cuda --shape qwen7b     # GPU: Qwen2.5-7B shapes, bf16, 8 x 1024, grad ckpt
    python tools/bench.py --sections train,memory --reps 9
    python tools/bench.py --device cuda --shape qwen7b --layers 4 --no-grad-ckpt --sections train
    python tools/bench.py --sections grpo --grpo-metrics runs/x/metrics.jsonl
    python tools/bench.py --device cuda --shape qwen7b --sections step --step-tokens 300,4096   # the real GRPO step
    torchrun --nproc_per_node 2 tools/bench.py --device cuda --sections step --step-tokens 300   # data parallel

Sections: init, train (fwd+bwd time per token), memory (peak), sync (merged weights into an
in-process vLLM vs one rollout batch; skipped without vllm), generate (HF generate throughput,
default on cuda), grpo (time shares of a train_grpo.py run), file (adapter bytes), step (the
real train_grpo.py step with vLLM at fixed completion lengths: seconds per stage, peak memory;
only when asked for). Prints markdown tables and PASS/MISS against the project's goals; writes
--out (JSON), whole, at the end.

Bad input (an option out of range, --device cuda without CUDA, a missing input file, an --out that
is a folder, one of the inputs or a file other than an earlier result) stops with one line and exit
code 2 before any model is built. Ctrl-C or SIGTERM: one line, exit code 130, --out not written.
"""
import argparse
import contextlib
import copy
import ctypes
import gc
import hashlib
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM in-process: its model is reachable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the project's modules; tests/tiny.py

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen2Config

import tinylora

# Qwen2.5 shapes, written in code (no hub). "tiny" is tiny.py's test model.
SHAPES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, vocab_size=512, tie_word_embeddings=False),
    "qwen0.5b": dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                     num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen7b": dict(num_hidden_layers=28, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
                   num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
METHODS = ("floor", "tinylora", "tinylora_lowmem", "peft_tinylora", "peft_lora")
SECTIONS = ("init", "train", "memory", "sync", "generate", "grpo", "file", "step")
U, R = 13, 2  # the paper's headline setting: 13 trainable numbers, rank-2 SVD

# -----------------------------------------------------------------------------
# timing and memory


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(seconds, result) of fn(); on cuda the clock stops only when the GPU is done."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def proc_kib(key):
    """A line of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (resident high-water mark)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def peak_memory(fn, device):
    """Bytes fn() adds at its peak: the CUDA allocator's peak, or the process RSS high-water mark on CPU."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS now is live memory
    before = proc_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM to the current RSS
    fn()
    return (proc_kib("VmHWM") - before) * 1024


def median_ratio(times, ref):
    """Median over repetitions of times[i] / ref[i] (paired: rep i of both ran seconds apart)."""
    return statistics.median(t / r for t, r in zip(times, ref))


# -----------------------------------------------------------------------------
# the model and the methods


def build_base(args):
    """The frozen random-weight base model of args.shape (seed 0), on args.device in args.dtype."""
    shape = dict(SHAPES[args.shape], vocab_size=args.vocab)
    shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    config = Qwen2Config(**shape, max_position_embeddings=max(4096, args.seq), use_cache=False)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    model.requires_grad_(False)
    if args.grad_ckpt:  # set before cloning: every method's copy inherits it
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()  # train mode: gradient checkpointing only acts in training (no dropout in Qwen2)


def clone(base):
    """A copy of `base` with new modules but the same weight tensors: methods share one base in memory."""
    same = {id(t): t for t in itertools.chain(base.parameters(), base.buffers())}
    return copy.deepcopy(base, same)


def own_bytes(model, base):
    """Bytes of the tensors a method added to the base (adapter parameters and buffers)."""
    shared = {t.data_ptr() for t in itertools.chain(base.parameters(), base.buffers())}
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.data_ptr() not in shared and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def peft_tinylora(base):
    from peft import TinyLoraConfig, get_peft_model

    config = TinyLoraConfig(r=R, u=U, weight_tying=1.0, target_modules=list(tinylora.TARGETS))
    return get_peft_model(clone(base), config)


def peft_lora(base):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=list(tinylora.TARGETS))
    return get_peft_model(clone(base), config)


def make_methods(base, args, results):
    """{method: model}, timing each adapter's init into results["init"]. With "init" in the
    sections, tinylora is first applied cold (empty SVD cache dir), then again from that cache."""
    init = {}
    cache = tempfile.mkdtemp(prefix="tinylora-svd-") if "init" in args.sections else tinylora.CACHE_DIR
    if "init" in args.sections:
        print(f"init: tinylora cold (SVD of every module, cache -> {cache}) ...", flush=True)
        cold = lambda: tinylora.apply(clone(base), U, R, cache_dir=cache, verbose=False)
        init["tinylora_cold"], _ = timed(cold, args.device)
    models = {"floor": base, "tinylora": clone(base)}
    init["tinylora_cached"], _ = timed(lambda: tinylora.apply(models["tinylora"], U, R, cache_dir=cache), args.device)
    models["tinylora_lowmem"] = clone(base)
    tinylora.apply(models["tinylora_lowmem"], U, R, cache_dir=cache, verbose=False, keep_merged=False)
    print("init: peft_tinylora (SVD of every module) ...", flush=True)
    init["peft_tinylora"], models["peft_tinylora"] = timed(lambda: peft_tinylora(base), args.device)
    init["peft_lora"], models["peft_lora"] = timed(lambda: peft_lora(base), args.device)
    if "init" in args.sections:  # without a cold start first, "cached" may have been cold: not reported
        results["init"] = init
        shutil.rmtree(cache)
    results["trainable"] = {m: sum(p.numel() for p in models[m].parameters() if p.requires_grad) for m in models}
    return models


# -----------------------------------------------------------------------------
# training forward + backward


def make_batch(base, args):
    """Fixed input embeddings (B, T, hidden) and labels (B, T): the same batch for every method."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    with torch.no_grad():
        embeds = base.get_input_embeddings()(ids)  # (B, T, hidden)
    return embeds, ids


def train_step(model, batch):
    """One forward + backward. Every method gets inputs_embeds that require grad, so the floor
    (frozen base, gradient to the embeddings only) does a subset of every adapter's work."""
    embeds, labels = batch
    model.zero_grad(set_to_none=True)
    embeds = embeds.detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=labels, use_cache=False).loss  # mean token cross-entropy
    loss.backward()


def bench_train(models, batch, args, results):
    names = list(models)
    tokens = args.batch * args.seq
    for name in names:  # warm-up: kernels, allocator, lazy buffers (tinylora's kept W + dW)
        timed(lambda: train_step(models[name], batch), args.device)
    results["adapter_bytes_in_memory"] = {n: own_bytes(models[n], models["floor"]) for n in names}
    if "memory" in args.sections:
        results["memory"] = {n: peak_memory(lambda: train_step(models[n], batch), args.device) for n in names}
    if "train" not in args.sections:
        return
    times = {n: [] for n in names}
    for rep in range(args.reps):
        for k in range(len(names)):
            name = names[(rep + k) % len(names)]  # rotate the order every repetition
            times[name].append(timed(lambda: train_step(models[name], batch), args.device)[0])
        print(f"train rep {rep + 1}/{args.reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)
    results["train"] = {n: dict(us_per_token=1e6 * statistics.median(times[n]) / tokens,
                                ratio=median_ratio(times[n], times["floor"]),
                                ratio_min=min(t / f for t, f in zip(times[n], times["floor"])),
                                ratio_max=max(t / f for t, f in zip(times[n], times["floor"])),
                                seconds=times[n]) for n in names}


# -----------------------------------------------------------------------------
# weight sync into vLLM vs one rollout batch


def sync_one(path, model, rollout, dtype, t_token=None):
    """Start vLLM on the checkpoint at `path` (the same weights as `model`, which has TinyLoRA applied),
    time one rollout batch and the weight sync, and check that vLLM then scores a sequence like `model`."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    import engine  # the engine and the sync exactly as train_grpo.py uses them
    import tiny

    P, n, T = rollout
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for r in tiny.problems(P)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # a fixed KV cache: vLLM's memory fraction would count the benchmark's other models against it
    llm = engine.make_llm(path, str(dtype).split(".")[-1], 0, max_model_len=1024, kv_cache_memory_bytes=2 << 30)
    params = SamplingParams(n=n, max_tokens=T, temperature=1.0, ignore_eos=True, seed=0)  # exactly T new tokens
    rollout_batch = lambda: llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    rollout_batch()  # warm-up: compiled graphs for these batch sizes
    t_gen = statistics.median(timed(rollout_batch, device)[0] for _ in range(2))

    v = model.tinylora_v
    with torch.no_grad():
        v.normal_(0, 0.05)  # a trained-looking v, so the sync visibly changes the model

    def merged():  # v changed, as after an optimizer update: every kept W + dW is recomputed
        with torch.no_grad():
            v.add_(1e-3)
        return tinylora.merged_weights(model, dtype)
    t_merge = statistics.median(timed(lambda: [None for _ in merged()], device)[0] for _ in range(3))
    t_sync = statistics.median(timed(lambda: engine.sync_weights(llm, merged()), device)[0] for _ in range(3))

    seq = prompts[0] + [21, 22, 23, 24, 30, 31]  # after the sync, vLLM's prompt logprobs == the adapted model's
    out = llm.generate([{"prompt_token_ids": seq}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lp_vllm = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], seq[1:])])
    ids = torch.tensor([seq], device=v.device)
    with torch.no_grad():
        lp = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), -1)
    lp_hf = lp.gather(1, ids[0, 1:, None])[:, 0].cpu()

    # GRPO does one fwd+bwd over every rollout token: t_train ~ (fwd+bwd per token) x rollout tokens
    tokens = P * n * (len(prompts[0]) + T)
    if t_token is None:  # measure it on 4 random rollout-length sequences
        ids = torch.randint(0, len(tok), (4, len(prompts[0]) + T), device=v.device)
        batch = (model.get_input_embeddings()(ids).detach(), ids)
        train_step(model, batch)  # warm-up
        t_token = statistics.median(timed(lambda: train_step(model, batch), device)[0] for _ in range(2)) / ids.numel()
    with torch.no_grad():
        v.zero_()
    del llm
    gc.collect()
    return dict(rollout=f"{P} prompts x n={n} x {T} new tokens", t_generate=t_gen, t_merge=t_merge, t_sync=t_sync,
                t_train_est=t_token * tokens, sync_share=t_sync / (t_gen + t_token * tokens),
                max_abs_logprob_diff=(lp_vllm - lp_hf).abs().max().item())


def bench_merge(models, args, results):
    """The merge at the benchmark's shape: after a change of v, every kept W + dW is recomputed,
    as after each optimizer update (and for each weight sync into vLLM)."""
    model = models["tinylora"]
    with torch.no_grad():
        model.tinylora_v.add_(1e-3)
    results["merge_at_bench_shape"], _ = timed(lambda: [None for _ in tinylora.merged_weights(model)], args.device)


def bench_sync(models, args, results):
    try:
        import vllm  # noqa: F401
    except ImportError:
        results["sync"] = "skipped: no vllm"
        print("sync: skipped: no vllm", flush=True)
        return
    import tiny

    results["sync"] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        print("sync: tiny model in vLLM ...", flush=True)
        path = tiny.make_model_dir(os.path.join(tmp, "tiny"))
        small = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        tinylora.apply(small, U, R, cache_dir=None, verbose=False)
        results["sync"]["tiny"] = sync_one(path, small, args.rollout, torch.float32)
        if args.sync_big and args.shape != "tiny":
            # the benchmark's own base model (same weights, so the SVD cache and the measured
            # fwd+bwd per token apply) with tiny.py's tokenizer: no hub here, and vLLM needs one
            print(f"sync: {args.shape} in vLLM ...", flush=True)
            path = os.path.join(tmp, args.shape)
            tok = tiny.make_tokenizer()
            base = models["floor"]  # the same tensors as under tinylora's wrappers, with plain HF names
            base.config.eos_token_id, base.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
            base.save_pretrained(path)
            tok.save_pretrained(path)
            t_token = results["train"]["tinylora"]["us_per_token"] / 1e6 if "train" in results else None
            results["sync"][args.shape] = sync_one(path, models["tinylora"], args.rollout_big, args.dtype, t_token)


# -----------------------------------------------------------------------------
# the other sections


def bench_generate(base, args, results):
    """HF generate throughput of the base model for one batch (the rollout path where vLLM is missing)."""
    P, n, T = args.rollout
    ids = torch.randint(0, args.vocab, (P * n, 64), generator=torch.Generator().manual_seed(2)).to(args.device)
    base.eval()
    gen = lambda: base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, min_new_tokens=T,
                                do_sample=True, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        gen()  # warm-up
        t, _ = timed(gen, args.device)
    base.train()
    results["generate"] = dict(batch=f"{P * n} sequences x 64 prompt + {T} new tokens", seconds=t,
                               new_tokens_per_s=P * n * T / t)


def metrics_rows(path):
    """The lines of a train_grpo.py metrics.jsonl; one cut off by a kill is skipped, as
    train_grpo.py skips it."""
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return [r for r in rows if isinstance(r, dict)]


def bench_grpo(path, results):
    """Time shares of a GRPO run from its metrics.jsonl (one JSON line per step; train_grpo.py's
    keys t_generate, t_sync, t_train, ...)."""
    rows = metrics_rows(path)
    parts = sorted({k for r in rows for k in r if k.startswith("t_") and k != "t_step"})
    total = {k: sum(r.get(k, 0.0) for r in rows) for k in parts}
    step = sum(r["t_step"] for r in rows) if all("t_step" in r for r in rows) else sum(total.values())
    results["grpo"] = dict(steps=len(rows), seconds=total, share={k: total[k] / step for k in parts})


# -----------------------------------------------------------------------------
# the real GRPO step: train_grpo.train on a random-weight model, vLLM rollouts of a fixed length


def signal_reward(accuracy):
    """A reward for random-weight rollouts (they earn nothing from the task): each completion is
    "correct" with probability `accuracy`, independently. At 0.9, the paper's GSM8K accuracy,
    1 - 0.9**4 - 0.1**4 = 34% of groups of 4 carry a signal. Drawn from the sample's gold answer
    and its count (unique_golds makes every row's gold its own), so a rank of a torchrun run gives
    a prompt's samples the rewards one process would. (Not a hash of the text: the random model's
    tokens mostly lie outside tiny.py's 512-token vocabulary and decode to the same text.)"""
    import collections
    import random
    seen = collections.Counter()

    def reward(text, gold):
        seen[gold] += 1
        return float(random.Random(f"{gold}/{seen[gold]}").random() < accuracy)
    return reward


def unique_golds(src, dst):
    """A copy of a GSM8K-format .jsonl whose row i answers "#### i" (questions kept: prompt lengths)."""
    with open(src) as f, open(dst, "w") as out:
        for i, line in enumerate(x for x in f if x.strip()):
            out.write(json.dumps(dict(question=json.loads(line)["question"], answer=f"#### {i}")) + "\n")
    return dst


def every_group_reward():
    """Rewards 1, 0, 1, 0, ... in sampling order: every group has a signal (the trainer's worst case)."""
    count = itertools.count()
    return lambda text, gold: float(next(count) % 2)


def step_model(args):
    """A random-weight model of args.shape (seed 0, args.dtype) with tiny.py's tokenizer, saved where
    vLLM can load it; reused if it is already there."""
    import tiny
    path = args.step_model or os.path.join(tempfile.gettempdir(), f"bench-{args.shape}")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"step: building a random {args.shape} in {path} ...", flush=True)
        tok = tiny.make_tokenizer()
        config = Qwen2Config(**dict(SHAPES[args.shape], vocab_size=args.vocab), max_position_embeddings=32768,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        torch.manual_seed(0)
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        del model
        gc.collect()
        torch.cuda.empty_cache() if args.device == "cuda" else None
    return path


def step_files():
    """The step section's data: the rows it trains on, and tiny.py's rows without --step-data."""
    return [os.path.join(tempfile.gettempdir(), f"bench-{x}.jsonl") for x in ("step", "tiny")]


def bench_step(args, results):
    """train_grpo.train as a user runs it (default recipe: 64 prompts x 4, 2 updates, sync), for each
    completion length in --step-tokens, once with --step-accuracy's share of groups carrying a signal
    and once with every group carrying one. One vLLM engine serves all runs (an engine cannot be
    freed and re-made in one process); each run loads its own trainer model."""
    import engine
    import train_grpo

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    data, tiny_data = step_files()
    if rank == 0:  # one writer; the other ranks of a torchrun run wait, then read
        step_model(args)
        unique_golds(args.step_data or tiny_rows(tiny_data), data)
    if world > 1:
        dist.barrier()
    path, longest = step_model(args), max(args.step_tokens)
    max_len = longest + 1024  # + the prompt
    llm = engine.make_llm(path, str(args.dtype).split(".")[-1], rank, args.step_util, max_len)
    results["step"] = []
    for T in args.step_tokens:
        cases = [("signal", signal_reward(args.step_accuracy))] + ([("all", every_group_reward())] if T <= 1024 else [])
        for case, reward in [c for c in cases if c[0] in args.step_cases]:
            run = [tempfile.mkdtemp(prefix=f"bench-step-{T}-") if rank == 0 else None]
            if world > 1:
                dist.broadcast_object_list(run)  # one run dir: rank 0 writes it
            run = run[0]
            targs = train_grpo.parse_args(["--model", path, "--data", data, "--max-new-tokens", str(T), "--steps",
                                           str(args.step_steps), "--run-dir", run, "--save-every", "0",
                                           "--max-model-len", str(max_len), "--gpu-memory-utilization",
                                           str(args.step_util)])
            print(f"step: {T} new tokens, reward {case!r}, {args.step_steps} steps ...", flush=True)
            with fingerprints(engine) as samples:
                model, _ = train_grpo.train(targs, reward, llm=llm)
            del model
            gc.collect()
            torch.cuda.empty_cache() if args.device == "cuda" else None
            if world > 1:
                everyone = [None] * world
                dist.all_gather_object(everyone, samples)
                samples = {k: x for d in everyone for k, x in d.items()}
            if rank > 0:
                continue
            rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
            later = rows[1:] or rows  # the first step warms up kernels and the allocator
            med = {k: statistics.median(r[k] for r in later) for k in
                   ("t_generate", "t_logp_old", "t_update", "t_sync", "t_step", "tokens", "signal", "trained_tokens")}
            results["step"].append(dict(tokens=T, case=case, steps=rows, median=med, first=rows[0],
                                        peak_gib=max(r["peak_gib"] for r in rows),
                                        grad_ckpt=[r["grad_ckpt"] for r in rows], samples=samples))


@contextlib.contextmanager
def fingerprints(engine):
    """Records a short hash of every rollout's completion ids, by its vLLM seed (the seed names the
    sample in every run of the same recipe: compare runs with it, e.g. one process vs torchrun)."""
    samples, generate = {}, engine.generate_vllm

    def recording(llm, prompts, n, *a, seed=None, **k):
        out = generate(llm, prompts, n, *a, seed=seed, **k)
        for first, o in zip(seed if isinstance(seed, list) else [], out):
            for j, x in enumerate(o["samples"]):
                samples[str(first + j)] = hashlib.sha1(str(x["ids"]).encode()).hexdigest()[:12]
        return out
    engine.generate_vllm = recording
    try:
        yield samples
    finally:
        engine.generate_vllm = generate


def tiny_rows(path):
    """GSM8K-format rows from tiny.py (short prompts), when --step-data gives no real data."""
    import tiny
    return tiny.write_jsonl(path, tiny.problems(2048, seed=5))


def du(path):
    """Bytes of a file, or of all files under a directory."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def bench_file(models, results):
    with tempfile.TemporaryDirectory() as tmp:
        tinylora.save(models["tinylora"], os.path.join(tmp, "tinylora.safetensors"))  # v + config
        models["peft_tinylora"].save_pretrained(os.path.join(tmp, "peft_tinylora"))
        models["peft_lora"].save_pretrained(os.path.join(tmp, "peft_lora"))
        results["file"] = {name: du(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}


# -----------------------------------------------------------------------------
# report


def report(results, args):
    """Markdown tables + PASS/MISS against the goals; returns the goals {name: (ok, text)}."""
    lines, goals = [], {}
    add = lines.append
    tr, mem, init = results.get("train"), results.get("memory"), results.get("init", {})
    if tr or mem:
        add("\n| method | trainable | adapter state | fwd+bwd us/token | x floor (min-max) | peak memory |")
        add("|---|---|---|---|---|---|")
        for m in METHODS:
            t = tr[m] if tr else None
            speed = f"{t['us_per_token']:.1f} | {t['ratio']:.3f} ({t['ratio_min']:.3f}-{t['ratio_max']:.3f})" if t else "- | -"
            add(f"| {m} | {results['trainable'][m]:,} | {results['adapter_bytes_in_memory'][m] / 2**20:.1f} MiB | {speed} | "
                + (f"{mem[m] / 2**20:,.0f} MiB |" if mem else "- |"))
    if tr:
        ok = tr["tinylora"]["ratio"] <= 1.02 and tr["tinylora"]["ratio"] <= tr["peft_tinylora"]["ratio"]
        goals["train"] = (ok, f"tinylora fwd+bwd {tr['tinylora']['ratio']:.3f}x floor (goal <= 1.02x), "
                              f"peft_tinylora {tr['peft_tinylora']['ratio']:.3f}x (goal: tinylora no slower)")
    if init:
        add("\n| init | seconds |\n|---|---|")
        for k, t in init.items():
            add(f"| {k} | {t:.3f} |")
        speedup = init["peft_tinylora"] / init["tinylora_cached"]
        goals["init"] = (speedup >= 20, f"cached tinylora init {speedup:.0f}x faster than peft_tinylora (goal >= 20x)")
    if "merge_at_bench_shape" in results:
        t = results["merge_at_bench_shape"]
        add(f"\nmerge after an update (every W + dW recomputed) at {args.shape} shapes ({args.dtype}): {t:.3f} s"
            + (f" = {100 * t / (tr['floor']['us_per_token'] * 1e-6 * args.batch * args.seq):.2f}% of one floor "
               f"fwd+bwd of {args.batch} x {args.seq} tokens" if tr else ""))
    sync = results.get("sync")
    if isinstance(sync, str):
        add(f"\nsync: {sync}")
    elif sync:
        add("\n| vLLM sync | rollout | generate s | train s (est.) | merge s | sync s (merge incl.) | sync share of step "
            "| max abs logprob diff vLLM vs HF after sync |")
        add("|---|---|---|---|---|---|---|---|")
        for shape, s in sync.items():
            add(f"| {shape} | {s['rollout']} | {s['t_generate']:.2f} | {s['t_train_est']:.2f} | {s['t_merge']:.4f} | "
                f"{s['t_sync']:.4f} | {100 * s['sync_share']:.3f}% | {s['max_abs_logprob_diff']:.1e} |")
        shares = ", ".join(f"{shape} {100 * s['sync_share']:.3f}%" for shape, s in sync.items())
        goals["sync"] = (all(s["sync_share"] <= 0.01 for s in sync.values()),
                         f"sync share of a step: {shares} (goal <= 1%; step = rollout generate + est. train "
                         "on its tokens)")
    if "generate" in results:
        g = results["generate"]
        add(f"\nHF generate ({g['batch']}): {g['seconds']:.2f} s, {g['new_tokens_per_s']:,.0f} new tokens/s")
    if "grpo" in results:
        g = results["grpo"]
        add(f"\nGRPO ({g['steps']} steps): " + ", ".join(f"{k} {100 * s:.1f}%" for k, s in g["share"].items()))
        if "t_sync" in g["share"]:  # the sync goal, measured on a real run
            goals["grpo_sync"] = (g["share"]["t_sync"] <= 0.01, f"sync {100 * g['share']['t_sync']:.2f}% of the "
                                                                "GRPO run's step time (goal <= 1%)")
    if "step" in results:
        add("\n| new tokens | groups with signal | step s | generate s | logp_old s | update s | sync s | trainer share "
            "| gen tokens/s | peak GiB | grad ckpt | first step s |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results["step"]:
            m = r["median"]
            trainer = m["t_logp_old"] + m["t_update"] + m["t_sync"]
            add(f"| {r['tokens']} | {r['case']} ({100 * m['signal']:.0f}%) | {m['t_step']:.1f} | {m['t_generate']:.1f} | "
                f"{m['t_logp_old']:.2f} | {m['t_update']:.2f} | {m['t_sync']:.2f} | {100 * trainer / m['t_step']:.0f}% | "
                f"{m['tokens'] / m['t_generate']:,.0f} | {r['peak_gib']:.1f} | {r['grad_ckpt']} | {r['first']['t_step']:.1f} |")
        signal = [r for r in results["step"] if r["case"] == "signal"]
        short = min(signal, key=lambda r: r["tokens"]) if signal else None
        if short:
            m = short["median"]
            share = (m["t_logp_old"] + m["t_update"] + m["t_sync"]) / m["t_step"]
            goals["trainer_share"] = (share <= 0.35, f"trainer side {100 * share:.0f}% of a step at {short['tokens']} "
                                                     "new tokens (goal <= 35%)")
            hours = 350 * m["t_step"] / 3600
            goals["full_run"] = (hours <= 2.5, f"paper's GSM8K run (350 steps) projects to {hours:.2f} h at "
                                               f"{short['tokens']} new tokens per completion (goal <= 2.5 h)")
    if "file" in results:
        add("\n| adapter file | bytes |\n|---|---|")
        for k, b in results["file"].items():
            add(f"| {k} | {b:,} |")
    add("")
    for name, (ok, text) in goals.items():
        add(f"{'PASS' if ok else 'MISS'} {name}: {text}")
    print("\n".join(lines))
    return goals


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                   help="default: cuda if available")
    p.add_argument("--shape", default=None, choices=list(SHAPES), help="default: qwen0.5b on cpu, qwen7b on cuda")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on cpu, bf16 on cuda")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocab size; default: the shape's, cut to 32000 on cpu (saves RAM and time; same for all)")
    p.add_argument("--batch", type=int, default=None, help="default: 2 on cpu, 8 on cuda")
    p.add_argument("--seq", type=int, default=None, help="default: 256 on cpu, 1024 on cuda")
    p.add_argument("--reps", type=int, default=5, help="timed fwd+bwd repetitions per method, after a warm-up (5)")
    p.add_argument("--grad-ckpt", action="store_true", default=None, help="gradient checkpointing (default on cuda)")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="no gradient checkpointing")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's); a slice is quicker")
    p.add_argument("--rollout", default="64x4x128", help="prompts x n x new tokens of a rollout batch, tiny model (64x4x128)")
    p.add_argument("--rollout-big", default="16x4x32", help="the same at the --shape model in vLLM (16x4x32: CPU-sized)")
    p.add_argument("--no-sync-big", dest="sync_big", action="store_false", help="vLLM on the tiny model only")
    p.add_argument("--sections", default=None, help=f"comma list of {','.join(SECTIONS)}; "
                   "default: all but generate on cpu, all but sync on cuda; grpo only with --grpo-metrics")
    p.add_argument("--grpo-metrics", default=None, help="metrics.jsonl of a train_grpo.py run (grpo section)")
    p.add_argument("--step-tokens", default="300,4096", help="step section: completion lengths (every completion "
                   "runs to the length: random weights never stop)")
    p.add_argument("--step-steps", type=int, default=3, help="step section: GRPO steps per run (the first warms up)")
    p.add_argument("--step-accuracy", type=float, default=0.9, help="step section: share of correct completions "
                   "(0.9: 34%% of groups of 4 carry a signal)")
    p.add_argument("--step-cases", default="signal,all", help="step section: the signal case, the every-group "
                   "case (only up to 1024 new tokens), or both")
    p.add_argument("--step-util", type=float, default=0.4, help="step section: vLLM's --gpu-memory-utilization")
    p.add_argument("--step-data", default=None, help="step section: a GSM8K .jsonl for realistic prompts "
                   "(default: tiny.py's short problems)")
    p.add_argument("--step-model", default=None, help="step section: where the random model is saved / reused")
    p.add_argument("--out", default="runs/bench.json", help="results as JSON (runs/bench.json)")
    args = p.parse_args(argv)
    for k in ("vocab", "batch", "seq", "reps", "layers", "step_steps"):  # before the defaults below
        if getattr(args, k) is not None and getattr(args, k) < 1:
            fail(f"--{k.replace('_', '-')} {getattr(args, k)}: must be >= 1")
    gpu = args.device == "cuda"
    if gpu and not torch.cuda.is_available():
        fail("--device cuda: torch sees no CUDA device here; --device cpu runs on the CPU")
    args.shape = args.shape or ("qwen7b" if gpu else "qwen0.5b")
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if gpu else "fp32")]
    args.vocab = args.vocab or (SHAPES[args.shape]["vocab_size"] if gpu or args.shape == "tiny" else 32000)
    args.batch, args.seq = args.batch or (8 if gpu else 2), args.seq or (1024 if gpu else 256)
    args.grad_ckpt = gpu if args.grad_ckpt is None else args.grad_ckpt
    args.rollout, args.rollout_big = (counts(r, "x", f"--{k}", 3) for k, r in
                                      (("rollout", args.rollout), ("rollout-big", args.rollout_big)))
    args.step_tokens = counts(args.step_tokens, ",", "--step-tokens")
    args.step_cases = args.step_cases.split(",")
    default = [s for s in SECTIONS if s not in ("sync" if gpu else "generate", "grpo", "step")]
    default += ["grpo"] if args.grpo_metrics else []
    args.sections = args.sections.split(",") if args.sections else default
    check(args)
    return args


def fail(msg):
    """Bad input: one line on stderr, exit code 2 (as argparse does)."""
    print(f"bench.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def counts(text, sep, option, n=None):
    """The positive integers of e.g. "64x4x128" or "300,4096" (n of them, if given)."""
    try:
        out = tuple(int(x) for x in text.split(sep))
    except ValueError:
        out = ()
    if not out or min(out) < 1 or (n and len(out) != n):
        fail(f"{option} {text!r}: {n or 'one or more'} positive integers separated by {sep!r}")
    return out


def check(args):
    """Every check of the options and their files that needs no model: bad input stops here."""
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad:
        fail(f"--sections: unknown {', '.join(bad)}; choose from {','.join(SECTIONS)}")
    if not 0 <= args.step_accuracy <= 1:
        fail(f"--step-accuracy {args.step_accuracy}: a share, from 0 to 1")
    if not 0 < args.step_util <= 1:
        fail(f"--step-util {args.step_util}: a share of GPU memory, above 0 and at most 1")
    if set(args.step_cases) - {"signal", "all"}:
        fail(f"--step-cases {','.join(args.step_cases)}: signal, all, or signal,all")
    if "grpo" in args.sections and not args.grpo_metrics:
        fail("--sections grpo needs --grpo-metrics (the metrics.jsonl of a train_grpo.py run)")
    inputs = {"--grpo-metrics": args.grpo_metrics, "--step-data": args.step_data}
    for option, path in inputs.items():
        if path and not os.path.isfile(path):
            fail(f"{option} {path}: no such file")
    if "grpo" in args.sections and not any("t_step" in r for r in metrics_rows(args.grpo_metrics)):
        fail(f"--grpo-metrics {args.grpo_metrics}: no step lines (JSON with t_step) of a train_grpo.py run")
    written = [args.out] + ([step_files()[0]] if "step" in args.sections else [])
    for option, path in inputs.items():  # never read a file this run writes over
        if path and any(os.path.exists(w) and os.path.samefile(path, w) for w in written):
            fail(f"{option} {path} is a file bench.py writes: copy it elsewhere, or choose another --out")
    if os.path.isdir(args.out):
        fail(f"--out {args.out} is a folder: name the JSON file, e.g. {os.path.join(args.out, 'bench.json')}")
    if os.path.exists(args.out) and not is_result(args.out):
        fail(f"--out {args.out} exists and is not a bench.py result: bench.py replaces no other file")
    folder = nearest(os.path.dirname(os.path.abspath(args.out)))
    if not (os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK)):
        fail(f"--out {args.out}: {folder} cannot be written (read-only, no permission, or a file)")
    model = args.step_model
    if "step" in args.sections and model and not os.path.exists(os.path.join(model, "config.json")) \
            and os.path.exists(model):
        if not os.path.isdir(model) or os.listdir(model):  # a model there is reused, else one is saved there
            fail(f"--step-model {model} holds files but no model: bench.py saves its random model only into a "
                 "new or empty folder")


def nearest(path):
    """path, or its nearest parent that exists."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def is_result(path):
    """Whether path holds an earlier bench.py result (which --out may replace)."""
    try:
        with open(path) as f:
            x = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(x, dict) and {"args", "goals"} <= set(x)


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: the step section, data parallel
        import machinery.distributed
        if args.sections != ["step"]:
            fail("under torchrun, bench.py runs --sections step only")
        machinery.distributed.start_distributed()
        if dist.get_rank() > 0:
            return bench_step(args, {})
    start = time.perf_counter()
    cut = f" (cut from {SHAPES[args.shape]['vocab_size']})" if args.vocab != SHAPES[args.shape]["vocab_size"] else ""
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"bench: {args.shape} shapes{f' ({args.layers} layers)' if args.layers else ''}, vocab {args.vocab}{cut}, {args.dtype}, {device_name}, batch {args.batch} x "
          f"{args.seq}, grad ckpt {args.grad_ckpt}, u={U} r={R} on {len(tinylora.TARGETS)} module types, "
          f"sections {','.join(args.sections)}", flush=True)
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__, "device": device_name,
               "loadavg_start": os.getloadavg()}  # other processes on the machine show up as noise
    if "grpo" in args.sections:
        bench_grpo(args.grpo_metrics, results)
    if "step" in args.sections:
        bench_step(args, results)
    if set(args.sections) - {"grpo", "step"}:
        base = build_base(args)
        models = make_methods(base, args, results)
        if {"train", "memory"} & set(args.sections):
            bench_train(models, make_batch(base, args), args, results)
            bench_merge(models, args, results)
        if "file" in args.sections:
            bench_file(models, results)
        if "generate" in args.sections:
            bench_generate(base, args, results)
        if "sync" in args.sections:  # last: vLLM may change the process's thread settings
            bench_sync(models, args, results)
    goals = report(results, args)
    results["goals"] = {k: dict(ok=ok, text=text) for k, (ok, text) in goals.items()}
    results["seconds"], results["loadavg_end"] = time.perf_counter() - start, os.getloadavg()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(args.out), f".bench-{os.getpid()}.tmp")
    try:  # whole or not at all: an interruption leaves no half-written --out
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    load = "/".join(f"{x:.1f}" for x in results["loadavg_start"][:1] + results["loadavg_end"][:1])
    print(f"\nbench: {len(goals)} goals, {sum(ok for ok, _ in goals.values())} PASS, {results['seconds']:.0f} s, "
          f"load average {load} (start/end, {os.cpu_count()} cpus), wrote {args.out}")


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler), SIGHUP (a closed terminal): as Ctrl-C


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    try:
        main()
    except KeyboardInterrupt:
        print("bench.py: interrupted; no --out written", file=sys.stderr)
        raise SystemExit(130)
