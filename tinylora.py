"""TinyLoRA: adapt every linear layer of a frozen LLM with a handful of numbers.

"Learning to Reason in 13 Parameters" (Morris et al., 2026, arXiv 2602.04118, Sec. 3).
For each adapted linear layer with frozen weight W (d_out x d_in):

    W = U S V^T                 exact SVD in fp32, keep the top r: U (d_out, r), S (r,), V (d_in, r)
    R = sum_i v_i P_i           v (u,) trainable, P (u, r, r) fixed random
    W' = W + U diag(S) R V^T

One v is shared by a tie group of n_tie modules (default: all of them, so u=13 means 13
trainable numbers). Choices this file makes, and why:
  - v starts at exactly 0, so the adapted model is bit-identical to the base at step 0.
  - SVD signs are canonicalised (largest-|entry| of each column of U is positive; V flips
    with it): (u_i, v_i) and (-u_i, -v_i) are both valid SVDs but give different adapters,
    so without this an adapter trained on a GPU would be a different model on a CPU.
  - P is drawn on the CPU from torch.Generator(seed * 2**20 + module index), fp32, entries
    N(0, 1) * ALPHA / (r * sqrt(u)) with ALPHA = 32. This is the scale of the paper authors'
    code (their verl fork: P ~ N(0, 1), R divided by sqrt(u), times PEFT's LoRA scaling
    lora_alpha / r with lora_alpha = 32 in their GSM8K scripts), so a learning rate means
    here what it means there: Adam moves each v_i by about lr per update whatever the
    gradient's size, and the same v gives the same size of dW. (Adapters saved with the
    earlier N(0, 1/(u*r)) scaling, 22.6x smaller at r = 2, still load: v is converted.)
  - W' is kept merged in the base dtype and recomputed (in fp32, from the untouched W) only
    when v changes, so forward and input gradient are the frozen model's own GEMMs, and the
    trainer runs exactly the weights synced into vLLM; the gradient of R needs only two skinny
    products. v is compared by value once per forward of the model (a pre-hook on the module
    that holds all adapted layers), which also sees fused optimizers and writes through .data.
    The cost is one copy of the adapted weights; keep_merged=False computes
    y = x W^T + ((x V) R^T diag(S)) U^T per call instead (dW never formed, slower).
  - Rounding W + dW into bf16: "nearest" erases every entry of dW smaller than half a bf16
    step of W, so a small v changes nothing at all. "stochastic" rounds each entry up with
    probability equal to its position between the two bf16 neighbours, using a fixed random
    threshold per entry (seeded per module): W' is then unbiased (E[W'] = W + dW over the
    entries), a deterministic function of v, and still exactly W at v = 0.
  - v is trained in fp32; with v_dtype bf16/fp16 the forward sees v rounded to that dtype
    (straight-through gradient), so the saved adapter is exactly the trained model.
  - Modules are ordered by depth, then type (q,k,v,o,gate,up,down); "tiled" ties
    consecutive runs of n_tie in that order (the paper's better choice), "structured"
    orders by type first, then depth.

Use:  v = tinylora.apply(model, u=13)   # only v is trainable; see README.md
Test: python -m pytest test_tinylora.py
"""
import hashlib
import json
import math
import os
import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TIE_MODES = ("tiled", "structured")
V_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALPHA = 32  # the paper authors' lora_alpha: dW per unit of v matches their code (see the docstring)
P_SCALE = "normal(0, 1) * 32 / (r * sqrt(u))"  # recorded in every adapter file
OLD_P_SCALES = {"normal(0, 1/(u*r))": lambda u, r: 1 / math.sqrt(u * r)}  # earlier adapters: std of P
ROUNDINGS = ("nearest", "stochastic")
CACHE_DIR = os.environ.get("TINYLORA_CACHE", os.path.expanduser("~/.cache/tinylora"))
CONFIG_KEYS = ("u", "r", "n_tie", "tie", "targets", "seed", "v_dtype", "p_scale", "rounding", "modules",
               "fingerprint")

