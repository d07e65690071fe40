"""The options: which are the run's recipe and which say how to run, and every check that needs no model.

check_args refuses (machinery.cli.Refused) before anything loads; recipe() is what a checkpoint
must match on --resume.
"""
import argparse
import importlib.util
import math
import os

import engine
import task
from machinery.cli import Refused

# Options that say how to run, not what to train: --resume takes them from its own command line;
# every other option is the run's recipe and comes from its args.json (checked against the
# checkpoint). --model and --data may point elsewhere on resume (a moved folder, another mount):
# the weights' fingerprint and the data's hash say whether they are still the run's.
MACHINERY = ("steps", "micro_tokens", "grad_ckpt", "low_memory", "backend", "gpu_memory_utilization",
             "max_model_len", "save_every", "eval_every", "eval_limit", "eval_data", "svd_cache", "wandb")
LOCATIONS = ("model", "data")
NOT_SAVED = ("given", "defaults", "resume", "run_dir")


def is_grpo(args):
    """train_grpo.py's options (train_sft.py has --batch instead of prompts, groups and mini-batches)."""
    return "group_size" in vars(args)


def trainer_of(options):
    """The script whose run these options (a dict: a command line's, or an args.json's) are: args.json's
    "trainer"; a folder made before args.json named it, by its options (only GRPO has group_size)."""
    return options.get("trainer") or ("train_grpo.py" if "group_size" in options else "train_sft.py")


def parse(parser, argv=None):
    """parser.parse_args(argv), plus what the command line gave (`given`) and the defaults: resume
    takes the recipe from args.json and only the given machinery options from the command line."""
    args = parser.parse_args(argv)
    args.defaults = vars(parser.parse_args([]))
    for action in parser._actions:  # parse again without defaults: what the command line gave
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(parser.parse_args(argv)))
    return args


def check_args(args, world=1):
    """Every check that needs no model, before anything loads."""
    def need(ok, msg):
        if not ok:
            raise Refused(msg)
    grpo = is_grpo(args)
    if grpo:
        need(args.group_size >= 2, f"--group-size {args.group_size}: GRPO needs >= 2 samples per prompt")
        need(args.prompts_per_step >= 1 and args.mini_batch >= 1, "--prompts-per-step and --mini-batch must be >= 1")
        need(args.prompts_per_step % args.mini_batch == 0,
             f"--prompts-per-step {args.prompts_per_step} is not a multiple of --mini-batch {args.mini_batch}")
        need(args.mini_batch % world == 0, f"--mini-batch {args.mini_batch} is not divisible by {world} ranks")
    else:
        need(args.batch >= 1 and args.batch % world == 0, f"--batch {args.batch} must be >= 1 and divisible by {world} ranks")
    need(args.u >= 1 and args.r >= 1, f"--u {args.u} and --r {args.r} must be >= 1")
    need(args.n_tie is None or args.n_tie >= 1, f"--n-tie {args.n_tie} must be >= 1")
    need(args.steps is None or args.steps >= 1, f"--steps {args.steps} must be >= 1 (omit it to train all epochs)")
    for k, x in vars(args).items():
        need(not isinstance(x, float) or math.isfinite(x), f"--{k.replace('_', '-')} {x} must be a finite number")
    need(0 <= args.seed < 10**6, f"--seed {args.seed} must be in [0, 10**6)" + (" (rollout seeds are built from it "
         "and must fit vLLM's 64-bit seeds)" if grpo else ""))
    need(not args.wandb or importlib.util.find_spec("wandb"), "--wandb needs the wandb package (pip install wandb)")
    need(not os.path.isfile(args.svd_cache or ""), f"--svd-cache {args.svd_cache} is a file, not a directory")
    need(args.epochs > 0, f"--epochs {args.epochs} must be > 0")
    if grpo:
        need(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens} must be >= 1")
        need(args.temperature > 0, f"--temperature {args.temperature} must be > 0 (GRPO learns from sampled rollouts)")
        vllm = args.backend == "vllm"
        need(not vllm or importlib.util.find_spec("vllm"), "--backend vllm: vLLM is not installed (pip install vllm, "
             "or --backend hf, the slow Hugging Face generate)")
        need(not vllm or args.temperature >= engine.VLLM_MIN_TEMPERATURE, f"--temperature {args.temperature}: "
             f"vLLM samples at {engine.VLLM_MIN_TEMPERATURE} at least (it raises lower values silently), so the "
             f"trainer's logprobs would not be the sampler's")
        if vllm:
            try:
                engine.check_vllm_cache()
            except ValueError as e:
                raise Refused(str(e))
    need(args.lr > 0 and args.weight_decay >= 0 and args.grad_clip > 0,
         f"--lr {args.lr} and --grad-clip {args.grad_clip} must be > 0, --weight-decay {args.weight_decay} >= 0")
    need(0 <= args.warmup < 1, f"--warmup {args.warmup} must be in [0, 1)")
    if grpo:
        need(0 <= args.clip_low < 1 and args.clip_high >= 0 and args.tis_cap >= 1, f"--clip-low {args.clip_low} must be "
             f"in [0, 1), --clip-high {args.clip_high} >= 0, --tis-cap {args.tis_cap} >= 1")
        need(0.01 <= args.gpu_memory_utilization < 1,
             f"--gpu-memory-utilization {args.gpu_memory_utilization} must be in [0.01, 1)")
        need(args.eval_every >= 0 and args.eval_limit >= 1, "--eval-every must be >= 0, --eval-limit >= 1")
    need(args.micro_tokens is None or args.micro_tokens >= 1, f"--micro-tokens {args.micro_tokens} must be >= 1")
    need(args.save_every >= 0, "--save-every must be >= 0")
    need(args.max_model_len is None or args.max_model_len >= 2, f"--max-model-len {args.max_model_len} must be >= 2")
    eval_data = args.eval_data if getattr(args, "eval_every", 0) else None
    for path in (args.data, eval_data or "gsm8k"):
        need(path in task.HUB or os.path.isfile(path), f"cannot read data file {path} (expected gsm8k, math500 or a .jsonl)")
    need(not task.needs_math_verify(args.data, eval_data)
         or importlib.util.find_spec("math_verify"), "MATH data is judged by math-verify: pip install math-verify")



def recipe(args):
    """The options that define what a run trains (everything but machinery and locations)."""
    return {k: x for k, x in vars(args).items() if k not in MACHINERY + LOCATIONS + NOT_SAVED}

