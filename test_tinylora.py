"""Tests of the TinyLoRA parameterization (tinylora.py): counts, shapes, gradients, equivalences.

Each test is named after the claim it proves. All run on the CPU in seconds with a tiny
random Qwen2 built in code (tests/tiny.py, fixture `tiny_dir` below).

    python -m pytest test_tinylora.py
"""
import json
import re
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

import tinylora

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = os.environ.get("TEST_DEVICE", "cpu")  # TEST_DEVICE=cuda runs these tests on a GPU
TOKENS = torch.tensor([[5, 17, 42, 99, 7, 250, 3, 64]], device=DEVICE)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Path of a saved tiny Qwen2 model + tokenizer (fp32, random weights)."""
    import tiny  # tests/tiny.py: pytest.ini puts tests/ on the path

    return tiny.make_model_dir(str(tmp_path_factory.mktemp("tiny") / "model"))


def load(tiny_dir, dtype=torch.float32, device=DEVICE):
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype).to(device).eval()


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens.to(model.device)).logits


def randomize(v, scale=0.02, seed=0):
    """A trained-looking v: |dW| a few percent of |W| in the top singular directions."""
    with torch.no_grad():
        v.copy_(scale * torch.randn(v.shape, generator=torch.Generator().manual_seed(seed)).to(v.device))


def qwen_names(layers, hidden, mlp, heads, kv_heads):
    """Module names of a real Hugging Face Qwen2 built on the meta device (no weights)."""
    config = Qwen2Config(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=mlp,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=1024)
    with torch.device("meta"):
        return [n for n, _ in Qwen2ForCausalLM(config).named_modules()]


QWEN7B = dict(layers=28, hidden=3584, mlp=18944, heads=28, kv_heads=4)

# -----------------------------------------------------------------------------
# counts and groups, from module names alone


def test_qwen7b_has_196_modules_in_depth_then_type_order():
    mods = tinylora.find_modules(qwen_names(**QWEN7B))
    assert len(mods) == 196
    assert mods[:8] == [f"model.layers.0.self_attn.{t}" for t in ("q_proj", "k_proj", "v_proj", "o_proj")] + \
        [f"model.layers.0.mlp.{t}" for t in ("gate_proj", "up_proj", "down_proj")] + ["model.layers.1.self_attn.q_proj"]
    assert "lm_head" not in mods and mods[-1] == "model.layers.27.mlp.down_proj"


@pytest.mark.parametrize("u,n_tie,expected", [(1, 1, 196), (13, None, 13), (13, 196, 13), (2, 7, 56), (1, 4, 49)])
def test_qwen7b_param_counts(u, n_tie, expected):
    mods = tinylora.find_modules(qwen_names(**QWEN7B))
    groups = tinylora.tie_groups(mods, n_tie or len(mods))
    assert (max(groups) + 1) * u == expected


def test_tiled_vs_structured_membership():
    mods = tinylora.find_modules(qwen_names(layers=2, hidden=128, mlp=256, heads=2, kv_heads=1))
    # tiled: consecutive pairs in (depth, type) order
    assert tinylora.tie_groups(mods, 2, "tiled") == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    # structured: by type first -> q of both layers, k of both layers, ...
    assert tinylora.tie_groups(mods, 2, "structured") == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6]
    # uneven: the last group is smaller
    assert tinylora.tie_groups(mods, 4, "tiled") == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2


def test_u13_all_tied_has_13_params(tiny_dir):
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is v and v.numel() == 13
    assert v.dtype == torch.float32 and torch.count_nonzero(v) == 0
    assert "13 trainable params = 52 bytes in fp32" in tinylora.describe(model)


# -----------------------------------------------------------------------------
# the frozen pieces


def test_shapes_of_U_S_V_P(tiny_dir):
    model = load(tiny_dir)
    v = tinylora.apply(model, u=5, r=3, n_tie=1, cache_dir=None, verbose=False)
    assert v.shape == (14, 5)  # 2 layers x 7 modules, n_tie=1
    for name, layer in tinylora.adapted_layers(model):
        d_out, d_in = layer.base.weight.shape
        assert layer.U.shape == (d_out, 3) and layer.S.shape == (3,) and layer.V.shape == (d_in, 3)
        assert layer.P.shape == (5, 3, 3)
        # U, V orthonormal columns; S the top singular values, descending
        eye = torch.eye(3, device=layer.U.device)
        torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-4, rtol=0)  # cuSOLVER: ~3e-5
        torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-4, rtol=0)
        top = torch.linalg.svdvals(layer.base.weight.float())[:3]
        torch.testing.assert_close(layer.S, top, atol=1e-5, rtol=1e-5)


def test_sign_flipped_svd_gives_the_same_model():
    W = torch.randn(48, 32, generator=torch.Generator().manual_seed(0))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, V = U[:, :4], Vh[:4].T
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0])  # another valid SVD: (u_i, v_i) -> (-u_i, -v_i)
    a, b = tinylora.canonical_signs(U, V), tinylora.canonical_signs(U * flip, V * flip)
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)
    R = torch.randn(4, 4)
    dW = lambda U, V: U * S[:4] @ R @ V.T
    assert not torch.allclose(dW(U, V), dW(U * flip, V * flip))  # why canonicalising matters
    torch.testing.assert_close(dW(*a), dW(*b))
    assert (a[0].gather(0, a[0].abs().argmax(0, keepdim=True)) > 0).all()


def test_P_is_identical_across_processes():
    code = "import tinylora, sys; from safetensors.torch import save_file; " \
           "save_file({'P': tinylora.make_P(7, 3, 13, 2)}, sys.argv[1])"
    path = os.path.join(HERE, ".pytest_cache", "P.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run([sys.executable, "-c", code, path], check=True, cwd=HERE)
    P = tinylora.make_P(7, 3, 13, 2)
    assert torch.equal(load_file(path)["P"], P) and P.shape == (13, 2, 2)
    assert not torch.equal(P, tinylora.make_P(7, 4, 13, 2)) and not torch.equal(P, tinylora.make_P(8, 3, 13, 2))
    assert abs(P.std().item() / (32 / (2 * 13 ** 0.5)) - 1) < 0.15  # N(0, 1) * ALPHA / (r sqrt(u))


def test_fingerprint_samples_large_weights_in_bounds():
    W = torch.zeros(2**24 + 2, dtype=torch.int8)  # fp32 index arithmetic would round past the end here
    W[-1] = 1
    assert tinylora.fingerprint([("w", W)]) != tinylora.fingerprint([("w", torch.zeros_like(W))])


def test_svd_cache_is_read_on_second_apply(tiny_dir, tmp_path, monkeypatch):
    first = load(tiny_dir)
    tinylora.apply(first, u=2, cache_dir=str(tmp_path), verbose=False)
    assert len(list(tmp_path.glob("svd-*.safetensors"))) == 1

    def no_svd(*a, **k):
        raise AssertionError("SVD recomputed despite the cache")

    monkeypatch.setattr(tinylora, "svd_top_r", no_svd)
    second = load(tiny_dir)
    tinylora.apply(second, u=2, cache_dir=str(tmp_path), verbose=False)
    for (_, a), (_, b) in zip(tinylora.adapted_layers(first), tinylora.adapted_layers(second)):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)
    for m in (first, second):  # bit for bit: a cold start and a cached one train the same
        randomize(m.tinylora_v)
        m(TOKENS).logits.logsumexp(-1).sum().backward()
    assert torch.equal(first.tinylora_v.grad, second.tinylora_v.grad)


@pytest.mark.parametrize("damage", ["nan", "shape", "truncated", "edited"])
def test_a_damaged_svd_cache_is_recomputed_and_replaced(tiny_dir, tmp_path, damage):
    reference = load(tiny_dir)
    tinylora.apply(reference, u=2, cache_dir=None, verbose=False)
    tinylora.apply(load(tiny_dir), u=2, cache_dir=str(tmp_path), verbose=False)
    (path,) = tmp_path.glob("svd-*.safetensors")
    t = load_file(path)
    if damage == "nan":
        t["3.U"][0, 0] = float("nan")
    elif damage == "shape":
        t["3.V"] = t["3.V"][:-1]
    elif damage == "edited":  # finite, the right shape, and wrong
        t["3.S"] = t["3.S"] * 2
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        save_file(t, str(path))
    model = load(tiny_dir)
    with pytest.warns(UserWarning, match="SVD cache .* is unusable"):
        tinylora.apply(model, u=2, cache_dir=str(tmp_path), verbose=False)
    for (_, a), (_, b) in zip(tinylora.adapted_layers(model), tinylora.adapted_layers(reference)):
        assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and torch.equal(a.V, b.V)  # recomputed
    tinylora.apply(load(tiny_dir), u=2, cache_dir=str(tmp_path), verbose=False)  # replaced: no warning now


def test_svd_cache_temp_file_is_per_process(tiny_dir, tmp_path, monkeypatch):
    """torchrun ranks write the same cache at once: each through its own temp file."""
    written = []
    real = os.replace
    monkeypatch.setattr(tinylora.os, "replace", lambda a, b: (written.append(a), real(a, b)))
    tinylora.apply(load(tiny_dir), u=2, cache_dir=str(tmp_path), verbose=False)
    assert len(written) == 1 and f".{os.getpid()}." in os.path.basename(written[0])
    assert not list(tmp_path.glob("*.tmp"))


# -----------------------------------------------------------------------------
# the adapted model: identity at 0, gradients, merge equivalence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("keep_merged", [True, False])
def test_zero_v_is_identity(tiny_dir, keep_merged, dtype):
    base = logits(load(tiny_dir, dtype))
    model = load(tiny_dir, dtype)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False, keep_merged=keep_merged)
    assert torch.equal(logits(model), base)  # bit-identical, not just close


def test_gradients_reach_v_and_nothing_else(tiny_dir):
    model = load(tiny_dir)
    v = tinylora.apply(model, u=4, n_tie=7, cache_dir=None, verbose=False)  # 2 groups: one per layer
    model(TOKENS).logits.logsumexp(-1).sum().backward()
    assert v.grad is not None and v.grad.shape == (2, 4)
    assert (v.grad.abs() > 0).all()  # every group of every entry gets a signal, even at v = 0
    assert all(p.grad is None for n, p in model.named_parameters() if p is not v)


@pytest.mark.parametrize("keep_merged", [True, False])
def test_gradient_matches_finite_difference(tiny_dir, keep_merged):
    model = load(tiny_dir).double()
    v = tinylora.apply(model, u=3, cache_dir=None, verbose=False, keep_merged=keep_merged)
    randomize(v, 0.015)
    loss = lambda: model(TOKENS).logits.double().logsumexp(-1).sum()
    loss().backward()
    e, eps = torch.zeros_like(v), 1e-3  # v, P, U, S, V stay fp32 in an fp64 model: a wide step
    e[0, 1] = eps
    with torch.no_grad():
        v += e
        up = loss()
        v -= 2 * e
        down = loss()
        v += e
    assert abs((up - down).item() / (2 * eps) - v.grad[0, 1].item()) < 1e-3 * max(1, abs(v.grad[0, 1].item()))


@pytest.mark.parametrize("keep_merged", [True, False])
def test_forward_equals_merged_model(tiny_dir, keep_merged):
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, n_tie=3, cache_dir=None, verbose=False, keep_merged=keep_merged)
    randomize(v, 0.1)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(load(tiny_dir)), atol=1e-3)  # v changed the model
    merged = dict(tinylora.merged_weights(model))
    assert len(merged) == 14 and all(k.endswith(".weight") for k in merged)
    plain = load(tiny_dir)
    plain.load_state_dict(merged, strict=False)
    torch.testing.assert_close(logits(plain), adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(tinylora.merge_and_unload(model)), adapted, atol=1e-5, rtol=1e-5)
    assert not tinylora.adapted_layers(model)


def test_kept_merged_and_per_call_paths_agree_in_output_and_gradient(tiny_dir):
    out, grad = {}, {}
    for keep in (True, False):
        model = load(tiny_dir)
        v = tinylora.apply(model, u=5, n_tie=7, cache_dir=None, verbose=False, keep_merged=keep)
        randomize(v, 0.05)
        y = model(TOKENS).logits
        y.logsumexp(-1).sum().backward()
        out[keep], grad[keep] = y.detach(), v.grad
    assert (grad[True].abs() > 0).all()
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad[True], grad[False], atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradient(tiny_dir):
    grad = {}
    for ckpt in (False, True):
        model = load(tiny_dir).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        v = tinylora.apply(model, u=13, cache_dir=None, verbose=False)
        randomize(v, 0.05)
        model(TOKENS, use_cache=False).logits.logsumexp(-1).sum().backward()
        grad[ckpt] = v.grad
    assert grad[True].abs().sum() > 0
    torch.testing.assert_close(grad[True], grad[False], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("how", ["adamw", "fused_adamw", "data", "load"])
def test_kept_merged_weights_follow_every_change_of_v(tiny_dir, tmp_path, how):
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    before = logits(model)
    if how == "load":  # an adapter file with another v
        other = load(tiny_dir)
        randomize(tinylora.apply(other, u=13, cache_dir=None, verbose=False))
        tinylora.save(other, str(tmp_path / "a.safetensors"))
        tinylora.load(model, str(tmp_path / "a.safetensors"))
    elif how == "data":  # bypasses autograd's version counter
        v.data.copy_(torch.full_like(v, 0.015))
    else:  # fused AdamW also leaves the version counter alone
        opt = torch.optim.AdamW([v], lr=0.1, fused=True) if how == "fused_adamw" else torch.optim.AdamW([v], lr=0.1)
        model(TOKENS).logits.logsumexp(-1).sum().backward()
        opt.step()
    assert v.abs().sum() > 0
    fresh = load(tiny_dir)  # the per-call path with the same v: the reference
    tinylora.apply(fresh, u=13, cache_dir=None, verbose=False, keep_merged=False)
    with torch.no_grad():
        fresh.tinylora_v.copy_(v)
    after = logits(model)
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after, logits(fresh), atol=1e-5, rtol=1e-5)


def test_bf16_forward_runs_exactly_the_weights_sent_to_vllm(tiny_dir):
    model = load(tiny_dir, torch.bfloat16)
    randomize(tinylora.apply(model, u=13, cache_dir=None, verbose=False), 0.1)
    adapted = logits(model)
    merged = dict(tinylora.merged_weights(model))  # what train_grpo.py syncs into vLLM
    assert all(merged[f"{n}.weight"] is layer.W_kept for n, layer in tinylora.adapted_layers(model))
    plain = load(tiny_dir, torch.bfloat16)
    plain.load_state_dict(merged, strict=False)
    assert torch.equal(logits(plain), adapted)  # bit for bit, rounding of the tiny dW included


@pytest.mark.parametrize("targets", [("down_proj", "q_proj"), ("up_proj", "k_proj", "o_proj")])
def test_a_change_of_v_reaches_every_module_whatever_the_targets_order(tiny_dir, targets):
    """The check of v runs before any adapted layer (a pre-hook on the decoder), so a module that
    runs or syncs before module 0 of the sorted list never uses a stale W'."""
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, targets=targets, cache_dir=None, verbose=False)
    logits(model)  # W' made for v = 0
    opt = torch.optim.AdamW([v], lr=0.01, fused=True)  # fused: the version counter does not move
    model(TOKENS).logits.logsumexp(-1).sum().backward()
    opt.step()
    synced = dict(tinylora.merged_weights(model))  # what the trainer sends to vLLM after the update
    for name, layer in tinylora.adapted_layers(model):
        assert torch.equal(synced[f"{name}.weight"], layer.merged_weight(torch.float32)), name
    fresh = load(tiny_dir)
    tinylora.apply(fresh, u=13, targets=targets, cache_dir=None, verbose=False, keep_merged=False)
    with torch.no_grad():
        fresh.tinylora_v.copy_(v)
    torch.testing.assert_close(logits(model), logits(fresh), atol=1e-5, rtol=1e-5)


