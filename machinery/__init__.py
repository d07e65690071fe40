"""The machinery of train_grpo.py, which a reader of the algorithm may skip.

What it holds: the checks of every option before anything loads; the run directory (one live
process owns it, through a lock that a crash cannot leave behind; args.json, metrics.jsonl, atomic
checkpoints, never of a non-finite v; resume, which refuses a changed recipe, a changed data set or
other weights); the memory plan (what a GPU holds, how many tokens a micro-batch may have, the
out-of-memory retry); data parallel helpers; signals (Ctrl-C, SIGTERM and SIGHUP keep every finished
step, exit 130) and the script's entry point. A step is finished once its metrics line is written.

    python train_grpo.py --help          # the options; this file has no command of its own
    python -m pytest tests/test_train_grpo.py
"""
import argparse
import contextlib
import copy
import fcntl
import glob
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from tqdm import tqdm

import engine
import task
import tinylora

# Options that say how to run, not what to train: --resume takes them from its own command line;
# every other option is the run's recipe and comes from its args.json (checked against the
# checkpoint). --model and --data may point elsewhere on resume (a moved folder, another mount):
# the weights' fingerprint and the data's hash say whether they are still the run's.
MACHINERY = ("steps", "micro_tokens", "grad_ckpt", "low_memory", "backend", "gpu_memory_utilization",
             "max_model_len", "save_every", "eval_every", "eval_limit", "eval_data", "svd_cache", "wandb")
LOCATIONS = ("model", "data")
NOT_SAVED = ("given", "defaults", "resume", "run_dir")
RUN_FILES = ("args.json", "metrics.jsonl", "adapter.safetensors", "trainer_state.pt")


def fail(msg):
    """Bad input: one line on stderr, exit code 2 (as argparse does)."""
    for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar ends its line first
        bar.close()
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    forget_empty_run_dir()
    raise SystemExit(2)


PROG = "train_grpo.py"  # the script whose errors these are (Run sets it)
MADE = []  # the run folder this process created, until args.json is in it


def forget_empty_run_dir():
    """A start that failed (bad input, Ctrl-C while loading) leaves no empty run folder behind."""
    for d in MADE:
        if os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
    MADE.clear()


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
            fail(msg)
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
                fail(str(e))
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


# -----------------------------------------------------------------------------
# the run directory: new or resumed, locked, checkpoints, metrics