# -----------------------------------------------------------------------------
# which modules, in which order, tied how (names only: no weights needed)


def find_modules(names, targets=TARGETS):
    """Names of decoder-block linears to adapt, ordered by depth then target type."""
    found = []
    for name in names:
        m = re.search(r"\.(\d+)\.", "." + name)  # the block index, e.g. model.layers.12.mlp.up_proj
        kind = name.rsplit(".", 1)[-1]
        if m and kind in targets:
            found.append((int(m.group(1)), targets.index(kind), name))
    return [name for _, _, name in sorted(found)]


def tie_groups(modules, n_tie, tie="tiled", targets=TARGETS):
    """Group index of each module (same order as `modules`): n_tie modules share one v."""
    n = len(modules)
    check(1 <= n_tie <= n, f"n_tie={n_tie} must be in [1, {n}] (the number of adapted modules)")
    check(tie in TIE_MODES, f"tie={tie!r} must be one of {TIE_MODES}")
    order = list(range(n))  # tiled: modules already sorted by depth, then type
    if tie == "structured":
        kind = lambda i: targets.index(modules[i].rsplit(".", 1)[-1])
        order.sort(key=lambda i: (kind(i), i))  # by type, then depth
    groups = [0] * n
    for rank, i in enumerate(order):
        groups[i] = rank // n_tie
    return groups


def check(ok, msg):
    if not ok:
        raise ValueError(msg)


# -----------------------------------------------------------------------------
# the frozen pieces: SVD (cached) and P


def fingerprint(weights):
    """Short hash of named weights from 4096 evenly spaced entries each, rounded to bf16, so a
    bf16 and an fp32 load of one checkpoint agree on every device. It tells models and
    fine-tunes apart; it does not notice a single edited entry."""
    h = hashlib.sha256()
    for name, W in weights:
        idx = torch.arange(4096, device=W.device) * (W.numel() - 1) // 4095  # int64: exact for any size
        sample = W.detach().reshape(-1)[idx].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(f"{name}{tuple(W.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def svd_top_r(W, r):
    """Exact top-r SVD of W (d_out, d_in) in fp32 with canonical signs: U (d_out,r), S (r,), V (d_in,r)."""
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    U, V = canonical_signs(U[:, :r], Vh[:r].T)
    # contiguous, as a reload from the cache is: a strided copy would round the products differently
    return U.contiguous(), S[:r].contiguous(), V.contiguous()


def canonical_signs(U, V):
    """Flip each pair (u_i, v_i) so the largest-|entry| of u_i is positive (U V^T is unchanged)."""
    sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))  # (1, r)
    return U * sign, V * sign


def p_std(u, r):
    """Standard deviation of the entries of P: ALPHA / (r * sqrt(u))."""
    return ALPHA / (r * math.sqrt(u))


def make_P(seed, index, u, r):
    """The fixed random tensor P (u, r, r) of module `index`: CPU generator, fp32, N(0, 1) * p_std(u, r)."""
    g = torch.Generator(device="cpu").manual_seed(seed * 2**20 + index)
    return torch.randn(u, r, r, generator=g) * p_std(u, r)


