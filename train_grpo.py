"""GRPO with TinyLoRA: a frozen LLM, u trainable numbers, rollouts from vLLM.

One step of the paper authors' GSM8K recipe (their verl scripts), in the order of this file:
  1. prompts: 64 rows of the training set (a seeded permutation per epoch)
  2. rollout: 4 samples per prompt from the in-process vLLM engine at temperature 1, with the
     sampler's logprob of each sampled token (logp_vllm)
  3. rewards: task.reward, 1 for the right answer, else 0 (GSM8K: the paper's rule, the number
     after "####" near the end; MATH: the last \\boxed{}, judged by math-verify)
  4. advantages: (reward - group mean) / (group std + 1e-6) within each prompt's 4 samples; a
     group whose rewards are all equal has none, and never runs through the trainer
  5. token logprobs of the samples under the trainer (logp), in micro-batches
  6. loss, the token-mean over a mini-batch of
        -min(ratio * A, clip(ratio, 1 - 0.2, 1 + 0.4) * A) * min(exp(logp_old - logp_vllm), 2)
     ratio = exp(logp - logp_old), logp_old the trainer's logprobs under the rollout-time v; the
     last factor (truncated importance sampling) corrects for vLLM sampling from a slightly
     different model (its kernels; with --low-memory also the bf16 rounding of W + dW)
  7. update: 2 AdamW updates of v per step, one per mini-batch of 32 prompts
  8. sync: W + dW of the adapted modules into vLLM, before the next rollout
Left out on purpose: KL term, entropy bonus, reference model, more than one epoch per batch.
machinery/ holds what a reader of the algorithm may skip: argument checks, the run directory
(lock, checkpoints, resume, metrics), memory planning and micro-batch packing, data parallel
helpers, signals. Ctrl-C, SIGTERM or SIGHUP keep every finished step and exit 130.

    python train_grpo.py --u 13 --model Qwen/Qwen2.5-7B-Instruct
    torchrun --nproc_per_node 8 train_grpo.py --u 13 ...   # data parallel: an engine per rank
    python tests/tiny.py --taught tiny && python train_grpo.py --model tiny/model \\
        --data tiny/train.jsonl --eval-data tiny/test.jsonl --eval-every 6 --n-tie 1 --lr 3e-3 \\
        --max-new-tokens 8 --gpu-memory-utilization 0.1   # CPU smoke run (README), ~45 s
"""
import argparse
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import Tensor
from transformers import AutoModelForCausalLM

import engine  # rollouts: vLLM in this process (weight sync), or Hugging Face generate
import machinery.memory  # what a reader may skip: machinery/ (checks, run folder, memory plan, signals)
import machinery.options
import machinery.run
import machinery.script
import machinery.update
import task  # data, prompt, reward
import tinylora