def layer_section():
    """README's "The layer on its own", up to the next section."""
    text = open(os.path.join(HERE, "README.md")).read()
    return text[text.index("**The layer on its own.**"):text.index("## Train and evaluate")]


def copy_lists():
    """The names README says to copy: (the definition alone, the fast layer)."""
    sec = layer_section()
    names = lambda pattern: re.findall(r"`(\w+)`", re.search(pattern, sec, re.S).group(1))
    definition = names(r"Copy from `tinylora.py`(.*?)\(the\s+definition\s+alone")
    return definition, definition + names(r"dW\s+never\s+formed\),\s+plus\s+(.*?)\s+for\s+the\s+fast\s+layer")


def pasted(names):
    """What a user pastes: README's import line, then each listed name as tinylora.py writes it."""
    import inspect
    imports = re.findall(r"```python\n(.*?)```", layer_section(), re.S)[0]
    assert all(line.startswith("import ") for line in imports.strip().splitlines()), imports
    source = open(tinylora.__file__).read()
    parts = [imports]
    for name in names:
        obj = getattr(tinylora, name)
        parts.append(inspect.getsource(obj) if inspect.isclass(obj) or inspect.isfunction(obj)
                     else re.search(rf"^{name} = .*$", source, re.M).group(0))  # a constant's line
    scope = {}  # an empty module: only what the pasted text itself imports and defines
    exec("\n\n".join(parts), scope)
    return scope


