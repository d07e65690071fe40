"""SFT with TinyLoRA: the paper's baseline at the same budget, cross-entropy on reference answers.

The paper's contrast: under GRPO 13 parameters learn GSM8K; under SFT "directly on answers" at the
same budget they do not (Qwen2.5-7B: 91% vs 83%). This is that SFT, with everything but the loss
shared with train_grpo.py: the same TinyLoRA and AdamW on v (train_grpo.policy: tinylora.apply's P,
tie groups, v dtype and rounding; the same warmup, 5% then constant, and weight decay), the same
prompt and chat template (task.build_prompt), the same token logprobs (train_grpo.token_logprobs),
the same gradient clip, the same run folder (args.json, metrics.jsonl, adapter.safetensors,
--resume).
One step, per batch of --batch training rows (a seeded permutation per epoch):

    loss = -(1 / T) sum over the batch's answer tokens of log p(token | prompt, answer so far)

T the number of answer tokens in the batch (a token-mean, as GRPO's loss); the prompt's tokens
carry no loss. The target is the chat template's assistant turn for the reference solution: its
tokens after the prompt, up to and including the end-of-turn token (so the model learns to stop).

What the paper leaves open, and what is chosen here:
  - the reference solution's calculator annotations ("48/2 = <<48/2=24>>24") are stripped: the
    model never sees them in a prompt, and no test-time answer has them (--keep-calculator keeps
    them); the final "#### 72" line stays, so a learned answer is one the reward can pay;
  - batch 64 rows per update (GRPO's 64 prompts per step), lr chosen per budget on a held-out
    selection set (docs/results.md), epochs as GRPO's default (3);
  - no evaluation inside the run: eval.py scores the adapter, as it scores GRPO's.
GSM8K-format data only (question / answer rows whose answer is a worked solution): a row whose answer
the reward would not pay as a completion (a bare number, no "#### N" line) or that holds a special
token's text ("<|im_end|>") is refused, one line naming it, before any weights load.

    python train_sft.py --u 13 --model Qwen/Qwen2.5-7B-Instruct
    python tests/tiny.py tiny && python train_sft.py --model tiny/model --data tiny/train.jsonl \\
        --batch 8 --steps 3
    python -m pytest tests/test_train_sft.py
"""
import argparse
import re
import time

import torch
import torch.distributed as dist

import machinery.memory  # what a reader may skip: machinery/ (checks, run folder, memory plan, signals)
import machinery.options
import machinery.run
import machinery.script
import task  # data, prompt
from train_grpo import Sample, policy, tinylora_options, token_logprobs  # GRPO's model, v, AdamW; log p

CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", default="Qwen/Qwen2.5-7B-Instruct", help="hub id or local path of the base model")
    a("--data", default="gsm8k",
      help="'gsm8k' (hub openai/gsm8k train) or a local GSM8K-format .jsonl")
    tinylora_options(a)  # the same as train_grpo.py's
    # SFT
    a("--batch", type=int, default=64, help="training rows per optimizer update (one step)")
    a("--epochs", type=float, default=3, help="passes over the training set")
    a("--steps", type=int, default=None,
      help="stop after this many steps (default: all epochs; the lr schedule is the full run's)")
    a("--keep-calculator", action="store_true",
      help="keep GSM8K's <<a*b=c>> calculator annotations in the targets")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate of v")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--grad-clip", type=float, default=1.0, help="max gradient norm")
    a("--warmup", type=float, default=0.05,
      help="fraction of the run's updates with a linear lr warmup, then constant")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
      help="dtype of the base model: auto is the checkpoint's")
    a("--seed", type=int, default=0, help="seeds data order and P; in [0, 10**6)")
    # how to run (machinery.options.MACHINERY: these may change on --resume)
    a("--micro-tokens", type=int, default=None, help="padded tokens per forward/backward "
      "micro-batch (memory only; gradients accumulate); default: what free GPU memory holds, "
      "8192 on a CPU")
    a("--grad-ckpt", default="auto", choices=["auto", "always", "never"],
      help="gradient checkpointing; auto: on in a step whose longest sequence needs it")
    a("--low-memory", action="store_true", help="do not keep merged W + dW in the trainer")
    a("--max-model-len", type=int, default=None,
      help="context length (default: the model's own); longer rows are skipped")
    a("--run-dir", default=None, help="where metrics.jsonl, checkpoints and the adapter go "
      "(default: runs/<time>); must not hold another run")
    a("--save-every", type=int, default=10, help="checkpoint every N steps (0: only at the end)")
    a("--resume", default=None, help="RUN_DIR of a run to continue")
    a("--wandb", default=None, metavar="PROJECT", help="also log to this Weights & Biases project")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, plus what was given on the command line (`given`) and the defaults."""
    return machinery.options.parse(build_parser(), argv)


# -----------------------------------------------------------------------------
# the data: prompt + reference answer, in the chat template


def answer_text(row: dict, keep_calculator: bool = False) -> str:
    """The reference solution as the target holds it: calculator annotations stripped unless kept."""
    return row["answer"] if keep_calculator else CALCULATOR.sub("", row["answer"])


def target_problem(tokenizer, row: dict, keep_calculator: bool = False) -> str | None:
    """Why the row's answer cannot be a target, or None. A target must earn the reward itself (a worked
    solution ending in a "#### N" line the strict rule reads, N the gold: not a bare number, as a JSON
    number answer is) and hold no special token's text (the tokenizer would read "<|im_end|>" as the
    end of the turn, and the target would stop there, its "#### N" line dropped)."""
    answer = answer_text(row, keep_calculator)
    special = next((t for t in tokenizer.all_special_tokens if t in answer), None)
    if special:
        return f"its answer holds {special!r}, a special token's text: the target would end there"
    if not task.reward("gsm8k", answer, row["gold"]):
        return (f"its answer {answer[-40:]!r} does not end in a '#### {row['gold']}' line the reward reads "
                f"(a bare answer or a JSON number trains a format the reward never pays)")
    return None


def target_ids(tokenizer, row: dict, keep_calculator: bool = False) -> list[int]:
    """The answer tokens of a row: the chat template's assistant turn holding the reference
    solution, after the prompt (row["prompt_ids"]), through the end-of-turn token."""
    answer = answer_text(row, keep_calculator)
    prompt = row["prompt_ids"]  # task.build_prompt's: the same user turn, then the assistant's
    turn = task.messages(row["question"]) + [{"role": "assistant", "content": answer}]
    full = list(tokenizer.apply_chat_template(turn, tokenize=True, return_dict=False))
    if full[:len(prompt)] != prompt:  # a template that renders the turn otherwise: answer + eos
        return tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids, end = full[len(prompt):], tokenizer.eos_token_id
    return ids[:ids.index(end) + 1] if end in ids else ids


def batch_for(rows: list[dict], step: int, steps_per_epoch: int, args, rank: int = 0,
              world: int = 1) -> list[dict]:
    """This step's rows: a slice of a seeded permutation per epoch; rank r takes every world-th."""
    epoch, offset = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    order = torch.randperm(len(rows), generator=g)
    return [rows[i] for i in order[offset * args.batch:(offset + 1) * args.batch]][rank::world]


