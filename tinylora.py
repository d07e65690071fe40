"""TinyLoRA: adapt every linear layer of a frozen LLM with a handful of numbers.

"Learning to Reason in 13 Parameters" (Morris et al., 2026, arXiv 2602.04118, Sec. 3). For each
adapted linear layer with frozen weight W (d_out, d_in):

    W = U S V^T                 exact SVD in fp32, top r: U (d_out, r), S (r,), V (d_in, r)
    R = sum_i v_i P_i           v (u,) trainable, P (u, r, r) fixed random
    W' = W + U diag(S) R V^T

One v is shared by a tie group of n_tie modules (default: all of them, so u = 13 means 13 trainable
numbers). The choices, each explained where it is made: v starts at exactly 0 (step 0 is the base
model, bit for bit); SVD signs are canonicalised (the same adapter on every device); P is drawn on
the CPU from (seed, module index) at the scale of the paper authors' code (their learning rates
apply); W' is kept merged in the base dtype and rebuilt only when v changes (the frozen model's own
GEMMs, and the trainer computes with the very tensors synced into vLLM).

Reading order: the math (modules, tie groups, SVD, P), the adapted layer, applying it to a model,
then the adapter file (SVD cache, save / load / export) at the end.

    v = tinylora.apply(model, u=13)     # freezes the model; v is the only trainable tensor
    python -m pytest test_tinylora.py
"""
import glob
import hashlib
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TIE_MODES = ("tiled", "structured")
V_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ROUNDINGS = ("nearest", "stochastic")
ALPHA = 32  # the paper authors' lora_alpha: dW per unit of v matches their code (see make_P)
CACHE_DIR = os.environ.get("TINYLORA_CACHE", os.path.expanduser("~/.cache/tinylora"))  # SVD factors

# -----------------------------------------------------------------------------
# the math: which modules, tied how; the frozen SVD factors; the fixed random P


def find_modules(names: Iterable[str], targets: tuple[str, ...] = TARGETS) -> list[str]:
    """Names of decoder-block linears to adapt, ordered by depth, then by target type."""
    found = []
    for name in names:
        block = re.search(r"\.(\d+)\.", "." + name)  # e.g. model.layers.12.mlp.up_proj
        kind = name.rsplit(".", 1)[-1]
        if block and kind in targets:
            found.append((int(block.group(1)), targets.index(kind), name))
    return [name for _, _, name in sorted(found)]


def tie_groups(modules: list[str], n_tie: int, tie: str = "tiled", targets: tuple[str, ...] = TARGETS) -> list[int]:
    """The tie group of each module (same order as `modules`): n_tie modules share one v.
    tiled: consecutive runs in (depth, type) order, the paper's better choice; structured: by type
    first (all q_proj, then all k_proj, ...), then depth."""
    n = len(modules)
    require(1 <= n_tie <= n, f"n_tie={n_tie} must be in [1, {n}] (the number of adapted modules)")
    require(tie in TIE_MODES, f"tie={tie!r} must be one of {TIE_MODES}")
    order = list(range(n))
    if tie == "structured":
        kind = lambda i: targets.index(modules[i].rsplit(".", 1)[-1])
        order.sort(key=lambda i: (kind(i), i))
    groups = [0] * n
    for rank, i in enumerate(order):
        groups[i] = rank // n_tie
    return groups


def svd_top_r(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-r SVD of W (d_out, d_in), fp32, canonical signs: U (d_out, r), S (r,), V (d_in, r).
    Contiguous, as a reload from the cache is: strided copies would round products differently.
    On the GPU when there is one, even for a model on the CPU (eval.py's for vLLM): a 1.5B model's
    196 SVDs ran over 6 minutes on 16 CPU cores; on an H200 a whole 200-row eval took 68 s."""
    dev = "cuda" if torch.cuda.is_available() and not W.is_cuda else W.device  # a rank: its GPU
    U, S, Vh = torch.linalg.svd(W.detach().to(dev).float(), full_matrices=False)
    U, V = canonical_signs(U[:, :r], Vh[:r].T)
    return tuple(x.to(W.device).contiguous() for x in (U, S[:r], V))


def canonical_signs(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (u_i, v_i) so that the largest-|entry| of u_i is positive (U V^T unchanged).
    Both signs are valid SVDs but give different adapters: without this, cuSOLVER and LAPACK could
    turn one trained v into two different models."""
    sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))  # (1, r)
    return U * sign, V * sign