# -----------------------------------------------------------------------------
# the recipe: every option, its default the paper's


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen2.5-7B-Instruct", help="hub id or local path of the base model")
    a("--data", default="gsm8k", help="'gsm8k' (hub openai/gsm8k train), 'math500', or a local "
      ".jsonl with question/answer (GSM8K) or problem/answer (MATH) rows; the reward follows it")
    a("--eval-data", default="gsm8k",
      help="held-out set of --eval-every: 'gsm8k' (its test split), 'math500', or a .jsonl")
    tinylora_options(a)
    # GRPO
    a("--prompts-per-step", type=int, default=64, help="prompts per GRPO step")
    a("--group-size", type=int, default=4, help="samples per prompt (a group)")
    a("--mini-batch", type=int, default=32,
      help="prompts per optimizer update (updates per step = prompts-per-step / this)")
    a("--epochs", type=float, default=3, help="passes over the training set")
    a("--steps", type=int, default=None,
      help="stop after this many steps (default: all epochs; the lr schedule is the full run's)")
    a("--max-new-tokens", type=int, default=4096, help="rollout length cap")
    a("--temperature", type=float, default=1.0, help="sampling temperature (the trainer's too)")
    a("--clip-low", type=float, default=0.2, help="ratio clip below: 1 - clip_low")
    a("--clip-high", type=float, default=0.4, help="ratio clip above: 1 + clip_high")
    a("--tis-cap", type=float, default=2.0, help="cap of the weight exp(logp_old - logp_vllm)")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate of v (P has the scale of the "
      "paper authors' code, so their learning rates mean the same here; they swept 1e-7..2e-4)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm")
    a("--warmup", type=float, default=0.05,
      help="fraction of the run's updates with a linear lr warmup, then constant")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
      help="dtype of the base model (trainer and vLLM): auto is the checkpoint's")
    a("--seed", type=int, default=0, help="seeds data order, P, and sampling; in [0, 10**6)")
    # how to run (machinery.options.MACHINERY: these may change on --resume)
    a("--micro-tokens", type=int, default=None, help="padded tokens per forward/backward "
      "micro-batch (memory only; gradients accumulate); default: what free GPU memory holds, "
      "8192 on a CPU")
    a("--grad-ckpt", default="auto", choices=["auto", "always", "never"], help="gradient "
      "checkpointing (~30%% slower, far less memory); auto: on in a step whose longest sequence "
      "needs it")
    a("--low-memory", action="store_true", help="do not keep merged W + dW in the trainer (saves "
      "one copy of the adapted weights, 12.5 GiB at 7B in bf16; fwd+bwd ~11%% slower on an H100)")
    a("--backend", default="vllm" if importlib.util.find_spec("vllm") else "hf",
      choices=["vllm", "hf"], help="rollout engine")
    a("--gpu-memory-utilization", type=float, default=0.4, help="vLLM's share of the GPU's memory, "
      "its weights and KV cache (on a CPU: of RAM); the trainer uses the rest")
    a("--max-model-len", type=int, default=None,
      help="context length (default: the model's own); longer prompts are skipped")
    a("--run-dir", default=None, help="where metrics.jsonl, checkpoints and the adapter go "
      "(default: runs/<time>); must not hold another run")
    a("--save-every", type=int, default=10, help="checkpoint every N steps (0: only at the end)")
    a("--resume", default=None, help="RUN_DIR of a run to continue")
    a("--eval-every", type=int, default=0,
      help="greedy pass@1 on --eval-data before training and every N steps (0: off)")
    a("--eval-limit", type=int, default=200, help="rows of --eval-data used by periodic eval")
    a("--wandb", default=None, metavar="PROJECT", help="also log to this Weights & Biases project")
    return p