def open_run(args):
    """(args, first step, checkpoint state or None): a new run directory, or the recipe and checkpoint
    of the one --resume names, locked for this process. Refuses before any model loads: a run dir
    that another process holds, a new run into another run's directory, a recipe option changed on
    resume, a --steps the checkpoint is already past."""
    if not args.resume:
        args.run_dir = args.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
        if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
            fail(f"--run-dir {args.run_dir} is a file, not a directory")
        refuse_model_dir(args.run_dir, args.model)
        found = [f for f in RUN_FILES if os.path.exists(os.path.join(args.run_dir, f))]
        if found:
            fail(f"--run-dir {args.run_dir} holds a run ({', '.join(found)}): --resume {args.run_dir} continues it")
        if not os.path.exists(args.run_dir):
            MADE.append(os.path.abspath(args.run_dir))
        lock(args.run_dir, create=True)
        for k in LOCATIONS:  # a local path is kept absolute, so --resume works from any directory
            if os.path.exists(getattr(args, k)):
                setattr(args, k, os.path.abspath(getattr(args, k)))
        args.trainer = trainer_of(vars(args))  # args.json names the script that made the run
        return args, 0, None
    if not os.path.isfile(os.path.join(args.resume, "args.json")):
        fail(f"--resume {args.resume}: no args.json there, not a run directory")
    if "run_dir" in args.given and os.path.abspath(args.run_dir) != os.path.abspath(args.resume):
        fail(f"--run-dir {args.run_dir} with --resume {args.resume}: a resumed run stays in its own directory")
    try:
        with open(os.path.join(args.resume, "args.json")) as f:
            saved = json.load(f)
    except ValueError as e:
        fail(f"--resume {args.resume}: args.json is not readable JSON ({e})")
    if not isinstance(saved, dict):
        fail(f"--resume {args.resume}: args.json holds a JSON {type(saved).__name__}, not the run's options")
    this, theirs = trainer_of(vars(args)), trainer_of(saved)
    if theirs != this:  # before the lock, whose message names this script
        fail(f"--resume {args.resume}: a {theirs} run; {theirs} --resume {args.resume} continues it")
    lock(args.resume)
    mine = [m for m in MACHINERY if m in args.defaults]  # this script's machinery options
    for k in args.given:
        if k not in MACHINERY + LOCATIONS + ("resume", "run_dir") and getattr(args, k) != saved.get(k, args.defaults[k]):
            fail(f"--{k.replace('_', '-')} {getattr(args, k)}: the run was made with {saved.get(k)}; "
                 f"only {', '.join('--' + m.replace('_', '-') for m in mine)} may change on --resume")
    now = {k: getattr(args, k) for k in args.given if k in MACHINERY + LOCATIONS}  # given again
    args = argparse.Namespace(**{**args.defaults, **saved, **now, "trainer": this, "resume": args.resume,
                                 "run_dir": args.resume, "given": args.given, "defaults": args.defaults})
    for tmp in glob.glob(os.path.join(args.run_dir, "*.tmp")):
        os.remove(tmp)  # left by a write that was killed; the file it was replacing is intact
    path, adapter = (os.path.join(args.run_dir, f) for f in ("trainer_state.pt", "adapter.safetensors"))
    if not os.path.exists(path) and any(s >= 1 for s, _ in logged(os.path.join(args.run_dir, "metrics.jsonl"))):
        fail(f"--resume {args.run_dir}: trainer_state.pt is missing, yet steps are logged: the checkpoint is lost "
             f"(a new run in another --run-dir starts over)")
    try:  # read both now, before any model loads: a damaged checkpoint is named, not a traceback later
        # map to the CPU: a checkpoint made on a GPU is read on any machine (restore moves it to v)
        state = torch.load(path, weights_only=True, map_location="cpu") if os.path.exists(path) else None
        config = tinylora.read_config(adapter) if state and state["step"] else None
        if config:
            tinylora.read_v(adapter, config)
    except Exception as e:
        fail(f"--resume {args.run_dir}: its checkpoint is damaged ({first_line(e)})")
    step = state["step"] if state else 0
    was, now = state.get("recipe") if state else None, recipe(args)
    edited = [f"{k} {now.get(k)} (the run's: {x})" for k, x in (was or {}).items() if now.get(k, x) != x]
    if edited:  # args.json was edited since the run started
        fail(f"--resume {args.run_dir}: args.json differs from the run's checkpoint: {', '.join(edited)}; "
             f"put it back (another recipe is another run)")
    theirs = {k: config[k] for k in ("u", "r", "tie", "seed", "v_dtype", "rounding")} if config else {}
    other = [f"{k} {x} (the run's: {getattr(args, k)})" for k, x in theirs.items() if x != getattr(args, k)]
    if other:  # e.g. copied in from another run
        fail(f"--resume {args.run_dir}: adapter.safetensors is not this run's: {', '.join(other)}")
    if args.steps is not None and args.steps < step:
        fail(f"--steps {args.steps}: the checkpoint in {args.run_dir} is already at step {step}")
    return args, step, state


def recipe(args):
    """The options that define what a run trains (everything but machinery and locations)."""
    return {k: x for k, x in vars(args).items() if k not in MACHINERY + LOCATIONS + NOT_SAVED}


def refuse_model_dir(run_dir, model):
    """A run directory must not be (or hold) a model: its adapter.safetensors would break the model
    for vLLM, which loads every .safetensors file of the directory."""
    if os.path.isdir(model) and os.path.isdir(run_dir) and os.path.samefile(run_dir, model):
        fail(f"--run-dir {run_dir} is the model directory; give the run a folder of its own")
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        fail(f"--run-dir {run_dir} holds a model (config.json); give the run a folder of its own")


HELD = {}  # run directories this process holds: real path -> the descriptor that holds the lock


def lock(run_dir, create=False):
    """An exclusive lock on the run directory for the life of this process: the OS drops it when the
    process dies, so a crash cannot leave it behind. Rank 0 holds it for all ranks."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    try:
        if create:
            os.makedirs(run_dir, exist_ok=True)
        if os.path.realpath(run_dir) not in HELD:
            fd = os.open(run_dir, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            HELD[os.path.realpath(run_dir)] = fd
    except BlockingIOError:
        fail(f"{run_dir} is in use by another {PROG} process; wait for it to end or stop it")
    except OSError as e:  # a read-only mount, a path through a file
        fail(f"--run-dir {run_dir}: cannot create or open it ({e.strerror})")


def data_hash(rows):
    """A hash of the usable rows in order (question, gold): another order or other rows differ."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["question"], r["gold"]]).encode())
    return h.hexdigest()[:16]