def p_std(u: int, r: int) -> float:
    """Standard deviation of P's entries: ALPHA / (r sqrt(u))."""
    return ALPHA / (r * math.sqrt(u))


def make_P(seed: int, index: int, u: int, r: int) -> torch.Tensor:
    """The fixed random P (u, r, r) of module `index`: a CPU generator, fp32, so it is the same on
    every machine. Entries N(0, 1) * 32 / (r sqrt(u)): the paper authors' code draws N(0, 1),
    divides R by sqrt(u) and scales dW by lora_alpha / r with lora_alpha = 32; folded into P, the
    same v gives the same dW, and a learning rate means what it means there (Adam moves each v_i
    by about lr per update)."""
    g = torch.Generator(device="cpu").manual_seed(seed * 2**20 + index)
    return torch.randn(u, r, r, generator=g) * p_std(u, r)


def require(ok: object, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


# -----------------------------------------------------------------------------
# the adapted layer: TinyLoRADef, the definition alone; TinyLoRALinear, the same layer with W' kept
# merged (fast) and apply()'s options. To copy them into other code, after
# `import math, torch, torch.nn as nn, torch.nn.functional as F`, take ALPHA, p_std, make_P,
# canonical_signs, svd_top_r and TinyLoRADef; for the fast layer also round_stochastic, VWatch,
# KeptLinear and TinyLoRALinear (README, "The layer on its own"; tests paste exactly those lists).


class TinyLoRADef(nn.Module):
    """A frozen nn.Linear adapted by the definition, per call:
    y = x W^T + b + ((x V) R^T diag(S)) U^T with R = sum_i v[group]_i P_i. dW is never formed (no
    extra memory; v = 0 adds exact zeros).

    v (n_groups, u) is a Parameter shared by the layers of a model; this layer uses row `group` (a
    v of shape (u,) is one group). P (u, r, r): make_P(seed, index, u, r), whose scale makes the
    paper's learning rates apply (a plain torch.randn(u, r, r) is 4.4x smaller at u = 13, r = 2).
    usv: (U, S, V) if computed already (e.g. from a cache), else the SVD is computed here."""

    def __init__(self, base: nn.Linear, v: torch.Tensor, P: torch.Tensor, group: int = 0,
                 usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if not (v.dim() in (1, 2) and P.dim() == 3 and v.shape[-1] == P.shape[0] == len(P) and
                P.shape[1] == P.shape[2]):
            raise ValueError(f"{type(self).__name__}: v must be (u,) or (groups, u) and P (u, r, "
                             f"r) with the same u; got v {tuple(v.shape)}, P {tuple(P.shape)}")
        U, S, V = usv if usv is not None else svd_top_r(base.weight, P.shape[1])
        self.base, self.v, self.group = base, v, group
        dev, dtype = base.weight.device, base.weight.dtype
        for k, t in zip("USVP", (U, S, V, P)):  # the definition, fp32
            self.register_buffer(k, t.to(dev, torch.float32), persistent=False)
        self.register_buffer("US", self.U * self.S, persistent=False)  # U diag(S) (d_out, r), fixed
        # U diag(S) and V in the base weight's dtype, for the products with activations
        self.register_buffer("US_w", self.US.to(dtype), persistent=False)
        self.register_buffer("V_w", self.V.to(dtype), persistent=False)

    def v_row(self):
        """This layer's v (u,)."""
        return self.v if self.v.dim() == 1 else self.v[self.group]

    def R(self):
        """R = sum_i v_i P_i, (r, r)."""
        return (self.v_row() @ self.P.flatten(1)).view(self.P.shape[1:])

    def delta_weight(self):
        """dW = U diag(S) R V^T, fp32 (d_out, d_in)."""
        return self.US @ self.R() @ self.V.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        y = F.linear(x2, self.base.weight, self.base.bias)  # exactly the frozen layer's output
        h = (x2 @ self.V_w.to(x2.dtype)) @ self.R().T.to(x2.dtype)  # (N, r): x V R^T
        # + h diag(S) U^T, accumulated into y in place (dtypes follow y: autocast may differ)
        return y.addmm_(h.to(y.dtype), self.US_w.T.to(y.dtype)).view(*x.shape[:-1], -1)


class VWatch:
    """Sees every change of v by comparing its value: fused AdamW and writes through .data leave
    autograd's version counter alone. `version` counts the changes seen. apply() calls check() once
    per forward of the model, from a pre-hook (`hook`); a layer without one checks at every call."""

    def __init__(self, v):
        self.v, self.last, self.version, self.hook = v, None, 0, None

    def check(self, *_):
        v = self.v.detach()
        if self.last is None or self.last.device != v.device or not torch.equal(v, self.last):
            self.last, self.version = v.clone(), self.version + 1


class KeptLinear(torch.autograd.Function):
    """y = x W'^T + b with W' = W + U diag(S) R V^T already built; gradients to x and v.

    v is an input only so that autograd hands it a gradient: it acts through W', built from it. The
    forward and dx are the frozen model's own GEMMs with W' for W; the extra work is
    dL/dR = (dy U diag(S))^T (x V), two skinny products, and dL/dv_i = <dL/dR, P_i>."""

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
            dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
            x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
            # (r, r), summed over the tokens in fp32
            dR = (dy2 @ US.to(dy.dtype)).float().T @ (x2 @ V.to(x.dtype)).float()
            dv = P.flatten(1) @ dR.flatten()  # (u,)
        return dx, dv, None, None, None, None, None


def round_stochastic(x: torch.Tensor, seed: int) -> torch.Tensor:
    """fp32 -> bf16, rounding each entry up with probability equal to its position between its two
    bf16 neighbours (E[result] = x), with a fixed random threshold per entry drawn from `seed`. On
    the bit pattern: add a random 16-bit number below bf16's last mantissa bit, cut those 16 bits
    off (a carry is exactly a round-up; an x already on the bf16 grid is unchanged)."""
    g = torch.Generator(device=x.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, x.shape, generator=g, device=x.device, dtype=torch.int32)
    bits = (x.contiguous().view(torch.int32) + noise) & -65536  # -65536 = 0xFFFF0000
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


class TinyLoRALinear(TinyLoRADef):
    """TinyLoRADef with W' = W + U diag(S) R V^T kept merged, and apply()'s options.

    keep_merged=True (default) is the fast path: W' is kept in the base dtype, rebuilt in fp32 from
    the untouched W whenever v changes, so y = x W'^T + b is one GEMM (KeptLinear). v's value is
    checked at every call (one host sync); tinylora.apply() checks it once per model forward.
    keep_merged=False is TinyLoRADef's forward, the definition per call.
    round_seed: None rounds W' to nearest in the base dtype; an int rounds fp32 -> bf16
    stochastically with thresholds from it (round_stochastic). v_dtype: the forward sees v rounded
    to it (straight-through gradient): an adapter saved in that dtype is exactly the trained model.
    """

    def __init__(self, base: nn.Linear, v: torch.Tensor, P: torch.Tensor, group: int = 0,
                 usv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None, keep_merged: bool = True,
                 v_dtype: torch.dtype = torch.float32, round_seed: int | None = None, watch: VWatch | None = None):
        super().__init__(base, v, P, group, usv)
        self.v_dtype, self.keep_merged, self.round_seed = v_dtype, keep_merged, round_seed
        self.watch = watch or VWatch(v)  # apply() passes one watch, shared and hooked
        self.kept_at = None  # the watch's version W_kept was built for
        self.register_buffer("W_kept", None, persistent=False)  # W' in the base dtype (fast path)

    def v_row(self):
        """This layer's v (u,), fp32, as the forward sees it: rounded to v_dtype."""
        v = super().v_row()
        if self.v_dtype != torch.float32:
            v = v + (v.to(self.v_dtype).float() - v).detach()
        return v

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W' = W + dW in `dtype` (default: the base dtype), added in fp32 from the untouched W.
        With keep_merged, in the base dtype: the kept copy, rebuilt if v changed since."""
        dtype = dtype or self.base.weight.dtype
        if self.keep_merged and dtype == self.base.weight.dtype:
            if self.kept_at != self.watch.version:
                self.W_kept = None  # free the old copy before making the new one
                self.W_kept, self.kept_at = self._merge(dtype), self.watch.version
            return self.W_kept
        return self._merge(dtype)

    def _merge(self, dtype):
        with torch.autocast(self.base.weight.device.type, enabled=False):  # fp32 dW, even under AMP
            W = self.base.weight + self.delta_weight()  # bf16 W + fp32 dW -> fp32
        if dtype == torch.bfloat16 and self.round_seed is not None and W.dtype == torch.float32:
            return round_stochastic(W, self.round_seed)
        return W.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.keep_merged:
            return super().forward(x)  # the definition
        if self.watch.hook is None:  # no model-level check: look at v now
            self.watch.check()
        W = self.merged_weight()
        return KeptLinear.apply(x, self.v_row(), W, self.base.bias, self.US_w, self.V_w, self.P)


# -----------------------------------------------------------------------------
# applying it to a model


def choose_modules(named: dict[str, nn.Module], u: int = 13, r: int = 2, n_tie: int | None = None, tie: str = "tiled",
                   targets: Iterable[str] = TARGETS, v_dtype: str = "fp32",
                   rounding: str = "nearest") -> tuple[list[str], list[int]]:
    """Check apply()'s arguments against {name: module}; return (adapted module names, the tie
    group of each). Shapes only: a model built on the meta device (no weights) will do."""
    targets = tuple(targets)
    names = [n for n in find_modules(named, targets) if isinstance(named[n], nn.Linear)]
    matched = {n.rsplit(".", 1)[-1] for n in names}
    require(names and matched == set(targets),
            f"targets {sorted(set(targets) - matched) or list(targets)} match no nn.Linear in a "
            f"decoder block")
    require(isinstance(u, int) and u >= 1, f"u={u} must be an integer >= 1")
    max_r = min(min(named[n].weight.shape) for n in names)
    require(isinstance(r, int) and 1 <= r <= max_r,
            f"r={r} must be in [1, {max_r}] (min(d_in, d_out) of the adapted layers)")
    require(v_dtype in V_DTYPES, f"v_dtype={v_dtype!r} must be one of {list(V_DTYPES)}")
    require(rounding in ROUNDINGS, f"rounding={rounding!r} must be one of {ROUNDINGS}")
    groups = tie_groups(names, len(names) if n_tie is None else n_tie, tie, targets)
    return names, groups


def apply(model: nn.Module, u: int = 13, r: int = 2, n_tie: int | None = None, tie: str = "tiled",
          targets: Iterable[str] = TARGETS, seed: int = 0, v_dtype: str = "fp32", cache_dir: str | None = CACHE_DIR,
          verbose: bool = True, keep_merged: bool = True, rounding: str = "nearest") -> nn.Parameter:
    """Freeze `model`, put TinyLoRALinear in place of its target linears; return v (groups, u).

    n_tie=None ties all modules to one v. cache_dir: where SVD factors are cached (None: nowhere).
    keep_merged: see TinyLoRALinear. rounding: how W + dW
    is rounded to a bf16 base, "nearest" (erases entries of dW under half a bf16 step of W) or
    "stochastic" (keeps them on average). Every argument is checked before any SVD is computed."""
    require(not adapted_layers(model), "TinyLoRA is already applied to this model")
    named = dict(model.named_modules())
    names, groups = choose_modules(named, u, r, n_tie, tie, targets, v_dtype, rounding)
    linears = [named[n] for n in names]
    bad = next((n for n, lin in zip(names, linears) if not torch.isfinite(lin.weight).all()), None)
    require(bad is None, f"{bad}.weight has non-finite entries (NaN or inf): a broken checkpoint")
    fp = fingerprint((n, lin.weight) for n, lin in zip(names, linears))
    usv = load_svd(linears, r, fp, cache_dir)
    v = nn.Parameter(torch.zeros(max(groups) + 1, u, device=linears[0].weight.device))  # exactly 0
    watch = VWatch(v)  # one for all layers: when to rebuild W'
    for p in model.parameters():
        p.requires_grad_(False)
    for i, (name, lin) in enumerate(zip(names, linears)):
        round_seed = 2**62 + seed * 2**20 + i if rounding == "stochastic" else None  # not P's seed
        layer = TinyLoRALinear(lin, v, make_P(seed, i, u, r), groups[i], usv[i], keep_merged,
                               V_DTYPES[v_dtype], round_seed, watch)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    if keep_merged:  # check v once per forward, before any adapted layer runs, whatever their order
        watch.hook = decoder_of(model, names).register_forward_pre_hook(watch.check)
    # v is registered in every adapted layer, so model.parameters() yields it (once), but not on the
    # model: Hugging Face's model.dtype is its first parameter's dtype, and must stay the base dtype
    # (the dtype vLLM is started in), not v's fp32.
    object.__setattr__(model, "tinylora_v", v)
    if hasattr(model, "save_pretrained"):  # it would fail on v, shared by every adapted layer
        object.__setattr__(model, "save_pretrained", _save_pretrained_refused)
    model.tinylora_config = dict(u=u, r=r, n_tie=len(names) if n_tie is None else n_tie, tie=tie,
                                 targets=list(targets), seed=seed, v_dtype=v_dtype, p_scale=P_SCALE,
                                 rounding=rounding, modules=names, fingerprint=fp)
    if verbose:
        print(describe(model))
    return v


def _save_pretrained_refused(*args, **kwargs):
    raise ValueError("this model has TinyLoRA applied: tinylora.save(model, 'adapter.safetensors') "
                     "writes its adapter (v + config, bytes), tinylora.export_merged(model, dir) a "
                     "plain checkpoint with W + dW merged")


def adapted_layers(model: nn.Module) -> list[tuple[str, TinyLoRALinear]]:
    """[(hf_name, TinyLoRALinear)] in module order (depth, then type)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TinyLoRALinear)]