def readme_usage(cls="TinyLoRALinear"):
    """README's lines that make a layer (the python block after the import line), for `cls`."""
    return re.findall(r"```python\n(.*?)```", layer_section(), re.S)[1].replace("TinyLoRALinear", cls)


@pytest.mark.parametrize("keep_merged", [True, False])
def test_the_layer_copied_alone_follows_v_in_a_plain_training_loop(keep_merged):
    """The layer and what it needs, pasted as README says into an empty namespace, on a plain
    nn.Linear and trained by a plain loop: no apply(), no model-level hook. After every optimizer
    step its output is the definition's, x W^T + b + ((x V) R^T diag(S)) U^T with the current v:
    never a stale W'."""
    code = pasted(copy_lists()[1])
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24)
    v = torch.nn.Parameter(torch.zeros(1, 4))
    P = torch.randn(4, 2, 2)
    layer = code["TinyLoRALinear"](base, v, P, keep_merged=keep_merged)
    opt = torch.optim.AdamW([v], lr=0.05, fused=True)  # fused: autograd's version counter stays put
    x = torch.randn(5, 32)
    for step in range(4):
        y = layer(x)
        with torch.no_grad():
            R = (v[0] @ P.flatten(1)).view(2, 2)
            want = base(x) + (x @ layer.V) @ R.T @ torch.diag(layer.S) @ layer.U.T
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert (v.abs() > 0).all()  # it trained, and every step was checked against the definition


