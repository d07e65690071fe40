"""GRPO on GSM8K with TinyLoRA: a frozen LLM, u trainable numbers, rollouts from vLLM.

Each step (the paper's GSM8K recipe, DESIGN.md "GRPO"):
  1. rollout: 64 prompts x n=4 samples from the in-process vLLM engine (temperature 1.0),
     keeping each sampled token's logprob under the sampler (logp_vllm)
  2. reward: 1 if the last "#### <number>" equals the gold answer (eval.gsm8k_reward)
  3. advantages: (reward - group mean) / (group std + 1e-6) per prompt's group of n
  4. 2 optimizer updates (mini-batches of 32 prompts), each minimising the token-mean of
        -min(ratio * A, clip(ratio, 1 - 0.2, 1 + 0.4) * A) * min(exp(logp_old - logp_vllm), 2)
     with ratio = exp(logp - logp_old); the last factor is truncated importance sampling,
     which corrects for vLLM sampling from a slightly different model than the trainer's
     (other kernels; with --low-memory also the bf16 rounding of W + dW, which the trainer
     then does not see). AdamW on v only, grad clip 1.0, warmup 5%.
  5. sync: the merged weights W + dW of the adapted modules (fp32 from the pristine base,
     never merged in place; by default the very tensors the trainer computes with) are
     loaded into vLLM after every update; nothing else is re-sent.
Simplifications on purpose: no KL term, no entropy bonus, no reference model, one epoch
per batch. Multi-GPU: `torchrun --nproc_per_node N train_grpo.py ...` (data parallel: each
rank its own engine and prompts; v's gradient, u numbers, is all-reduced).

    python train_grpo.py --u 13 --model Qwen/Qwen2.5-7B-Instruct
    python tiny.py tiny && python train_grpo.py --model tiny/model --data tiny/train.jsonl \
        --eval-data tiny/test.jsonl --prompts-per-step 8 --mini-batch 4 --max-new-tokens 16 --steps 3
"""
import argparse
import copy
import importlib.util
import json
import math
import os
import re
import time

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from tqdm import tqdm

