"""posttrain.objectives: SFT masking is exact, DPO/IPO/cDPO losses and metrics are TRL's formulas, the reward model's
score and its transformers export agree."""
from __future__ import annotations

import math

import pytest
import torch

from helpers import make_model
from posttrain.data import IGNORE_INDEX
from posttrain.objectives import (DPO_NAMES, SFTObjective, bradley_terry_loss, dpo_loss, dpo_metrics,
                                  last_token_values, per_token_nll, sequence_logps, value_of_row)
from pretrain.config import load_config
from pretrain.loss import LossWeights


def _sft_batch(model_cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model_cfg.vocab_size, (2, 12), generator=g)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3:7] = ids[0, 4:8]  # an "assistant turn" in each row, different places
    labels[1, 6:11] = ids[1, 7:12]
    document_ids = torch.tensor([[0] * 8 + [1] * 4, [0] * 5 + [1] * 7])
    return {"input_ids": ids, "labels": labels, "document_ids": document_ids}


def test_sft_loss_is_the_masked_cross_entropy_and_prompt_labels_do_nothing():
    model, model_cfg = make_model("llama_gqa")
    model.train()
    batch = _sft_batch(model_cfg)
    weights = LossWeights.at(load_config("tiny"), 0.0)
    loss, parts, _ = SFTObjective().loss(model, batch, weights)
    logits = model(batch["input_ids"], document_ids=batch["document_ids"])  # (B, T, V)
    keep = batch["labels"] != IGNORE_INDEX
    logp = torch.log_softmax(logits.double(), -1)
    hand = -sum(logp[b, t, batch["labels"][b, t]] for b, t in keep.nonzero().tolist()) / keep.sum()
    assert float(loss) == pytest.approx(float(hand), rel=1e-5)
    # gradients reach the logits only at the labelled positions: a prompt token's label changes nothing
    logits = logits.detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX
                                      ).backward()
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep].abs().sum(-1) > 0).all()
    changed = dict(batch, labels=batch["labels"].clone())
    changed["labels"][0, 0] = IGNORE_INDEX  # was already masked: same value
    changed["labels"][1, 2] = IGNORE_INDEX
    assert float(SFTObjective().loss(model, changed, weights)[0]) == float(loss)


def test_per_token_logps_sum_the_labelled_tokens():
    model, model_cfg = make_model("llama_gqa")
    model.loss_fn = per_token_nll
    batch = _sft_batch(model_cfg, seed=1)
    logps = sequence_logps(model, batch)
    logp = torch.log_softmax(model(batch["input_ids"]).double(), -1)
    for b in range(2):
        keep = (batch["labels"][b] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert float(logps[b]) == pytest.approx(float(sum(logp[b, t, batch["labels"][b, t]] for t in keep)), rel=1e-5)
    mean = sequence_logps(model, batch, average=True)
    assert torch.allclose(mean, logps / (batch["labels"] != IGNORE_INDEX).sum(-1), rtol=1e-6)


LOGPS = [(-12.0, -15.5, -13.0, -14.0), (-3.25, -2.0, -3.0, -2.5), (-40.0, -41.0, -40.0, -41.0)]


@pytest.mark.parametrize("loss_type,beta,smoothing", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2),
                                                      ("ipo", 0.1, 0.0), ("ipo", 2.0, 0.0)])
def test_dpo_losses_and_metrics_are_trls_formulas(loss_type, beta, smoothing):
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*LOGPS))
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i, (a, b, c, d) in enumerate(LOGPS):
        z = (a - b) - (c - d)
        want = ((-math.log(sig(beta * z)) * (1 - smoothing) - math.log(sig(-beta * z)) * smoothing)
                if loss_type == "sigmoid" else (z - 1 / (2 * beta)) ** 2)
        assert float(losses[i]) == pytest.approx(want, rel=1e-12)
        assert float(chosen[i]) == pytest.approx(beta * (a - c)) and float(rejected[i]) == pytest.approx(beta * (b - d))
    m = dpo_metrics(losses, chosen, rejected, pc, pr)
    assert set(m) == set(DPO_NAMES)
    assert float(m["rewards/margins"]) == pytest.approx(sum(beta * ((a - c) - (b - d)) for a, b, c, d in LOGPS) / 3)
    assert float(m["rewards/accuracies"]) == pytest.approx(1 / 3)  # pair 2 loses, pair 3 ties: neither counts
    assert float(m["logps/chosen"]) == pytest.approx(sum(r[0] for r in LOGPS) / 3, rel=1e-6)
    assert float(m["logps/rejected"]) == pytest.approx(sum(r[1] for r in LOGPS) / 3, rel=1e-6)


def test_bradley_terry_and_last_token_values():
    rc, rr = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    assert torch.allclose(bradley_terry_loss(rc, rr), torch.tensor([math.log1p(math.exp(-1.0)),
                                                                     math.log1p(math.exp(1.0))]))
    assert torch.allclose(bradley_terry_loss(rc, rr, margin=0.5), -torch.nn.functional.logsigmoid(rc - rr - 0.5))
    values = torch.arange(12.0).view(2, 6)
    assert last_token_values(values, torch.tensor([3, 6])).tolist() == [2.0, 11.0]


@pytest.mark.parametrize("name", ["llama_gqa", "v3_groups_mtp", "v2_lite_greedy"])
def test_reward_export_matches_transformers_sequence_classification(name, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from posttrain.reward import to_hf_reward
    model, model_cfg = make_model(name)
    model.loss_fn = value_of_row
    pad = model_cfg.vocab_size - 1
    out = to_hf_reward(model, model_cfg, tmp_path, pad_token_id=pad)
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__.endswith("ForSequenceClassification") and hf.config.num_labels == 1
    ids = torch.randint(0, pad, (3, 10), generator=torch.Generator().manual_seed(0))
    lengths = torch.tensor([10, 7, 4])
    for i, n in enumerate(lengths.tolist()):
        ids[i, n:] = pad
    with torch.no_grad():
        ours = last_token_values(model(ids, labels=ids).lm_loss, lengths)
        theirs = hf(input_ids=ids).logits[:, 0]
    assert torch.allclose(ours, theirs.float(), atol=1e-4), (ours, theirs)
