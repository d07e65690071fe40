"""Learning curves of train_grpo.py and train_sft.py runs, from their metrics.jsonl, as one PNG of panels.

Per run: the training reward of GRPO, the training loss of SFT (10-step mean, and per step, faint);
held-out greedy pass@1 from the eval lines (eval_strict, eval_flexible, and eval_math_verify where the
metrics have it); dw_kept (how much of dW survives bf16 rounding in the engine's weights). A panel is
drawn where some run's metrics have its key (an SFT run alone: loss and dw_kept); metrics with none of
them are refused. Needs matplotlib.

    python tools/plot.py runs/u13 runs/u1-ntie1 --out curve.png

A run is its folder or its metrics.jsonl. A line that does not parse (the last one of a run still
writing, or killed mid-line) is skipped, as train_grpo.py skips it. --out ends in .png, .pdf or .svg
(the format), in a folder that exists, and is never one of the inputs; it is written whole or not
at all (a temp file renamed), replacing an earlier plot of that name. Bad input (a run without
metrics, an --out like the above) is one line and exit code 2, before anything is drawn; Ctrl-C
one line and exit code 130.
"""
import argparse
import json
import os
import signal
import sys

EVALS = {"eval_strict": ("o-", 1.0), "eval_flexible": ("s--", 0.5), "eval_math_verify": ("^:", 0.7)}
FORMATS = (".png", ".pdf", ".svg")
PANELS = {  # a panel per key that some run's metrics have: title, y label, y range
    "reward": ("training reward (10-step mean)", "training reward", None),  # train_grpo.py's
    "loss": ("training loss (10-step mean)", "cross-entropy per answer token", None),  # train_sft.py's
    "eval": ("held-out greedy pass@1", "greedy pass@1", (0, 1)),  # train_grpo.py's --eval-every
    "dw_kept": ("dw_kept: dW surviving bf16 rounding", "<W' - W, dW> / |dW|^2", (0, 1.1)),
}


def metrics_path(run):
    """A run folder's metrics.jsonl, or the file itself if given."""
    return run if os.path.isfile(run) else os.path.join(run, "metrics.jsonl")


def read(run):
    """(label, rows) of a run: the lines of its metrics.jsonl that parse as a step's JSON object.
    ValueError if there is none."""
    path = metrics_path(run)
    if not os.path.isfile(path):
        raise ValueError(f"{run}: no metrics.jsonl there (give a train_grpo.py or train_sft.py run folder "
                         "or its metrics.jsonl)")
    rows = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # cut off by a kill, or still being written
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no metrics lines yet")
    return os.path.basename(os.path.dirname(os.path.abspath(path))), rows


def panels(runs):
    """The PANELS that some run's metrics have a key of, in order. ValueError if none."""
    keys = [k for k in PANELS if any(k in r or k == "eval" and EVALS.keys() & r.keys() for _, rows in runs
                                     for r in rows)]
    if not keys:
        raise ValueError(f"{', '.join(label for label, _ in runs)}: the metrics hold none of reward, loss, "
                         f"{', '.join(EVALS)}, dw_kept: nothing to plot")
    return keys


def plot(runs, out):
    """Draw the runs' curves into the file out (.png, .pdf or .svg); returns the figure."""
    runs = [read(run) for run in runs]  # first: bad input is said before matplotlib loads
    keys = panels(runs)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    ax = dict(zip(keys, axes[0]))
    for i, (label, rows) in enumerate(runs):
        color = f"C{i}"  # a run's color, the same in every panel
        for key in ("reward", "loss"):
            train = [r for r in rows if key in r]
            if key in ax and train:
                steps, y = [r["step"] for r in train], [r[key] for r in train]
                mean = [sum(y[max(0, j - 9):j + 1]) / len(y[max(0, j - 9):j + 1]) for j in range(len(y))]
                ax[key].plot(steps, mean, color=color, label=label)
                ax[key].plot(steps, y, color=color, alpha=0.2, linewidth=0.8)
        for key, (style, alpha) in EVALS.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax["eval"].plot(*zip(*points), style, color=color, alpha=alpha)  # run by color, as on the left
        points = [(r["step"], r["dw_kept"]) for r in rows if "dw_kept" in r]
        if points:
            ax["dw_kept"].plot(*zip(*points), color=color, label=label)
    for key, a in ax.items():
        title, ylabel, ylim = PANELS[key]
        a.set(xlabel="step", ylabel=ylabel, title=title, ylim=ylim)
        if key != "eval":
            a.legend(fontsize=7)
    if "eval" in ax:
        ax["eval"].legend([Line2D([], [], linestyle=style[1:], marker=style[0], color="gray", alpha=alpha)
                           for style, alpha in EVALS.values()],
                          [key[5:].replace("_", "-") for key in EVALS], fontsize=7, title="score", title_fontsize=7)
    fig.tight_layout()
    tmp = os.path.join(os.path.dirname(out), f".plot-{os.getpid()}.tmp")
    try:  # whole or not at all: an interrupted save leaves no half-written plot
        with open(tmp, "wb") as f:
            fig.savefig(f, format=os.path.splitext(out)[1][1:].lower(), dpi=110)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    print(f"wrote {out}")
    return fig


def check_out(out, runs):
    """Why --out cannot be written, or None."""
    folder = os.path.dirname(out) or "."
    if os.path.isdir(out):
        return f"--out {out} is a folder: name a file in it, e.g. {os.path.join(out, 'curve.png')}"
    if os.path.splitext(out)[1].lower() not in FORMATS:
        return f"--out {out}: name a .png, .pdf or .svg file (the extension is the format)"
    if not os.path.isdir(folder):
        return f"--out {out}: no folder {folder} (make it first)"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"--out {out}: {folder} cannot be written (read-only or no permission)"
    if any(os.path.exists(out) and os.path.samefile(out, metrics_path(run)) for run in runs):
        return f"--out {out} is one of the inputs: choose another name"
    return None


def interrupted(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill), SIGHUP (a closed terminal): as Ctrl-C


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="train_grpo.py or train_sft.py run folders (or their metrics.jsonl)")
    p.add_argument("--out", default="curve.png", help="the .png, .pdf or .svg to write (curve.png)")
    args = p.parse_args(argv)
    try:
        for run in args.runs:  # the runs, then --out, all before matplotlib loads
            read(run)
        problem = check_out(args.out, args.runs)
        if problem:
            raise ValueError(problem)
        plot(args.runs, args.out)
    except ValueError as e:
        print(f"plot.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt:
        print(f"plot.py: interrupted; {args.out} not written", file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    main()