def prompt_hash(rows):
    """A hash of the rows' prompt token ids: another tokenizer or chat template differs."""
    return hashlib.sha256(json.dumps([r["prompt_ids"] for r in rows]).encode()).hexdigest()[:16]


def write_args(args):
    tmp = os.path.join(args.run_dir, "args.json.tmp")
    with open(tmp, "w") as f:
        json.dump({k: x for k, x in vars(args).items() if k not in NOT_SAVED}, f, indent=2)
    os.replace(tmp, os.path.join(args.run_dir, "args.json"))


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


def save_checkpoint(run_dir, model, state, extra, args=None):
    """The adapter file plus the trainer state (with `extra`: the recipe and the data's hash), each
    written atomically (temp file + rename); with `args`, a new run's args.json first. A full disk: one
    line, no temp file left, and the previous checkpoint intact; at a new run's start, none of its files
    (the same command starts it again; fail removes the folder it made)."""
    try:
        if args:
            write_args(args)
        tinylora.save(model, os.path.join(run_dir, "adapter.safetensors"))
        tmp = os.path.join(run_dir, "trainer_state.pt.tmp")
        torch.save({**state, **extra}, tmp)  # tensors and plain values: torch.load(weights_only=True) reads it
        os.replace(tmp, os.path.join(run_dir, "trainer_state.pt"))
    except (OSError, RuntimeError, SafetensorError) as e:  # how torch.save and safetensors say "disk full"
        free = shutil.disk_usage(run_dir).free // 1024  # torch's own message may not say "disk full"
        started = [os.path.join(run_dir, f) for f in RUN_FILES] if args else []
        for path in glob.glob(os.path.join(run_dir, "*.tmp")) + started:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        if args:
            fail(f"could not write the first checkpoint to {run_dir} ({first_line(e)}; {free} KiB free there); "
                 f"nothing of the run is left: the same command starts it again")
        fail(f"could not write the checkpoint of step {state['step']} to {run_dir} ({first_line(e)}; "
             f"{free} KiB free there); the previous checkpoint there is intact")


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


def log(path, m, wandb=None):
    try:
        with open(path, "a") as f:
            f.write(json.dumps(m) + "\n")
    except OSError as e:
        fail(f"could not write {path} ({e.strerror}); the checkpoint there holds the last saved step")
    if wandb:
        wandb.log({k: x for k, x in m.items() if k != "v"}, step=m["step"])


# -----------------------------------------------------------------------------
# the run: setup before any weight loads, then checkpoints and metrics around the loop


