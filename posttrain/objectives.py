"""The post-training objectives, each a ``pretrain.train.Objective`` on the pretraining loop.

* ``SFTObjective``: ``pretrain.loss.total_loss`` (lm + lambda MTP + alpha balance terms) on packed conversations
  whose labels are -100 outside the assistant turns (``train.loss_on``): the mean cross-entropy over assistant
  tokens of each micro-batch.
* ``DPOObjective``: per-sequence log-probabilities of the chosen and rejected responses under the policy and the
  frozen reference (the init weights), :func:`dpo_loss` (TRL's ``DPOTrainer.dpo_loss``: sigmoid with cDPO label
  smoothing, IPO on length-averaged log-probs), plus the MoE balance terms.
* ``RMObjective``: a scalar value head (one row of the LM head, ``VALUE_ROW``; transformers' ``score`` on export)
  read at the last token of each sequence, :func:`bradley_terry_loss`, plus the MoE balance terms.

DPO and RM need the per-token values of the whole sequence, so they swap the model's ``loss_fn`` for a per-token
one (``ModelOutput.lm_loss`` is then (B, T)); the logits are materialised (no fused chunked head). Every objective
splits its loss into the model's forward and ``output_loss(out, batch, weights, carried)``, so it runs in every
layout: under pipeline parallelism the last stage calls ``output_loss`` with the batch's extra tensors (the pair
lengths, DPO's reference log-probs) that DeepSpeed hands it as labels (``parallel.pipeline.pipeline_batches``).
DPO's frozen reference is cut to the same stage as the policy and runs through the pipeline in ``batch``
(``parallel.pipeline.stage_forward``), before the step's 1F1B schedule.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from posttrain.data import IGNORE_INDEX, PairDataset, SFTDataset, load_pairs, load_sft
from posttrain.stage import PosttrainObjective
from pretrain.loss import BALANCE_TERMS, LOSS_NAMES, balance_vector

DPO_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected")
RM_NAMES = ("loss", "rm/accuracy", "rm/margin", "rm/chosen", "rm/rejected")


# ------------------------------------------------------------------------------------------------- losses

def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs (N,) each -> (losses (N,), chosen rewards (N,), rejected rewards (N,)), as TRL's ``dpo_loss``:
    logits = (pi_c - pi_r) - (ref_c - ref_r); sigmoid: -logsig(b logits)(1 - ls) - logsig(-b logits) ls (cDPO);
    ipo: (logits - 1 / (2 b))^2; rewards b (pi - ref), detached."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"dpo.loss_type={loss_type!r}: use sigmoid or ipo")
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen, policy_rejected) -> dict:
    """TRL's logged names -> batch means (detached)."""
    values = {"loss": losses.mean(), "rewards/chosen": chosen_rewards.mean(),
              "rewards/rejected": rejected_rewards.mean(), "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
              "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
              "logps/chosen": policy_chosen.detach().mean(), "logps/rejected": policy_rejected.detach().mean()}
    return {k: v.detach().float() for k, v in values.items()}


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Rewards (N,) -> losses (N,) = -log sigmoid(r_c - r_r - margin) (InstructGPT's pairwise loss; Llama 2's
    margin variant)."""
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def balance_loss(out, weights, carried: torch.Tensor | None = None) -> torch.Tensor:
    """sum_t alpha_t * term_t of the MoE balance terms in ``out`` (0 for a dense model); ``carried``: the detached
    terms of earlier pipeline stages (their value counts, their gradient is their stage's own)."""
    like = out.lm_loss if out.lm_loss is not None else out.logits
    terms = balance_vector(out.moe_terms, like)
    if carried is not None:
        terms = terms + carried
    return sum((weights.alphas[t] * terms[i] for i, t in enumerate(BALANCE_TERMS) if weights.alphas[t]),
               terms.new_zeros(()))


def per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A model ``loss_fn`` that does not reduce: logits (B, T, V), labels (B, T) -> NLL (B, T), 0 where ignored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view_as(labels)


def per_token_nll_tp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``per_token_nll`` on this rank's vocab shard (B, T, V / tp): the same (B, T) values on every TP rank."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    keep = labels != IGNORE_INDEX
    return vocab_parallel_cross_entropy(logits.float(), labels.masked_fill(~keep, 0)) * keep


# ---------------------------------------------------------------------------------------------- objectives

class SFTObjective(PosttrainObjective):
    """Masked next-token prediction on packed conversations (``posttrain.sft``)."""

    stage, names = "sft", LOSS_NAMES

    def load(self, cfg, tok, skipped, paths):
        return load_sft(paths, tok, cfg.data.seq_length, cfg.train.loss_on, skipped)

    def dataset(self, cfg, num_rows, records=None):
        return SFTDataset(self.records if records is None else records, cfg.data.seq_length, cfg.train.seed,
                          self.tok.pad_id, num_rows)

    def batch(self, run, rows):
        rows = rows.to(run.device, non_blocking=True)  # (mb, 3, T)
        return {"input_ids": rows[:, 0], "labels": rows[:, 1], "document_ids": rows[:, 2]}


class PairObjective(PosttrainObjective):
    """Preference pairs: chosen and rejected sequences as one (2 mb, T) batch, chosen first."""

    def load(self, cfg, tok, skipped, paths):
        return load_pairs(paths, tok, cfg.data.seq_length, skipped)

    def dataset(self, cfg, num_rows, records=None):
        return PairDataset(self.records if records is None else records, cfg.data.seq_length, cfg.train.seed,
                           self.tok.pad_id, num_rows)

    def preflight(self, cfg, world_size, rank):
        if cfg.model.num_nextn_predict_layers:  # MTP is a language-modelling objective; its weights are dropped
            cfg.model.num_nextn_predict_layers = 0
        return super().preflight(cfg, world_size, rank)

    def batch(self, run, rows):
        rows = rows.to(run.device, non_blocking=True)  # (mb, 7, T)
        return {"input_ids": torch.cat([rows[:, 0], rows[:, 3]]), "labels": torch.cat([rows[:, 1], rows[:, 4]]),
                "lengths": torch.cat([rows[:, 2, 0], rows[:, 5, 0]]), "index": rows[:, 6, 0]}


def output_logps(out, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """A per-token-NLL output -> summed (or, ``average``, per-token mean) log-prob of each sequence's labelled
    tokens (2 mb,)."""
    keep = labels != IGNORE_INDEX
    logps = -(out.lm_loss * keep).sum(-1)
    return logps / keep.sum(-1).clamp(min=1) if average else logps


def sequence_logps(model, batch: dict, average: bool = False) -> torch.Tensor:
    """``output_logps`` of ``model`` (a whole model, or a pipeline stage: through the pipeline, the log-probs on
    every stage) on the batch."""
    from parallel.pipeline import forward_everywhere

    ids, labels = batch["input_ids"], batch["labels"]
    return forward_everywhere(model, ids, labels, lambda out: output_logps(out, labels, average), ids.shape[:1])


class DPOObjective(PairObjective):
    """Direct preference optimisation against the frozen init weights (``posttrain.dpo``)."""

    stage, names = "dpo", DPO_NAMES

    def prepare_model(self, model, cfg, topo):
        from parallel.pipeline import cut_stage
        from pretrain.train import build_model_for

        self.cfg, self.average = cfg, cfg.dpo.loss_type == "ipo"  # TRL's IPO averages the log-probs
        model.loss_fn = per_token_nll_tp if topo.tp > 1 else per_token_nll
        self.reference, self.reference_table, self.eval_reference_table = None, None, None
        if not cfg.dpo.precompute_reference:  # the init weights in the same layout (stage), frozen, in eval mode
            self.reference = cut_stage(build_model_for(cfg, topo, _FrozenReference()), cfg, topo)
            self.reference.loss_fn = model.loss_fn
            if cfg.train.precision == "bf16":  # the policy's precision (DeepSpeed casts it); the router bias as there
                from pretrain.engine import keep_router_bias_fp32
                keep_router_bias_fp32(self.reference.to(torch.bfloat16))
        return model

    def batch(self, run, rows, heldout: bool = False):
        """The pair batch plus ``ref_logps`` (2 mb,), chosen first: the reference's log-probs of its sequences."""
        b = super().batch(run, rows)
        b["ref_logps"] = self.reference_logps_for(run, b, heldout)
        return b

    def eval_batch(self, run, rows):
        return self.batch(run, rows, heldout=True)

    def reference_logps_for(self, run, batch: dict, heldout: bool = False) -> torch.Tensor:
        """Reference log-probs (2 mb,) of the batch (of ``data.eval_paths`` when ``heldout``), chosen first."""
        if self.reference is None:  # dpo.precompute_reference: tables made at the first training batch
            if self.reference_table is None:
                self.reference_table = self.reference_pass(run, self.records, "reference_logps.pt")
                if self.eval_records:
                    self.eval_reference_table = self.reference_pass(run, self.eval_records, "eval_reference_logps.pt")
            table = (self.eval_reference_table if heldout else self.reference_table).to(batch["input_ids"].device)
            return torch.cat([table[batch["index"], 0], table[batch["index"], 1]])
        with torch.no_grad():
            return sequence_logps(self.reference, batch, self.average)

    @torch.no_grad()
    def reference_pass(self, run, records: list, name: str) -> torch.Tensor:
        """``dpo.precompute_reference``: (num_pairs, 2) reference log-probs (chosen, rejected) of ``records`` by pair
        index, computed by the policy before its first update in one pass over every pair (every rank runs the same
        batches, so the TP/EP collectives and the pipeline's sends match), saved as ``train.output_dir/<name>`` and
        read back on resume."""
        import torch.distributed as dist
        from pathlib import Path

        from pretrain.config import ConfigError

        path = Path(self.cfg.train.output_dir) / name
        if path.is_file():
            return torch.load(path, weights_only=True)
        if (Path(self.cfg.train.output_dir) / "latest").is_file():  # a resumed run: the policy has moved
            raise ConfigError(f"dpo.precompute_reference: {path} is missing in a resumed run (data.eval_paths added "
                              f"after the start?); the trained policy is no reference: start a new train.output_dir")
        model, mb = self.policy, self.cfg.train.micro_batch_size
        ds = PairDataset(records, self.cfg.data.seq_length, 0, self.tok.pad_id, len(records))
        table = torch.zeros(len(records), 2)
        model.eval()  # as the reference it replaces: no token dropping
        for first in range(0, len(ds), mb):
            rows = torch.from_numpy(np.stack([ds[i] for i in range(first, min(first + mb, len(ds)))]))
            batch = PairObjective.batch(self, run, rows)
            logps = sequence_logps(model, batch, self.average).cpu()
            table[batch["index"].cpu()] = logps.view(2, -1).T
        model.train()
        if dist.get_rank() == 0:
            torch.save(table, path)
        return table

    def pair_losses(self, out, batch):
        """(DPO losses (mb,), chosen rewards, rejected rewards, policy log-probs (2 mb,)) of the policy's output."""
        d = self.cfg.dpo
        logps, ref = output_logps(out, batch["labels"], self.average), batch["ref_logps"]
        n = logps.shape[0] // 2
        return (*dpo_loss(logps[:n].float(), logps[n:].float(), ref[:n], ref[n:], d.beta, d.loss_type,
                          d.label_smoothing), logps)

    def output_eval_loss(self, out, batch):
        return self.pair_losses(out, batch)[0].mean()

    def output_loss(self, out, batch, weights, carried=None):
        losses, chosen_r, rejected_r, logps = self.pair_losses(out, batch)
        n = logps.shape[0] // 2
        loss = losses.mean() + balance_loss(out, weights, carried)
        parts = dpo_metrics(losses, chosen_r, rejected_r, logps[:n], logps[n:])
        parts["loss"] = loss.detach().float()
        return loss, parts


class _FrozenReference(PosttrainObjective):
    """``build_model_for``'s finishing step for DPO's reference: no gradients, eval mode."""

    def prepare_model(self, model, cfg, topo):
        for p in model.parameters():
            p.requires_grad_(False)
        return model.eval()


VALUE_ROW = 0
"""The reward model's value head is row ``VALUE_ROW`` of the LM head (the ``<unk>`` piece, never produced with
byte fallback): a Linear(hidden, 1) whose weight keeps the plain model's state-dict name and shape, so checkpoints,
every layout's shard plan and ``load_model_from_checkpoint`` work unchanged; the export writes it as ``score``."""


def value_of_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reward model's ``loss_fn``: logits (B, T, V) -> values (B, T) (``ModelOutput.lm_loss``)."""
    return logits[..., VALUE_ROW].float()


def value_of_row_tp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``value_of_row`` on a vocab shard (B, T, V / tp): TP rank 0 holds the row; the values are summed over TP (the
    others add zeros) so every rank has them, and the backward's identity hands rank 0 their full gradient."""
    from megatron.core.parallel_state import get_tensor_model_parallel_rank
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    own = logits[..., VALUE_ROW].float()
    return reduce_from_tensor_model_parallel_region(own if get_tensor_model_parallel_rank() == 0 else own * 0)


@torch.no_grad()
def init_value_row(model, cfg, topo, seed: int) -> None:
    """A fresh value head (normal(0, 1 / sqrt(hidden + 1)), seeded: identical on every rank) in the LM head's row."""
    generator = torch.Generator().manual_seed(seed)
    row = torch.randn(cfg.model.hidden_size, generator=generator) / math.sqrt(cfg.model.hidden_size + 1)
    if topo.tp_rank == 0:  # the rank holding vocabulary row 0
        model.lm_head.weight[VALUE_ROW] = row.to(model.lm_head.weight)


def last_token_values(values_BT: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Values (B, T), sequence lengths (B,) -> the value at each sequence's last token (B,) (right padding)."""
    return values_BT[torch.arange(values_BT.shape[0], device=lengths.device), lengths - 1]


class RMObjective(PairObjective):
    """Reward model on preference pairs: Bradley-Terry on the last-token scores (``posttrain.rm``)."""

    stage, names = "rm", RM_NAMES

    def prepare_model(self, model, cfg, topo):
        self.margin = cfg.rm.margin
        init_value_row(model, cfg, topo, cfg.train.seed)
        model.loss_fn = value_of_row_tp if topo.tp > 1 else value_of_row
        return model

    @staticmethod
    def rewards(out, batch):
        """The model's output of a pair batch -> (chosen rewards (mb,), rejected rewards (mb,))."""
        rewards = last_token_values(out.lm_loss, batch["lengths"])
        n = rewards.shape[0] // 2
        return rewards[:n], rewards[n:]

    def output_eval_loss(self, out, batch):
        return bradley_terry_loss(*self.rewards(out, batch), self.margin).mean()

    def output_loss(self, out, batch, weights, carried=None):
        chosen, rejected = self.rewards(out, batch)
        loss = bradley_terry_loss(chosen, rejected, self.margin).mean() + balance_loss(out, weights, carried)
        parts = {"loss": loss, "rm/accuracy": (chosen > rejected).float().mean(), "rm/margin": (chosen - rejected).mean(),
                 "rm/chosen": chosen.mean(), "rm/rejected": rejected.mean()}
        return loss, {k: v.detach().float() for k, v in parts.items()}
