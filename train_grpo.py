"""GRPO with TinyLoRA: a frozen LLM, u trainable numbers, rollouts from vLLM.

One step, after the paper's GSM8K recipe (the authors' verl scripts):
  1. rollout: 64 prompts x 4 samples from the in-process vLLM engine at temperature 1; the
     logprob of each sampled token under the sampler is kept (logp_vllm)
  2. reward: eval.reward, 1 if the answer is right (GSM8K: the number after the last "####";
     MATH: the last \\boxed{}, judged by math-verify), else 0
  3. advantages: (reward - group mean) / (group std + 1e-6) within each prompt's 4 samples. A
     group whose samples all got the same reward has advantage 0 and no gradient, so it is never
     run through the trainer (its tokens still count in the token-mean: the loss is unchanged)
  4. updates: 2 AdamW updates of v (mini-batches of 32 prompts), each minimising the token-mean of
        -min(ratio * A, clip(ratio, 1 - 0.2, 1 + 0.4) * A) * min(exp(logp_old - logp_vllm), 2)
     with ratio = exp(logp - logp_old) and logp_old the trainer's logprobs under the rollout-time
     v. The last factor (truncated importance sampling) corrects for vLLM sampling from a slightly
     different model than the trainer's (other kernels; with --low-memory also the bf16 rounding
     of W + dW). Sequences go through the trainer in micro-batches packed by length under a token
     budget sized to the free GPU memory, with gradient checkpointing only in steps that need it
  5. sync: W + dW of the adapted modules (by default the very bf16 tensors the trainer computes
     with) is loaded into vLLM before the next rollout; nothing else is sent
Left out on purpose: KL term, entropy bonus, reference model, more than one epoch per batch.
Multi-GPU: `torchrun --nproc_per_node N train_grpo.py ...` (data parallel: each rank has its own
engine and prompts; v's gradient, u numbers, is all-reduced).
Ctrl-C or SIGTERM saves every finished step and exits 130; `--resume RUN_DIR` continues.

    python train_grpo.py --u 13 --model Qwen/Qwen2.5-7B-Instruct
    python tiny.py tiny && python train_grpo.py --model tiny/model --data tiny/train.jsonl \\
        --eval-data tiny/test.jsonl --prompts-per-step 8 --mini-batch 4 --max-new-tokens 16 --steps 3
"""
import argparse
import copy
import glob
import importlib.util
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from tqdm import tqdm

import eval as task  # the dataset, prompt, reward and generation backends live in eval.py
import tinylora

# Options that say how to run, not what to train: --resume takes them from its own command line
# when given there; every other option is the run's recipe and comes from its args.json.
MACHINERY = ("steps", "micro_tokens", "grad_ckpt", "low_memory", "backend", "gpu_memory_utilization",
             "max_model_len", "save_every", "eval_every", "eval_limit", "eval_data", "svd_cache", "wandb")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen2.5-7B-Instruct", help="hub id or local path of the frozen base model")
    a("--data", default="gsm8k", help="'gsm8k' (hub openai/gsm8k train), 'math500', or a local .jsonl with "
      "question/answer (GSM8K) or problem/answer (MATH) rows; the reward follows the task")
    a("--eval-data", default="gsm8k", help="held-out set for --eval-every: 'gsm8k' (test split), 'math500' or a .jsonl")
    # TinyLoRA
    a("--u", type=int, default=13, help="trainable numbers per tie group (size of v)")
    a("--r", type=int, default=2, help="rank of the frozen truncated SVD of each adapted weight")
    a("--n-tie", type=int, default=None, help="modules sharing one v (default: all, so params = u)")
    a("--tie", default="tiled", choices=tinylora.TIE_MODES, help="how modules are grouped into tie groups")
    a("--targets", default=",".join(tinylora.TARGETS), help="comma-separated linear layer names to adapt")
    a("--v-dtype", default="fp32", choices=list(tinylora.V_DTYPES), help="storage dtype of v (forward sees v rounded to it)")
    a("--rounding", default="nearest", choices=tinylora.ROUNDINGS, help="how W + dW is rounded to a bf16 base "
      "(trainer and vLLM alike): 'nearest' erases entries of dW under half a bf16 step; 'stochastic' keeps "
      "them on average (unbiased), at the same speed")
    a("--svd-cache", default=tinylora.CACHE_DIR, help="directory of cached SVD factors ('' disables)")
    # GRPO
    a("--prompts-per-step", type=int, default=64, help="prompts per GRPO step (x group size rollouts)")
    a("--group-size", type=int, default=4, help="samples per prompt; advantages are normalised within a group")
    a("--mini-batch", type=int, default=32, help="prompts per optimizer update (updates per step = prompts-per-step / this)")
    a("--epochs", type=float, default=3, help="passes over the training set")
    a("--steps", type=int, default=None, help="stop after this many steps (default: all epochs; the lr schedule is "
      "always the full run's)")
    a("--max-new-tokens", type=int, default=4096, help="rollout length cap")
    a("--temperature", type=float, default=1.0, help="sampling temperature of rollouts (the trainer uses the same)")
    a("--clip-low", type=float, default=0.2, help="ratio clip below: 1 - clip_low")
    a("--clip-high", type=float, default=0.4, help="ratio clip above: 1 + clip_high (asymmetric, 'clip higher')")
    a("--tis-cap", type=float, default=2.0, help="cap of the truncated importance weight exp(logp_old - logp_vllm)")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate of v (P has the scale of the paper authors' "
      "code, so their learning rates mean the same here; they swept 1e-7..2e-4; on SmolLM2-135M 1e-4 learned, "
      "1e-3 diverged: see README)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm")
    a("--warmup", type=float, default=0.05, help="fraction of the run's updates with a linear lr warmup, then constant")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="dtype of the base model (trainer and "
      "vLLM): auto is the checkpoint's")
    a("--seed", type=int, default=0, help="seeds data order, P, and sampling")
    # machinery: how to run (may change on --resume)
    a("--micro-tokens", type=int, default=None, help="padded tokens per forward/backward micro-batch (memory only; "
      "gradients accumulate); default: what the free GPU memory holds, 8192 on a CPU")
    a("--grad-ckpt", default="auto", choices=["auto", "always", "never"], help="gradient checkpointing in the trainer "
      "(~30%% slower, far less memory); auto: on in a step whose longest sequence would not fit without it")
    a("--low-memory", action="store_true", help="do not keep merged W + dW weights in the trainer (saves one "
      "copy of the adapted weights, 12.5 GiB at 7B in bf16; training fwd+bwd ~11%% slower on an H100)")
    a("--backend", default="vllm" if importlib.util.find_spec("vllm") else "hf", choices=["vllm", "hf"], help="rollout engine")
    a("--gpu-memory-utilization", type=float, default=0.4, help="vLLM's share of the GPU's memory, its weights and KV "
      "cache (on a CPU: of RAM); the trainer uses the rest")
    a("--max-model-len", type=int, default=None, help="context length (default: the model's own); longer prompts are skipped")
    a("--run-dir", default=None, help="where metrics.jsonl, checkpoints and the adapter go (default: runs/<time>); "
      "must not hold another run")
    a("--save-every", type=int, default=10, help="checkpoint every N steps (0: only at the end)")
    a("--resume", default=None, help="RUN_DIR of an interrupted run: continue it from its last checkpoint")
    a("--eval-every", type=int, default=0, help="greedy pass@1 on --eval-data before training and every N steps (0: off)")
    a("--eval-limit", type=int, default=200, help="rows of --eval-data used by periodic eval")
    a("--wandb", default=None, metavar="PROJECT", help="also log to this Weights & Biases project")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    for action in p._actions:  # parse again without defaults: what was given on the command line
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))
    return args