class Run:
    """A training run's bookkeeping. Made before any weight loads: the options checked, the run
    directory locked, the data read and checked, the lr schedule's length, the memory plan. Then
    `with run.checkpointed(...)` resumes or writes the first checkpoint, and on any way out (Ctrl-C,
    SIGTERM, SIGHUP, a crash) saves the state after the last finished (= logged) step."""

    def __init__(self, args):
        global PROG
        PROG = trainer_of(vars(args))
        self.rank, self.world = rank_world()
        self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        args, self.start, state = open_run(args)
        check_args(args, self.world)
        meta = meta_model(args)
        try:
            names, _ = tinylora.choose_modules(dict(meta.named_modules()), args.u, args.r, args.n_tie, args.tie,
                                               args.targets.split(","), args.v_dtype, args.rounding)
            args.max_model_len = task.context_length(meta.config, args.max_model_len)
        except ValueError as e:
            fail(f"{e} (--u, --r, --n-tie, --tie, --targets, --max-model-len for {args.model})")
        try:
            self.tokenizer = task.load_tokenizer(args.model)
            if getattr(args, "backend", None) == "vllm":
                engine.check_vllm_runs(meta.config)
        except ValueError as e:
            fail(f"--model {args.model}: {e}")
        per_step = args.prompts_per_step if is_grpo(args) else args.batch  # rows per step
        self.rows, skipped, self.task_name = load_data(args, self.tokenizer, args.data, "train", per_step)
        # what the checkpoint must match on resume: the rows, the prompts the model sees (tokenizer and chat
        # template included), the dtype the weights load in (bf16 and fp32 copies share a fingerprint)
        self.extra = dict(recipe=recipe(args), data=data_hash(self.rows), dtype=str(meta.dtype).removeprefix("torch."),
                          prompts=prompt_hash(self.rows))
        if state and state.get("data") not in (None, self.extra["data"]):
            fail(f"--data {args.data}: not the rows this run was trained on (other rows, another order, or a "
                 f"--max-model-len that skips others; hash {self.extra['data']}, the run's {state['data']})")
        if state and state.get("prompts") not in (None, self.extra["prompts"]):
            fail(f"--model {args.model}: its tokenizer or chat template makes other prompts than the run's (hash "
                 f"{self.extra['prompts']}, the run's {state['prompts']}); the run's own model continues it")
        if state and state.get("dtype") not in (None, self.extra["dtype"]):
            fail(f"--model {args.model} loads in {self.extra['dtype']}, the run trained in {state['dtype']}: "
                 f"the run's own weights continue it bit-identically")
        if getattr(args, "eval_every", 0):
            self.eval_rows, _, self.eval_task_name = load_data(args, self.tokenizer, args.eval_data, "test", 1,
                                                          args.eval_limit)
        self.steps_per_epoch = len(self.rows) // per_step
        schedule = int(args.epochs * self.steps_per_epoch)  # the lr schedule's length, whatever --steps says
        if schedule < 1:
            fail(f"--epochs {args.epochs} of {self.steps_per_epoch} steps each is less than one step")
        self.last = min(schedule, args.steps or schedule)
        updates = args.prompts_per_step // args.mini_batch if is_grpo(args) else 1  # per step
        self.warmup_updates = max(1, round(args.warmup * schedule * updates))
        self.args, self.adapter = args, os.path.join(args.run_dir, "adapter.safetensors")
        self.done = bool(self.start) and self.start >= self.last
        if self.rank == 0:
            if args.steps and args.steps > schedule:
                print(f"note: --steps {args.steps} is past the {schedule} steps of {args.epochs:g} epochs; "
                      f"the run stops at step {schedule}", file=sys.stderr)
            if self.done:
                print(f"already done: {args.run_dir} is at step {self.start} of {self.last}; nothing to train "
                      f"(a larger --steps continues it)")
            else:
                print(f"data: {len(self.rows)} {self.task_name} rows ({skipped} skipped), {self.steps_per_epoch} steps "
                      f"per epoch, steps {self.start} -> {self.last}, run dir {args.run_dir}")
        if torch.cuda.is_available() and not self.done:
            check_memory(args, meta, names, min(args.max_model_len, 512 + getattr(args, "max_new_tokens", 512)))

    def steps(self):
        """The steps to run, with a progress bar; the state at the start of each is kept for a rollback."""
        bar = tqdm(range(self.start, self.last), initial=self.start, total=self.last,
                   desc="grpo" if is_grpo(self.args) else "sft", disable=self.rank != 0)
        for step in bar:
            if SIGNALS:  # one that came inside an import (stop_like_ctrl_c)
                raise KeyboardInterrupt
            self.state = capture(step, self.v, self.opt, self.sched)
            yield step
            m = self.last_metrics
            shown = dict(reward=".3f", mismatch=".1e", loss=".4f", v_norm=".2e")
            bar.set_postfix({k.removesuffix("_norm"): format(m[k], f) for k, f in shown.items() if k in m})

    @contextlib.contextmanager
    def checkpointed(self, model, v, opt, sched, sync, generate):
        """Resume (checkpoint loaded, the engine brought to v) or start (args.json, first checkpoint,
        baseline eval); on any exit, the state after the last logged step is saved."""
        args = self.args
        self.model, self.v, self.opt, self.sched = model, v, opt, sched
        self.act_bytes = free_for_activations(model.config) if torch.cuda.is_available() else None
        self.evaluate = lambda: evaluate(args, generate, self.tokenizer, self.eval_rows, self.eval_task_name)
        self.first = self.last_metrics = None
        self.wandb, self.metrics_path = None, os.path.join(args.run_dir, "metrics.jsonl")
        torch.manual_seed(args.seed * 1000 + self.rank)  # the HF backend samples with torch's RNG: each rank its own
        if self.start:
            load_checkpoint(args.run_dir, model, v, opt, sched)
            sync()  # every rank's engine starts from the base weights; bring it to the resumed v
        if self.rank == 0:
            if args.wandb:
                import wandb
                self.wandb = wandb
                wandb.init(project=args.wandb, config=recipe(args), resume="allow")
            if args.resume:
                trim_metrics(self.metrics_path, self.start)
                lines = dict(logged(self.metrics_path))
                if 1 in lines:  # the run's first step, for the final line
                    self.first = json.loads(lines[1])
                if getattr(args, "eval_every", 0) and self.start == 0 and 0 not in lines:  # stopped in the baseline
                    log(self.metrics_path, dict(step=0, **self.evaluate()), self.wandb)
            else:  # written once the weights and the engine are up: a failed start leaves no run behind
                save_checkpoint(args.run_dir, model, capture(0, v, opt, sched), self.extra, args)  # args.json too
                if getattr(args, "eval_every", 0):
                    log(self.metrics_path, dict(step=0, **self.evaluate()), self.wandb)
        self.state = self.after = capture(self.start, v, opt, sched)
        try:
            yield
        except SystemExit:  # our own one-line error (a full disk, say): said already, nothing more to save
            raise
        except BaseException as e:  # Ctrl-C, a signal or a crash: keep every logged step, drop the cut one
            keep = self.after if self.logged_through() >= self.after["step"] else self.state
            print(f"\n{type(e).__name__} in step {keep['step'] + 1}: saving the state after step {keep['step']} "
                  f"to {args.run_dir} (--resume {args.run_dir} continues from there)")
            restore(keep, v, opt, sched)
            if self.rank == 0:
                save_checkpoint(args.run_dir, model, keep, self.extra)
            raise
        self.after = capture(self.last, v, opt, sched)
        if self.rank == 0:
            save_checkpoint(args.run_dir, model, self.after, self.extra)
            print(final_line(args, self.last, self.first, self.last_metrics, v))

    def within_memory(self, update, samples):
        """update(...) for this step; out of GPU memory: again from the step's start with half the budget."""
        m, self.act_bytes = update_within_memory(update, self.args, self.model, self.opt, self.sched, self.v,
                                                 samples, self.world, self.act_bytes, self.state)
        return m

    def log_step(self, step, m, rewards, samples):
        """GRPO's step: its rewards and tokens added to the trainer's metrics, then finish_step."""
        m.update(reward=sum(rewards) / len(rewards), accuracy=sum(x == 1.0 for x in rewards) / len(rewards),
                 tokens=sum(len(s["logp_vllm"]) for s in samples))
        self.finish_step(step, m)

    def finish_step(self, step, m):
        """The step's metrics (over all ranks), a periodic eval, the metrics line, a periodic checkpoint."""
        args, v = self.args, self.v
        if not torch.isfinite(v.detach().to(tinylora.V_DTYPES[args.v_dtype])).all():  # as the adapter stores it
            self.diverged(step)
        m.update(step=step + 1, epoch=step / self.steps_per_epoch, v_norm=v.norm().item(),
                 dw_kept=tinylora.dw_kept(self.model),
                 peak_gib=torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0)
        m = all_mean(m, self.world, v.device, v)
        if v.numel() <= 64:  # the few trained numbers themselves, step by step
            m["v"] = v.detach().flatten().tolist()
        if self.rank == 0 and getattr(args, "eval_every", 0) and (step + 1) % args.eval_every == 0:
            m.update(self.evaluate())
        self.after = capture(step + 1, v, self.opt, self.sched)  # before the line: once written, it is kept
        if self.rank == 0:
            log(self.metrics_path, m, self.wandb)
            if args.save_every and (step + 1) % args.save_every == 0:
                save_checkpoint(args.run_dir, self.model, self.after, self.extra)
        self.first, self.last_metrics = self.first or m, m

    def diverged(self, step):
        """v went NaN or inf (fp16 holds at most 65504): the state after the last finite step is saved,
        never the diverged v, and the run stops in one line."""
        restore(self.state, self.v, self.opt, self.sched)  # the state at this step's start
        if self.rank == 0:
            save_checkpoint(self.args.run_dir, self.model, self.state, self.extra)
        fail(f"step {step + 1} made v non-finite (NaN or inf in {self.args.v_dtype}): the run diverged; "
             f"{self.args.run_dir} keeps the state after step {step} (--resume diverges again there: a lower --lr "
             f"or a wider --v-dtype is a new run, in another --run-dir)")

    def logged_through(self):
        """The last step in metrics.jsonl (0 if none); rank > 0 writes none and keeps the rollback."""
        steps = [s for s, _ in logged(self.metrics_path)] if self.rank == 0 else []
        return max(steps, default=0)


