"""Data parallel (torchrun): joining the process group, ranks, the metrics' all-reduce.

Each rank runs its own engine on its share of the prompts; v's gradient (u numbers per tie group) is
all that train_grpo.update and train_sft.sft_step all-reduce; all_mean combines the step's metrics
and checks that every rank holds the same v.
"""
import os

import torch
import torch.distributed as dist


def rank_world():
    """(rank, world size) under torchrun, (0, 1) otherwise (vLLM may start torch.distributed itself)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_distributed():
    """Started by torchrun: join its process group (NCCL, one GPU per process; gloo on CPUs), True."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def all_mean(m, world, device, v):
    """Combine the step's metrics over ranks (mean; max for tis_max and peak_gib; sum for counts), and
    check that every rank holds exactly the same v (a max and a min over u numbers)."""
    if world == 1:
        return m
    keys = sorted(k for k in m if k not in ("step", "epoch") and m[k] is not None)
    x = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=device)
    mx = x.clone()
    dist.all_reduce(x)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    sums = ("tokens", "trained_tokens", "micro_batches")
    out = {k: mx[i].item() if k in ("tis_max", "peak_gib") else x[i].item() / (1 if k in sums else world)
           for i, k in enumerate(keys)}
    out.update(step=m["step"], epoch=m["epoch"])
    hi, lo = v.detach().clone(), -v.detach()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MAX)
    if not (torch.equal(hi, v) and torch.equal(-lo, v)):  # ranks diverged: fail loudly, not silently
        raise RuntimeError(f"rank {dist.get_rank()}: ranks hold different v after step {m['step']}")
    return out
