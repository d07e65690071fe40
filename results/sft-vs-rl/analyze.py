"""RL against SFT at the same budget: the table and the figure, from the committed completions.

Reads the GSM8K test completions (1,319 rows each, with their three scores) of the SFT runs here
(test/*.jsonl.gz, named <budget>-lr<lr>-seed<s> or sel-<budget>-lr<lr> for seed 0; each learning
rate its own row), of GRPO runs named so with a grpo- in front (rest.sh's grpo-more: the recipe of the
one-epoch GRPO runs in ../qwen-coder-1.5b, p1, p13-seed0, p13-seed1, p196, p2548 at lr 1e-4, base, and
read with them) or grpo-ep1- (rest.sh's grpo-seeds: one epoch of the fit set, a row of its own); prints a
markdown table (mean over seeds, min..max across seeds, and GRPO at 1e-4 - SFT paired per problem on
seed-averaged correctness, +- one standard error; beside each row the share of completions that carry
"#### N" and math-verify's accuracy among them: how much of a strict gap is the format) and the
selection set's scores per lr (GRPO's too once rest.sh's grpo-select has run: its grpo-sel- runs are
cut short, so they choose the lr of the grpo-ep1- rows and are never tested themselves; the GRPO rows'
lr, 1e-4, was fixed, and their "chosen by" names the rule's choice at their budget), and draws
budget_curve.png. SFT's runs of one epoch (one_epoch.sh's, named ep1-...) and of 30 steps are
separate rows. Needs matplotlib. A file it cannot read rightly (a name in test/ other than those
above and summary.jsonl, grpo-sel- ones included; a cut .gz, a completions file without 1,319 rows
or without a column, a missing or damaged select/summary.jsonl) ends it in one line naming the
file, exit code 1.

    python results/sft-vs-rl/analyze.py
"""
import glob
import gzip
import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
GRPO = os.path.join(HERE, "..", "qwen-coder-1.5b")
COLS = ("strict", "flexible", "math_verify")
BUDGETS = {"p1": 1, "p13": 13, "p196": 196, "p2548": 2548, "p12544": 12544}
SFT_EPOCH, SFT_30 = "SFT, 1 epoch", "SFT, 30 steps"  # one epoch of the fit set; 0.28 of one
GRPO_FIT = "GRPO, 1 epoch of the fit set"  # one-epoch schedule, no selection rows: not pooled with GRPO's
ROWS = 1319  # the GSM8K test set: every completions file holds each of its rows once
GRPO_SEL = "GRPO, runs cut short (rest.sh's GSTEPS steps of the one-epoch schedule)"  # grpo-select: never tested
NAME = re.compile(r"(grpo-ep1-|grpo-(?!sel-)|ep1-)?(?:sel-)?(" + "|".join(BUDGETS) + r")-lr([0-9e.-]+)(?:-seed\d+)?\.jsonl\.gz")


class Bad(ValueError):
    """A results file that cannot be read rightly: one line naming it, exit code 1 (__main__)."""


def scores(path):
    """{id: {column: 0/1}} of a completions file; "formatted": the completion carries "#### N" where the
    paper's reward reads it (eval.py's "extracted": the strict rule's answer, right or wrong)."""
    try:
        with gzip.open(path, "rt") as f:
            rows = [json.loads(line) for line in f]
        out = {r["id"]: {**{k: float(bool(r[k])) for k in COLS}, "formatted": float(r["extracted"] is not None)}
               for r in rows}
    except KeyError as e:
        raise Bad(f"{path}: a row without the column {e}") from None
    except (OSError, EOFError, ValueError, TypeError) as e:  # missing, cut, not gzip, not JSON lines
        raise Bad(f"{path}: cannot be read ({e})") from None
    if len(rows) != ROWS or len(out) != ROWS:
        raise Bad(f"{path}: {len(rows)} rows ({len(out)} ids), not the {ROWS} of the GSM8K test: a partial file?")
    return out


def read_summary(path):
    """The rows of an eval_many summary.jsonl, each with its name, data and score columns."""
    try:
        with open(path) as f:
            rows = [json.loads(line) for line in f]
    except (OSError, ValueError) as e:
        raise Bad(f"{path}: cannot be read ({e})") from None
    for i, r in enumerate(rows, 1):
        if not (isinstance(r, dict) and {"name", "data", *COLS} <= r.keys()):
            raise Bad(f"{path}: line {i} is not an eval_many summary line (name, data, {', '.join(COLS)})")
    return rows