def test_apply_keeps_the_models_dtype(tiny_dir):
    """model.dtype (the first parameter's dtype in Hugging Face) is what vLLM is started in."""
    model = load(tiny_dir, torch.bfloat16)
    v = tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    assert model.dtype == torch.bfloat16 and v.dtype == torch.float32
    assert sum(p is v for p in model.parameters()) == 1 and model.tinylora_v is v


@pytest.mark.parametrize("keep_merged", [True, False])
def test_backward_under_autocast(tiny_dir, keep_merged):
    """Mixed precision: an fp32 model under torch.autocast(bf16), as any AMP trainer runs it."""
    grad = {}
    for amp in (False, True):
        model = load(tiny_dir)
        v = tinylora.apply(model, u=13, cache_dir=None, verbose=False, keep_merged=keep_merged)
        randomize(v, 0.05)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=amp):
            loss = model(TOKENS).logits.float().logsumexp(-1).sum()
        loss.backward()  # outside the autocast region, as AMP recipes do
        grad[amp] = v.grad
    assert grad[True].dtype == torch.float32 and torch.isfinite(grad[True]).all()
    cos = torch.nn.functional.cosine_similarity(grad[True].flatten(), grad[False].flatten(), dim=0)
    assert cos > 0.99  # bf16 arithmetic, the same gradient


