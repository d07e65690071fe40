"""The trainers' entry point: signals, a closed stdout, warnings turned into errors.

Ctrl-C, SIGTERM and SIGHUP become a KeyboardInterrupt, which the Run turns into a saved checkpoint
(every finished step kept) and main() into exit code 130.
"""
import os
import signal
import sys

import torch.distributed as dist

from machinery.cli import QuietStdout, fail, warning_as_error
from machinery.distributed import start_distributed
from machinery.run_folder import forget_empty_run_dir

# The signals stop_like_ctrl_c received. Process-wide on purpose: a signal handler is the process's, and
# the signal it notes inside an import is raised later by whichever Run is stepping (Run.steps).
SIGNALS = []


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
        forget_empty_run_dir()
        fail(warning_as_error(w), os.path.basename(sys.argv[0]))  # the script's name, as argparse says it
    if ddp and getattr(args, "backend", "hf") == "hf":  # with vLLM, its engine tears the process groups down at exit
        dist.destroy_process_group()
