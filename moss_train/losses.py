"""The losses of every stage.

Token losses: :func:`token_cross_entropy`, the per-token cross-entropy (and top-1 hit) of the
language-modelling stages, computed chunk by chunk so no second vocabulary-sized fp32 buffer
exists; :func:`sequence_logps`, a response's summed log-probability (DPO) through it.

Pairwise preference losses, per pair (the stages sum them; the engine divides by the global
pair count, so the optimizer sees the mean over every pair of the global batch).

- Bradley-Terry (reward model): ``-log sigmoid(r_chosen - r_rejected - margin)``; with a margin
  the chosen reward must exceed the rejected one by at least about that much before the loss
  flattens (Llama 2's margin loss).
- DPO (Rafailov et al. 2023): ``-log sigmoid(beta * h)`` with the log-ratio difference
  ``h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))``.
- IPO (Azar et al. 2023): ``(h - 1 / (2 beta))^2``, which regresses h to a finite target
  instead of pushing it to infinity (DPO's overfitting on deterministic preferences).

Log-probabilities are sums over the response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_VARIANTS = ("sigmoid", "ipo")
IGNORE_INDEX = -100  # a label that carries no loss


# Rows of logits per chunk in token_cross_entropy: ~32 MiB of fp32 (256 rows of a 32k
# vocabulary), enough rows for ATen's softmax kernels to use every thread, while the fp32
# temporaries stay a small fraction of the N x V logits.
CHUNK_BYTES = 2**25


class _TokenCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of (N, V) logits, in fp32 whatever the logits' dtype, and whether
    each label is the top prediction.

    F.cross_entropy keeps its fp32 log-softmax output (N x V) for backward, and nll_loss's
    backward fills another dense N x V gradient before log-softmax's backward makes a third;
    an accuracy metric's argmax reads the logits once more. Here the forward keeps only one
    fp32 log-sum-exp per row (the logits themselves are kept, in their own dtype, not copied),
    and the backward computes softmax - one-hot chunk by chunk into the one gradient buffer:
    one N x V buffer fewer at the loss's peak.

    The log-sum-exp is max + log(sum(exp(x - max))) from the row max (amax), and "the label is
    the top prediction" is "the label's logit equals that max": on CPU, ATen's argmax and
    log-softmax cost ~2.5x that for the same chunk (bench/RESULTS.md, "the loss head").
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):
        rows = max(1, CHUNK_BYTES // (4 * logits.shape[1]))
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        peak = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            stop = start + rows
            chunk = logits[start:stop].float()
            peak[start:stop] = chunk_peak = chunk.amax(dim=-1)
            lse[start:stop] = chunk_peak + (chunk - chunk_peak[:, None]).exp_().sum(dim=-1).log_()
        valid = labels != IGNORE_INDEX
        target_logits = logits.gather(1, labels.clamp(min=0)[:, None]).squeeze(1).float()
        token_loss = torch.where(valid, lse - target_logits, 0.0)
        is_top = valid & (target_logits == peak)
        ctx.save_for_backward(logits, labels, lse)
        ctx.mark_non_differentiable(is_top)
        return token_loss, is_top

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_is_top):
        logits, labels, lse = ctx.saved_tensors
        scale = torch.where(labels != IGNORE_INDEX, grad_loss.float(), 0.0)[:, None]
        targets = labels.clamp(min=0)[:, None]
        grad = torch.empty_like(logits)
        rows = max(1, CHUNK_BYTES // (4 * logits.shape[1]))
        for start in range(0, logits.shape[0], rows):
            stop = start + rows
            # softmax as exp(x - lse) from the forward's lse: one pass fewer than softmax, and the
            # subtraction promotes bf16 logits to fp32 without a separate cast.
            probs = torch.sub(logits[start:stop], lse[start:stop, None]).exp_()
            probs.mul_(scale[start:stop]).scatter_add_(1, targets[start:stop], -scale[start:stop])
            grad[start:stop] = probs
        return grad, None


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits, (N,) labels -> per-token fp32 loss (0 where the label is -100), equal to
    F.cross_entropy(logits.float(), labels, reduction="none"), and per token whether the label
    is the top prediction (its logit the row's maximum; False where the label is -100). That is
    logits.argmax(-1) == labels except where several logits tie for the maximum, where every
    tied label counts."""
    return _TokenCrossEntropy.apply(logits.contiguous(), labels.contiguous())


def summed_per_row(token_values: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N,) values of the N True positions of the (B, T) mask `targets` -> (B,) sums per row."""
    rows = targets.nonzero()[:, 0]
    return torch.zeros(targets.shape[0], dtype=token_values.dtype, device=token_values.device).index_add(
        0, rows, token_values
    )


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the summed log-probability of its labelled tokens (labels != -100), in fp32,
    through token_cross_entropy: chunk by chunk, so no vocabulary-sized fp32 buffer exists and
    the logits are not copied.

    (B, T, V) logits and (B, T) labels; or, as DPO's model computes them (only at the target
    positions, ``logits_at``), the (N, V) logits and (N,) labels of the N True positions of the
    (B, T) mask `targets`.
    """
    if targets is None:
        token_loss, _ = token_cross_entropy(logits.flatten(0, 1), labels.flatten())
        return -token_loss.view(labels.shape).sum(dim=1)
    token_loss, _ = token_cross_entropy(logits, labels)
    return -summed_per_row(token_loss, targets)


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-pair loss -log sigmoid(chosen - rejected - margin), computed in fp32."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)


def log_ratio_difference(
    policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor
) -> torch.Tensor:
    """h: how much more the policy prefers the chosen response than the reference does."""
    return (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())


def dpo(h: torch.Tensor, beta: float, variant: str = "sigmoid") -> torch.Tensor:
    """Per-pair DPO ("sigmoid") or IPO ("ipo") loss of the log-ratio differences `h`."""
    if variant == "sigmoid":
        return -F.logsigmoid(beta * h)
    if variant == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"unknown DPO loss variant {variant!r}; one of {', '.join(DPO_VARIANTS)}")