def evaluate(args, generate, tokenizer, rows, task_name):
    """Greedy pass@1 on the held-out rows, with the policy as it is now."""
    import eval  # the pass@1 loop (eval.py imports this module)
    res = eval.evaluate(lambda p: generate(p, 1, 0.0, args.max_new_tokens), tokenizer, rows, task_name,
                        args.max_new_tokens, max_len=args.max_model_len, prompts=[r["prompt_ids"] for r in rows])
    return {f"eval_{k}": res[k] for k in task.SCORES if res.get(k) is not None}


def final_line(args, steps, first, last, v):
    """The one line a run ends with (GRPO: the reward's first and last step; SFT: the loss's)."""
    f = lambda m, k, fmt: format(m[k], fmt) if m and m.get(k) is not None else "-"
    key, fmt = ("reward", ".3f") if is_grpo(args) else ("loss", ".4f")
    return (f"done: {steps} steps, {key} {f(first, key, fmt)} -> {f(last, key, fmt)}, "
            f"mismatch {f(last, 'mismatch', '.2e')}, dw_kept {f(last, 'dw_kept', '.2f')}, |v| {v.norm().item():.3e}, "
            f"{v.numel()} params ({v.numel() * tinylora.V_DTYPES[args.v_dtype].itemsize} bytes), "
            f"s/step {f(last, 't_step', '.1f')}, adapter {args.run_dir}/adapter.safetensors")


