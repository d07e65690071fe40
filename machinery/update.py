"""The bookkeeping of train_grpo.update(): how its samples run, and the step's trainer metrics.

update() itself says which samples train (a non-zero advantage), the probe group, the loss and its
divisor. Plan packs those samples into micro-batches that fit memory (machinery.memory) and computes
the metrics; Counts adds up what update() counts (clipped and capped tokens, skipped updates).
"""
import torch

from machinery.memory import micro_batch_plan, pack


class Plan:
    """How update() runs the samples it trains (per mini-batch) and its probe group: packed into
    micro-batches that fit memory, gradient checkpointing decided, logp_vllm on the trainer's device;
    and the step's trainer metrics."""

    def __init__(self, args, model, samples, trained, probe, act_bytes, device):
        self.samples, self.trained, self.probe, self.device = samples, trained, probe, device
        longest = max((len(s.ids) for mb in trained + [probe] for s in mb), default=1)
        self.ckpt, self.micro_tokens = micro_batch_plan(args, model, longest, act_bytes)
        self.packs = [pack(mb, self.micro_tokens) for mb in trained]
        for s in samples:
            s.logp_vllm = s.logp_vllm.to(device)

    def before_update(self):
        """The micro-batches whose logp_old needs a pass before the first update: mini-batches 1..,
        and the probe group."""
        return [m for mb in self.packs[1:] for m in mb] + pack(self.probe, self.micro_tokens)

    def metrics(self, counts, opt, t_logp_old, t_update):
        """The step's trainer metrics: mismatch (mean |logp_old - logp_vllm| over the trained tokens),
        tis_max / tis_capped (the largest importance weight, the share at the cap), clip_frac (over
        the updates after the first), signal (share of samples in groups with an advantage)."""
        seen = [s for mb in self.trained + [self.probe] for s in mb]
        n_tok = sum(len(s.logp_vllm) for s in seen)
        diff = torch.cat([s.logp_old - s.logp_vllm for s in seen]) if seen else torch.zeros(0)
        c = counts.__dict__
        return dict(mismatch=diff.abs().sum().item() / max(n_tok, 1), tis_max=diff.exp().max().item() if n_tok else 1.0,
                    tis_capped=c["capped"] / max(n_tok, 1), clip_frac=c["clipped"] / max(c["can_clip"], 1),
                    grad_norm=c["grad_norm"], skipped=c["skipped"], lr=c.get("lr", opt.param_groups[0]["lr"]),
                    signal=sum(len(mb) for mb in self.trained) / len(self.samples),
                    trained_tokens=n_tok if not self.probe else 0, micro_batches=sum(len(p) for p in self.packs),
                    grad_ckpt=int(self.ckpt), t_logp_old=t_logp_old, t_update=t_update)


class Counts:
    """update()'s counters: clipped / capped tokens, skipped updates, the mean gradient norm, the lr."""

    def __init__(self):
        self.clipped = self.capped = self.can_clip = self.skipped = 0
        self.grad_norm = 0.0

    def micro(self, k, clipped, capped, n):
        self.capped += capped
        if k > 0:  # the first update's ratio is exactly 1: it cannot clip
            self.clipped += clipped
            self.can_clip += n

    def update(self, grad_norm, opt, n_updates):
        self.grad_norm += grad_norm.item() / n_updates
        self.lr = opt.param_groups[0]["lr"]  # the lr this update used