def tinylora_options(a: Callable) -> None:
    """The TinyLoRA options (train_sft.py takes the same)."""
    a("--u", type=int, default=13, help="trainable numbers per tie group (size of v)")
    a("--r", type=int, default=2, help="rank of the frozen truncated SVD of each adapted weight")
    a("--n-tie", type=int, default=None, help="modules sharing one v (default: all, so params = u)")
    a("--tie", default="tiled", choices=tinylora.TIE_MODES, help="how modules form tie groups")
    a("--targets", default=",".join(tinylora.TARGETS), help="comma-separated linears to adapt")
    a("--v-dtype", default="fp32", choices=list(tinylora.V_DTYPES),
      help="storage dtype of v (the forward sees v rounded to it)")
    a("--rounding", default="nearest", choices=tinylora.ROUNDINGS, help="how W + dW is rounded to "
      "a bf16 base (trainer and vLLM alike): 'nearest' erases entries of dW under half a bf16 "
      "step; 'stochastic' keeps them on average (unbiased)")
    a("--svd-cache", default=tinylora.CACHE_DIR, help="cached SVD factors ('' disables)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, plus what was given on the command line (`given`) and the defaults."""
    return machinery.options.parse(build_parser(), argv)


# -----------------------------------------------------------------------------
# one GRPO step, in call order


@dataclass
class Sample:
    """One completion of a prompt; group_size of them per prompt, prompt-major. rollout() makes it,
    the loop sets adv, update() sets logp_old. (train_sft.py's are reference answers: ids, n_prompt.)"""
    ids: list[int]  # prompt + completion token ids
    n_prompt: int  # how many of ids are the prompt's
    text: str = ""  # the completion, decoded: what the reward reads
    gold: str = ""  # the row's answer
    logp_vllm: Tensor | None = None  # (T,) the sampler's log p of each of the T completion tokens
    adv: float = 0.0  # (reward - group mean) / (group std + 1e-6)
    logp_old: Tensor | None = None  # (T,) the trainer's log p under the rollout-time v


def prompts_for(rows: list[dict], step: int, steps_per_epoch: int, args, rank: int = 0,
                world: int = 1) -> list[dict]:
    """This step's rows: a slice of a seeded permutation per epoch; rank r takes every world-th."""
    epoch, offset = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    order = torch.randperm(len(rows), generator=g)
    batch = order[offset * args.prompts_per_step:(offset + 1) * args.prompts_per_step]
    return [rows[i] for i in batch][rank::world]


def rollout_seeds(seed: int, step: int, rank: int, world: int, n: int, group_size: int) -> list[int]:
    """vLLM seeds of a rank's n prompts in a step: sample j of the step's prompt p (p = i * world +
    rank for the rank's prompt i, as prompts_for deals them) gets (seed * 10**6 + step) * 10**6 +
    p * group_size + j. No two samples of a run share a noise stream, a resumed run samples exactly
    what it would have, and N ranks draw the very streams one process would."""
    return [(seed * 10**6 + step) * 10**6 + (i * world + rank) * group_size for i in range(n)]


def rollout(generate, rows: list[dict], args, seeds: list[int]) -> list[Sample]:
    """args.group_size samples per row, prompt-major, with the sampler's logprobs. Row i's samples
    are drawn with seeds[i] + j."""
    out = generate([r["prompt_ids"] for r in rows], args.group_size, args.temperature,
                   args.max_new_tokens, seed=seeds)
    return [Sample(ids=o["prompt_ids"] + s["ids"], n_prompt=len(o["prompt_ids"]), text=s["text"],
                   gold=r["gold"], logp_vllm=torch.tensor(s["logprobs"], dtype=torch.float32))
            for r, o in zip(rows, out) for s in o["samples"]]


def advantages(rewards: list[float], group_size: int) -> list[float]:
    """(reward - group mean) / (group std + 1e-6); a group with equal rewards gets 0, not NaN."""
    r = torch.tensor(rewards, dtype=torch.float64).view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1).tolist()


def token_logprobs(model, seqs: list[list[int]], n_prompt: list[int], temperature: float) -> Tensor:
    """log p of every completion token under `model` at the sampling temperature, flat: sequence 0's
    completion tokens, then sequence 1's, ... seqs: (prompt + completion) id lists; n_prompt: prompt
    lengths. One right-padded forward of the decoder (no KV cache), then the LM head in chunks. No
    attention mask: with causal attention a real token never sees the padding after it, and without
    a mask attention runs its fused (flash) kernel instead of one that stores (L, L) weights."""
    dev = model.get_input_embeddings().weight.device
    lens = torch.tensor([len(s) for s in seqs], device=dev)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in seqs], batch_first=True).to(dev)
    pos = torch.arange(ids.shape[1], device=dev)
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # (B, L, H)
    # position t predicts token t+1: completion tokens p..len-1 come from positions p-1..len-2
    start = torch.tensor(n_prompt, device=dev)[:, None] - 1
    pred = (pos >= start) & (pos < lens[:, None] - 1)  # (B, L)
    h, target = hidden[pred], ids[:, 1:][pred[:, :-1]]  # (N, H), (N,): sequence by sequence
    head, chunk = model.get_output_embeddings(), machinery.memory.logits_chunk(model.config.vocab_size)
    out = []
    for i in range(0, len(target), chunk):
        part = (head, h[i:i + chunk], target[i:i + chunk], temperature)
        if torch.is_grad_enabled():  # the (chunk, vocab) logits are made again in backward
            out.append(torch.utils.checkpoint.checkpoint(_logp, *part, use_reentrant=False))
        else:
            out.append(_logp(*part))
    return torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)


def _logp(head: torch.nn.Module, h: Tensor, target: Tensor, temperature: float) -> Tensor:
    logits = head(h).float() / temperature  # (T, vocab), fp32: bf16 would dominate the mismatch
    return logits.gather(-1, target[:, None])[:, 0] - logits.logsumexp(-1)