def test_round_stochastic_is_unbiased_and_exact_on_the_grid():
    x = torch.full((100_000,), 1.0) + 1e-3  # bf16 neighbours of 1.001: 1.0 and 1.0078125
    assert x.to(torch.bfloat16).float().mean() == 1.0  # to nearest: the 1e-3 is erased
    y = tinylora.round_stochastic(x, seed=0)
    assert y.dtype == torch.bfloat16 and set(y.float().unique().tolist()) == {1.0, 1.0078125}
    assert abs(y.float().mean().item() - 1.001) < 2e-5  # unbiased
    assert abs(tinylora.round_stochastic(-x, seed=0).float().mean().item() + 1.001) < 2e-5
    assert torch.equal(tinylora.round_stochastic(x, seed=0), y)  # fixed thresholds: deterministic
    w = torch.randn(1000).to(torch.bfloat16)
    assert torch.equal(tinylora.round_stochastic(w.float(), seed=1), w)  # already on the grid: unchanged


def test_dw_kept_measures_what_bf16_rounding_erases(tiny_dir):
    kept = {}
    for dtype, rounding in [(torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic")]:
        model = load(tiny_dir, dtype)
        v = tinylora.apply(model, u=13, cache_dir=None, verbose=False, rounding=rounding)
        assert tinylora.dw_kept(model) is None  # dW = 0
        randomize(v, 1e-5)  # a v that Adam reaches after one update at lr 1e-5
        kept[dtype, rounding] = tinylora.dw_kept(model)
        if rounding == "stochastic":
            assert torch.equal(logits(model), logits(load(tiny_dir, dtype))) is False
    assert abs(kept[torch.float32, "nearest"] - 1) < 1e-4  # fp32: nothing lost
    assert kept[torch.bfloat16, "nearest"] < 0.1  # to nearest: most of the update is erased
    assert 0.8 < kept[torch.bfloat16, "stochastic"] < 1.2  # unbiased rounding keeps it on average


def test_stochastic_rounding_is_identity_at_zero_and_synced_bit_for_bit(tiny_dir, tmp_path):
    model = load(tiny_dir, torch.bfloat16)
    v = tinylora.apply(model, u=13, cache_dir=None, verbose=False, rounding="stochastic")
    assert torch.equal(logits(model), logits(load(tiny_dir, torch.bfloat16)))  # v = 0: exactly the base
    randomize(v, 1e-3)
    adapted = logits(model)
    plain = load(tiny_dir, torch.bfloat16)
    plain.load_state_dict(dict(tinylora.merged_weights(model)), strict=False)  # what vLLM receives
    assert torch.equal(logits(plain), adapted)
    path = str(tmp_path / "a.safetensors")  # the rounding is part of the adapter: a reload is the same model
    tinylora.save(model, path)
    fresh = load(tiny_dir, torch.bfloat16)
    tinylora.load(fresh, path, cache_dir=None, verbose=False)
    assert fresh.tinylora_config["rounding"] == "stochastic" and torch.equal(logits(fresh), adapted)


def test_merged_weights_leave_the_model_untouched(tiny_dir):
    model = load(tiny_dir)
    v = tinylora.apply(model, u=2, cache_dir=None, verbose=False)
    randomize(v)
    before = {n: p.clone() for n, p in model.named_parameters()}
    for name, W in tinylora.merged_weights(model, torch.bfloat16):
        assert W.dtype == torch.bfloat16
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bf16_base_keeps_fp32_v(tiny_dir):
    model = load(tiny_dir, torch.bfloat16)
    v = tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    randomize(v, 0.1)
    out = model(TOKENS).logits
    assert out.dtype == torch.bfloat16 and v.dtype == torch.float32
    out.float().logsumexp(-1).sum().backward()
    assert v.grad.dtype == torch.float32 and v.grad.abs().sum() > 0
    ref = load(tiny_dir)  # the same adapter on the fp32 model
    tinylora.apply(ref, u=13, cache_dir=None, verbose=False)
    randomize(ref.tinylora_v, 0.1)
    torch.testing.assert_close(out.float(), logits(ref), atol=0.15, rtol=0.05)


# -----------------------------------------------------------------------------
# the adapter file and exports


def test_save_load_round_trip_reproduces_logits(tiny_dir, tmp_path):
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, n_tie=5, tie="structured", seed=3, cache_dir=None, verbose=False)
    randomize(v)
    path = str(tmp_path / "adapter.safetensors")
    tinylora.save(model, path)
    assert load_file(path)["v"].shape == (3, 13)
    fresh = load(tiny_dir)
    tinylora.load(fresh, path, cache_dir=None, verbose=False)
    assert torch.equal(logits(fresh), logits(model))


def test_u13_adapter_file_is_tiny(tiny_dir, tmp_path):
    model = load(tiny_dir)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    path = str(tmp_path / "a.safetensors")
    tinylora.save(model, path)
    assert load_file(path)["v"].numel() * 4 == 52
    assert os.path.getsize(path) < 4096  # 52 bytes of v + a JSON header


def test_bf16_v_dtype_saves_exactly_the_trained_model(tiny_dir, tmp_path):
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, v_dtype="bf16", cache_dir=None, verbose=False)
    randomize(v, 0.015)
    with torch.no_grad():
        v += 1e-4  # fp32 values that bf16 rounds
    path = str(tmp_path / "a.safetensors")
    tinylora.save(model, path)
    assert load_file(path)["v"].dtype == torch.bfloat16 and os.path.getsize(path) < 4096
    fresh = load(tiny_dir)
    tinylora.load(fresh, path, cache_dir=None, verbose=False)
    assert torch.equal(logits(fresh), logits(model))  # the forward already saw bf16-rounded v
    model(TOKENS).logits.sum().backward()
    assert v.grad.abs().sum() > 0  # straight-through: rounding does not block the gradient


