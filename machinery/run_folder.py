"""The run folder: new or resumed, locked, its checkpoints and metrics (docs/run-folder.md).

One live process owns a run folder, through a lock that a crash cannot leave behind. It holds args.json
(the options), metrics.jsonl (a line per finished step), adapter.safetensors and trainer_state.pt (the
checkpoint, written atomically, never of a non-finite v). open_run resumes one and refuses a changed
recipe, a damaged checkpoint or another run's files before any model loads. Refusals are
machinery.cli.Refused; the Run says them in one line.
"""
import argparse
import contextlib
import copy
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import time

import torch
import torch.distributed as dist
from safetensors import SafetensorError

import tinylora
from machinery.cli import Refused, first_line
from machinery.options import LOCATIONS, MACHINERY, NOT_SAVED, recipe, trainer_of

RUN_FILES = ("args.json", "metrics.jsonl", "adapter.safetensors", "trainer_state.pt")


# -----------------------------------------------------------------------------
# the lock: one live process per run folder


@dataclasses.dataclass
class Held:
    fd: int  # the descriptor that holds the lock
    made: bool = False  # created by this process, not yet known to hold args.json: a failed start removes it


# The run folders this process holds: real path -> Held. One registry per process on purpose: a flock
# belongs to the process (the OS drops it when the process dies, never before), a second flock of the same
# folder from this process would refuse itself, and a failed start must remove the empty folder it made
# wherever it ends (a Run's one-line error, or Ctrl-C while the weights load, which no Run sees).
HELD = {}