def grpo_loss(logp: Tensor, logp_old: Tensor, logp_vllm: Tensor, adv: float | Tensor, clip_low: float,
              clip_high: float, tis_cap: float) -> tuple[Tensor, int, int]:
    """Per-token clipped surrogate x truncated IS weight. All (T,) tensors; adv a scalar or (T,).
    Returns (loss summed over tokens, number of clipped tokens, number of capped IS weights)."""
    ratio = torch.exp(logp - logp_old)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    tis = torch.exp(logp_old - logp_vllm).clamp(max=tis_cap).detach()
    n_clipped, n_capped = (surrogate != ratio * adv).sum().item(), (tis >= tis_cap).sum().item()
    return -(tis * surrogate).sum(), n_clipped, n_capped


def update(args, model, opt, sched, v: Tensor, samples: list[Sample], world: int,
           act_bytes: float | None) -> dict:
    """The step's optimizer updates, one per mini-batch of prompts, on the samples with a non-zero
    advantage; returns the step's trainer metrics. A mini-batch's loss is the token-mean over all
    its completion tokens (all ranks), the zero-advantage ones included: skipping them changes no
    gradient. act_bytes: memory for activations (None on a CPU), which sizes the micro-batches."""
    n_mb = args.prompts_per_step // args.mini_batch
    per = len(samples) // n_mb  # samples per mini-batch on this rank
    minis = [samples[k * per:(k + 1) * per] for k in range(n_mb)]  # one optimizer update each
    trained = [[s for s in mb if s.adv != 0] for mb in minis]  # a zero advantage: a zero gradient
    # no signal anywhere: one group still runs (no update) so that the trainer/vLLM mismatch is logged
    probe = [] if any(trained) else samples[:args.group_size]
    plan = machinery.update.Plan(args, model, samples, trained, probe, act_bytes, v.device)  # packing
    # logp_old: the trainer's logprobs under the rollout-time v. Mini-batch 0's come free from its
    # own gradient pass below (v has not moved yet); the later ones need a no-grad pass now.
    t0 = time.time()
    with torch.no_grad():
        for micro in plan.before_update():
            for s, lp in zip(micro, per_sample(model, micro, args.temperature)[1]):
                s.logp_old = lp
    t_logp_old = time.time() - t0

    counts = machinery.update.Counts()
    for k, micros in enumerate(plan.packs):
        # the token-mean's divisor: every completion token of the mini-batch, zero-advantage ones
        # included, over all ranks; the same for every micro-batch, so the sum is the mini-batch mean
        n_tokens = torch.tensor(float(sum(len(s.logp_vllm) for s in minis[k])), device=v.device)
        if world > 1:
            dist.all_reduce(n_tokens)
        for micro in micros:
            logp, logp_each = per_sample(model, micro, args.temperature)
            if k == 0:
                for s, x in zip(micro, logp_each):
                    s.logp_old = x.detach()
            logp_old = torch.cat([s.logp_old for s in micro])
            logp_vllm = torch.cat([s.logp_vllm for s in micro])
            adv = torch.cat([torch.full_like(s.logp_vllm, s.adv) for s in micro])
            loss, clipped, capped = grpo_loss(logp, logp_old, logp_vllm, adv,
                                              args.clip_low, args.clip_high, args.tis_cap)
            (loss / n_tokens).backward()
            counts.micro(k, clipped, capped, len(logp))  # the first update's ratio is 1: no clip
        if v.grad is None:  # no signal on this rank: AdamW still steps (momentum, decay)
            v.grad = torch.zeros_like(v)
        if world > 1:
            dist.all_reduce(v.grad)  # u numbers per group: all of data parallelism's communication
        if torch.isfinite(v.grad).all():  # the same verdict on every rank after the all-reduce
            counts.update(torch.nn.utils.clip_grad_norm_(v, args.grad_clip), opt, len(plan.packs))
            opt.step()
        else:  # a NaN / inf gradient would make v non-finite for good: this update is skipped
            print("warning: non-finite gradient; update skipped, v unchanged")
            counts.skipped += 1
        sched.step()
        opt.zero_grad(set_to_none=True)
    return plan.metrics(counts, opt, t_logp_old, time.time() - t0 - t_logp_old)