# -----------------------------------------------------------------------------
# one SFT step, and the run


def sft_step(args, model, opt, sched, v: torch.Tensor, batch: list[Sample], world: int,
             act_bytes: float | None) -> dict:
    """One optimizer update on the batch: token-mean cross-entropy of the answer tokens."""
    t0 = time.time()
    longest = max(len(s.ids) for s in batch)
    ckpt, micro_tokens = machinery.memory.micro_batch_plan(args, model, longest, act_bytes)
    n_tokens = torch.tensor(float(sum(len(s.ids) - s.n_prompt for s in batch)),
                            device=v.device)
    if world > 1:
        dist.all_reduce(n_tokens)  # the token-mean is over the whole batch, all ranks
    loss_sum = 0.0
    for micro in machinery.memory.pack(batch, micro_tokens):
        logp = token_logprobs(model, [s.ids for s in micro], [s.n_prompt for s in micro], 1.0)
        loss = -logp.sum() / n_tokens
        loss.backward()
        loss_sum += loss.item()
    if world > 1:
        dist.all_reduce(v.grad)
        loss_sum = torch.tensor(loss_sum, device=v.device)
        dist.all_reduce(loss_sum)
        loss_sum = loss_sum.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(v, args.grad_clip).item()
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return dict(loss=loss_sum, grad_norm=grad_norm, lr=lr, tokens=int(n_tokens.item()),
                grad_ckpt=int(ckpt), t_step=time.time() - t0)


def train(args) -> tuple[torch.nn.Module | None, str]:
    """Run SFT; returns (model, path of the final adapter)."""
    run = machinery.run.Run(args)  # checks, run dir (locked), data, memory plan; no weights loaded
    args = run.args
    if run.task_name != "gsm8k":
        run.fail(f"--data {args.data}: {run.task_name} rows; SFT trains on GSM8K's worked solutions")
    if run.done:
        return None, run.adapter
    for row in run.rows:  # before any weights load
        problem = target_problem(run.tokenizer, row, args.keep_calculator)
        if problem:
            run.fail(f"--data {args.data}: row {row['id'] + 1}: {problem}; SFT trains on worked "
                     f"solutions ending in '#### N'")
        row["target_ids"] = target_ids(run.tokenizer, row, args.keep_calculator)
    long = sum(len(r["prompt_ids"]) + len(r["target_ids"]) > args.max_model_len for r in run.rows)
    if long:
        run.fail(f"--data {args.data}: {long} rows are longer than the context "
                 f"{args.max_model_len} with their answer; a larger --max-model-len, or data "
                 f"without them")
    model, v, opt, sched = policy(args, run)  # the same TinyLoRA, AdamW and warmup as GRPO's
    with run.checkpointed(model, v, opt, sched, sync=lambda: None, generate=None):
        for step in run.steps():  # resumes; saves every finished step on Ctrl-C, SIGTERM, crashes
            rows = batch_for(run.rows, step, run.steps_per_epoch, args, run.rank, run.world)
            batch = [Sample(ids=r["prompt_ids"] + r["target_ids"], n_prompt=len(r["prompt_ids"]))
                     for r in rows]
            m = run.within_memory(sft_step, batch)
            run.finish_step(step, m)  # metrics line; checkpoint at --save-every
    return model, run.adapter


if __name__ == "__main__":
    machinery.script.main(train, parse_args)