class Plan:
    """How update() runs the samples it trains (per mini-batch) and its probe group: packed into
    micro-batches that fit memory, gradient checkpointing decided, logp_vllm on the trainer's device;
    and the step's trainer metrics."""

    def __init__(self, args, model, samples, trained, probe, act_bytes, device):
        self.samples, self.trained, self.probe, self.device = samples, trained, probe, device
        longest = max((len(s["ids"]) for mb in trained + [probe] for s in mb), default=1)
        self.ckpt, self.micro_tokens = micro_batch_plan(args, model, longest, act_bytes)
        self.packs = [pack(mb, self.micro_tokens) for mb in trained]
        for s in samples:
            s["logp_vllm"] = s["logp_vllm"].to(device)

    def before_update(self):
        """The micro-batches whose logp_old needs a pass before the first update: mini-batches 1..,
        and the probe group."""
        return [m for mb in self.packs[1:] for m in mb] + pack(self.probe, self.micro_tokens)

    def metrics(self, counts, opt, t_logp_old, t_update):
        """The step's trainer metrics: mismatch (mean |logp_old - logp_vllm| over the trained tokens),
        tis_max / tis_capped (the largest importance weight, the share at the cap), clip_frac (over
        the updates after the first), signal (share of samples in groups with an advantage)."""
        seen = [s for mb in self.trained + [self.probe] for s in mb]
        n_tok = sum(len(s["logp_vllm"]) for s in seen)
        diff = torch.cat([s["logp_old"] - s["logp_vllm"] for s in seen]) if seen else torch.zeros(0)
        c = counts.__dict__
        return dict(mismatch=diff.abs().sum().item() / max(n_tok, 1), tis_max=diff.exp().max().item() if n_tok else 1.0,
                    tis_capped=c["capped"] / max(n_tok, 1), clip_frac=c["clipped"] / max(c["can_clip"], 1),
                    grad_norm=c["grad_norm"], skipped=c["skipped"], lr=c.get("lr", opt.param_groups[0]["lr"]),
                    signal=sum(len(mb) for mb in self.trained) / len(self.samples),
                    trained_tokens=n_tok if not self.probe else 0, micro_batches=sum(len(p) for p in self.packs),
                    grad_ckpt=int(self.ckpt), t_logp_old=t_logp_old, t_update=t_update)


class Counts:
    """update()'s counters: clipped / capped tokens, skipped updates, the mean gradient norm, the lr."""

    def __init__(self):
        self.clipped = self.capped = self.can_clip = self.skipped = 0
        self.grad_norm = 0.0

    def micro(self, k, clipped, capped, n):
        self.capped += capped
        if k > 0:  # the first update's ratio is exactly 1: it cannot clip
            self.clipped += clipped
            self.can_clip += n

    def update(self, grad_norm, opt, n_updates):
        self.grad_norm += grad_norm.item() / n_updates
        self.lr = opt.param_groups[0]["lr"]  # the lr this update used


# -----------------------------------------------------------------------------
# setup: data, the policy, the engine


def load_data(args, tok, data, split, need, limit=None):
    """(rows with their prompt ids, rows skipped, task) of a data set; rows whose prompt leaves no room
    to answer within the context are skipped (and counted). Fails unless `need` rows are left."""
    flag = "--data" if split == "train" else "--eval-data"
    try:
        rows, skipped, task_name = task.load_rows(data, split=split, limit=limit)
    except Exception as e:  # unreadable file, not JSON lines, a hub id without a hub
        fail(f"{flag} {data}: {first_line(e)}")
    rows, prompts, long = task.prompts_within(tok, rows, task_name, args.max_model_len)
    if len(rows) < need:
        fail(f"{flag} {data}: {len(rows)} usable rows ({skipped} without a question and answer, {long} with a "
             f"prompt longer than the context {args.max_model_len}), fewer than the {need} needed")
    for r, p in zip(rows, prompts):
        r["prompt_ids"] = p
    return rows, skipped + long, task_name