def lock(run_dir, prog, create=False):
    """An exclusive lock on the run directory for the life of this process: the OS drops it when the
    process dies, so a crash cannot leave it behind. Rank 0 holds it for all ranks. prog: the script
    (named when another process holds the folder)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    try:
        made = create and not os.path.exists(run_dir)
        if create:
            os.makedirs(run_dir, exist_ok=True)
        if os.path.realpath(run_dir) not in HELD:
            fd = os.open(run_dir, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            HELD[os.path.realpath(run_dir)] = Held(fd)
        HELD[os.path.realpath(run_dir)].made |= made
    except BlockingIOError:
        raise Refused(f"{run_dir} is in use by another {prog} process; wait for it to end or stop it") from None
    except OSError as e:  # a read-only mount, a path through a file, no locks on this file system
        if made and os.path.isdir(run_dir) and not os.listdir(run_dir):
            os.rmdir(run_dir)  # made just now: a failed start leaves no folder behind
        raise Refused(f"--run-dir {run_dir}: cannot create or open it ({e.strerror})") from None


def forget_empty_run_dir():
    """A start that failed (bad input, Ctrl-C while loading) leaves no empty run folder behind."""
    for d, held in HELD.items():
        if held.made and os.path.isdir(d) and not os.listdir(d):
            os.rmdir(d)
        held.made = False


# -----------------------------------------------------------------------------
# open: a new run folder, or the run --resume names


def open_run(args):
    """(args, first step, checkpoint state or None): a new run directory, or the recipe and checkpoint
    of the one --resume names, locked for this process. Refuses before any model loads: a run dir
    that another process holds, a new run into another run's directory, a recipe option changed on
    resume, a --steps the checkpoint is already past."""
    if not args.resume:
        args.run_dir = args.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
        if os.path.exists(args.run_dir) and not os.path.isdir(args.run_dir):
            raise Refused(f"--run-dir {args.run_dir} is a file, not a directory")
        refuse_model_dir(args.run_dir, args.model)
        found = [f for f in RUN_FILES if os.path.exists(os.path.join(args.run_dir, f))]
        if found:
            raise Refused(f"--run-dir {args.run_dir} holds a run ({', '.join(found)}): "
                          f"--resume {args.run_dir} continues it")
        lock(args.run_dir, trainer_of(vars(args)), create=True)
        for k in LOCATIONS:  # a local path is kept absolute, so --resume works from any directory
            if os.path.exists(getattr(args, k)):
                setattr(args, k, os.path.abspath(getattr(args, k)))
        args.trainer = trainer_of(vars(args))  # args.json names the script that made the run
        return args, 0, None
    if not os.path.isfile(os.path.join(args.resume, "args.json")):
        raise Refused(f"--resume {args.resume}: no args.json there, not a run directory")
    if "run_dir" in args.given and os.path.abspath(args.run_dir) != os.path.abspath(args.resume):
        raise Refused(f"--run-dir {args.run_dir} with --resume {args.resume}: a resumed run stays in its own "
                      f"directory")
    try:
        with open(os.path.join(args.resume, "args.json")) as f:
            saved = json.load(f)
    except ValueError as e:
        raise Refused(f"--resume {args.resume}: args.json is not readable JSON ({e})")
    if not isinstance(saved, dict):
        raise Refused(f"--resume {args.resume}: args.json holds a JSON {type(saved).__name__}, not the run's "
                      f"options")
    this, theirs = trainer_of(vars(args)), trainer_of(saved)
    if theirs != this:  # before the lock, whose message names this script
        raise Refused(f"--resume {args.resume}: a {theirs} run; {theirs} --resume {args.resume} continues it")
    lock(args.resume, this)
    mine = [m for m in MACHINERY if m in args.defaults]  # this script's machinery options
    for k in args.given:
        if k not in MACHINERY + LOCATIONS + ("resume", "run_dir") and getattr(args, k) != saved.get(k, args.defaults[k]):
            raise Refused(f"--{k.replace('_', '-')} {getattr(args, k)}: the run was made with {saved.get(k)}; "
                          f"only {', '.join('--' + m.replace('_', '-') for m in mine)} may change on --resume")
    now = {k: getattr(args, k) for k in args.given if k in MACHINERY + LOCATIONS}  # given again
    args = argparse.Namespace(**{**args.defaults, **saved, **now, "trainer": this, "resume": args.resume,
                                 "run_dir": args.resume, "given": args.given, "defaults": args.defaults})
    for tmp in glob.glob(os.path.join(args.run_dir, "*.tmp")):
        os.remove(tmp)  # left by a write that was killed; the file it was replacing is intact
    path, adapter = (os.path.join(args.run_dir, f) for f in ("trainer_state.pt", "adapter.safetensors"))
    if not os.path.exists(path) and any(s >= 1 for s, _ in logged(os.path.join(args.run_dir, "metrics.jsonl"))):
        raise Refused(f"--resume {args.run_dir}: trainer_state.pt is missing, yet steps are logged: the checkpoint "
                      f"is lost (a new run in another --run-dir starts over)")
    try:  # read both now, before any model loads: a damaged checkpoint is named, not a traceback later
        # map to the CPU: a checkpoint made on a GPU is read on any machine (restore moves it to v)
        state = torch.load(path, weights_only=True, map_location="cpu") if os.path.exists(path) else None
        config = tinylora.read_config(adapter) if state and state["step"] else None
        if config:
            tinylora.read_v(adapter, config)
    except Exception as e:
        raise Refused(f"--resume {args.run_dir}: its checkpoint is damaged ({first_line(e)})")
    step = state["step"] if state else 0
    was, now = state.get("recipe") if state else None, recipe(args)
    edited = [f"{k} {now.get(k)} (the run's: {x})" for k, x in (was or {}).items() if now.get(k, x) != x]
    if edited:  # args.json was edited since the run started
        raise Refused(f"--resume {args.run_dir}: args.json differs from the run's checkpoint: {', '.join(edited)}; "
                      f"put it back (another recipe is another run)")
    theirs = {k: config[k] for k in ("u", "r", "tie", "seed", "v_dtype", "rounding")} if config else {}
    other = [f"{k} {x} (the run's: {getattr(args, k)})" for k, x in theirs.items() if x != getattr(args, k)]
    if other:  # e.g. copied in from another run
        raise Refused(f"--resume {args.run_dir}: adapter.safetensors is not this run's: {', '.join(other)}")
    if args.steps is not None and args.steps < step:
        raise Refused(f"--steps {args.steps}: the checkpoint in {args.run_dir} is already at step {step}")
    return args, step, state


def refuse_model_dir(run_dir, model):
    """A run directory must not be (or hold) a model: its adapter.safetensors would break the model
    for vLLM, which loads every .safetensors file of the directory."""
    if os.path.isdir(model) and os.path.isdir(run_dir) and os.path.samefile(run_dir, model):
        raise Refused(f"--run-dir {run_dir} is the model directory; give the run a folder of its own")
    if os.path.isfile(os.path.join(run_dir, "config.json")):
        raise Refused(f"--run-dir {run_dir} holds a model (config.json); give the run a folder of its own")


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
    (the same command starts it again; the Run's one-line error removes the folder it made)."""
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
            raise Refused(f"could not write the first checkpoint to {run_dir} ({first_line(e)}; {free} KiB free "
                          f"there); nothing of the run is left: the same command starts it again")
        raise Refused(f"could not write the checkpoint of step {state['step']} to {run_dir} ({first_line(e)}; "
                      f"{free} KiB free there); the previous checkpoint there is intact")


def logged(path):
    """(step, line) for each line of a metrics.jsonl; a line cut off by a kill is skipped."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        for line in f:
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
        raise Refused(f"could not write {path} ({e.strerror}); the checkpoint there holds the last saved step")
    if wandb:
        wandb.log({k: x for k, x in m.items() if k != "v"}, step=m["step"])


def load_checkpoint(run_dir, model, v, opt, sched):
    try:
        tinylora.load(model, os.path.join(run_dir, "adapter.safetensors"), verbose=False)  # checks the base model
    except ValueError as e:  # e.g. --model names other weights than the run's
        raise Refused(f"--resume {run_dir}: {e}")
    state = torch.load(os.path.join(run_dir, "trainer_state.pt"), weights_only=True, map_location="cpu")
    restore(state, v, opt, sched)