def load_svd(linears, r, fp, cache_dir):
    """[(U, S, V)] for each linear, from cache_dir when present and sound, else computed and cached."""
    path = cache_dir and os.path.join(cache_dir, f"svd-{fp}-r{r}.safetensors")
    if path and os.path.exists(path):
        try:
            t = load_file(path)
            out = [(t[f"{i}.U"], t[f"{i}.S"], t[f"{i}.V"]) for i in range(len(linears))]
            for lin, (U, S, V) in zip(linears, out):
                d_out, d_in = lin.weight.shape
                check(U.shape == (d_out, r) and S.shape == (r,) and V.shape == (d_in, r), "shapes differ")
                check(all(torch.isfinite(x).all() for x in (U, S, V)), "non-finite entries")
                W = lin.weight.detach().float()  # the factors must be this weight's: W V = U diag(S)
                check((W @ V.to(W.device) - (U * S).to(W.device)).abs().max() <= 1e-3 * S[0], "factors do not fit W")
            return out
        except Exception as e:  # truncated, edited or foreign file: never apply it, replace it
            warnings.warn(f"SVD cache {path} is unusable ({e}); recomputing it")
    out = [tuple(x.cpu() for x in svd_top_r(lin.weight, r)) for lin in linears]
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tensors = {f"{i}.{k}": x.contiguous() for i, usv in enumerate(out) for k, x in zip("USV", usv)}
        tmp = f"{path}.{os.getpid()}.tmp"  # one temp file per process: torchrun ranks write at once
        save_file(tensors, tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves half a cache
    return out


def round_stochastic(x, seed):
    """fp32 -> bf16, rounding each entry up with probability equal to its position between its two
    bf16 neighbours (so E[result] = x), with a fixed random threshold per entry drawn from `seed`.
    Works on the bit pattern: add a random 16-bit number below bf16's last mantissa bit, then cut
    those 16 bits off (a carry is exactly a round-up; an x already on the bf16 grid is unchanged)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, x.shape, generator=g, device=x.device, dtype=torch.int32)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # -65536 = 0xFFFF0000
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


# -----------------------------------------------------------------------------
# the adapted layer


class VStamp:
    """Counts the changes of v, compared by value: optimizers that bypass autograd's version
    counter (fused AdamW, writes through .data) are seen too. One host sync per check, made once
    per forward by a pre-hook on the module that holds every adapted layer (apply() registers it)."""

    def __init__(self, v):
        self.v, self.seen, self.n, self.hook = v, None, 0, None

    def check(self, *_):
        v = self.v.detach()
        if self.seen is None or self.seen.device != v.device or not torch.equal(v, self.seen):
            self.seen, self.n = v.clone(), self.n + 1


class MergedLinear(torch.autograd.Function):
    """y = x W'^T + b for a precomputed W' = W + U diag(S) R V^T, R = sum_i v_i P_i; gradients to x and v.

    The forward and the input gradient are the frozen model's own GEMMs, with W' in place of W;
    the extra work is dL/dR = (dy U diag(S))^T (x V) (two skinny products) and dL/dv_i = <dL/dR, P_i>."""

    @staticmethod
    def forward(ctx, x, v, W, bias, US, V, P):
        ctx.save_for_backward(x, W, US, V, P)
        return F.linear(x, W, bias)

    @staticmethod
    def backward(ctx, dy):
        x, W, US, V, P = ctx.saved_tensors
        # under torch.autocast, dy (like the forward's output) may be in another dtype than W and x
        dx = dy @ W.to(dy.dtype) if ctx.needs_input_grad[0] else None
        dv = None
        if ctx.needs_input_grad[1]:
            dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
            dR = (dy2 @ US.to(dy.dtype)).float().T @ (x2 @ V.to(x.dtype)).float()  # (r, r), summed over tokens in fp32
            dv = P.flatten(1) @ dR.flatten()  # (u,)
        return dx, dv, None, None, None, None, None


class TinyLoRALinear(nn.Module):
    """A frozen nn.Linear adapted to W' = W + U diag(S) R V^T with R = sum_i v[group]_i P_i.

    keep_merged=True (default): W' is kept in memory in the base dtype (one extra copy of the
    adapted weights) and recomputed only when v changes, i.e. once per optimizer update. The
    forward and the input gradient then cost exactly what the frozen model's do, and the model
    computes with exactly the weights that are synced into vLLM. v's change is detected by the
    stamp's pre-hook, once per forward of the model: call a single adapted layer on its own
    after changing v and it still uses the old W' (call stamp.check() first).
    keep_merged=False: y = x W^T + ((x V) R^T diag(S)) U^T per call, no extra weight memory,
    slower (skinny products over the activations in the forward and the backward).
    round_seed: None rounds W' to the base dtype to nearest; an int rounds bf16 stochastically
    with thresholds drawn from it (see round_stochastic)."""

    def __init__(self, base, U, S, V, P, v, group, v_dtype="fp32", stamp=None, round_seed=None):
        super().__init__()
        self.base, self.v, self.group, self.v_dtype = base, v, group, V_DTYPES[v_dtype]
        self.stamp, self.round_seed, self.merged_at = stamp, round_seed, None  # stamp None: keep_merged=False
        dev = base.weight.device
        # the definition, fp32: U (d_out, r), S (r,), V (d_in, r), P (u, r, r)
        for k, x in zip("USVP", (U, S, V, P)):
            self.register_buffer(k, x.to(dev, torch.float32), persistent=False)
        self.register_buffer("US", self.U * self.S, persistent=False)  # U diag(S), fixed
        # U diag(S) and V in the compute dtype (the same tensors when the base is fp32)
        self.register_buffer("US_x", self.US.to(base.weight.dtype), persistent=False)
        self.register_buffer("V_x", self.V.to(base.weight.dtype), persistent=False)
        self.register_buffer("W_merged", None, persistent=False)  # W' in the base dtype, if kept

    def v_row(self):
        """This module's v (u,), fp32, as the forward sees it: rounded to v_dtype (straight-through)."""
        v = self.v[self.group]
        if self.v_dtype != torch.float32:
            v = v + (v.to(self.v_dtype).float() - v).detach()
        return v

    def R(self):
        """R = sum_i v_i P_i, (r, r)."""
        return (self.v_row() @ self.P.flatten(1)).view(self.P.shape[1:])

    def delta_weight(self):
        """dW = U diag(S) R V^T, fp32, (d_out, d_in)."""
        return self.US @ self.R() @ self.V.T

    @torch.no_grad()
    def merge(self, dtype):
        """W' = W + dW, added in fp32 (or wider) from the untouched base W, rounded to `dtype`."""
        with torch.autocast(self.base.weight.device.type, enabled=False):  # dW in fp32 even under AMP
            W = self.base.weight + self.delta_weight()  # type promotion: bf16 W + fp32 dW -> fp32
        if dtype == torch.bfloat16 and self.round_seed is not None and W.dtype == torch.float32:
            return round_stochastic(W, self.round_seed)
        return W.to(dtype)

    def merged(self, dtype=None):
        """W' in `dtype` (default: the base dtype); with keep_merged, the kept copy, refreshed if v changed."""
        dtype = dtype or self.base.weight.dtype
        if self.stamp is None or dtype != self.base.weight.dtype:
            return self.merge(dtype)
        if self.merged_at != self.stamp.n:
            self.W_merged = None  # free the old copy before making the new one
            self.W_merged, self.merged_at = self.merge(dtype), self.stamp.n
        return self.W_merged

    def forward(self, x):
        if self.stamp is not None:
            return MergedLinear.apply(x, self.v_row(), self.merged(), self.base.bias, self.US_x, self.V_x, self.P)
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        y = F.linear(x2, self.base.weight, self.base.bias)  # exactly the frozen layer's output
        h = (x2 @ self.V_x.to(x2.dtype)) @ self.R().T.to(x2.dtype)  # (N, r): x V R^T
        # + h diag(S) U^T, accumulated into y in place (no extra pass); adds exact zeros at v = 0.
        # (dtypes follow y: under torch.autocast it may differ from the weights')
        return y.addmm_(h.to(y.dtype), self.US_x.T.to(y.dtype)).view(*x.shape[:-1], -1)


