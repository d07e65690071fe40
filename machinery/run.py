"""The Run: a training run's bookkeeping around the loop of train_grpo.py and train_sft.py.

Before any weight loads: the options checked, the run folder opened and locked, the data read and
checked, the lr schedule's length, the memory plan. Then `with run.checkpointed(...)`: resume or the
first checkpoint, a metrics line per finished step, periodic eval and checkpoints, and on any way out
(Ctrl-C, SIGTERM, SIGHUP, a crash) the state after the last finished step saved. What the user can fix
ends the program in one line, `<script>: error: ...`, exit 2, with no empty run folder left behind.
"""
import contextlib
import json
import os
import sys

import torch
from tqdm import tqdm

import engine
import eval  # the pass@1 loop of --eval-every (eval.py imports machinery.cli only, never this module)
import task
import tinylora
from machinery import distributed, memory, options, run_folder, script
from machinery.cli import Refused, fail, first_line


class Run:
    """A training run's bookkeeping. Made before any weight loads: the options checked, the run
    directory locked, the data read and checked, the lr schedule's length, the memory plan. Then
    `with run.checkpointed(...)` resumes or writes the first checkpoint, and on any way out (Ctrl-C,
    SIGTERM, SIGHUP, a crash) saves the state after the last finished (= logged) step."""

    def __init__(self, args):
        self.prog = options.trainer_of(vars(args))  # the script whose run this is: its errors say so
        with self.refusals():
            self.setup(args)

    def fail(self, msg):
        """What the user can fix: one line, `<script>: error: <msg>`, exit 2; a start that failed leaves
        no empty run folder behind."""
        run_folder.forget_empty_run_dir()
        fail(msg, self.prog)

    @contextlib.contextmanager
    def refusals(self):
        """Inside, a check's Refused ends the program in one line (self.fail)."""
        try:
            yield
        except Refused as e:
            self.fail(str(e))

    @contextlib.contextmanager
    def refusing(self, what, hint="", errors=Exception):
        """Inside, an error (of the `errors` types) ends the program with one line, `what: <the error>
        hint`, exit 2: a truncated weights file, NaN weights, an engine that cannot start (no traceback
        for what the user can fix)."""
        try:
            yield
        except errors as e:
            self.fail(f"{what}: {first_line(e)}{hint}")

    def setup(self, args):
        """The options checked, the run folder opened, the data read, the schedule, the memory plan."""
        self.rank, self.world = distributed.rank_world()
        self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        args, self.start, state = run_folder.open_run(args)
        options.check_args(args, self.world)
        meta = meta_model(args)
        try:
            names, _ = tinylora.choose_modules(dict(meta.named_modules()), args.u, args.r, args.n_tie, args.tie,
                                               args.targets.split(","), args.v_dtype, args.rounding)
            args.max_model_len = task.context_length(meta.config, args.max_model_len)
        except ValueError as e:
            raise Refused(f"{e} (--u, --r, --n-tie, --tie, --targets, --max-model-len for {args.model})")
        try:
            self.tokenizer = task.load_tokenizer(args.model)
            if getattr(args, "backend", None) == "vllm":
                engine.check_vllm_runs(meta.config)
        except ValueError as e:
            raise Refused(f"--model {args.model}: {e}")
        per_step = args.prompts_per_step if options.is_grpo(args) else args.batch  # rows per step
        self.rows, skipped, self.task_name = load_data(args, self.tokenizer, args.data, "train", per_step)
        # what the checkpoint must match on resume: the rows, the prompts the model sees (tokenizer and chat
        # template included), the dtype the weights load in (bf16 and fp32 copies share a fingerprint)
        self.extra = dict(recipe=options.recipe(args), data=run_folder.data_hash(self.rows),
                          dtype=str(meta.dtype).removeprefix("torch."), prompts=run_folder.prompt_hash(self.rows))
        if state and state.get("data") not in (None, self.extra["data"]):
            raise Refused(f"--data {args.data}: not the rows this run was trained on (other rows, another order, "
                          f"or a --max-model-len that skips others; hash {self.extra['data']}, the run's "
                          f"{state['data']})")
        if state and state.get("prompts") not in (None, self.extra["prompts"]):
            raise Refused(f"--model {args.model}: its tokenizer or chat template makes other prompts than the "
                          f"run's (hash {self.extra['prompts']}, the run's {state['prompts']}); the run's own "
                          f"model continues it")
        if state and state.get("dtype") not in (None, self.extra["dtype"]):
            raise Refused(f"--model {args.model} loads in {self.extra['dtype']}, the run trained in "
                          f"{state['dtype']}: the run's own weights continue it bit-identically")
        if getattr(args, "eval_every", 0):
            self.eval_rows, _, self.eval_task_name = load_data(args, self.tokenizer, args.eval_data, "test", 1,
                                                          args.eval_limit)
        self.steps_per_epoch = len(self.rows) // per_step
        schedule = int(args.epochs * self.steps_per_epoch)  # the lr schedule's length, whatever --steps says
        if schedule < 1:
            raise Refused(f"--epochs {args.epochs} of {self.steps_per_epoch} steps each is less than one step")
        self.last = min(schedule, args.steps or schedule)
        updates = args.prompts_per_step // args.mini_batch if options.is_grpo(args) else 1  # per step
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
            memory.check_memory(args, meta, names, min(args.max_model_len, 512 + getattr(args, "max_new_tokens", 512)))

    def steps(self):
        """The steps to run, with a progress bar; the state at the start of each is kept for a rollback."""
        bar = tqdm(range(self.start, self.last), initial=self.start, total=self.last,
                   desc="grpo" if options.is_grpo(self.args) else "sft", disable=self.rank != 0)
        for step in bar:
            if script.SIGNALS:  # one that came inside an import (stop_like_ctrl_c)
                raise KeyboardInterrupt
            self.state = run_folder.capture(step, self.v, self.opt, self.sched)
            yield step
            m = self.last_metrics
            shown = dict(reward=".3f", mismatch=".1e", loss=".4f", v_norm=".2e")
            bar.set_postfix({k.removesuffix("_norm"): format(m[k], f) for k, f in shown.items() if k in m})

    @contextlib.contextmanager
    def checkpointed(self, model, v, opt, sched, sync, generate):
        """Resume (checkpoint loaded, the engine brought to v) or start (args.json, first checkpoint,
        baseline eval); on any exit, the state after the last logged step is saved."""
        with self.refusals():  # a full disk, a damaged checkpoint: one line, nothing more saved
            args = self.args
            self.model, self.v, self.opt, self.sched = model, v, opt, sched
            self.act_bytes = memory.free_for_activations(model.config) if torch.cuda.is_available() else None
            self.evaluate = lambda: evaluate(args, generate, self.tokenizer, self.eval_rows, self.eval_task_name)
            self.first = self.last_metrics = None
            self.wandb, self.metrics_path = None, os.path.join(args.run_dir, "metrics.jsonl")
            torch.manual_seed(args.seed * 1000 + self.rank)  # the HF backend samples with torch's RNG: per rank
            if self.start:
                run_folder.load_checkpoint(args.run_dir, model, v, opt, sched)
                sync()  # every rank's engine starts from the base weights; bring it to the resumed v
            if self.rank == 0:
                if args.wandb:
                    import wandb
                    self.wandb = wandb
                    wandb.init(project=args.wandb, config=options.recipe(args), resume="allow")
                if args.resume:
                    run_folder.trim_metrics(self.metrics_path, self.start)
                    lines = dict(run_folder.logged(self.metrics_path))
                    if 1 in lines:  # the run's first step, for the final line
                        self.first = json.loads(lines[1])
                    if getattr(args, "eval_every", 0) and self.start == 0 and 0 not in lines:  # stopped in the baseline
                        run_folder.log(self.metrics_path, dict(step=0, **self.evaluate()), self.wandb)
                else:  # written once the weights and the engine are up: a failed start leaves no run behind
                    first = run_folder.capture(0, v, opt, sched)
                    run_folder.save_checkpoint(args.run_dir, model, first, self.extra, args)  # args.json too
                    if getattr(args, "eval_every", 0):
                        run_folder.log(self.metrics_path, dict(step=0, **self.evaluate()), self.wandb)
            self.state = self.after = run_folder.capture(self.start, v, opt, sched)
            try:
                yield
            except (SystemExit, Refused):  # our own one-line error (a full disk, say): nothing more to save
                raise
            except BaseException as e:  # Ctrl-C, a signal or a crash: keep every logged step, drop the cut one
                keep = self.after if self.logged_through() >= self.after["step"] else self.state
                print(f"\n{type(e).__name__} in step {keep['step'] + 1}: saving the state after step {keep['step']} "
                      f"to {args.run_dir} (--resume {args.run_dir} continues from there)")
                run_folder.restore(keep, v, opt, sched)
                if self.rank == 0:
                    run_folder.save_checkpoint(args.run_dir, model, keep, self.extra)
                raise
            self.after = run_folder.capture(self.last, v, opt, sched)
            if self.rank == 0:
                run_folder.save_checkpoint(args.run_dir, model, self.after, self.extra)
                times = [json.loads(line).get("t_step") for s, line in run_folder.logged(self.metrics_path) if s]
                print(final_line(args, self.last, self.first, self.last_metrics, v, times))

    def within_memory(self, update, samples):
        """update(...) for this step; out of GPU memory: again from the step's start with half the budget."""
        m, self.act_bytes = memory.update_within_memory(update, self.args, self.model, self.opt, self.sched,
                                                        self.v, samples, self.world, self.act_bytes, self.state)
        return m

    def log_step(self, step, m, rewards, samples):
        """GRPO's step: its rewards and tokens added to the trainer's metrics, then finish_step."""
        m.update(reward=sum(rewards) / len(rewards), accuracy=sum(x == 1.0 for x in rewards) / len(rewards),
                 tokens=sum(len(s.logp_vllm) for s in samples))
        self.finish_step(step, m)

    def finish_step(self, step, m):
        """The step's metrics (over all ranks), a periodic eval, the metrics line, a periodic checkpoint."""
        args, v = self.args, self.v
        if not torch.isfinite(v.detach().to(tinylora.V_DTYPES[args.v_dtype])).all():  # as the adapter stores it
            self.diverged(step)
        m.update(step=step + 1, epoch=step / self.steps_per_epoch, v_norm=v.norm().item(),
                 dw_kept=tinylora.dw_kept(self.model),
                 peak_gib=torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0)
        m = distributed.all_mean(m, self.world, v.device, v)
        if v.numel() <= 64:  # the few trained numbers themselves, step by step
            m["v"] = v.detach().flatten().tolist()
        if self.rank == 0 and getattr(args, "eval_every", 0) and (step + 1) % args.eval_every == 0:
            m.update(self.evaluate())
        self.after = run_folder.capture(step + 1, v, self.opt, self.sched)  # before the line: once written, kept
        if self.rank == 0:
            run_folder.log(self.metrics_path, m, self.wandb)
            if args.save_every and (step + 1) % args.save_every == 0:
                run_folder.save_checkpoint(args.run_dir, self.model, self.after, self.extra)
        self.first, self.last_metrics = self.first or m, m

    def diverged(self, step):
        """v went NaN or inf (fp16 holds at most 65504): the state after the last finite step is saved,
        never the diverged v, and the run stops in one line."""
        run_folder.restore(self.state, self.v, self.opt, self.sched)  # the state at this step's start
        if self.rank == 0:
            run_folder.save_checkpoint(self.args.run_dir, self.model, self.state, self.extra)
        self.fail(f"step {step + 1} made v non-finite (NaN or inf in {self.args.v_dtype}): the run diverged; "
                  f"{self.args.run_dir} keeps the state after step {step} (--resume diverges again there: a lower "
                  f"--lr or a wider --v-dtype is a new run, in another --run-dir)")

    def logged_through(self):
        """The last step in metrics.jsonl (0 if none); rank > 0 writes none and keeps the rollback."""
        steps = [s for s, _ in run_folder.logged(self.metrics_path)] if self.rank == 0 else []
        return max(steps, default=0)


