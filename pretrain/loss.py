"""The training objective, written once for every layout (plain, tensor-, expert- and pipeline-parallel).

    loss = lm_loss + lambda * mean_k(mtp_loss_k) + sum_t alpha_t * term_t

``lm_loss``/``mtp_loss_k`` are token means (``pretrain.model.transformer.token_mean``: a fully masked micro-batch
gives 0, never NaN, in every layout); the balance terms ``term_t`` are summed over the MoE layers by the model
(``ModelOutput.moe_terms``) and weighted by the ``MoEConfig`` field ``BALANCE_TERMS`` names. The plain and
tensor-parallel paths call :func:`total_loss` on the model's output; a pipeline's last stage calls it with the
terms the earlier stages carried forward (``parallel.pipeline``). The expert-bias update (:func:`balance_experts`)
runs only after a training step whose optimizer update was applied.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config import Config
from pretrain.model import ModelOutput, update_expert_bias

BALANCE_TERMS = {"seq_aux": "seq_aux_alpha", "expert_aux": "aux_loss_alpha", "device_aux": "device_aux_alpha",
                 "comm_aux": "comm_aux_alpha"}
"""MoE balance term (a key of ``ModelOutput.moe_terms``) -> the ``MoEConfig`` field holding its weight alpha."""

COUNT_TERMS = ("dropped",)
"""MoE stats that are counts, summed and logged (``moe/dropped_tokens``) but never part of the loss."""

LOSS_NAMES = ("loss", "lm_loss", "mtp_loss") + tuple(f"{t}_loss" for t in BALANCE_TERMS)
"""The parts :func:`total_loss` reports, in this order (logged as ``train/<name>``)."""


@dataclass(frozen=True)
class LossWeights:
    """The weights in force at one step: lambda (MTP) and alpha per balance term."""

    mtp: float
    alphas: dict

    @classmethod
    def at(cls, cfg: Config, mtp_weight: float) -> "LossWeights":
        """``mtp_weight``: lambda at this step (``pretrain.schedule.loss_weights_at``)."""
        return cls(mtp_weight, {t: float(getattr(cfg.moe, field)) for t, field in BALANCE_TERMS.items()})


def balance_vector(terms: dict, like: torch.Tensor) -> torch.Tensor:
    """The balance terms as one fp32 vector (len(BALANCE_TERMS),) in table order (absent terms are 0): what a
    pipeline stage sends forward."""
    zero = like.new_zeros((), dtype=torch.float32)
    return torch.stack([terms.get(t, zero).float() for t in BALANCE_TERMS])


def total_loss(out: ModelOutput, weights: LossWeights, carried: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """out: the model's (or the last pipeline stage's) training output; carried: (len(BALANCE_TERMS),) balance terms
    of earlier pipeline stages. -> (loss scalar, {name: detached scalar} for every name in ``LOSS_NAMES``)."""
    lm = out.lm_loss
    mtp = torch.stack(out.mtp_losses).mean() if out.mtp_losses else torch.zeros_like(lm)
    terms = balance_vector(out.moe_terms, lm)
    if carried is not None:
        terms = terms + carried
    loss = lm + weights.mtp * mtp
    for i, t in enumerate(BALANCE_TERMS):
        if weights.alphas[t]:
            loss = loss + weights.alphas[t] * terms[i]
    parts = {"loss": loss, "lm_loss": lm, "mtp_loss": mtp}
    parts.update({f"{t}_loss": terms[i] for i, t in enumerate(BALANCE_TERMS)})
    return loss, {k: v.detach().float() for k, v in parts.items()}


def parts_vector(parts: dict, device) -> torch.Tensor:
    """``total_loss``'s parts as a (len(LOSS_NAMES),) fp32 vector (for summing over micro-batches and ranks)."""
    return torch.stack([parts[n].reshape(()).float() for n in LOSS_NAMES]).to(device)


def dropped_tokens(out: ModelOutput) -> float:
    """Token copies dropped over capacity in this forward (0 when nothing drops)."""
    return sum(float(out.moe_terms[t]) for t in COUNT_TERMS if t in out.moe_terms)


@torch.no_grad()
def balance_experts(model: nn.Module, load_LE: torch.Tensor, gamma: float, applied: bool,
                    rows: list[int] | None = None) -> None:
    """Aux-loss-free bias update after a step. load_LE (L, E): tokens per expert of every MoE layer, summed over the
    step's training micro-batches and ranks (identical everywhere); ``rows``: the rows of the routers ``model``
    holds (a pipeline stage), None = all. Skipped steps (``applied=False``) leave the bias where it was, as they
    leave the weights: V3's bias follows the training batches that were applied."""
    if not applied or not load_LE.numel():
        return
    update_expert_bias(model, load_LE if rows is None else load_LE[rows], gamma)