def per_sample(model, micro: list[Sample], temperature: float) -> tuple[Tensor, tuple[Tensor, ...]]:
    """token_logprobs of a micro-batch of samples, and the same tensor split per sample."""
    lp = token_logprobs(model, [s.ids for s in micro], [s.n_prompt for s in micro], temperature)
    return lp, lp.split([len(s.ids) - s.n_prompt for s in micro])


def sync(llm, model) -> None:
    """W + dW of the adapted modules into the engine (keep_merged: the trainer's very tensors)."""
    if llm is not None:
        engine.sync_weights(llm, tinylora.merged_weights(model))


# -----------------------------------------------------------------------------
# the run: setup, then the loop


def policy(args, run):
    """The frozen model with TinyLoRA on its linears; v (tie groups, u) is all that trains, by AdamW
    with a linear warmup, then a constant lr. Returns (model, v, optimizer, scheduler)."""
    with run.refusing(f"--model {args.model}: cannot load its weights"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype,
                                                     device_map=run.device)
    with run.refusing(f"--model {args.model}", errors=ValueError):  # e.g. NaN weights
        v = tinylora.apply(model, args.u, args.r, args.n_tie, args.tie, args.targets.split(","),
                           args.seed, args.v_dtype, args.svd_cache or None, verbose=run.rank == 0,
                           keep_merged=not args.low_memory, rounding=args.rounding)
    model.train()  # gradient checkpointing acts in train mode (Qwen2 has no dropout)
    opt = torch.optim.AdamW([v], lr=args.lr, weight_decay=args.weight_decay)
    warmup = lambda i: min(1.0, (i + 1) / run.warmup_updates)  # linear warmup, then constant
    return model, v, opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup)


def train(args, reward_fn: Callable[[str, str], float] | None = None,
          llm=None) -> tuple[torch.nn.Module | None, str]:
    """Run GRPO; returns (model, path of the final adapter). reward_fn(text, gold) replaces the
    task's reward (tests, benchmarks); `llm` may be an existing vLLM engine."""
    run = machinery.run.Run(args)  # checks, run dir (locked), data, memory plan; no weights loaded
    args = run.args
    if run.done:  # a finished run resumed: nothing to load
        return None, run.adapter
    model, v, opt, sched = policy(args, run)
    if llm is None and args.backend == "vllm":  # in the base dtype, never v's fp32
        for _ in tinylora.merged_weights(model):  # the kept W + dW made now: the engine sizes
            pass  # itself to the memory left after them
        with run.refusing("vLLM could not start", machinery.run.engine_hint(args)):
            llm = engine.make_llm(args.model, str(model.dtype).removeprefix("torch."),
                                  args.seed + run.rank, args.gpu_memory_utilization,
                                  args.max_model_len)
    generate = engine.make_generate(llm, model, run.tokenizer, args.max_model_len)
    reward_fn = reward_fn or (lambda text, gold: task.reward(run.task_name, text, gold))
    with run.checkpointed(model, v, opt, sched, lambda: sync(llm, model), generate):
        for step in run.steps():  # resumes; saves every finished step on Ctrl-C, SIGTERM, crashes
            t0 = time.time()
            rows = prompts_for(run.rows, step, run.steps_per_epoch, args, run.rank, run.world)
            seeds = rollout_seeds(args.seed, step, run.rank, run.world, len(rows), args.group_size)
            samples = rollout(generate, rows, args, seeds)
            t_generate = time.time() - t0
            rewards = [reward_fn(s.text, s.gold) for s in samples]
            for s, a in zip(samples, advantages(rewards, args.group_size)):
                s.adv = a
            stats = run.within_memory(update, samples)  # out of memory: again, smaller batches
            t1 = time.time()
            sync(llm, model)
            stats.update(t_generate=t_generate, t_sync=time.time() - t1, t_step=time.time() - t0)
            run.log_step(step, stats, rewards, samples)  # metrics line; checkpoint at --save-every
    return model, run.adapter


if __name__ == "__main__":
    machinery.script.main(train, parse_args)