def test_loading_onto_another_base_is_refused(tiny_dir, tmp_path):
    model = load(tiny_dir)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    path = str(tmp_path / "a.safetensors")
    tinylora.save(model, path)
    other = load(tiny_dir)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a "fine-tune" of the base
    with pytest.raises(ValueError, match="another base model"):
        tinylora.load(other, path, cache_dir=None, verbose=False)


@pytest.mark.parametrize("edit", ["missing", "extra", "no_meta", "p_scale"])
def test_bad_adapter_file_is_refused(tiny_dir, tmp_path, edit):
    model = load(tiny_dir)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    c = dict(model.tinylora_config)
    if edit == "missing":
        del c["seed"]
    elif edit == "extra":
        c["alpha"] = 16
    elif edit == "p_scale":
        c["p_scale"] = "normal(0, 1/r)"
    path = str(tmp_path / "bad.safetensors")
    save_file({"v": torch.zeros(1, 13)}, path, metadata=None if edit == "no_meta" else {"tinylora": json.dumps(c)})
    with pytest.raises(ValueError, match={"missing": "missing \\['seed'\\]", "extra": "unknown \\['alpha'\\]",
                                          "no_meta": "not a TinyLoRA adapter", "p_scale": "P scaling"}[edit]):
        tinylora.load(load(tiny_dir), path, cache_dir=None, verbose=False)


@pytest.mark.parametrize("bad", ["nan", "inf", "no_v"])
def test_adapter_with_a_broken_v_is_refused(tiny_dir, tmp_path, bad):
    model = load(tiny_dir)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    meta = {"tinylora": json.dumps(model.tinylora_config)}
    v = torch.zeros(1, 13)
    v[0, 3] = float(bad) if bad != "no_v" else 0.0
    path = str(tmp_path / "bad.safetensors")
    save_file({"w": v} if bad == "no_v" else {"v": v}, path, metadata=meta)
    with pytest.raises(ValueError, match="no tensor 'v'" if bad == "no_v" else "non-finite"):
        tinylora.load(load(tiny_dir), path, cache_dir=None, verbose=False)


def test_adapter_with_the_old_p_scaling_loads_as_the_same_model(tiny_dir, tmp_path):
    """Adapters saved with P ~ N(0, 1/(u r)) (before P got the paper code's scale) still load:
    the same random draws at another scale, so a rescaled v is exactly the same model."""
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, n_tie=7, cache_dir=None, verbose=False)
    randomize(v, 0.05)
    c = dict(model.tinylora_config, p_scale="normal(0, 1/(u*r))")
    del c["rounding"]  # old files had no rounding key
    old_v = v.detach() * (tinylora.p_std(13, 2) * (13 * 2) ** 0.5)  # the v that gave this model then
    path = str(tmp_path / "old.safetensors")
    save_file({"v": old_v}, path, metadata={"tinylora": json.dumps(c)})
    fresh = load(tiny_dir)
    with pytest.warns(UserWarning, match="v converted"):
        tinylora.load(fresh, path, cache_dir=None, verbose=False)
    torch.testing.assert_close(logits(fresh), logits(model), atol=1e-5, rtol=1e-5)


def test_peft_lora_export_gives_the_same_logits(tiny_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, n_tie=2, cache_dir=None, verbose=False)
    randomize(v, 0.1)
    tinylora.export_peft_lora(model, str(tmp_path / "lora"), tiny_dir)
    lora = peft.PeftModel.from_pretrained(load(tiny_dir), str(tmp_path / "lora")).eval()
    torch.testing.assert_close(logits(lora), logits(model), atol=1e-5, rtol=1e-5)