def refusing(what, hint="", errors=Exception):
    """A context in which an error (of the `errors` types) ends the program with one line, `what:
    <the error> hint`, exit 2: a truncated weights file, NaN weights, an engine that cannot start
    (no traceback for what the user can fix)."""
    return _Refusing(what, hint, errors)


class _Refusing(contextlib.AbstractContextManager):
    def __init__(self, what, hint, errors):
        self.what, self.hint, self.errors = what, hint, errors

    def __exit__(self, kind, e, tb):
        if isinstance(e, self.errors):
            fail(f"{self.what}: {first_line(e)}{self.hint}")


def engine_hint(args):
    """What to change when vLLM cannot start (its memory share, its context)."""
    return f" (--gpu-memory-utilization {args.gpu_memory_utilization}, --max-model-len {args.max_model_len})"


def load_checkpoint(run_dir, model, v, opt, sched):
    try:
        tinylora.load(model, os.path.join(run_dir, "adapter.safetensors"), verbose=False)  # checks the base model
    except ValueError as e:  # e.g. --model names other weights than the run's
        fail(f"--resume {run_dir}: {e}")
    state = torch.load(os.path.join(run_dir, "trainer_state.pt"), weights_only=True, map_location="cpu")
    restore(state, v, opt, sched)


def meta_model(args):
    """The model built on the meta device from its config alone (no weights), in the dtype it will
    be loaded in: names, shapes, sizes."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        config = AutoConfig.from_pretrained(args.model)
        dtype = getattr(config, "dtype", None) or torch.float32 if args.dtype == "auto" else args.dtype
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, str(dtype).removeprefix("torch.")))
    except Exception as e:  # no such directory, a hub id with no hub, an architecture transformers lacks
        fail(f"--model {args.model}: cannot read its config ({first_line(e)})")


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


def check_memory(args, meta, names, longest):
    """Before any weight loads: trainer weights + kept W + dW + vLLM's share + one longest sequence
    (checkpointed) must fit the GPU; otherwise exit with the numbers and what to change."""
    named = dict(meta.named_parameters())
    nbytes = meta.get_input_embeddings().weight.element_size()
    total = torch.cuda.mem_get_info()[1]
    need = {"trainer weights": sum(p.numel() for p in named.values()) * nbytes,
            "kept W + dW": 0 if args.low_memory else sum(named[f"{n}.weight"].numel() for n in names) * nbytes,
            **({"vLLM (--gpu-memory-utilization)": args.gpu_memory_utilization * total}
               if getattr(args, "backend", None) == "vllm" else {}),  # train_sft.py and --backend hf: none
            f"activations of one {longest}-token sequence": longest * activation_bytes(meta.config, nbytes, True)
            + logits_chunk(meta.config.vocab_size) * meta.config.vocab_size * 10,
            "CUDA context and workspaces": 2 * 2**30}
    if sum(need.values()) > total:
        parts = ", ".join(f"{k} {x / 2**30:.1f}" for k, x in need.items())
        fail(f"this GPU has {total / 2**30:.1f} GiB, the run needs {sum(need.values()) / 2**30:.1f} GiB ({parts}). "
             f"Try --low-memory, {'a lower --gpu-memory-utilization or --max-new-tokens, ' if is_grpo(args) else ''}"
             f"or a larger GPU")


def free_for_activations(config):
    """Bytes the trainer may use for activations: 90% of the free device memory once weights and
    engine are in place, minus room for the logits chunks and workspaces."""
    torch.cuda.empty_cache()  # blocks cached by model loading and vLLM's profiling run
    free = torch.cuda.mem_get_info()[0] - logits_chunk(config.vocab_size) * config.vocab_size * 10 - 2**30
    return 0.9 * free


def micro_batch_plan(args, model, longest, act_bytes):
    """(gradient checkpointing on?, padded tokens per micro-batch) for a step whose longest sequence
    has `longest` tokens, given `act_bytes` bytes for activations (None on a CPU)."""
    nbytes = model.get_input_embeddings().weight.element_size()
    per_token = lambda ckpt: activation_bytes(model.config, nbytes, ckpt)
    if args.grad_ckpt == "auto":
        ckpt = act_bytes is not None and longest * per_token(False) > act_bytes
    else:
        ckpt = args.grad_ckpt == "always"
    tokens = args.micro_tokens or (int(act_bytes // per_token(ckpt)) if act_bytes is not None else 8192)
    if ckpt != model.is_gradient_checkpointing:
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    return ckpt, max(tokens, longest)


def pack(samples, micro_tokens):
    """Micro-batches of samples, longest first, each at most `micro_tokens` padded tokens (its size
    times its longest sequence): sorting by length leaves little padding."""
    out = []
    for s in sorted(samples, key=lambda s: -len(s["ids"])):
        if out and (len(out[-1]) + 1) * len(out[-1][0]["ids"]) <= micro_tokens:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def update_within_memory(update, args, model, opt, sched, v, samples, world, act_bytes, state):
    """update(); if the GPU runs out of memory, the step's updates start again from `state` with half
    the activation budget (at most 3 times; not with a fixed --micro-tokens). Returns (metrics, the
    budget that fitted: later steps keep it)."""
    for attempt in range(4):
        try:
            return update(args, model, opt, sched, v, samples, world, act_bytes), act_bytes
        except torch.OutOfMemoryError:
            if attempt == 3 or act_bytes is None or args.micro_tokens:
                raise
            restore(state, v, opt, sched)
            v.grad, act_bytes = None, act_bytes / 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"warning: the trainer ran out of GPU memory; retrying the updates with micro-batches "
                  f"for {act_bytes / 2**30:.1f} GiB of activations")


# -----------------------------------------------------------------------------
# data parallel (torchrun): ranks, the metrics' all-reduce


def rank_world():
    """(rank, world size) under torchrun, (0, 1) otherwise (vLLM may start torch.distributed itself)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_distributed():
    """Started by torchrun: join its process group (NCCL, one GPU per process; gloo on CPUs), True."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def all_mean(m, world, device, v):
    """Combine the step's metrics over ranks (mean; max for tis_max and peak_gib; sum for counts), and
    check that every rank holds exactly the same v (a max and a min over u numbers)."""
    if world == 1:
        return m
    keys = sorted(k for k in m if k not in ("step", "epoch") and m[k] is not None)
    x = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=device)
    mx = x.clone()
    dist.all_reduce(x)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    sums = ("tokens", "trained_tokens", "micro_batches")
    out = {k: mx[i].item() if k in ("tis_max", "peak_gib") else x[i].item() / (1 if k in sums else world)
           for i, k in enumerate(keys)}
    out.update(step=m["step"], epoch=m["epoch"])
    hi, lo = v.detach().clone(), -v.detach()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    if not (torch.equal(hi, v) and torch.equal(-lo, v)):  # ranks diverged: fail loudly, not silently
        raise RuntimeError(f"rank {dist.get_rank()}: ranks hold different v after step {m['step']}")
    return out


# -----------------------------------------------------------------------------
# the script's entry point: signals, a closed stdout, warnings turned into errors


SIGNALS = []  # those received by stop_like_ctrl_c


def stop_like_ctrl_c(signum, frame):
    """Ctrl-C, SIGTERM (kill, a scheduler), SIGHUP (a closed terminal): a KeyboardInterrupt, the
    finished steps saved. Inside an import (vLLM's start imports much lazily) only noted: raised there
    it can abort torch's import or be caught by an import guard and ignored; Run.steps() raises it."""
    SIGNALS.append(signum)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return
        frame = frame.f_back
    raise KeyboardInterrupt


def main(train, parse_args):
    """`python train_grpo.py ...`: train, with Ctrl-C / SIGTERM / SIGHUP saving the finished steps
    (exit 130) and a warning made an error (PYTHONWARNINGS=error) reported in one line."""
    sys.stdout = QuietStdout(sys.stdout)  # before vLLM's logger takes hold of sys.stdout
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop_like_ctrl_c)
    try:
        args = parse_args()
        ddp = start_distributed()
        train(args)
    except KeyboardInterrupt:
        forget_empty_run_dir()
        raise SystemExit(130)  # interrupted, state saved: a non-zero exit stops a script chaining runs
    except Warning as w:  # only raised when the user made warnings errors
        fail(warning_as_error(w))
    if ddp and getattr(args, "backend", "hf") == "hf":  # with vLLM, its engine tears the process groups down at exit
        dist.destroy_process_group()


class QuietStdout:
    """sys.stdout that survives its reader going away (`... | head -1`): the program goes on, and
    what it would have printed goes to /dev/null. Installed before vLLM's logger takes sys.stdout.
    A stdout closed from the start (`>&-`: sys.stdout is None) is /dev/null too, on descriptor 1, so
    that no file this process opens later takes that descriptor (and what C code prints to it)."""

    def __init__(self, stream):
        if stream is None:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            stream = open(1, "w", closefd=False)
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