def runs():
    """{(method, budget, lr): [scores of each seed]}: each learning rate and training length apart. SFT's
    one-epoch runs are named ep1-..., its 30-step runs (0.28 epoch) have no prefix."""
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, "test", "*"))):
        if os.path.basename(path) == "summary.jsonl":  # eval_many's, beside the completions
            continue
        m = NAME.fullmatch(os.path.basename(path))
        if not m:
            raise Bad(f"{path}: not a completions file analyze.py reads ([grpo-|grpo-ep1-|ep1-][sel-]<budget>-lr<lr>[-seed<s>]"
                      f".jsonl.gz, budget one of {', '.join(BUDGETS)}); move it away")
        method = {"grpo-": "GRPO", "grpo-ep1-": GRPO_FIT, "ep1-": SFT_EPOCH}.get(m.group(1), SFT_30)
        out.setdefault((method, BUDGETS[m.group(2)], m.group(3)), []).append(scores(path))
    for name, budget in (("p1", 1), ("p13-seed0", 13), ("p13-seed1", 13), ("p196", 196), ("p2548", 2548)):
        out.setdefault(("GRPO", budget, "1e-4"), []).append(scores(os.path.join(GRPO, name, "eval_gsm8k.jsonl.gz")))
    return out


def chosen(summary, prefix, column="strict"):
    """The protocol's choice, {budget: lr}, from eval_many's selection summary.jsonl: per budget the lr
    of the best <prefix><budget>-lr<lr> row by strict, math-verify breaking ties (prefix sel- for SFT's
    30-step runs, ep1-sel- for its one-epoch runs, grpo-sel- for GRPO); column="math_verify": what
    math-verify alone would choose (strict breaking ties). rest.sh and one_epoch.sh call it; protocol.sh
    and finish.sh ran the strict rule inline. ValueError (Bad) if the rows it matches were scored on more
    than one data file (by file name): a test-set line must never choose an lr."""
    other = {"strict": "math_verify", "math_verify": "strict"}[column]
    rows = selected(summary, prefix)
    data = {os.path.basename(r["data"]) for r in rows.values()}
    if len(data) > 1:
        raise Bad(f"{summary}: its {prefix} rows were scored on {len(data)} data files ({', '.join(sorted(data))}); "
                  f"the lr is chosen on one selection set")
    best = {}
    for (b, lr), r in rows.items():  # in the summary's order: the first of equals stays
        if b not in best or (r[column], r[other]) > best[b][0]:
            best[b] = ((r[column], r[other]), lr)
    return {b: lr for b, (_, lr) in best.items()}


def selected(summary, prefix):
    """{(budget name, lr): row} of the summary's <prefix><budget>-lr<lr> rows, in its order (a name scored
    twice: its last row)."""
    pattern = re.compile(re.escape(prefix) + r"(" + "|".join(BUDGETS) + r")-lr(.+)")
    return {(m[1], m[2]): r for r in read_summary(summary) if (m := pattern.fullmatch(r["name"]))}


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


def among_formatted(seeds):
    """Per seed that wrote any: math-verify's % correct among the completions that carry "#### N"."""
    return [100 * sum(s[i]["math_verify"] for i in s if s[i]["formatted"]) / sum(s[i]["formatted"] for i in s)
            for s in seeds if any(s[i]["formatted"] for i in s)]


def choices():
    """{(method, budget, lr): "strict" | "math-verify" | "both"}: which column's selection rule chose it
    (reads select/summary.jsonl)."""
    out = {}
    summary = os.path.join(HERE, "select", "summary.jsonl")
    for method, prefix in ((SFT_30, "sel-"), (SFT_EPOCH, "ep1-sel-"), (GRPO_FIT, "grpo-sel-")):
        for col, name in (("strict", "strict"), ("math_verify", "math-verify")):
            for b, lr in chosen(summary, prefix, col).items():
                key = (method, BUDGETS[b], lr)
                out[key] = "both" if key in out else name
    return out


def picked(chose, method):
    """{budget: lr} strict's rule chose for one method, from choices(): for GRPO_FIT the grpo-sel- rows'
    choice ({} before rest.sh's grpo-select has run; the GRPO rows' lr, 1e-4, was fixed, not chosen)."""
    return {k[1]: k[2] for k, by in chose.items() if k[0] == method and by in ("strict", "both")}


def cell(values):
    """mean (min..max) over seeds; - for none."""
    if not values:
        return "-"
    spread = f" ({min(values):.1f}..{max(values):.1f})" if len(values) > 1 else ""
    return f"{sum(values) / len(values):.1f}{spread}"