def evaluate(args, generate, tokenizer, rows, task_name):
    """Greedy pass@1 on the held-out rows, with the policy as it is now."""
    res = eval.evaluate(lambda p: generate(p, 1, 0.0, args.max_new_tokens), tokenizer, rows, task_name,
                        args.max_new_tokens, max_len=args.max_model_len, prompts=[r["prompt_ids"] for r in rows])
    return {f"eval_{k}": res[k] for k in task.SCORES if res.get(k) is not None}


def final_line(args, steps, first, last, v, times=()):
    """The one line a run ends with (GRPO: the reward's first and last step; SFT: the loss's; s/step: the
    mean step time over the run's logged steps, those before a --resume included)."""
    f = lambda m, k, fmt: format(m[k], fmt) if m and m.get(k) is not None else "-"
    key, fmt = ("reward", ".3f") if options.is_grpo(args) else ("loss", ".4f")
    times = [t for t in times if t is not None]
    per_step = f"{sum(times) / len(times):.1f}" if times else "-"
    return (f"done: {steps} steps, {key} {f(first, key, fmt)} -> {f(last, key, fmt)}, "
            f"mismatch {f(last, 'mismatch', '.2e')}, dw_kept {f(last, 'dw_kept', '.2f')}, |v| {v.norm().item():.3e}, "
            f"{v.numel()} params ({v.numel() * tinylora.V_DTYPES[args.v_dtype].itemsize} bytes), "
            f"s/step {per_step}, adapter {args.run_dir}/adapter.safetensors")


