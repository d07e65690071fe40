"""Learning curves of train_grpo.py runs, from their metrics.jsonl, as one PNG of three panels.

Per run: the training reward (10-step mean, and per step, faint); held-out greedy pass@1 from the
eval lines (eval_strict, eval_flexible, and eval_math_verify where the metrics have it); dw_kept
(how much of dW survives bf16 rounding in the engine's weights). Needs matplotlib.

    python tools/plot.py runs/u13 runs/u1-ntie1 --out curve.png
"""
import argparse
import json
import os

EVALS = {"eval_strict": ("o-", 1.0), "eval_flexible": ("s--", 0.5), "eval_math_verify": ("^:", 0.7)}


def plot(runs, out):
    """Draw the runs' curves into the PNG out; returns the figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        train = [r for r in rows if "reward" in r]
        label = os.path.basename(run.rstrip("/"))
        steps, reward = [r["step"] for r in train], [r["reward"] for r in train]
        mean = [sum(reward[max(0, i - 9):i + 1]) / len(reward[max(0, i - 9):i + 1])
                for i in range(len(reward))]
        color = left.plot(steps, mean, label=label)[0].get_color()
        left.plot(steps, reward, color=color, alpha=0.2, linewidth=0.8)
        for key, (style, alpha) in EVALS.items():
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                mid.plot(*zip(*points), style, color=color, alpha=alpha)  # run by color, as on the left
        right.plot(steps, [r.get("dw_kept") for r in train], color=color, label=label)
    left.set(xlabel="GRPO step", ylabel="training reward", title="training reward (10-step mean)")
    mid.set(xlabel="GRPO step", ylabel="greedy pass@1", title="held-out greedy pass@1", ylim=(0, 1))
    right.set(xlabel="GRPO step", ylabel="<W' - W, dW> / |dW|^2",
              title="dw_kept: dW surviving bf16 rounding", ylim=(0, 1.1))
    for ax in (left, right):
        ax.legend(fontsize=7)
    mid.legend([Line2D([], [], linestyle=style[1:], marker=style[0], color="gray", alpha=alpha)
                for style, alpha in EVALS.values()],
               [key[5:].replace("_", "-") for key in EVALS], fontsize=7, title="score", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return fig


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (each with a metrics.jsonl)")
    p.add_argument("--out", default="curve.png", help="the PNG to write")
    args = p.parse_args()
    plot(args.runs, args.out)