def layers(model):
    """[(hf_name, TinyLoRALinear)] in module order (depth, then type)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TinyLoRALinear)]


# -----------------------------------------------------------------------------
# apply / merge / save / load / export


def plan(named, u=13, r=2, n_tie=None, tie="tiled", targets=TARGETS, v_dtype="fp32", rounding="nearest"):
    """Check apply()'s arguments against {name: module} and return (adapted module names, tie group
    of each). Needs module shapes only: a model built on the meta device (no weights) will do."""
    targets = tuple(targets)
    names = [n for n in find_modules(named, targets) if isinstance(named[n], nn.Linear)]
    matched = {n.rsplit(".", 1)[-1] for n in names}
    check(names and matched == set(targets),
          f"targets {sorted(set(targets) - matched) or list(targets)} match no nn.Linear in a decoder block")
    check(isinstance(u, int) and u >= 1, f"u={u} must be an integer >= 1")
    max_r = min(min(named[n].weight.shape) for n in names)
    check(isinstance(r, int) and 1 <= r <= max_r, f"r={r} must be in [1, {max_r}] (min(d_in, d_out) of the adapted layers)")
    check(v_dtype in V_DTYPES, f"v_dtype={v_dtype!r} must be one of {list(V_DTYPES)}")
    check(rounding in ROUNDINGS, f"rounding={rounding!r} must be one of {ROUNDINGS}")
    groups = tie_groups(names, len(names) if n_tie is None else n_tie, tie, targets)  # checks n_tie and tie
    return names, groups


def apply(model, u=13, r=2, n_tie=None, tie="tiled", targets=TARGETS, seed=0, v_dtype="fp32",
          cache_dir=CACHE_DIR, verbose=True, keep_merged=True, rounding="nearest"):
    """Freeze `model`, wrap its target linears in TinyLoRALinear, return the shared v (n_groups, u).

    n_tie=None ties all modules to one v. cache_dir=None disables the SVD cache. keep_merged:
    see TinyLoRALinear (fast, one extra copy of the adapted weights; False saves that memory).
    rounding: how W + dW is rounded to a bf16 base ("nearest" or "stochastic", see the docstring
    at the top). Every argument is checked before any SVD is computed."""
    check(not layers(model), "TinyLoRA is already applied to this model")
    targets = tuple(targets)
    named = dict(model.named_modules())
    names, groups = plan(named, u, r, n_tie, tie, targets, v_dtype, rounding)
    n_tie = len(names) if n_tie is None else n_tie

    linears = [named[n] for n in names]
    fp = fingerprint((n, lin.weight) for n, lin in zip(names, linears))
    usv = load_svd(linears, r, fp, cache_dir)
    dev = linears[0].weight.device
    v = nn.Parameter(torch.zeros(max(groups) + 1, u, device=dev))  # exactly 0: step 0 == base model
    stamp = VStamp(v) if keep_merged else None  # shared by all modules: when to recompute W'
    for p in model.parameters():
        p.requires_grad_(False)
    for i, (name, lin) in enumerate(zip(names, linears)):
        parent, _, child = name.rpartition(".")
        round_seed = 2**62 + seed * 2**20 + i if rounding == "stochastic" else None  # not P's stream
        layer = TinyLoRALinear(lin, *usv[i], make_P(seed, i, u, r), v, groups[i], v_dtype, stamp, round_seed)
        setattr(model.get_submodule(parent), child, layer)
    if stamp:  # check v once per forward, before any adapted layer runs, whatever their order
        stamp.hook = holder(model, names).register_forward_pre_hook(stamp.check)
    # v is registered in every adapted layer, so model.parameters() yields it (once). It is not
    # registered on the model itself: Hugging Face's model.dtype is the dtype of the model's first
    # parameter, which must stay the base dtype (the dtype vLLM is started in), not v's fp32.
    object.__setattr__(model, "tinylora_v", v)
    model.tinylora_config = dict(u=u, r=r, n_tie=n_tie, tie=tie, targets=list(targets), seed=seed,
                                 v_dtype=v_dtype, p_scale=P_SCALE, rounding=rounding, modules=names,
                                 fingerprint=fp)
    if verbose:
        print(summary(model))
    return v


def holder(model, names):
    """The innermost module containing every adapted layer that runs a forward of its own (e.g. the
    decoder, Qwen2Model, for model.layers.*): a forward of the model always passes through it first."""
    parts = os.path.commonprefix([n.split(".") for n in names])  # common leading name parts
    while parts and isinstance(model.get_submodule(".".join(parts)), (nn.ModuleList, nn.ModuleDict)):
        parts = parts[:-1]  # containers never run a forward
    return model.get_submodule(".".join(parts))


def summary(model):
    c, v = model.tinylora_config, model.tinylora_v
    nbytes = v.numel() * V_DTYPES[c["v_dtype"]].itemsize
    return (f"TinyLoRA: {len(c['modules'])} modules, {v.shape[0]} tie groups ({c['tie']}, n_tie={c['n_tie']}), "
            f"u={c['u']}, r={c['r']}: {v.numel()} trainable params = {nbytes} bytes in {c['v_dtype']}")


@torch.no_grad()
def merged_weights(model, dtype=None):
    """Yield (hf_name, W + dW) for each adapted module, computed in fp32 from the untouched base
    weight and rounded to `dtype` (default: the base dtype). The base weights are not modified. This
    is what weight sync into vLLM and export consume; with keep_merged, in the base dtype, these
    are the very tensors the model's forward uses."""
    named = layers(model)
    if named and named[0][1].stamp:
        named[0][1].stamp.check()  # v may have changed since the last forward
    for name, layer in named:
        yield f"{name}.weight", layer.merged(dtype)