import eval as task  # the dataset, prompt, reward and generation backends live in eval.py
import tinylora


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen2.5-7B-Instruct", help="hub id or local path of the frozen base model")
    a("--data", default="gsm8k", help="'gsm8k' (hub openai/gsm8k train) or a local .jsonl with question/answer rows")
    a("--eval-data", default="gsm8k", help="held-out set for --eval-every: 'gsm8k' (test split) or a .jsonl")
    # TinyLoRA
    a("--u", type=int, default=13, help="trainable numbers per tie group (size of v)")
    a("--r", type=int, default=2, help="rank of the frozen truncated SVD of each adapted weight")
    a("--n-tie", type=int, default=None, help="modules sharing one v (default: all, so params = u)")
    a("--tie", default="tiled", choices=tinylora.TIE_MODES, help="how modules are grouped into tie groups")
    a("--targets", default=",".join(tinylora.TARGETS), help="comma-separated linear layer names to adapt")
    a("--v-dtype", default="fp32", choices=list(tinylora.V_DTYPES), help="storage dtype of v (forward sees v rounded to it)")
    a("--svd-cache", default=tinylora.CACHE_DIR, help="directory of cached SVD factors ('' disables)")
    # GRPO
    a("--prompts-per-step", type=int, default=64, help="prompts per GRPO step (x group size rollouts)")
    a("--group-size", type=int, default=4, help="samples per prompt; advantages are normalised within a group")
    a("--mini-batch", type=int, default=32, help="prompts per optimizer update (updates per step = prompts-per-step / this)")
    a("--micro-batch", type=int, default=8, help="sequences per forward/backward chunk (memory only; gradients accumulate)")
    a("--epochs", type=float, default=3, help="passes over the training set")
    a("--steps", type=int, default=None, help="stop after this many steps (default: all epochs)")
    a("--max-new-tokens", type=int, default=4096, help="rollout length cap")
    a("--temperature", type=float, default=1.0, help="sampling temperature of rollouts (the trainer uses the same)")
    a("--clip-low", type=float, default=0.2, help="ratio clip below: 1 - clip_low")
    a("--clip-high", type=float, default=0.4, help="ratio clip above: 1 + clip_high (asymmetric, 'clip higher')")
    a("--tis-cap", type=float, default=2.0, help="cap of the truncated importance weight exp(logp_old - logp_vllm)")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate of v (the paper swept 1e-7..2e-4; not tuned here)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm")
    a("--warmup", type=float, default=0.05, help="fraction of updates with a linear lr warmup, then constant")
    a("--grad-ckpt", action="store_true", help="gradient checkpointing in the trainer (less memory, ~30%% slower)")
    a("--low-memory", action="store_true", help="do not keep merged W + dW weights in the trainer (saves one "
      "copy of the adapted weights, 12.5 GiB at 7B in bf16; training fwd+bwd 7-11%% slower on an H100)")
    # machinery
    a("--backend", default="vllm" if importlib.util.find_spec("vllm") else "hf", choices=["vllm", "hf"], help="rollout engine")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="dtype of the base model (trainer and vLLM)")
    a("--gpu-memory-utilization", type=float, default=0.4, help="vLLM's share of GPU memory (on CPU: of RAM)")
    a("--max-model-len", type=int, default=None, help="vLLM context length (default: the model's own)")
    a("--seed", type=int, default=0, help="seeds data order, P, and sampling")
    a("--run-dir", default=None, help="where metrics.jsonl, checkpoints and the adapter go (default: runs/<time>)")
    a("--save-every", type=int, default=10, help="checkpoint every N steps (0: only at the end)")
    a("--resume", default=None, help="RUN_DIR of an interrupted run: continue it from its last checkpoint")
    a("--eval-every", type=int, default=0, help="greedy pass@1 on --eval-data every N steps (0: off)")
    a("--eval-limit", type=int, default=200, help="rows of --eval-data used by periodic eval")
    a("--wandb", default=None, metavar="PROJECT", help="also log to this Weights & Biases project")
    return p.parse_args(argv)


def check_args(args, world=1):
    """Every cheap check, before any model loads."""
    def need(ok, msg):
        if not ok:
            raise SystemExit(f"error: {msg}")
    need(args.group_size >= 2, f"--group-size {args.group_size}: GRPO needs >= 2 samples per prompt")
    need(args.mini_batch > 0 and args.prompts_per_step % args.mini_batch == 0,
         f"--prompts-per-step {args.prompts_per_step} is not a multiple of --mini-batch {args.mini_batch}")
    need(args.mini_batch % world == 0, f"--mini-batch {args.mini_batch} is not divisible by {world} ranks")
    need(args.micro_batch >= 1 and args.u >= 1 and args.r >= 1, "--micro-batch, --u and --r must be >= 1")
    local = os.path.exists(args.model) or not re.fullmatch(r"[\w.-]+/[\w.-]+", args.model) \
        or os.path.isdir(args.model.split("/")[0])
    need(not local or os.path.isdir(args.model), f"--model {args.model}: no such model directory")
    for path in (args.data, args.eval_data if args.eval_every else "gsm8k"):
        need(path in ("gsm8k", "math500") or os.path.isfile(path), f"cannot read data file {path}")


# -----------------------------------------------------------------------------
# the trainer's side: logprobs of sampled tokens, the GRPO loss


def token_logprobs(model, seqs, n_prompt, temperature):
    """logp of each completion token under `model`, at the sampling temperature.
    seqs: list of (prompt + completion) id lists; n_prompt: prompt lengths. Returns a list of 1-D tensors."""
    dev = model.tinylora_v.device
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long, device=dev)  # right-padded (B, L)
    mask = torch.zeros(len(seqs), L, dtype=torch.long, device=dev)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
    head, out = model.get_output_embeddings(), []
    for i, (s, p) in enumerate(zip(seqs, n_prompt)):
        # position t predicts token t+1: completion tokens s[p:] are predicted by positions p-1 .. len-2
        h, target = hidden[i, p - 1:len(s) - 1], ids[i, p:len(s)]
        if torch.is_grad_enabled():  # recompute the (T_i, vocab) logits in backward instead of storing them
            out.append(torch.utils.checkpoint.checkpoint(_logp, head, h, target, temperature, use_reentrant=False))
        else:
            out.append(_logp(head, h, target, temperature))
    return out