def decoder_of(model: nn.Module, names: list[str]) -> nn.Module:
    """The innermost module holding every adapted layer that runs a forward of its own (Qwen2Model
    for model.layers.*): a forward of the model passes through it before any adapted layer."""
    parts = os.path.commonprefix([n.split(".") for n in names])  # common leading name parts
    containers = (nn.ModuleList, nn.ModuleDict)  # they never run a forward
    while parts and isinstance(model.get_submodule(".".join(parts)), containers):
        parts = parts[:-1]
    return model.get_submodule(".".join(parts))


def describe(model: nn.Module) -> str:
    """One line: modules, tie groups, u, r, trainable parameters and their bytes."""
    c, v = model.tinylora_config, model.tinylora_v
    nbytes = v.numel() * V_DTYPES[c["v_dtype"]].itemsize
    return (f"TinyLoRA: {len(c['modules'])} modules, {v.shape[0]} tie groups ({c['tie']}, "
            f"n_tie={c['n_tie']}), u={c['u']}, r={c['r']}: {v.numel()} trainable params = "
            f"{nbytes} bytes in {c['v_dtype']}")


@torch.no_grad()
def merged_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_name, W + dW) of each adapted module, computed in fp32 from the untouched base
    weight and rounded to `dtype` (default: the base dtype); the model is not modified. What weight
    sync into vLLM and export consume: with keep_merged, in the base dtype, the very tensors the
    forward uses."""
    named = adapted_layers(model)
    for watch in {id(layer.watch): layer.watch for _, layer in named}.values():
        watch.check()  # v may have changed since the last forward
    for name, layer in named:
        yield f"{name}.weight", layer.merged_weight(dtype)


@torch.no_grad()
def dw_kept(model: nn.Module, n: int = 4096) -> float | None:
    """How much of dW survives in the merged weights in the base dtype (what vLLM samples from):
    <W' - W, dW> / <dW, dW> over n evenly spaced entries of every adapted module. 1.0: all of it;
    0.0: rounding erased it (bf16 W + a dW under half a bf16 step rounds back to W). None: dW = 0"""
    num = den = 0.0  # fp64 sums on the device: one wait for the GPU, not two per module
    for (_, layer), (_, W2) in zip(adapted_layers(model), merged_weights(model)):
        W = layer.base.weight
        idx = torch.arange(n, device=W.device) * (W.numel() - 1) // (n - 1)  # int64: exact
        i, j = idx // W.shape[1], idx % W.shape[1]  # (row, column) of each sampled entry
        d = ((layer.US[i] @ layer.R()) * layer.V[j]).sum(1)  # dW at the samples, fp32
        kept = W2.reshape(-1)[idx].float() - W.reshape(-1)[idx].float()
        num, den = num + (kept * d).sum().double(), den + (d * d).sum().double()
    num, den = float(num), float(den)
    return num / den if den > 0 else None


# -----------------------------------------------------------------------------
# the adapter file and the SVD cache: save / load / export

P_SCALE = "normal(0, 1) * 32 / (r * sqrt(u))"  # recorded in every adapter file
OLD_P_SCALES = {"normal(0, 1/(u*r))": lambda u, r: 1 / math.sqrt(u * r)}  # earlier files: std of P
CONFIG_KEYS = ("u", "r", "n_tie", "tie", "targets", "seed", "v_dtype", "p_scale", "rounding",
               "modules", "fingerprint")


def fingerprint(weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Short hash of named weights from 4096 evenly spaced entries each, rounded to bf16, so a bf16
    and an fp32 load of one checkpoint agree on every device. It tells models and fine-tunes apart;
    it does not notice a single edited entry."""
    h = hashlib.sha256()
    for name, W in weights:
        idx = torch.arange(4096, device=W.device) * (W.numel() - 1) // 4095  # int64: exact
        sample = W.detach().reshape(-1)[idx].to(torch.bfloat16).view(torch.int16).cpu()
        h.update(f"{name}{tuple(W.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def load_svd(linears: list[nn.Linear], r: int, fp: str, cache_dir: str | None) -> list[tuple[torch.Tensor, ...]]:
    """[(U, S, V)] of each linear: from cache_dir when there and sound, else computed (and cached
    when the directory is writable; if not, the run goes on without a cache, with a warning). The
    file is keyed by the weights' fingerprint, r and dtype: a bf16 and an fp32 copy of one model
    share a fingerprint, but not their SVDs."""
    dtype = str(linears[0].weight.dtype).removeprefix("torch.")
    path = cache_dir and os.path.join(cache_dir, f"svd-{fp}-r{r}-{dtype}.safetensors")
    for stale in glob.glob(f"{glob.escape(path)}.*.tmp") if path else []:  # a killed process's
        pid = stale.rsplit(".", 2)[-2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            os.remove(stale)
    if path and os.path.exists(path):
        try:
            t = load_file(path)
            out = [(t[f"{i}.U"], t[f"{i}.S"], t[f"{i}.V"]) for i in range(len(linears))]
            for lin, (U, S, V) in zip(linears, out):
                d_out, d_in = lin.weight.shape
                shapes = (U.shape, S.shape, V.shape)
                require(shapes == ((d_out, r), (r,), (d_in, r)), "shapes differ")
                require(all(torch.isfinite(x).all() for x in (U, S, V)), "non-finite entries")
                W = lin.weight.detach().float()  # the factors must be this W's: W V = U diag(S)
                misfit = (W @ V.to(W.device) - (U * S).to(W.device)).abs().max()
                require(misfit <= 1e-3 * S[0], "factors do not fit W")
            return out
        except Exception as e:  # truncated, edited or foreign file: never apply it, replace it
            warnings.warn(f"SVD cache {path} is unusable ({e}); recomputing it")
    out = [tuple(x.cpu() for x in svd_top_r(lin.weight, r)) for lin in linears]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the SVDs' workspace goes back before vLLM measures free memory
    if path:
        tensors = {f"{i}.{k}": x for i, usv in enumerate(out) for k, x in zip("USV", usv)}
        tmp = f"{path}.{os.getpid()}.tmp"  # one temp file per process: torchrun ranks write at once
        try:
            os.makedirs(cache_dir, exist_ok=True)
            save_file(tensors, tmp)
            os.replace(tmp, path)  # atomic: a killed run never leaves half a cache
        except OSError as e:  # read-only or full disk: the factors are computed, only not kept
            warnings.warn(f"SVD cache not written to {cache_dir} ({e.strerror or e}); going on "
                          f"without it")
            if os.path.exists(tmp):
                os.remove(tmp)
    return out


def save(model: nn.Module, path: str) -> None:
    """The adapter: v in its storage dtype + the config needed to rebuild the rest. No pickle."""
    c = model.tinylora_config
    v = model.tinylora_v.detach().to(V_DTYPES[c["v_dtype"]]).cpu().contiguous()
    tmp = path + ".tmp"
    save_file({"v": v}, tmp, metadata={"tinylora": json.dumps(c)})
    os.replace(tmp, path)  # atomic


def read_config(path: str) -> dict:
    """The config of the adapter file at `path`, checked: every key present, a known P scale."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # missing file, not safetensors
        raise ValueError(f"{path}: cannot read a TinyLoRA adapter ({e})") from e
    require("tinylora" in meta, f"{path} is not a TinyLoRA adapter (no 'tinylora' metadata)")
    c = json.loads(meta["tinylora"])
    c.setdefault("rounding", "nearest")  # adapters saved before rounding was an option
    missing, extra = set(CONFIG_KEYS) - set(c), set(c) - set(CONFIG_KEYS)
    require(not missing and not extra,
            f"{path}: bad adapter config, missing {sorted(missing)}, unknown {sorted(extra)}")
    require(c["p_scale"] == P_SCALE or c["p_scale"] in OLD_P_SCALES,
            f"{path}: P scaling {c['p_scale']!r} is unknown to this code (it knows "
            f"{[P_SCALE, *OLD_P_SCALES]})")
    return c


def read_v(path: str, c: dict) -> torch.Tensor:
    """v of the adapter at `path` (config c), fp32, in this code's P scaling; checked finite."""
    try:
        v = load_file(path)["v"].float()
    except KeyError:
        raise ValueError(f"{path}: no tensor 'v' in this adapter file") from None
    groups = max(tie_groups(c["modules"], c["n_tie"], c["tie"], c["targets"])) + 1
    require(v.shape == (groups, c["u"]),
            f"{path}: v has shape {tuple(v.shape)}, its config needs {(groups, c['u'])}")
    require(bool(torch.isfinite(v).all()),
            f"{path}: v has non-finite entries (NaN or inf): a diverged run?")
    if c["p_scale"] != P_SCALE:  # the same random draws at another scale: v rescaled, same model
        v = v * (OLD_P_SCALES[c["p_scale"]](c["u"], c["r"]) / p_std(c["u"], c["r"]))
        warnings.warn(f"{path}: made with P scaling {c['p_scale']!r}; v converted to {P_SCALE!r} "
                      f"(same model)")
    return v


def check_base(model: nn.Module, path: str, c: dict | None = None) -> None:
    """Raises ValueError unless the adapter at `path` (config c) was made for this model's base
    weights: its modules in the model, and their weights' fingerprint the one it recorded."""
    c = c or read_config(path)
    if adapted_layers(model):
        fp = model.tinylora_config["fingerprint"]
    else:
        named = dict(model.named_modules())
        require(all(n in named for n in c["modules"]), f"{path}: adapter modules are missing from this model")
        fp = fingerprint((n, named[n].weight) for n in c["modules"])
    require(fp == c["fingerprint"], f"{path} was trained on another base model (weights "
            f"fingerprint {c['fingerprint']}, this model has {fp})")


def load(model: nn.Module, path: str, cache_dir: str | None = CACHE_DIR, verbose: bool = True,
         keep_merged: bool = True) -> nn.Parameter:
    """Apply TinyLoRA as recorded in `path` (if not applied yet) and load its v. Returns v.
    Refuses an adapter made for another base model."""
    c = read_config(path)
    v = read_v(path, c)
    c["p_scale"] = P_SCALE
    check_base(model, path, c)
    applied = bool(adapted_layers(model))
    if not applied:
        apply(model, c["u"], c["r"], c["n_tie"], c["tie"], c["targets"], c["seed"], c["v_dtype"],
              cache_dir, verbose, keep_merged, c["rounding"])
    require(model.tinylora_config == c,
            f"{path}: adapter config differs from the TinyLoRA already applied to this model")
    with torch.no_grad():
        model.tinylora_v.copy_(v)
    return model.tinylora_v


def export_peft_lora(model: nn.Module, out_dir: str, base_model_name_or_path: str = "") -> None:
    """Write the adapter as a standard rank-r LoRA (PEFT format, loadable by peft and by vLLM's
    --enable-lora): lora_A = V^T (r, d_in), lora_B = U diag(S) R (d_out, r), alpha = r: scale 1.
    Equal to the TinyLoRA model in fp32. On a bf16 base the LoRA adds B A x in bf16 at run time,
    while the trained model ran bf16(W + dW): the two differ by rounding until the LoRA is merged
    (logits up to ~0.06 apart on the tiny test model); export_merged gives the trained weights."""
    os.makedirs(out_dir, exist_ok=True)
    c, tensors = model.tinylora_config, {}
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.V.T.contiguous().cpu()
            B = layer.US @ layer.R()  # (d_out, r)
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous().cpu()
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"))
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", r=c["r"], lora_alpha=c["r"],
                  lora_dropout=0.0, target_modules=c["targets"], bias="none", fan_in_fan_out=False,
                  use_rslora=False, use_dora=False, inference_mode=True,
                  base_model_name_or_path=base_model_name_or_path)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Write W + dW into each base linear and put the plain nn.Linear back (for export)."""
    for (_, layer), (_, W) in zip(adapted_layers(model), list(merged_weights(model))):
        layer.base.weight.copy_(W)
    unapply(model)
    return model


def unapply(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Put each adapted layer's own nn.Linear back (its weight as it is) and forget v; returns
    [(hf_name, weight)] of the restored linears."""
    named = adapted_layers(model)
    for name, layer in named:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base)
    if named and named[0][1].watch.hook:
        named[0][1].watch.hook.remove()
    del model.tinylora_v, model.tinylora_config
    model.__dict__.pop("save_pretrained", None)  # the class's own again
    return [(f"{name}.weight", layer.base.weight) for name, layer in named]


def export_merged(model: nn.Module, out_dir: str) -> None:
    """A plain Hugging Face checkpoint with W + dW merged (consumes the TinyLoRA wrapping)."""
    merge_and_unload(model).save_pretrained(out_dir)