@torch.no_grad()
def dw_kept(model, n=4096):
    """How much of dW survives in the merged weights in the base dtype (what vLLM samples from):
    <W' - W, dW> / <dW, dW> over n evenly spaced entries of every adapted module. 1.0: all of it
    (fp32, or a large v); 0.0: rounding erased it (bf16 W + a dW under half a bf16 step rounds back
    to W). Stochastic rounding keeps it near 1 on average. None when dW = 0."""
    num = den = 0.0
    for (_, layer), (_, W2) in zip(layers(model), merged_weights(model)):  # checks v first
        W = layer.base.weight
        idx = torch.arange(n, device=W.device) * (W.numel() - 1) // (n - 1)  # int64: exact for any size
        i, j = idx // W.shape[1], idx % W.shape[1]  # (row, column) of each sampled entry
        d = ((layer.US[i] @ layer.R()) * layer.V[j]).sum(1)  # dW at the samples, fp32
        kept = W2.reshape(-1)[idx].float() - W.reshape(-1)[idx].float()
        num, den = num + (kept * d).sum().item(), den + (d * d).sum().item()
    return num / den if den > 0 else None


@torch.no_grad()
def merge_and_unload(model):
    """Write W + dW into each base linear and put the plain nn.Linear back (for export)."""
    named = layers(model)
    for (name, layer), (_, W) in zip(named, list(merged_weights(model))):
        layer.base.weight.copy_(W)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    if named and named[0][1].stamp:
        named[0][1].stamp.hook.remove()
    del model.tinylora_v, model.tinylora_config
    return model