def test_merged_export_gives_the_same_logits(tiny_dir, tmp_path):
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    randomize(v, 0.1)
    adapted = logits(model)
    tinylora.export_merged(model, str(tmp_path / "merged"))
    torch.testing.assert_close(logits(load(str(tmp_path / "merged"))), adapted, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# bad input: a ValueError naming the value and the range, before any SVD


@pytest.mark.parametrize("kwargs,match", [
    (dict(u=0), "u=0 must be an integer >= 1"),
    (dict(r=0), r"r=0 must be in \[1, 64\]"),
    (dict(r=65), r"r=65 must be in \[1, 64\]"),
    (dict(n_tie=0), r"n_tie=0 must be in \[1, 14\]"),
    (dict(n_tie=15), r"n_tie=15 must be in \[1, 14\]"),
    (dict(tie="random"), "tie='random' must be one of"),
    (dict(v_dtype="int8"), "v_dtype='int8' must be one of"),
    (dict(targets=("q_proj", "qkv_proj")), r"targets \['qkv_proj'\] match no nn.Linear"),
])
def test_bad_input_raises_before_any_svd(tiny_dir, monkeypatch, kwargs, match):
    monkeypatch.setattr(tinylora, "svd_top_r", lambda *a: pytest.fail("SVD ran before validation"))
    with pytest.raises(ValueError, match=match):
        tinylora.apply(load(tiny_dir), cache_dir=None, verbose=False, **kwargs)


def test_apply_twice_is_refused(tiny_dir):
    model = load(tiny_dir)
    tinylora.apply(model, u=1, cache_dir=None, verbose=False)
    with pytest.raises(ValueError, match="already applied"):
        tinylora.apply(model, u=1, cache_dir=None, verbose=False)


@cuda
def test_adapter_trained_on_gpu_gives_the_same_model_on_cpu(tiny_dir, tmp_path):
    """Portability: cuSOLVER and LAPACK SVDs (signs canonicalised) and CPU-drawn P agree."""
    gpu = load(tiny_dir, device="cuda")
    v = tinylora.apply(gpu, u=13, n_tie=4, cache_dir=None, verbose=False)
    opt = torch.optim.AdamW([v], lr=0.005)
    for _ in range(5):  # a few real optimizer steps on the GPU
        gpu(TOKENS.cuda()).logits.logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    path = str(tmp_path / "gpu.safetensors")
    tinylora.save(gpu, path)
    cpu = load(tiny_dir, device="cpu")
    tinylora.load(cpu, path, cache_dir=None, verbose=False)
    assert v.abs().min() > 0
    base = logits(load(tiny_dir, device="cpu"))
    assert (logits(cpu) - base).abs().max() > 0.1  # the adapter matters...
    torch.testing.assert_close(logits(cpu), logits(gpu).cpu(), atol=1e-3, rtol=1e-3)  # ...and is the same model


# -----------------------------------------------------------------------------
# README's code: the snippet runs, and the layer copied by README's list is the module's


def readme_block(after):
    """The first ```python block of README.md after the line containing `after`."""
    text = open(os.path.join(HERE, "README.md")).read()
    return re.search(r"```python\n(.*?)```", text[text.index(after):], re.S).group(1)


def test_readme_snippet_runs_as_written(tiny_dir, tmp_path, monkeypatch):
    """README's "Use TinyLoRA in your own code", with the tiny model for the hub id: it trains, saves
    52 bytes of v, reloads them into a fresh model and exports both ways."""
    code = readme_block("## Use TinyLoRA in your own code").replace("Qwen/Qwen2.5-0.5B-Instruct", tiny_dir)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code, scope)
    v = scope["v"]
    assert v.shape == (1, 13) and (v != 0).all()  # one optimizer step moved every number
    assert os.path.getsize("adapter.safetensors") < 4096 and load_file("adapter.safetensors")["v"].numel() == 13
    assert os.path.exists("lora/adapter_model.safetensors") and os.path.exists("merged/config.json")
    merged = AutoModelForCausalLM.from_pretrained("merged").eval()
    model = scope["model"].eval()
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-5, rtol=1e-5)


def adapted_q_proj(tiny_dir, keep_merged=True):
    """(the tiny model's first q_proj as apply() adapts it, module index 0; the model's v, randomized)."""
    model = load(tiny_dir)
    v = tinylora.apply(model, u=13, seed=0, cache_dir=None, verbose=False, keep_merged=keep_merged)
    randomize(v)
    return model.model.layers[0].self_attn.q_proj, v


def pasted_layer(tiny_dir, names, cls):
    """README's import line and list pasted into an empty namespace, then README's two lines on a copy
    of the tiny model's first q_proj (module index 0 in apply's order); (layer, v)."""
    import copy
    code = pasted(names)
    code["linear"] = copy.deepcopy(load(tiny_dir).model.layers[0].self_attn.q_proj)
    exec(readme_usage(cls), code)
    return code["layer"], code["v"]


def test_the_layer_copied_by_readmes_list_is_the_modules(tiny_dir):
    """README's import line and fast-layer list, pasted into an empty namespace, then README's two
    lines: the layer's P (its scale included), dW, output and gradient to v equal tinylora.apply's
    for the same module and v, bit for bit."""
    layer, v = pasted_layer(tiny_dir, copy_lists()[1], "TinyLoRALinear")
    mine, ref = adapted_q_proj(tiny_dir)
    with torch.no_grad():
        v.copy_(ref[0])
    assert torch.equal(layer.P, mine.P) and torch.equal(layer.delta_weight(), mine.delta_weight())
    x = torch.randn(3, mine.base.in_features)
    y, y_ref = layer(x), mine(x)
    assert torch.equal(y, y_ref)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert v.grad.abs().sum() > 0 and torch.equal(v.grad, ref.grad[0])