def _logp(head, h, target, temperature):
    logits = head(h).float() / temperature  # (T, vocab) in fp32: bf16 log_softmax would dominate the mismatch
    return logits.log_softmax(-1).gather(-1, target[:, None])[:, 0]


def grpo_loss(logp, logp_old, logp_vllm, adv, clip_low, clip_high, tis_cap):
    """Per-token clipped surrogate x truncated IS weight. All (T,) tensors; adv broadcast (scalar or (T,)).
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


# -----------------------------------------------------------------------------
# run directory: metrics, atomic checkpoints, resume


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
    state = torch.load(os.path.join(run_dir, "trainer_state.pt"), weights_only=True)
    restore(state, v, opt, sched)
    return state["step"]


def resume_args(args):
    """The interrupted run's own arguments win (same recipe), except where to stop."""
    with open(os.path.join(args.resume, "args.json")) as f:
        saved = json.load(f)
    saved.update(resume=args.resume, run_dir=args.resume, steps=args.steps or saved["steps"])
    return argparse.Namespace(**{**vars(parse_args([])), **saved})  # options newer than the run: defaults


# -----------------------------------------------------------------------------
# the loop


def train(args, reward_fn=task.gsm8k_reward, llm=None):
    """Run GRPO; returns (model, path of the final adapter). `llm` may be an existing vLLM engine."""
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1  # (vLLM may initialise torch.distributed for itself)
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if args.resume:
        args = resume_args(args)
    check_args(args, world)
    rows, skipped, kind = task.load_rows(args.data, split="train")
    steps_per_epoch = len(rows) // args.prompts_per_step
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {args.data} has {len(rows)} usable rows, fewer than --prompts-per-step")
    total = min(int(args.epochs * steps_per_epoch), args.steps or 10**9)
    run_dir = args.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype).to(device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    v = tinylora.apply(model, args.u, args.r, args.n_tie, args.tie, args.targets.split(","), args.seed,
                       args.v_dtype, args.svd_cache or None, verbose=rank == 0, keep_merged=not args.low_memory)
    updates_per_step = args.prompts_per_step // args.mini_batch
    warmup = max(1, round(args.warmup * total * updates_per_step))
    opt = torch.optim.AdamW([v], lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    torch.manual_seed(args.seed * 1000 + rank)  # each rank samples differently
    start = load_checkpoint(run_dir, model, v, opt, sched) if args.resume else 0
    model.train()  # (Qwen2 has no dropout; this only turns gradient checkpointing on)

    if args.backend == "vllm" and llm is None:  # the engine gets the trainer's resolved dtype ("auto" may differ)
        llm = task.make_llm(args.model, str(model.dtype).removeprefix("torch."), args.seed + rank,
                            args.gpu_memory_utilization, args.max_model_len)
    sync = lambda: task.sync_weights(llm, tinylora.merged_weights(model)) if llm is not None else 0

    def generate(prompts, n, temperature, max_new_tokens, seed=None):
        if llm is not None:
            return task.generate_vllm(llm, prompts, n, temperature, max_new_tokens, seed=seed)
        return task.generate_hf(model, tok, prompts, n, temperature, max_new_tokens)  # seeded by torch's RNG

    eval_rows = task.load_rows(args.eval_data, split="test", limit=args.eval_limit) if args.eval_every else None
    wandb = None
    if args.wandb and rank == 0:
        import wandb
        wandb.init(project=args.wandb, config=vars(args), resume="allow")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    if start:
        sync()  # the engine starts from the base weights; bring it to the resumed v
        if rank == 0:  # drop lines of steps after the checkpoint (a crash between checkpoints): they rerun
            with open(metrics_path) as f:
                keep = [line for line in f if json.loads(line)["step"] <= start]
            with open(metrics_path, "w") as f:
                f.writelines(keep)
    if rank == 0:
        print(f"data: {len(rows)} {kind} rows ({skipped} skipped), {steps_per_epoch} steps per epoch, "
              f"steps {start} -> {total}, run dir {run_dir}")
    bar = tqdm(range(start, total), initial=start, total=total, desc="grpo", disable=rank != 0)
    m, state = {}, capture(start, v, opt, sched)
    try:
        for step in bar:
            state = capture(step, v, opt, sched)  # an interrupted step is rolled back to here
            # this step's prompts: a seeded permutation per epoch, then a slice; each rank takes every world-th
            epoch, offset = divmod(step, steps_per_epoch)
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            batch = [rows[i] for i in order[offset * args.prompts_per_step:(offset + 1) * args.prompts_per_step]]
            batch = batch[rank::world]
            prompts = [task.build_prompt(tok, r["question"], kind) for r in batch]

            t0 = time.time()
            # vLLM rollouts are seeded per (seed, step, rank, prompt): a resumed run samples the same
            out = generate(prompts, args.group_size, args.temperature, args.max_new_tokens,
                           seed=1000 * (100_000 * args.seed + step) + rank * len(prompts))
            t_gen = time.time() - t0
            seqs, n_prompt, logp_vllm, rewards = [], [], [], []
            for r, o in zip(batch, out):
                for s in o["samples"]:
                    seqs.append(o["prompt_ids"] + s["ids"])
                    n_prompt.append(len(o["prompt_ids"]))
                    logp_vllm.append(torch.tensor(s["logprobs"], dtype=torch.float32, device=device))
                    rewards.append(reward_fn(s["text"], r["gold"]))
            adv = advantages(rewards, args.group_size)

            m = train_step(args, model, opt, sched, v, seqs, n_prompt, logp_vllm, adv, updates_per_step,
                           sync, world)
            m.update(step=step + 1, epoch=step / steps_per_epoch, t_generate=t_gen,
                     reward=sum(rewards) / len(rewards), accuracy=sum(x == 1.0 for x in rewards) / len(rewards),
                     tokens=sum(len(s["ids"]) for o in out for s in o["samples"]))
            m = all_mean(m, world, device, v)
            if rank == 0 and args.eval_every and (step + 1) % args.eval_every == 0:
                greedy = lambda p: generate(p, 1, 0.0, args.max_new_tokens)
                res = task.evaluate(greedy, tok, eval_rows[0], eval_rows[2], args.max_new_tokens)
                m.update(eval_strict=res["strict"], eval_flexible=res["flexible"])
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(m) + "\n")
                if wandb:
                    wandb.log(m, step=step + 1)
                if args.save_every and (step + 1) % args.save_every == 0:
                    save_checkpoint(run_dir, model, capture(step + 1, v, opt, sched))
            bar.set_postfix(reward=f"{m['reward']:.3f}", mismatch=f"{m['mismatch']:.1e}", v=f"{m['v_norm']:.2e}")
        state = capture(total, v, opt, sched)
    except KeyboardInterrupt:
        print(f"\ninterrupted in step {state['step'] + 1}: saving the state after step {state['step']} to {run_dir}")
        restore(state, v, opt, sched)
    if rank == 0:
        save_checkpoint(run_dir, model, state)
        print(f"done: {state['step']} steps, reward {m.get('reward', float('nan')):.3f}, mismatch "
              f"{m.get('mismatch', float('nan')):.2e}, |v| {v.norm().item():.3e}, {v.numel()} params "
              f"({v.numel() * tinylora.V_DTYPES[args.v_dtype].itemsize} bytes), adapter {run_dir}/adapter.safetensors")
    return model, os.path.join(run_dir, "adapter.safetensors")


def train_step(args, model, opt, sched, v, seqs, n_prompt, logp_vllm, adv, updates, sync, world):
    """The step's updates over its rollouts (one mini-batch of prompts each), then a sync after each."""
    t0, per_update = time.time(), len(seqs) // updates
    m = dict(mismatch=0.0, is_max=0.0, is_capped=0.0, clip_frac=0.0, grad_norm=0.0, t_sync=0.0, skipped=0)
    chunks = lambda idx: [idx[i:i + args.micro_batch] for i in range(0, len(idx), args.micro_batch)]
    # logp_old: the trainer's logprobs under the rollout-time v. For the first mini-batch they equal
    # the (detached) logprobs of its own forward, so only later mini-batches need an extra pass.
    logp_old = [None] * len(seqs)
    with torch.no_grad():
        for idx in chunks(list(range(per_update, len(seqs)))):
            for i, lp in zip(idx, token_logprobs(model, [seqs[i] for i in idx], [n_prompt[i] for i in idx], args.temperature)):
                logp_old[i] = lp
    n_tok = sum(len(x) for x in logp_vllm)
    for u in range(updates):
        idx_u = list(range(u * per_update, (u + 1) * per_update))
        tokens = torch.tensor(float(sum(len(logp_vllm[i]) for i in idx_u)), device=v.device)
        if world > 1:
            dist.all_reduce(tokens)  # token-mean over the whole mini-batch, all ranks
        loss_sum = 0.0
        for idx in chunks(idx_u):
            lps = token_logprobs(model, [seqs[i] for i in idx], [n_prompt[i] for i in idx], args.temperature)
            loss = 0.0
            for i, lp in zip(idx, lps):
                if logp_old[i] is None:
                    logp_old[i] = lp.detach()
                l, clipped, capped = grpo_loss(lp, logp_old[i], logp_vllm[i], adv[i],
                                               args.clip_low, args.clip_high, args.tis_cap)
                loss = loss + l
                m["clip_frac"] += clipped / n_tok
                m["is_capped"] += capped / n_tok
            (loss / tokens).backward()
            loss_sum += loss.item()
        if world > 1:
            dist.all_reduce(v.grad)  # u numbers per group: the whole communication of data parallelism
        if not math.isfinite(loss_sum) or not torch.isfinite(v.grad).all():
            print(f"warning: non-finite loss/gradient ({loss_sum}); update skipped, v unchanged")
            m["skipped"] += 1
            opt.zero_grad(set_to_none=True)
            continue
        m["grad_norm"] += torch.nn.utils.clip_grad_norm_(v, args.grad_clip).item() / updates
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.time()
        sync()
        m["t_sync"] += time.time() - t1
    for lo, lv in zip(logp_old, logp_vllm):
        m["mismatch"] += (lo - lv).abs().sum().item() / n_tok
        m["is_max"] = max(m["is_max"], torch.exp(lo - lv).max().item() if len(lv) else 0.0)
    m.update(t_train=time.time() - t0 - m["t_sync"], v_norm=v.norm().item(), lr=sched.get_last_lr()[0])
    return m


def all_mean(m, world, device, v):
    """Combine the step's metrics over ranks (mean; max for is_max; sum for tokens), and check that
    every rank holds exactly the same v (a max and a min over u numbers)."""
    if world == 1:
        return m
    keys = sorted(k for k in m if k not in ("step", "epoch"))
    x = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=device)
    mx = x.clone()
    dist.all_reduce(x)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    out = {k: mx[i].item() if k == "is_max" else x[i].item() / (1 if k == "tokens" else world) for i, k in enumerate(keys)}
    out.update(step=m["step"], epoch=m["epoch"])
    hi, lo = v.detach().clone(), -v.detach()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    if not (torch.equal(hi, v) and torch.equal(-lo, v)):  # ranks diverged: fail loudly, not silently
        raise RuntimeError(f"rank {dist.get_rank()}: ranks hold different v after step {m['step']}")
    return out


if __name__ == "__main__":
    args = parse_args()
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1  # started by torchrun
    if ddp:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    train(args)
    if ddp and args.backend == "hf":  # with vLLM, its engine tears the process groups down at exit
        dist.destroy_process_group()