def save(model, path):
    """The adapter: v in its storage dtype + the config needed to rebuild the rest. No pickle."""
    c = model.tinylora_config
    v = model.tinylora_v.detach().to(V_DTYPES[c["v_dtype"]]).cpu().contiguous()
    tmp = path + ".tmp"
    save_file({"v": v}, tmp, metadata={"tinylora": json.dumps(c)})
    os.replace(tmp, path)  # atomic


def read_config(path):
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # missing file, not safetensors
        raise ValueError(f"{path}: cannot read a TinyLoRA adapter ({e})") from e
    check("tinylora" in meta, f"{path} is not a TinyLoRA adapter (no 'tinylora' metadata)")
    c = json.loads(meta["tinylora"])
    c.setdefault("rounding", "nearest")  # adapters saved before rounding was an option
    missing, extra = set(CONFIG_KEYS) - set(c), set(c) - set(CONFIG_KEYS)
    check(not missing and not extra, f"{path}: bad adapter config, missing {sorted(missing)}, unknown {sorted(extra)}")
    check(c["p_scale"] == P_SCALE or c["p_scale"] in OLD_P_SCALES,
          f"{path}: P scaling {c['p_scale']!r} is unknown to this code (it knows {[P_SCALE, *OLD_P_SCALES]})")
    return c


