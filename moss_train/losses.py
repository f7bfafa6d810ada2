"""Pairwise preference losses, per pair (the stages sum them; the engine divides by the global
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
