"""What every script here shares on the command line (train_grpo.py, train_sft.py, eval.py, tools/).

Refused is what a check raises when the user can fix the cause (bad input, a full disk, a run folder in
use): the script says it in one line, `<script>: error: <what>`, and exits with code 2, as argparse
does; no traceback. first_line picks the informative line of another library's exception;
QuietStdout keeps a script alive when its reader goes away (`... | head -1`).
"""
import os
import sys

from tqdm import tqdm


class Refused(Exception):
    """What the user can fix (its message, one line). The checks raise it; the Run, or a tool, says it
    with fail() under its own script's name."""


def fail(msg, prog):
    """Bad input: one line on stderr, exit code 2 (as argparse does). prog: the script speaking."""
    for bar in list(getattr(tqdm, "_instances", ())):  # a progress bar ends its line first
        bar.close()
    print(f"{prog}: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


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