def test_the_definition_alone_copied_by_readmes_short_list_is_applys_definition(tiny_dir):
    """README's import line and short list (TinyLoRADef and what it needs, nothing of the fast layer),
    pasted into an empty namespace: its output and gradient to v are apply(keep_merged=False)'s bit
    for bit (the same computation) and the fast layer's of apply()'s default to fp32 rounding."""
    short, fast = copy_lists()
    assert short[-1] == "TinyLoRADef" and "KeptLinear" not in short and set(short) < set(fast)
    layer, v = pasted_layer(tiny_dir, short, "TinyLoRADef")
    x = torch.randn(3, layer.base.in_features)
    for keep_merged, exact in [(False, True), (True, False)]:
        mine, ref = adapted_q_proj(tiny_dir, keep_merged)
        with torch.no_grad():
            v.copy_(ref[0])
        v.grad = None
        y, y_ref = layer(x), mine(x)
        y.square().sum().backward()
        y_ref.square().sum().backward()
        assert v.grad.abs().sum() > 0 and (y - layer.base(x)).abs().max() > 1e-3  # v acts
        if exact:
            assert torch.equal(y, y_ref) and torch.equal(v.grad, ref.grad[0])
        else:
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v.grad, ref.grad[0], atol=1e-4, rtol=1e-4)


def test_the_modules_definition_layer_is_the_layers_definition_path():
    """tinylora.TinyLoRADef is TinyLoRALinear(keep_merged=False): the same output and gradient."""
    torch.manual_seed(0)
    base, P = torch.nn.Linear(16, 12), tinylora.make_P(0, 3, 5, 2)
    v = torch.nn.Parameter(torch.randn(2, 5) * 0.1)
    x = torch.randn(4, 7, 16)
    a = tinylora.TinyLoRADef(base, v, P, group=1)
    b = tinylora.TinyLoRALinear(base, v, P, group=1, keep_merged=False)
    ya, yb = a(x), b(x)
    assert ya.shape == (4, 7, 12) and torch.equal(ya, yb)
    ya.sum().backward()
    ga, v.grad = v.grad, None
    yb.sum().backward()
    assert ga[1].abs().sum() > 0 and (ga[0] == 0).all() and torch.equal(ga, v.grad)


def test_a_v_of_shape_u_is_one_tie_group():
    """TinyLoRALinear(linear, v) with v of shape (u,) is the layer with v of shape (1, u)."""
    torch.manual_seed(0)
    base, P = torch.nn.Linear(16, 12), tinylora.make_P(0, 0, 5, 2)
    v1 = torch.nn.Parameter(torch.randn(5) * 0.1)
    v2 = torch.nn.Parameter(v1.detach().clone()[None])
    x = torch.randn(4, 16)
    a, b = tinylora.TinyLoRALinear(base, v1, P), tinylora.TinyLoRALinear(base, v2, P)
    assert torch.equal(a(x), b(x))
    a(x).sum().backward()
    b(x).sum().backward()
    assert v1.grad.shape == (5,) and torch.equal(v1.grad, v2.grad[0])
    with pytest.raises(ValueError, match=r"v must be \(u,\) or \(groups, u\) and P \(u, r, r\) with the same u"):
        tinylora.TinyLoRALinear(base, torch.nn.Parameter(torch.zeros(4)), P)


def test_save_pretrained_of_an_adapted_model_names_the_ways_to_save(tiny_dir, tmp_path):
    """Hugging Face's save_pretrained cannot write v (shared by every layer): one line says what can."""
    model = load(tiny_dir)
    tinylora.apply(model, u=13, cache_dir=None, verbose=False)
    with pytest.raises(ValueError) as e:
        model.save_pretrained(str(tmp_path / "m"))
    assert "tinylora.save" in str(e.value) and "tinylora.export_merged" in str(e.value)
    assert len(str(e.value).splitlines()) == 1 and not (tmp_path / "m").exists()
    tinylora.export_merged(model, str(tmp_path / "merged"))  # the class's own save_pretrained again
    assert (tmp_path / "merged" / "config.json").exists()


def test_fp32_and_bf16_copies_of_a_model_keep_their_own_svds(tiny_dir, tmp_path):
    """One fingerprint (bf16-rounded samples), two dtypes: each loads the SVD of its own weights (CS1)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float32):
        model = load(tiny_dir, dtype)
        tinylora.apply(model, u=13, cache_dir=str(tmp_path), verbose=False)
        layer = model.model.layers[0].mlp.down_proj
        U, S, V = tinylora.svd_top_r(layer.base.weight, 2)
        assert torch.equal(layer.U, U) and torch.equal(layer.S, S)
    assert sorted(p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("svd-*")) == ["bfloat16.safetensors",
                                                                                  "float32.safetensors"]


def test_a_temp_file_left_by_a_killed_process_is_removed(tiny_dir, tmp_path):
    model = load(tiny_dir)
    tinylora.apply(model, u=13, cache_dir=str(tmp_path), verbose=False)
    (path,) = tmp_path.glob("svd-*.safetensors")
    stale, live = tmp_path / f"{path.name}.999999999.tmp", tmp_path / f"{path.name}.{os.getpid()}.tmp"
    stale.write_bytes(b"x" * 100)
    live.write_bytes(b"x")
    tinylora.apply(load(tiny_dir), u=13, cache_dir=str(tmp_path), verbose=False)
    assert not stale.exists() and live.exists()  # a live process's file is its own
