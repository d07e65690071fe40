"""Memory: what a GPU holds, how many tokens a micro-batch may have, the out-of-memory retry.

check_memory refuses a run that cannot fit before any weight loads; micro_batch_plan and pack size
the trainer's micro-batches (train_grpo.update, train_sft.sft_step) to the memory left once the
weights and the engine are in place. On a CPU, 8192 padded tokens per micro-batch.
"""
import torch

from machinery.cli import Refused
from machinery.options import is_grpo
from machinery.run_folder import restore


def activation_bytes(config, nbytes, ckpt):
    """Estimated autograd memory per token of the trainer's forward + backward (Qwen2/Llama decoder).
    A layer keeps ~(7 h + 2 kv + 4 m) values per token (norm inputs and outputs, q/k/v and attention
    output, MLP gate/up/activation/product) plus fp32 copies in its two RMSNorms (8 h bytes): 218 KiB
    at 7B in bf16; two layers' worth of gradients are in flight. With checkpointing each layer keeps
    only its input, and one layer is recomputed at a time."""
    h, m = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    layer = nbytes * (7 * h + 2 * kv + 4 * m) + 8 * h
    return (config.num_hidden_layers * nbytes * h + 3 * layer) if ckpt else (config.num_hidden_layers + 2) * layer


def logits_chunk(vocab):
    """Tokens per chunk of the LM head: ~256 MiB of fp32 logits at a time, never all (T, vocab)."""
    return max(64, 2**26 // vocab)


def check_memory(args, meta, names, longest):
    """Before any weight loads: trainer weights + kept W + dW + vLLM's share + one longest sequence
    (checkpointed) must fit the GPU; otherwise exit with the numbers and what to change."""
    named = dict(meta.named_parameters())
    nbytes = meta.get_input_embeddings().weight.element_size()
    total = torch.cuda.mem_get_info()[1]
    need = {"trainer weights": sum(p.numel() for p in named.values()) * nbytes,
            "kept W + dW": 0 if args.low_memory else sum(named[f"{n}.weight"].numel() for n in names) * nbytes,
            **({"vLLM (--gpu-memory-utilization)": args.gpu_memory_utilization * total}
               if getattr(args, "backend", None) == "vllm" else {}),  # train_sft.py and --backend hf: none
            f"activations of one {longest}-token sequence": longest * activation_bytes(meta.config, nbytes, True)
            + logits_chunk(meta.config.vocab_size) * meta.config.vocab_size * 10,
            "CUDA context and workspaces": 2 * 2**30}
    if sum(need.values()) > total:
        parts = ", ".join(f"{k} {x / 2**30:.1f}" for k, x in need.items())
        grpo = "a lower --gpu-memory-utilization or --max-new-tokens, " if is_grpo(args) else ""
        raise Refused(f"this GPU has {total / 2**30:.1f} GiB, the run needs {sum(need.values()) / 2**30:.1f} GiB "
                      f"({parts}). Try --low-memory, {grpo}or a larger GPU")


def free_for_activations(config):
    """Bytes the trainer may use for activations: 90% of the free device memory once weights and
    engine are in place, minus room for the logits chunks and workspaces."""
    torch.cuda.empty_cache()  # blocks cached by model loading and vLLM's profiling run
    free = torch.cuda.mem_get_info()[0] - logits_chunk(config.vocab_size) * config.vocab_size * 10 - 2**30
    return 0.9 * free


def micro_batch_plan(args, model, longest, act_bytes):
    """(gradient checkpointing on?, padded tokens per micro-batch) for a step whose longest sequence
    has `longest` tokens, given `act_bytes` bytes for activations (None on a CPU)."""
    nbytes = model.get_input_embeddings().weight.element_size()
    per_token = lambda ckpt: activation_bytes(model.config, nbytes, ckpt)
    if args.grad_ckpt == "auto":
        ckpt = act_bytes is not None and longest * per_token(False) > act_bytes
    else:
        ckpt = args.grad_ckpt == "always"
    tokens = args.micro_tokens or (int(act_bytes // per_token(ckpt)) if act_bytes is not None else 8192)
    if ckpt != model.is_gradient_checkpointing:
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    return ckpt, max(tokens, longest)


def pack(samples, micro_tokens):
    """Micro-batches of samples, longest first, each at most `micro_tokens` padded tokens (its size
    times its longest sequence): sorting by length leaves little padding."""
    out = []
    for s in sorted(samples, key=lambda s: -len(s.ids)):
        if out and (len(out[-1]) + 1) * len(out[-1][0].ids) <= micro_tokens:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def update_within_memory(update, args, model, opt, sched, v, samples, world, act_bytes, state):
    """update(); if the GPU runs out of memory, the step's updates start again from `state` with half
    the activation budget (at most 3 times; not with a fixed --micro-tokens). Returns (metrics, the
    budget that fitted: later steps keep it)."""
    for attempt in range(4):
        try:
            return update(args, model, opt, sched, v, samples, world, act_bytes), act_bytes
        except torch.OutOfMemoryError:
            if attempt == 3 or act_bytes is None or args.micro_tokens:
                raise
            restore(state, v, opt, sched)
            v.grad, act_bytes = None, act_bytes / 2
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            print(f"warning: the trainer ran out of GPU memory; retrying the updates with micro-batches "
                  f"for {act_bytes / 2**30:.1f} GiB of activations")