def read_v(path, c):
    """v of the adapter at `path` (config c) in fp32, in this code's P scaling; checked finite."""
    try:
        v = load_file(path)["v"].float()
    except KeyError:
        raise ValueError(f"{path}: no tensor 'v' in this adapter file") from None
    groups = max(tie_groups(c["modules"], c["n_tie"], c["tie"], c["targets"])) + 1
    check(v.shape == (groups, c["u"]), f"{path}: v has shape {tuple(v.shape)}, its config needs {(groups, c['u'])}")
    check(bool(torch.isfinite(v).all()), f"{path}: v has non-finite entries (NaN or inf): a diverged run?")
    if c["p_scale"] != P_SCALE:  # same random draws, another scale: the same model with a rescaled v
        v = v * (OLD_P_SCALES[c["p_scale"]](c["u"], c["r"]) / p_std(c["u"], c["r"]))
        warnings.warn(f"{path}: made with P scaling {c['p_scale']!r}; v converted to {P_SCALE!r} (same model)")
    return v


def load(model, path, cache_dir=CACHE_DIR, verbose=True, keep_merged=True):
    """Apply TinyLoRA as recorded in `path` (if not applied yet) and load its v. Returns v.
    Refuses an adapter made for another base model."""
    c = read_config(path)
    v = read_v(path, c)
    c["p_scale"] = P_SCALE
    if not layers(model):
        named = dict(model.named_modules())
        check(all(n in named for n in c["modules"]), f"{path}: adapter modules are missing from this model")
        fp = fingerprint((n, named[n].weight) for n in c["modules"])
        check(fp == c["fingerprint"], f"{path} was trained on another base model (weights fingerprint "
                                      f"{c['fingerprint']}, this model has {fp})")
        apply(model, c["u"], c["r"], c["n_tie"], c["tie"], c["targets"], c["seed"], c["v_dtype"],
              cache_dir, verbose, keep_merged, c["rounding"])
    check(model.tinylora_config == c, f"{path}: adapter config differs from the TinyLoRA already applied to this model")
    check(v.shape == model.tinylora_v.shape, f"{path}: v has shape {tuple(v.shape)}, expected {tuple(model.tinylora_v.shape)}")
    with torch.no_grad():
        model.tinylora_v.copy_(v)
    return model.tinylora_v


def export_peft_lora(model, out_dir, base_model_name_or_path=""):
    """Write the adapter as a standard rank-r LoRA (PEFT format, loadable by peft and vLLM's
    --enable-lora): lora_A = V^T (r, d_in), lora_B = U diag(S) R (d_out, r), alpha = r so scale 1."""
    os.makedirs(out_dir, exist_ok=True)
    c, tensors = model.tinylora_config, {}
    with torch.no_grad():
        for name, layer in layers(model):
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.V.T.contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = (layer.US @ layer.R()).contiguous().cpu()
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=c["r"], lora_alpha=c["r"], lora_dropout=0.0,
                  target_modules=c["targets"], bias="none", fan_in_fan_out=False, use_rslora=False,
                  use_dora=False, base_model_name_or_path=base_model_name_or_path, inference_mode=True)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export_merged(model, out_dir):
    """A plain Hugging Face checkpoint with W + dW merged (consumes the TinyLoRA wrapping)."""
    merge_and_unload(model).save_pretrained(out_dir)