def table(out, base, chose):
    print("| method | params | lr | chosen by | seeds | strict | flexible | math-verify | carries `####` | "
          "math-verify among them | GRPO - SFT, paired: strict / math-verify |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    order = {"GRPO": 0, GRPO_FIT: 1, SFT_EPOCH: 2, SFT_30: 3}
    rule = picked(chose, GRPO_FIT)
    for key in sorted(out, key=lambda k: (k[1], order[k[0]], float(k[2]))):
        method, budget, lr = key
        seeds = out[key]
        cells = [cell(accuracy(seeds, col)) for col in (*COLS, "formatted")] + [cell(among_formatted(seeds))]
        diff = ""
        grpo = out.get(("GRPO", budget, "1e-4"))
        if method in (SFT_EPOCH, SFT_30) and grpo:
            d = [paired(mean_over_seeds(grpo, c), mean_over_seeds(seeds, c)) for c in ("strict", "math_verify")]
            diff = " / ".join(f"{100 * mu:+.1f} +- {100 * se:.1f}" for mu, se in d)
        by = chose.get(key, "")
        if method == "GRPO":  # fixed at 1e-4; where the selection set has scored GRPO, its choice beside it
            by = f"none (the rule: {rule[budget]})" if budget in rule else "none"
        print(f"| {method} | {budget:,} | {lr} | {by} | {len(seeds)} | {' | '.join(cells)} | {diff} |")
    row = [cell(accuracy([base], col)) for col in (*COLS, "formatted")] + [cell(among_formatted([base]))]
    print(f"| base | 0 | | | | {' | '.join(row)} | |")


def curve(out, method, chose):
    """{budget: seeds} of one method's curve: GRPO at lr 1e-4, the others at the lr strict's rule chose per
    budget."""
    lrs = picked(chose, method)
    return {k[1]: out[k] for k in out if k[0] == method and k[2] == ("1e-4" if method == "GRPO" else lrs.get(k[1]))}


def winner(grpo, sft, col):
    """Who is ahead in one column: the paired difference (seed-averaged per problem) beyond two standard
    errors and, with two or more seeds on each side, the seeds' ranges apart; else "no winner". With one
    seed on a side the spread across seeds is unknown: the name with "(1 seed)"."""
    mu, se = paired(mean_over_seeds(grpo, col), mean_over_seeds(sft, col))
    if abs(mu) <= 2 * se:
        return "no winner"
    (hi, lo), name = ((grpo, sft), "GRPO") if mu > 0 else ((sft, grpo), "SFT")
    if min(len(grpo), len(sft)) < 2:
        return f"{name} (1 seed)"
    return name if min(accuracy(hi, col)) > max(accuracy(lo, col)) else "no winner (the seeds overlap)"


def reach(curves, base, col, share=0.9):
    """Per method: the smallest budget whose mean gain over the base model reaches share x the best gain of
    any method at any budget, or "-" (and its best share of it)."""
    gain = {m: {b: sum(accuracy(s, col)) / len(s) - accuracy([base], col)[0] for b, s in c.items()}
            for m, c in curves.items()}
    best = max(g for c in gain.values() for g in c.values())
    out = {}
    for m, c in gain.items():
        hit = [b for b in sorted(c) if c[b] >= share * best]
        out[m] = (f"{hit[0]:,}" if hit else "not reached", max(c.values()) / best)
    return best, out


def contrast(out, base, chose):
    """Per budget, GRPO (at 1e-4, and its one-epoch fit-set runs at the chosen lr where they exist) against
    SFT of each length at its chosen lr: the winner in strict and math-verify; then where each method
    reaches 90 % of the best gain over the base model."""
    curves = {m: curve(out, m, chose) for m in ("GRPO", GRPO_FIT, SFT_EPOCH, SFT_30)}
    curves = {m: c for m, c in curves.items() if c or m != GRPO_FIT}  # the fit-set GRPO only once it has run
    fit_lr = picked(chose, GRPO_FIT)
    print("| params | GRPO | against | winner, strict | winner, math-verify |")
    print("|---|---|---|---|---|")
    for budget in sorted({b for m in ("GRPO", GRPO_FIT) for b in curves.get(m, {})}):
        for grpo in ("GRPO", GRPO_FIT):
            name = "lr 1e-4, fixed" if grpo == "GRPO" else f"1 epoch of the fit set, lr {fit_lr.get(budget)}, chosen"
            for method in (SFT_EPOCH, SFT_30):
                if budget in curves.get(grpo, {}) and budget in curves[method]:
                    cells = [winner(curves[grpo][budget], curves[method][budget], c) for c in ("strict", "math_verify")]
                    print(f"| {budget:,} | {name} | {method} | {' | '.join(cells)} |")
    print()
    print("| column | best gain over base (points) | " + " | ".join(f"90 % of it: {m}" for m in curves) + " |")
    print("|---|---|" + "---|" * len(curves))
    for col in ("strict", "math_verify"):
        best, got = reach({m: c for m, c in curves.items() if c}, base, col)
        cells = [f"{got[m][0]} (its best: {100 * got[m][1]:.0f} %)" if m in got else "-" for m in curves]
        print(f"| {col.replace('_', '-')} | {best:.1f} | {' | '.join(cells)} |")


def figure(out, base, chose, path):
    """Strict and math-verify against the budget: GRPO (at 1e-4; and one epoch of the fit set at the chosen lr
    once those runs exist), and SFT of each length at the lr that strict's rule chose per budget on the
    selection set (bars: the seeds' range)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rule = picked(chose, GRPO_FIT)
    picks = "; ".join(f"{lr} at " + ", ".join(f"{b:,}" for b in sorted(rule) if rule[b] == lr)
                      for lr in sorted(set(rule.values()) - {"1e-4"}, key=float))
    grpo = "GRPO, lr 1e-4, fixed" + (f" (chosen: {picks})" if picks else "")
    curves = [("GRPO", grpo, "o-"), (GRPO_FIT, "GRPO, 1 epoch of the fit set, lr chosen per budget", "D-"),
              (SFT_EPOCH, "SFT, 1 epoch, lr chosen per budget", "s-"),
              (SFT_30, "SFT, 30 steps (0.28 epoch), lr chosen per budget", "^:")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, title in zip(axes, ("strict", "math_verify"), ("GSM8K strict (the paper's metric)",
                                                                 "GSM8K math-verify")):
        for method, label, style in curves:
            points = curve(out, method, chose)
            if not points:
                continue
            accs = [accuracy(points[b], col) for b in sorted(points)]
            mean = [sum(a) / len(a) for a in accs]
            err = [[m - min(a) for m, a in zip(mean, accs)], [max(a) - m for m, a in zip(mean, accs)]]
            ax.errorbar(sorted(points), mean, yerr=err, fmt=style, capsize=3, label=label)
        ax.axhline(accuracy([base], col)[0], color="gray", linestyle="--", label="base")
        ax.set(xscale="log", xlabel="trained parameters", ylabel="greedy pass@1 (%)", title=title, ylim=(0, 90))
        ax.legend(fontsize=8, loc="upper left")  # above the points (at most 63 %)
    fig.suptitle("Qwen2.5-Coder-1.5B-Instruct, TinyLoRA, GSM8K test: GRPO (one epoch) vs SFT; bars: the seeds' range",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def selection(summary, prefix):
    """The selection set's scores, strict / math-verify in %, one row per budget, one column per lr tried;
    bold: the protocol's choice (strict, math-verify breaking ties)."""
    got = {(BUDGETS[b], lr): r for (b, lr), r in selected(summary, prefix).items()}
    if not got:
        print("(none)")
        return
    lrs = sorted({lr for _, lr in got}, key=float)
    pick = {BUDGETS[b]: lr for b, lr in chosen(summary, prefix).items()}
    print(f"| params | {' | '.join('lr ' + lr for lr in lrs)} |")
    print("|---|" + "---|" * len(lrs))
    for budget in sorted({b for b, _ in got}):
        cells = []
        for lr in lrs:
            r = got.get((budget, lr))
            text = f"{100 * r['strict']:.1f} / {100 * r['math_verify']:.1f}" if r else "-"
            cells.append(f"**{text}**" if r and pick[budget] == lr else text)
        print(f"| {budget:,} | {' | '.join(cells)} |")


def main():
    out = runs()  # every file read and checked before a line is printed
    base = scores(os.path.join(GRPO, "base", "eval_gsm8k.jsonl.gz"))
    chose = choices()
    summary = os.path.join(HERE, "select", "summary.jsonl")
    for prefix, what in (("ep1-sel-", SFT_EPOCH), ("sel-", SFT_30), ("grpo-sel-", GRPO_SEL)):
        if prefix == "grpo-sel-" and not selected(summary, prefix):
            continue  # rest.sh's grpo-select has not run
        print(f"Selection set, {what}, seed 0: strict / math-verify (%)\n")
        selection(summary, prefix)
        print()
    print("GSM8K test\n")
    table(out, base, chose)
    print("\nGRPO against SFT per budget, and where each reaches 90 % of the best gain (in brackets: its own"
          " best gain as a share of that)\n")
    contrast(out, base, chose)
    figure(out, base, chose, os.path.join(HERE, "budget_curve.png"))
    print(f"wrote {os.path.join(HERE, 'budget_curve.png')}")


if __name__ == "__main__":
    try:
        main()
    except Bad as e:
        print(f"analyze.py: error: {e}", file=sys.stderr)
        raise SystemExit(1)