def fail(msg):
    """Bad input: one line on stderr, exit code 2 (as argparse does)."""
    print(f"train_grpo.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args, world=1):
    """Every check that needs no model, before anything loads."""
    def need(ok, msg):
        if not ok:
            fail(msg)
    need(args.group_size >= 2, f"--group-size {args.group_size}: GRPO needs >= 2 samples per prompt")
    need(args.prompts_per_step >= 1 and args.mini_batch >= 1, "--prompts-per-step and --mini-batch must be >= 1")
    need(args.prompts_per_step % args.mini_batch == 0,
         f"--prompts-per-step {args.prompts_per_step} is not a multiple of --mini-batch {args.mini_batch}")
    need(args.mini_batch % world == 0, f"--mini-batch {args.mini_batch} is not divisible by {world} ranks")
    need(args.u >= 1 and args.r >= 1, f"--u {args.u} and --r {args.r} must be >= 1")
    need(args.n_tie is None or args.n_tie >= 1, f"--n-tie {args.n_tie} must be >= 1")
    need(args.steps is None or args.steps >= 1, f"--steps {args.steps} must be >= 1 (omit it to train all epochs)")
    for k, x in vars(args).items():
        need(not isinstance(x, float) or math.isfinite(x), f"--{k.replace('_', '-')} {x} must be a finite number")
    need(0 <= args.seed < 2**31, f"--seed {args.seed} must be in [0, 2**31)")
    need(not args.wandb or importlib.util.find_spec("wandb"), "--wandb needs the wandb package (pip install wandb)")
    need(not os.path.isfile(args.svd_cache or ""), f"--svd-cache {args.svd_cache} is a file, not a directory")
    need(args.epochs > 0, f"--epochs {args.epochs} must be > 0")
    need(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    need(args.temperature > 0, f"--temperature {args.temperature} must be > 0 (GRPO learns from sampled rollouts)")
    need(args.lr > 0 and args.weight_decay >= 0 and args.grad_clip > 0,
         f"--lr {args.lr} and --grad-clip {args.grad_clip} must be > 0, --weight-decay {args.weight_decay} >= 0")
    need(0 <= args.warmup < 1, f"--warmup {args.warmup} must be in [0, 1)")
    need(0 <= args.clip_low < 1 and args.clip_high >= 0 and args.tis_cap >= 1,
         f"--clip-low {args.clip_low} must be in [0, 1), --clip-high {args.clip_high} >= 0, --tis-cap {args.tis_cap} >= 1")
    need(0 < args.gpu_memory_utilization < 1, f"--gpu-memory-utilization {args.gpu_memory_utilization} must be in (0, 1)")
    need(args.micro_tokens is None or args.micro_tokens >= 1, f"--micro-tokens {args.micro_tokens} must be >= 1")
    need(args.save_every >= 0 and args.eval_every >= 0 and args.eval_limit >= 1,
         "--save-every and --eval-every must be >= 0, --eval-limit >= 1")
    need(args.max_model_len is None or args.max_model_len >= 2, f"--max-model-len {args.max_model_len} must be >= 2")
    for path in (args.data, args.eval_data if args.eval_every else "gsm8k"):
        need(path in task.HUB or os.path.isfile(path), f"cannot read data file {path} (expected gsm8k, math500 or a .jsonl)")


# -----------------------------------------------------------------------------
# the run directory: new or resumed, metrics, atomic checkpoints

RUN_FILES = ("args.json", "metrics.jsonl", "adapter.safetensors", "trainer_state.pt")


def open_run(args):
    """(args, first step): a new run directory, or the recipe and checkpoint of the one --resume names.
    Refuses before any model loads: a new run into another run's directory, a recipe option changed on
    resume, a --steps the checkpoint is already past."""
    if not args.resume:
        args.run_dir = args.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
            fail(f"--run-dir {args.run_dir} is a file, not a directory")
        found = [f for f in RUN_FILES if os.path.exists(os.path.join(args.run_dir, f))]
        if found:
            fail(f"--run-dir {args.run_dir} holds a run ({', '.join(found)}): --resume {args.run_dir} continues it")
        return args, 0
    if not os.path.isfile(os.path.join(args.resume, "args.json")):
        fail(f"--resume {args.resume}: no args.json there, not a run directory")
    if "run_dir" in args.given and os.path.abspath(args.run_dir) != os.path.abspath(args.resume):
        fail(f"--run-dir {args.run_dir} with --resume {args.resume}: a resumed run stays in its own directory")
    try:
        with open(os.path.join(args.resume, "args.json")) as f:
            saved = json.load(f)
    except ValueError as e:
        fail(f"--resume {args.resume}: args.json is not readable JSON ({e})")
    defaults = vars(parse_args([]))
    for k in args.given:
        if k not in MACHINERY + ("resume", "run_dir") and getattr(args, k) != saved.get(k, defaults[k]):
            fail(f"--{k.replace('_', '-')} {getattr(args, k)}: the run was made with {saved.get(k)}; "
                 f"only {', '.join('--' + m.replace('_', '-') for m in MACHINERY)} may change on --resume")
    mine = {k: getattr(args, k) for k in args.given if k in MACHINERY}
    args = argparse.Namespace(**{**defaults, **saved, **mine, "resume": args.resume, "run_dir": args.resume,
                                 "given": args.given})  # options newer than the run: defaults
    for tmp in glob.glob(os.path.join(args.run_dir, "*.tmp")):
        os.remove(tmp)  # left by a write that was killed; the file it was replacing is intact
    state, adapter = (os.path.join(args.run_dir, f) for f in ("trainer_state.pt", "adapter.safetensors"))
    if not os.path.exists(state) and any(s >= 1 for s, _ in logged(os.path.join(args.run_dir, "metrics.jsonl"))):
        fail(f"--resume {args.run_dir}: trainer_state.pt is missing, yet steps are logged: the checkpoint is lost "
             f"(a new run in another --run-dir starts over)")
    try:  # read both now, before any model loads: a damaged checkpoint is named, not a traceback later
        step = torch.load(state, weights_only=True)["step"] if os.path.exists(state) else 0
        if step:
            tinylora.read_v(adapter, tinylora.read_config(adapter))
    except Exception as e:
        fail(f"--resume {args.run_dir}: its checkpoint is damaged ({str(e).splitlines()[0]})")
    if args.steps is not None and args.steps < step:
        fail(f"--steps {args.steps}: the checkpoint in {args.run_dir} is already at step {step}")
    return args, step


def write_args(args):
    os.makedirs(args.run_dir, exist_ok=True)
    with open(os.path.join(args.run_dir, "args.json"), "w") as f:
        json.dump({k: x for k, x in vars(args).items() if k != "given"}, f, indent=2)


def capture(step, v, opt, sched):
    """Everything that changes during training (tiny: v has u numbers per group)."""
    return copy.deepcopy(dict(step=step, v=v.detach(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                              rng=torch.get_rng_state(),
                              cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []))


def restore(state, v, opt, sched):
    with torch.no_grad():
        v.copy_(state["v"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def save_checkpoint(run_dir, model, state):
    """The adapter file plus the trainer state, each written atomically (temp file + rename)."""
    tinylora.save(model, os.path.join(run_dir, "adapter.safetensors"))
    tmp = os.path.join(run_dir, "trainer_state.pt.tmp")
    torch.save(state, tmp)  # tensors and numbers only: torch.load(weights_only=True) reads it
    os.replace(tmp, os.path.join(run_dir, "trainer_state.pt"))


def load_checkpoint(run_dir, model, v, opt, sched):
    tinylora.load(model, os.path.join(run_dir, "adapter.safetensors"), verbose=False)  # checks the base model
    restore(torch.load(os.path.join(run_dir, "trainer_state.pt"), weights_only=True), v, opt, sched)


def logged(path):
    """(step, line) for each line of a metrics.jsonl; a line cut off by a kill is skipped."""
    for line in open(path) if os.path.exists(path) else []:
        try:
            yield json.loads(line)["step"], line if line.endswith("\n") else line + "\n"
        except (ValueError, KeyError):
            pass


def trim_metrics(path, step):
    """Keep the lines of steps up to the checkpoint's: later ones (a crash between checkpoints) rerun."""
    keep = [line for s, line in logged(path) if s <= step]
    with open(path, "w") as f:
        f.writelines(keep)


# -----------------------------------------------------------------------------
# memory: what the GPU holds, how many tokens a micro-batch may have


def activation_bytes(config, nbytes, ckpt):
    """Estimated autograd memory per token of the trainer's forward + backward (Qwen2/Llama decoder).
    A layer keeps ~(7 h + 2 kv + 4 m) values per token (norm inputs and outputs, q/k/v and attention
    output, MLP gate/up/activation/product) plus fp32 copies in its two RMSNorms (8 h bytes): 218 KiB
    at 7B in bf16; two layers' worth of gradients are in flight. With checkpointing each layer keeps
    only its input, and one layer is recomputed at a time."""
    h, m = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    layer = nbytes * (7 * h + 2 * kv + 4 * m) + 8 * h
    return (config.num_hidden_layers * nbytes * h + 3 * layer) if ckpt else (config.num_hidden_layers + 2) * layer


def logits_chunk(vocab):
    """Tokens per chunk of the LM head: ~256 MiB of fp32 logits at a time, never all (T, vocab)."""
    return max(64, 2**26 // vocab)


def meta_model(args):
    """The model built on the meta device from its config alone (no weights), in the dtype it will
    be loaded in: names, shapes, sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(args.model)
    except Exception as e:  # no such directory, or a hub id with no hub
        fail(f"--model {args.model}: cannot read its config ({str(e).splitlines()[0]})")
    dtype = getattr(config, "dtype", None) or torch.float32 if args.dtype == "auto" else args.dtype
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, str(dtype).removeprefix("torch.")))


def check_memory(args, meta, names, longest):
    """Before any weight loads: trainer weights + kept W + dW + vLLM's share + one longest sequence
    (checkpointed) must fit the GPU; otherwise exit with the numbers and what to change."""
    named = dict(meta.named_parameters())
    nbytes = meta.get_input_embeddings().weight.element_size()
    total = torch.cuda.mem_get_info()[1]
    need = {"trainer weights": sum(p.numel() for p in named.values()) * nbytes,
            "kept W + dW": 0 if args.low_memory else sum(named[f"{n}.weight"].numel() for n in names) * nbytes,
            "vLLM (--gpu-memory-utilization)": args.gpu_memory_utilization * total if args.backend == "vllm" else 0,
            f"activations of one {longest}-token sequence": longest * activation_bytes(meta.config, nbytes, True)
            + logits_chunk(meta.config.vocab_size) * meta.config.vocab_size * 10,
            "CUDA context and workspaces": 2 * 2**30}
    if sum(need.values()) > total:
        parts = ", ".join(f"{k} {x / 2**30:.1f}" for k, x in need.items())
        fail(f"this GPU has {total / 2**30:.1f} GiB, the run needs {sum(need.values()) / 2**30:.1f} GiB ({parts}). "
             f"Try --low-memory, a lower --gpu-memory-utilization or --max-new-tokens, or a larger GPU")


def free_for_activations(config):
    """Bytes the trainer may use for activations: 90% of the free device memory once weights and
    engine are in place, minus room for the logits chunks and workspaces."""
    torch.cuda.empty_cache()  # blocks cached by model loading and vLLM's profiling run
    free = torch.cuda.mem_get_info()[0] - logits_chunk(config.vocab_size) * config.vocab_size * 10 - 2**30
    return 0.9 * free


def micro_batch_plan(args, model, longest, budget):
    """(gradient checkpointing on?, padded tokens per micro-batch) for a step whose longest sequence
    has `longest` tokens, given `budget` bytes for activations (None on a CPU)."""
    nbytes = model.get_input_embeddings().weight.element_size()
    per_token = lambda ckpt: activation_bytes(model.config, nbytes, ckpt)
    if args.grad_ckpt == "auto":
        ckpt = budget is not None and longest * per_token(False) > budget
    else:
        ckpt = args.grad_ckpt == "always"
    tokens = args.micro_tokens or (int(budget // per_token(ckpt)) if budget is not None else 8192)
    if ckpt != model.is_gradient_checkpointing:
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    return ckpt, max(tokens, longest)


# -----------------------------------------------------------------------------
# the trainer's side: logprobs of sampled tokens, the GRPO loss


def token_logprobs(model, seqs, n_prompt, temperature):
    """log p of every completion token under `model` at the sampling temperature, flat: sequence 0's
    completion tokens, then sequence 1's, ... seqs: (prompt + completion) id lists; n_prompt: prompt
    lengths. One right-padded forward of the decoder (no KV cache), then the LM head in chunks. No
    attention mask: with causal attention a real token never sees the padding after it, and without
    a mask attention runs its fused (flash) kernel instead of one that stores (L, L) weights."""
    dev = model.get_input_embeddings().weight.device
    lens = torch.tensor([len(s) for s in seqs], device=dev)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True).to(dev)  # (B, L)
    pos = torch.arange(ids.shape[1], device=dev)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # (B, L, H)
    # position t predicts token t+1: completion tokens p..len-1 are predicted by positions p-1..len-2
    pred = (pos >= torch.tensor(n_prompt, device=dev)[:, None] - 1) & (pos < lens[:, None] - 1)  # (B, L)
    h, target = hidden[pred], ids[:, 1:][pred[:, :-1]]  # (N, H), (N,): row-major = sequence by sequence
    head, chunk = model.get_output_embeddings(), logits_chunk(model.config.vocab_size)
    out = []
    for i in range(0, len(target), chunk):
        if torch.is_grad_enabled():  # the (chunk, vocab) logits are recomputed in backward, not kept
            out.append(torch.utils.checkpoint.checkpoint(_logp, head, h[i:i + chunk], target[i:i + chunk],
                                                         temperature, use_reentrant=False))
        else:
            out.append(_logp(head, h[i:i + chunk], target[i:i + chunk], temperature))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


def _logp(head, h, target, temperature):
    logits = head(h).float() / temperature  # (T, vocab) in fp32: bf16 log_softmax would dominate the mismatch
    return logits.gather(-1, target[:, None])[:, 0] - logits.logsumexp(-1)


def grpo_loss(logp, logp_old, logp_vllm, adv, clip_low, clip_high, tis_cap):
    """Per-token clipped surrogate x truncated IS weight. All (T,) tensors; adv a scalar or (T,).
    Returns (loss summed over tokens, number of clipped tokens, number of capped IS weights)."""
    ratio = torch.exp(logp - logp_old)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    tis = torch.exp(logp_old - logp_vllm).clamp(max=tis_cap).detach()
    return -(tis * surrogate).sum(), (surrogate != ratio * adv).sum().item(), (tis >= tis_cap).sum().item()


def advantages(rewards, group_size):
    """(reward - group mean) / (group std + 1e-6); a group with equal rewards gets 0, not NaN."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1).tolist()


def pack(samples, budget):
    """Micro-batches of samples, longest first, each at most `budget` padded tokens (its size times
    its longest sequence): sorting by length leaves little padding."""
    out = []
    for s in sorted(samples, key=lambda s: -len(s["ids"])):
        if out and (len(out[-1]) + 1) * len(out[-1][0]["ids"]) <= budget:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def logprobs_of(model, micro, temperature):
    """token_logprobs of a micro-batch of samples, and the same tensor split per sample."""
    lp = token_logprobs(model, [s["ids"] for s in micro], [s["n_prompt"] for s in micro], temperature)
    return lp, lp.split([len(s["ids"]) - s["n_prompt"] for s in micro])


# -----------------------------------------------------------------------------
# one GRPO step: rollout -> rewards -> advantages -> updates (-> sync, in train)


def rollout(generate, rows, args, seeds):
    """args.group_size samples per row, prompt-major: dicts with ids (prompt + completion), n_prompt,
    logp_vllm (per completion token) and text. Row i's samples use seeds seeds[i] + j (vLLM)."""
    out = generate([r["prompt_ids"] for r in rows], args.group_size, args.temperature, args.max_new_tokens, seed=seeds)
    return [dict(ids=o["prompt_ids"] + s["ids"], n_prompt=len(o["prompt_ids"]), text=s["text"], gold=r["gold"],
                 logp_vllm=torch.tensor(s["logprobs"], dtype=torch.float32))
            for r, o in zip(rows, out) for s in o["samples"]]


def update(args, model, opt, sched, v, samples, world, budget):
    """The step's optimizer updates, one per mini-batch of prompts, on the samples with a non-zero
    advantage; returns metrics. A mini-batch's loss is the token-mean over all its completion tokens
    (all ranks), the zero-advantage ones included: skipping them changes no gradient."""
    n_mb = args.prompts_per_step // args.mini_batch
    per = len(samples) // n_mb  # samples per mini-batch on this rank
    minis = [samples[k * per:(k + 1) * per] for k in range(n_mb)]
    trained = [[s for s in mb if s["adv"] != 0] for mb in minis]
    # no signal at all: still measure the trainer/vLLM mismatch, on one group (no update needs it)
    probe = [] if any(trained) else samples[:args.group_size]
    longest = max((len(s["ids"]) for mb in trained + [probe] for s in mb), default=1)
    ckpt, tokens = micro_batch_plan(args, model, longest, budget)
    packs = [pack(mb, tokens) for mb in trained]
    dev = v.device
    for s in samples:
        s["logp_vllm"] = s["logp_vllm"].to(dev)

    t0 = time.time()
    with torch.no_grad():  # logp_old of later mini-batches: under the rollout-time v, before any update
        for micro in [m for mbp in packs[1:] for m in mbp] + pack(probe, tokens):
            for s, lp in zip(micro, logprobs_of(model, micro, args.temperature)[1]):
                s["logp_old"] = lp
    t_old = time.time() - t0

    m = dict(clipped=0, capped=0, tokens_can_clip=0, grad_norm=0.0, skipped=0)
    for k in range(n_mb):
        tokens_k = torch.tensor(float(sum(len(s["logp_vllm"]) for s in minis[k])), device=dev)
        if world > 1:
            dist.all_reduce(tokens_k)  # the token-mean is over the whole mini-batch, all ranks
        for micro in packs[k]:
            lp, per_sample = logprobs_of(model, micro, args.temperature)
            if k == 0:  # v is still the rollout-time v: these are logp_old
                for s, x in zip(micro, per_sample):
                    s["logp_old"] = x.detach()
            cat = lambda key: torch.cat([s[key] for s in micro])
            adv = torch.cat([torch.full_like(s["logp_vllm"], s["adv"]) for s in micro])
            loss, clipped, capped = grpo_loss(lp, cat("logp_old"), cat("logp_vllm"), adv,
                                              args.clip_low, args.clip_high, args.tis_cap)
            (loss / tokens_k).backward()
            m["capped"] += capped
            if k > 0:  # the first update's ratio is exactly 1: it cannot clip
                m["clipped"], m["tokens_can_clip"] = m["clipped"] + clipped, m["tokens_can_clip"] + len(lp)
        if v.grad is None:  # no signal on this rank: AdamW still steps (momentum, decay), as with a zero loss
            v.grad = torch.zeros_like(v)
        if world > 1:
            dist.all_reduce(v.grad)  # u numbers per group: the whole communication of data parallelism
        if not torch.isfinite(v.grad).all():  # the same on every rank after the all-reduce
            print("warning: non-finite gradient; update skipped, v unchanged")
            m["skipped"] += 1
        else:
            m["grad_norm"] += torch.nn.utils.clip_grad_norm_(v, args.grad_clip).item() / n_mb
            m["lr"] = opt.param_groups[0]["lr"]  # the lr this update used
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    seen = [s for mb in trained + [probe] for s in mb]
    n_tok = sum(len(s["logp_vllm"]) for s in seen)
    diff = torch.cat([s["logp_old"] - s["logp_vllm"] for s in seen]) if seen else torch.zeros(0)
    return dict(mismatch=diff.abs().sum().item() / max(n_tok, 1), is_max=diff.exp().max().item() if n_tok else 1.0,
                is_capped=m["capped"] / max(n_tok, 1), clip_frac=m["clipped"] / max(m["tokens_can_clip"], 1),
                grad_norm=m["grad_norm"], skipped=m["skipped"], lr=m.get("lr", opt.param_groups[0]["lr"]),
                signal=sum(len(mb) for mb in trained) / len(samples), trained_tokens=n_tok if not probe else 0,
                micro_batches=sum(len(p) for p in packs), grad_ckpt=int(ckpt), t_logp_old=t_old,
                t_update=time.time() - t0 - t_old)


def update_within_memory(args, model, opt, sched, v, samples, world, budget, state):
    """update(); if the GPU runs out of memory, the step's updates start again from `state` with half
    the activation budget (at most 3 times; not with a fixed --micro-tokens). Returns (metrics, the
    budget that fitted: later steps keep it)."""
    for attempt in range(4):
        try:
            return update(args, model, opt, sched, v, samples, world, budget), budget
        except torch.OutOfMemoryError:
            if attempt == 3 or budget is None or args.micro_tokens:
                raise
            restore(state, v, opt, sched)
            v.grad, budget = None, budget / 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"warning: the trainer ran out of GPU memory; retrying the updates with micro-batches "
                  f"for {budget / 2**30:.1f} GiB of activations")


# -----------------------------------------------------------------------------
# setup and the loop


def load_data(args, tok, data, split, need, limit=None):
    """(rows with their prompt ids, rows skipped, task) of a data set; rows whose prompt leaves no room
    to answer within the context are skipped (and counted). Fails unless `need` rows are left."""
    flag = "--data" if split == "train" else "--eval-data"
    try:
        rows, skipped, kind = task.load_rows(data, split=split, limit=limit)
    except Exception as e:  # unreadable file, not JSON lines, a hub id without a hub
        fail(f"{flag} {data}: {str(e).splitlines()[0]}")
    prompts = [task.build_prompt(tok, r["question"], kind) for r in rows]
    rows, prompts, long = task.drop_long_prompts(rows, prompts, args.max_model_len)
    if len(rows) < need:
        fail(f"{flag} {data}: {len(rows)} usable rows ({skipped} without a question and answer, {long} with a prompt "
             f"longer than the context {args.max_model_len}), fewer than the {need} needed")
    for r, p in zip(rows, prompts):
        r["prompt_ids"] = p
    return rows, skipped + long, kind


def load_policy(args, rank):
    """(frozen model with TinyLoRA applied, v)."""
    from transformers import AutoModelForCausalLM
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, device_map=device)
    v = tinylora.apply(model, args.u, args.r, args.n_tie, args.tie, args.targets.split(","), args.seed,
                       args.v_dtype, args.svd_cache or None, verbose=rank == 0, keep_merged=not args.low_memory,
                       rounding=args.rounding)
    for _ in tinylora.merged_weights(model):  # make the kept W + dW now, before the engine sizes its memory
        pass
    return model.train(), v  # train mode: gradient checkpointing acts (Qwen2 has no dropout)


def train(args, reward_fn=None, llm=None):
    """Run GRPO; returns (model, path of the final adapter). reward_fn(text, gold) replaces the task's
    reward (tests, benchmarks); `llm` may be an existing vLLM engine."""
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1  # (vLLM may initialise torch.distributed for itself)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    args, start = open_run(args)
    check_args(args, world)
    meta = meta_model(args)
    try:
        names, _ = tinylora.plan(dict(meta.named_modules()), args.u, args.r, args.n_tie, args.tie,
                                 args.targets.split(","), args.v_dtype, args.rounding)
    except ValueError as e:
        fail(f"{e} (--u, --r, --n-tie, --tie, --targets for {args.model})")
    try:
        args.max_model_len = task.context_length(meta.config, args.max_model_len)
    except ValueError as e:
        fail(str(e))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)  # the data is read and checked before any weight loads
    rows, skipped, kind = load_data(args, tok, args.data, "train", args.prompts_per_step)
    if args.eval_every:
        eval_rows, _, eval_kind = load_data(args, tok, args.eval_data, "test", 1, args.eval_limit)
    steps_per_epoch = len(rows) // args.prompts_per_step
    full = int(args.epochs * steps_per_epoch)  # the lr schedule's length, whatever --steps says
    if full < 1:
        fail(f"--epochs {args.epochs} of {steps_per_epoch} steps each is less than one step")
    total = min(full, args.steps or full)
    if torch.cuda.is_available():
        check_memory(args, meta, names, min(args.max_model_len, 512 + args.max_new_tokens))
    if rank == 0 and not args.resume:
        write_args(args)

    model, v = load_policy(args, rank)
    reward_fn = reward_fn or (lambda text, gold: task.reward(kind, text, gold))
    updates_per_step = args.prompts_per_step // args.mini_batch
    warmup = max(1, round(args.warmup * full * updates_per_step))
    opt = torch.optim.AdamW([v], lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    torch.manual_seed(args.seed * 1000 + rank)  # the HF backend samples with torch's RNG: each rank its own
    if start:
        load_checkpoint(args.run_dir, model, v, opt, sched)

    if args.backend == "vllm" and llm is None:  # the engine gets the base weights' dtype (never v's fp32)
        try:
            llm = task.make_llm(args.model, str(model.dtype).removeprefix("torch."), args.seed + rank,
                                args.gpu_memory_utilization, args.max_model_len)
        except (ValueError, RuntimeError) as e:  # e.g. no memory left for its KV cache
            fail(f"vLLM could not start: {str(e).strip().splitlines()[-1]} (--gpu-memory-utilization "
                 f"{args.gpu_memory_utilization}, --max-model-len {args.max_model_len})")
    budget = free_for_activations(model.config) if torch.cuda.is_available() else None
    sync = lambda: task.sync_weights(llm, tinylora.merged_weights(model)) if llm is not None else 0

    def generate(prompts, n, temperature, max_new_tokens, seed=None):
        if llm is not None:
            return task.generate_vllm(llm, prompts, n, temperature, max_new_tokens, seed=seed)
        model.eval()  # with the KV cache: Hugging Face turns it off under gradient checkpointing in training
        try:  # seeded by torch's RNG; completions stop at the context length, as in vLLM
            return task.generate_hf(model, tok, prompts, n, temperature, max_new_tokens, args.max_model_len)
        finally:
            model.train()

    def evaluate():
        res = task.evaluate(lambda p: generate(p, 1, 0.0, args.max_new_tokens), tok, eval_rows, eval_kind,
                            args.max_new_tokens)
        return dict(eval_strict=res["strict"], eval_flexible=res["flexible"])

    metrics_path = os.path.join(args.run_dir, "metrics.jsonl")
    wandb = None
    if start:
        sync()  # every rank's engine starts from the base weights; bring it to the resumed v
    if rank == 0:
        if args.wandb:
            import wandb
            wandb.init(project=args.wandb, config=vars(args), resume="allow")
        if args.resume:
            trim_metrics(metrics_path, start)
        else:
            save_checkpoint(args.run_dir, model, capture(0, v, opt, sched))  # --resume works from here on
            if args.eval_every:
                log(metrics_path, dict(step=0, **evaluate()), wandb)
        print(f"data: {len(rows)} {kind} rows ({skipped} skipped), {steps_per_epoch} steps per epoch, "
              f"steps {start} -> {total}, run dir {args.run_dir}")
    bar = tqdm(range(start, total), initial=start, total=total, desc="grpo", disable=rank != 0)
    m, first, state = {}, None, capture(start, v, opt, sched)
    try:
        for step in bar:
            state = capture(step, v, opt, sched)  # an interrupted step is rolled back to here
            t0 = time.time()
            mine = prompts_for(rows, step, steps_per_epoch, args, rank, world)
            seeds = rollout_seeds(args.seed, step, rank, world, len(mine), args.group_size)
            samples = rollout(generate, mine, args, seeds)
            t_gen = time.time() - t0
            rewards = [reward_fn(s["text"], s["gold"]) for s in samples]
            for s, a in zip(samples, advantages(rewards, args.group_size)):
                s["adv"] = a
            m, budget = update_within_memory(args, model, opt, sched, v, samples, world, budget, state)
            t1 = time.time()
            sync()
            m.update(step=step + 1, epoch=step / steps_per_epoch, reward=sum(rewards) / len(rewards),
                     accuracy=sum(x == 1.0 for x in rewards) / len(rewards), v_norm=v.norm().item(),
                     dw_kept=tinylora.dw_kept(model), tokens=sum(len(s["logp_vllm"]) for s in samples),
                     t_generate=t_gen, t_sync=time.time() - t1, t_step=time.time() - t0,
                     peak_gib=torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0)
            m = all_mean(m, world, v.device, v)
            if v.numel() <= 64:  # the few trained numbers themselves, step by step
                m["v"] = v.detach().flatten().tolist()
            if rank == 0 and args.eval_every and (step + 1) % args.eval_every == 0:
                m.update(evaluate())
            if rank == 0:
                log(metrics_path, m, wandb)
                if args.save_every and (step + 1) % args.save_every == 0:
                    save_checkpoint(args.run_dir, model, capture(step + 1, v, opt, sched))
            first = first or m
            bar.set_postfix(reward=f"{m['reward']:.3f}", mismatch=f"{m['mismatch']:.1e}", v=f"{m['v_norm']:.2e}")
        state = capture(total, v, opt, sched)
    except BaseException as e:  # Ctrl-C or a crash: keep every step that finished, drop the cut one
        print(f"\n{type(e).__name__} in step {state['step'] + 1}: saving the state after step {state['step']} "
              f"to {args.run_dir} (--resume {args.run_dir} continues from there)")
        restore(state, v, opt, sched)
        if rank == 0:
            save_checkpoint(args.run_dir, model, state)
        raise
    if rank == 0:
        save_checkpoint(args.run_dir, model, state)
        summary(args, state["step"], first, m, v)
    return model, os.path.join(args.run_dir, "adapter.safetensors")


def prompts_for(rows, step, steps_per_epoch, args, rank, world):
    """This step's rows: a seeded permutation per epoch, then a slice; rank r takes every world-th."""
    epoch, offset = divmod(step, steps_per_epoch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    batch = order[offset * args.prompts_per_step:(offset + 1) * args.prompts_per_step]
    return [rows[i] for i in batch][rank::world]


def rollout_seeds(seed, step, rank, world, n, group_size):
    """vLLM seeds of a rank's n prompts in a step: sample j of the step's prompt p (p = i * world + rank
    for the rank's prompt i, as prompts_for deals them) gets (seed * 10**6 + step) * 10**6 + p * group_size
    + j. No two samples of a run share a noise stream, a resumed run samples exactly what it would have,
    and N ranks draw the very streams one process would."""
    return [(seed * 10**6 + step) * 10**6 + (i * world + rank) * group_size for i in range(n)]


def log(path, m, wandb=None):
    with open(path, "a") as f:
        f.write(json.dumps(m) + "\n")
    if wandb:
        wandb.log({k: x for k, x in m.items() if k != "v"}, step=m["step"])


def summary(args, steps, first, last, v):
    """The one line a run ends with."""
    f = lambda m, k, fmt: format(m[k], fmt) if m and m.get(k) is not None else "-"
    print(f"done: {steps} steps, reward {f(first, 'reward', '.3f')} -> {f(last, 'reward', '.3f')}, "
          f"mismatch {f(last, 'mismatch', '.2e')}, dw_kept {f(last, 'dw_kept', '.2f')}, |v| {v.norm().item():.3e}, "
          f"{v.numel()} params ({v.numel() * tinylora.V_DTYPES[args.v_dtype].itemsize} bytes), "
          f"s/step {f(last, 't_step', '.1f')}, adapter {args.run_dir}/adapter.safetensors")


def all_mean(m, world, device, v):
    """Combine the step's metrics over ranks (mean; max for is_max; sum for tokens), and check that
    every rank holds exactly the same v (a max and a min over u numbers)."""
    if world == 1:
        return m
    keys = sorted(k for k in m if k not in ("step", "epoch") and m[k] is not None)
    x = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=device)
    mx = x.clone()
    dist.all_reduce(x)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    sums = ("tokens", "trained_tokens", "micro_batches")
    out = {k: mx[i].item() if k in ("is_max", "peak_gib") else x[i].item() / (1 if k in sums else world)
           for i, k in enumerate(keys)}
    out.update(step=m["step"], epoch=m["epoch"])
    hi, lo = v.detach().clone(), -v.detach()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    if not (torch.equal(hi, v) and torch.equal(-lo, v)):  # ranks diverged: fail loudly, not silently
        raise RuntimeError(f"rank {dist.get_rank()}: ranks hold different v after step {m['step']}")
    return out


def start_distributed():
    """Started by torchrun: join its process group (NCCL, one GPU per process; gloo on CPUs), True."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler's preemption): the finished steps are saved, as on Ctrl-C


if __name__ == "__main__":
    args = parse_args()
    ddp = start_distributed()
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    try:
        train(args)
    except KeyboardInterrupt:
        raise SystemExit(130)  # interrupted, state saved: a non-zero exit stops a shell script that chains runs
    if ddp and args.backend == "hf":  # with vLLM, its engine tears the process groups down at exit
        dist.destroy_process_group()