# -----------------------------------------------------------------------------
# setup: data, the model's shapes, the engine's hint


def load_data(args, tok, data, split, need, limit=None):
    """(rows with their prompt ids, rows skipped, task) of a data set; rows whose prompt leaves no room
    to answer within the context are skipped (and counted). Fails unless `need` rows are left."""
    flag = "--data" if split == "train" else "--eval-data"
    try:
        rows, skipped, task_name = task.load_rows(data, split=split, limit=limit)
    except Exception as e:  # unreadable file, not JSON lines, a hub id without a hub
        raise Refused(f"{flag} {data}: {first_line(e)}")
    rows, prompts, long = task.prompts_within(tok, rows, task_name, args.max_model_len)
    if len(rows) < need:
        raise Refused(f"{flag} {data}: {len(rows)} usable rows ({skipped} without a question and answer, {long} "
                      f"with a prompt longer than the context {args.max_model_len}), fewer than the {need} needed")
    for r, p in zip(rows, prompts):
        r["prompt_ids"] = p
    return rows, skipped + long, task_name


def engine_hint(args):
    """What to change when vLLM cannot start (its memory share, its context)."""
    return f" (--gpu-memory-utilization {args.gpu_memory_utilization}, --max-model-len {args.max_model_len})"


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
        raise Refused(f"--model {args.model}: cannot read its config ({first_line(e)})")
