"""RL against SFT at the same budget: the table and the figure, from the committed completions.

Reads the GSM8K test completions (1,319 rows each, with their three scores) of the SFT runs here
(test/*.jsonl.gz, named <budget>-lr<lr>-seed<s> or sel-<budget>-lr<lr> for seed 0; each learning
rate its own row), of GRPO runs named so with a grpo- in front (rest.sh's), and of the one-epoch
GRPO runs in ../qwen-coder-1.5b (p1, p13-seed0, p13-seed1, p196, p2548 at lr 1e-4, base); prints a
markdown table (mean over seeds, min..max across seeds, and GRPO at 1e-4 - SFT paired per problem on
seed-averaged correctness, +- one standard error) and draws budget_curve.png. Needs matplotlib.

    python results/sft-vs-rl/analyze.py
"""
import glob
import gzip
import json
import math
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
GRPO = os.path.join(HERE, "..", "qwen-coder-1.5b")
COLS = ("strict", "flexible", "math_verify")
BUDGETS = {"p1": 1, "p13": 13, "p196": 196, "p2548": 2548, "p12544": 12544}
CURVES = {("GRPO", "1e-4"): "o-", ("SFT", "1e-3"): "s-.", ("SFT", "3e-3"): "^:"}  # (method, lr): line style


def scores(path):
    """{id: {column: 0/1}} of a completions file."""
    with gzip.open(path, "rt") as f:
        return {r["id"]: {k: float(bool(r[k])) for k in COLS} for r in map(json.loads, f)}


def runs():
    """{(method, budget, lr): [scores of each seed]}: SFT at each learning rate apart."""
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, "test", "*.jsonl.gz"))):
        m = re.match(r"(grpo-)?(?:sel-)?(p\d+)-lr([0-9e.-]+)(?:-seed\d+)?\.jsonl\.gz", os.path.basename(path))
        method = "GRPO" if m.group(1) else "SFT"
        out.setdefault((method, BUDGETS[m.group(2)], m.group(3)), []).append(scores(path))
    for name, budget in (("p1", 1), ("p13-seed0", 13), ("p13-seed1", 13), ("p196", 196), ("p2548", 2548)):
        out.setdefault(("GRPO", budget, "1e-4"), []).append(scores(os.path.join(GRPO, name, "eval_gsm8k.jsonl.gz")))
    return out


def chosen(summary, prefix, column="strict"):
    """The protocol's choice, {budget: lr}, from eval_many's selection summary.jsonl: per budget the lr
    of the best <prefix><budget>-lr<lr> row by strict, math-verify breaking ties (prefix sel- for SFT's
    30-step runs, ep1-sel- for its one-epoch runs, grpo-sel- for GRPO); column="math_verify": what
    math-verify alone would choose (strict breaking ties). rest.sh and one_epoch.sh call it; protocol.sh
    and finish.sh ran the strict rule inline."""
    other = {"strict": "math_verify", "math_verify": "strict"}[column]
    best = {}
    with open(summary) as f:
        for r in map(json.loads, f):
            m = re.fullmatch(re.escape(prefix) + r"(p\d+)-lr(.+)", r["name"])
            if m and (m[1] not in best or (r[column], r[other]) > best[m[1]][0]):
                best[m[1]] = ((r[column], r[other]), m[2])
    return {b: lr for b, (_, lr) in best.items()}


def mean_over_seeds(seeds, col):
    """Per problem: the share of seeds that got it right."""
    return {i: sum(s[i][col] for s in seeds) / len(seeds) for i in seeds[0]}


def paired(a, b):
    """mean(a - b) and its standard error over problems (a, b: {id: value})."""
    d = [a[i] - b[i] for i in a]
    mu = sum(d) / len(d)
    return mu, math.sqrt(sum((x - mu) ** 2 for x in d) / (len(d) - 1) / len(d))


def accuracy(seeds, col):
    """Per seed: % correct in one column."""
    return [100 * sum(s[i][col] for i in s) / len(s) for s in seeds]


def table(out, base):
    print("| method | params | lr | seeds | strict | flexible | math-verify | GRPO - SFT, paired: strict / math-verify |")
    print("|---|---|---|---|---|---|---|---|")
    for key in sorted(out, key=lambda k: (k[1], k[0] == "SFT", float(k[2]))):
        method, budget, lr = key
        seeds, cells = out[key], []
        for col in COLS:
            acc = accuracy(seeds, col)
            spread = f" ({min(acc):.1f}..{max(acc):.1f})" if len(acc) > 1 else ""
            cells.append(f"{sum(acc) / len(acc):.1f}{spread}")
        diff = ""
        grpo = out.get(("GRPO", budget, "1e-4"))
        if method == "SFT" and grpo:
            d = [paired(mean_over_seeds(grpo, c), mean_over_seeds(seeds, c)) for c in ("strict", "math_verify")]
            diff = " / ".join(f"{100 * mu:+.1f} +- {100 * se:.1f}" for mu, se in d)
        print(f"| {method} | {budget:,} | {lr} | {len(seeds)} | {' | '.join(cells)} | {diff} |")
    acc = {c: 100 * sum(base[i][c] for i in base) / len(base) for c in COLS}
    print(f"| base | 0 | | | {acc['strict']:.1f} | {acc['flexible']:.1f} | {acc['math_verify']:.1f} | |")


def figure(out, base, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, title in zip(axes, ("strict", "math_verify"), ("GSM8K strict (the paper's metric)",
                                                                 "GSM8K math-verify")):
        styles = iter(["v--", "D-", "x:", "*-."])  # for (method, lr) pairs not in CURVES
        for method, lr in sorted({(m, r) for m, _, r in out}, key=lambda k: (k[0], float(k[1]))):
            style = CURVES.get((method, lr)) or next(styles)
            budgets = sorted(b for m, b, r in out if (m, r) == (method, lr))
            accs = [accuracy(out[(method, b, lr)], col) for b in budgets]
            mean = [sum(a) / len(a) for a in accs]
            err = [[m - min(a) for m, a in zip(mean, accs)], [max(a) - m for m, a in zip(mean, accs)]]
            seeds = "/".join(sorted({str(len(a)) for a in accs}))
            seeds += " seed" if seeds == "1" else " seeds"
            ax.errorbar(budgets, mean, yerr=err, fmt=style, capsize=3, label=f"{method}, lr {lr} ({seeds})")
        ax.axhline(100 * sum(base[i][col] for i in base) / len(base), color="gray", linestyle="--", label="base")
        ax.set(xscale="log", xlabel="trained parameters", ylabel="greedy pass@1 (%)", title=title, ylim=(0, 70))
        ax.legend(fontsize=8)
    fig.suptitle("Qwen2.5-Coder-1.5B-Instruct, TinyLoRA: GRPO (one epoch) vs SFT (30 steps); bars: seeds' range; "
                 "SFT lr 3e-3 is the selection set's choice by strict",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    out = runs()
    base = scores(os.path.join(GRPO, "base", "eval_gsm8k.jsonl.gz"))
    table(out, base)
    figure(out, base, os.path.join(HERE, "budget_curve.png"))
    print(f"wrote {os.path.join(HERE, 'budget_curve.png')}")
