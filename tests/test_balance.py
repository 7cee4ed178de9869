"""DeepSeek-V2's balancing: expert-, device-level and communication losses per sequence (hand-computed), device-level
token dropping (only over-capacity, lowest-affinity copies; exempt sequences; never in evaluation), the config keys."""
import copy

import pytest
import torch

from parallel import Topology, parallelize_model
from pretrain.config import ConfigError, load_config
from pretrain.loss import BALANCE_TERMS, LossWeights, dropped_tokens, total_loss
from pretrain.model import build_model
from pretrain.model.moe import MoE, balance_losses, device_capacity_keep, drop_exempt_sequences


def test_three_balance_losses_by_hand():
    # E = 4 experts in D = 2 devices {0, 1} {2, 3}, K = 2, M = 2, one sequence of T = 2 tokens (softmax scores).
    scores = torch.tensor([[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.3, 0.2]])
    idx = torch.tensor([[0, 1], [0, 2]])
    terms = balance_losses(scores, idx, batch=1, num_groups=2, topk_group=2)
    # f = E/(K T) * chosen = [2, 1, 1, 0]; P = mean scores = [0.45, 0.2, 0.2, 0.15]: sum f P = 0.9 + 0.2 + 0.2 = 1.3
    assert terms["expert_aux"].item() == pytest.approx(1.3) and terms["seq_aux"].item() == pytest.approx(1.3)
    # f' = mean f per device = [1.5, 0.5]; P' = sum P per device = [0.65, 0.35]: 0.975 + 0.175 = 1.15
    assert terms["device_aux"].item() == pytest.approx(1.15)
    # token 0 is sent to device 0, token 1 to devices 0 and 1: f'' = D/(M T) * [2, 1] = [1, 0.5]: 0.65 + 0.175
    assert terms["comm_aux"].item() == pytest.approx(0.825)


def test_balance_losses_are_per_sequence_means():
    # Two sequences: the micro-batch's terms are the mean of each sequence's own (T = one sequence's tokens).
    torch.manual_seed(0)
    scores = torch.rand(2 * 6, 8).softmax(-1).requires_grad_(True)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(12)])
    both = balance_losses(scores, idx, batch=2, num_groups=4, topk_group=2)
    one = [balance_losses(scores[6 * b:6 * (b + 1)], idx[6 * b:6 * (b + 1)], 1, 4, 2) for b in range(2)]
    for name in ("expert_aux", "device_aux", "comm_aux"):
        assert both[name].item() == pytest.approx((one[0][name].item() + one[1][name].item()) / 2, rel=1e-6)
    both["device_aux"].backward()  # P carries the gradient; f is a count
    assert scores.grad.abs().sum() > 0


def test_token_dropping_keeps_the_highest_affinity_copies_per_device():
    # 4 tokens x 2 copies over D = 2 devices: capacity = floor(1.0 * 8 / 2) = 4 copies per device.
    # Device 0 (experts 0, 1) gets 6 copies with affinities 0.5 0.3 | 0.6 | 0.4 0.35 | 0.45: drop 0.3 and 0.35.
    affinity = torch.tensor([[0.5, 0.3], [0.6, 0.2], [0.4, 0.35], [0.45, 0.1]])
    idx = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 3]])
    none = torch.zeros(4, dtype=torch.bool)
    keep = device_capacity_keep(affinity, idx, none, num_experts=4, num_groups=2, capacity_factor=1.0)
    assert keep.tolist() == [[True, False], [True, True], [True, False], [True, True]]
    # Tokens 2 and 3 exempt (their sequence): their 3 device-0 copies go first, then the best other one (0.6).
    keep = device_capacity_keep(affinity, idx, torch.tensor([False, False, True, True]), 4, 2, 1.0)
    assert keep.tolist() == [[False, False], [True, True], [True, True], [True, True]]
    # Under capacity nothing drops; exempt copies stay even past the capacity (capacity 0 here).
    assert device_capacity_keep(affinity, idx, none, 4, 2, 1.5).all()
    assert device_capacity_keep(affinity, idx, torch.ones(4, dtype=torch.bool), 4, 2, 0.1).all()


def test_exempt_sequences_are_a_function_of_the_routing():
    idx = torch.tensor([[[0, 1], [2, 7]], [[0, 1], [2, 6]], [[3, 3], [2, 2]]])  # id sums 10, 9, 10
    assert drop_exempt_sequences(idx.view(-1, 2), batch=3).tolist() == [True, False, True]
    idx = torch.randint(0, 64, (1000, 32, 6))
    assert 0.07 < drop_exempt_sequences(idx.view(-1, 6), 1000).float().mean() < 0.13  # about 10%


def v2_tiny(*overrides):
    return load_config("tiny", ["model.scoring_func=softmax", "model.norm_topk_prob=false", "moe.aux_loss_alpha=0.003",
                                "moe.device_aux_alpha=0.05", "moe.comm_aux_alpha=0.02", "moe.capacity_factor=0.5",
                                *overrides])


def test_moe_layer_drops_in_training_only_and_counts():
    cfg = v2_tiny()
    torch.manual_seed(0)
    model = parallelize_model(build_model(cfg.model), Topology.from_config(cfg, 1), cfg)  # switches dropping on
    layer = model.layers[1].mlp
    assert isinstance(layer, MoE) and layer.capacity_factor == 0.5
    x = torch.randn(3, 10, cfg.model.hidden_size)
    flat = x.view(-1, x.shape[-1])
    idx, weight, scores = layer.gate(flat)
    exempt = drop_exempt_sequences(idx, 3).repeat_interleave(10)
    keep = device_capacity_keep(scores.gather(1, idx), idx, exempt, 8, cfg.model.n_group, 0.5)
    # 60 copies over 4 devices of capacity floor(0.5 * 60 / 4) = 7: each device keeps at most 7 non-exempt copies
    device = idx // 2
    for d in range(4):
        assert int((keep & (device == d) & ~exempt.unsqueeze(1)).sum()) <= 7
    assert int((~keep).sum()) >= 60 - 28 - 2 * int(exempt.sum())
    y, stats = layer.train()(x)
    want = layer.experts(flat, idx, weight * keep).view_as(x) + layer.shared_experts(x)
    torch.testing.assert_close(y, want)
    assert stats["dropped"].item() == int((~keep).sum())
    assert set(BALANCE_TERMS) <= set(stats) and stats["load"].sum() == 60  # load counts routed copies
    y_eval, stats_eval = layer.eval()(x)
    assert stats_eval["dropped"].item() == 0
    torch.testing.assert_close(y_eval, layer.experts(flat, idx, weight).view_as(x) + layer.shared_experts(x))


def test_model_loss_adds_the_weighted_v2_terms():
    cfg = v2_tiny()
    torch.manual_seed(0)
    model = parallelize_model(build_model(cfg.model), Topology.from_config(cfg, 1), cfg).train()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 16))
    out = model(ids, labels=ids)
    weights = LossWeights.at(cfg, 0.3)
    assert weights.alphas == {"seq_aux": 0.0001, "expert_aux": 0.003, "device_aux": 0.05, "comm_aux": 0.02}
    loss, parts = total_loss(out, weights)
    want = (out.lm_loss + 0.3 * torch.stack(out.mtp_losses).mean() + 0.0001 * out.moe_terms["seq_aux"]
            + 0.003 * out.moe_terms["expert_aux"] + 0.05 * out.moe_terms["device_aux"]
            + 0.02 * out.moe_terms["comm_aux"])
    torch.testing.assert_close(loss, want)
    assert parts["device_aux_loss"] == out.moe_terms["device_aux"] and dropped_tokens(out) > 0


def test_old_capacity_key_names_the_new_one_and_v2_preset():
    with pytest.raises(ConfigError, match=r"^parallel.capacity_factor was replaced by moe.capacity_factor"):
        load_config("tiny", ["parallel.capacity_factor=1.0"])
    with pytest.raises(ConfigError, match=r"moe.capacity_factor=0.0: must be positive"):
        load_config("tiny", ["moe.capacity_factor=0"])
    m = load_config("deepseek-v2").moe
    assert (m.aux_loss_alpha, m.device_aux_alpha, m.comm_aux_alpha, m.capacity_factor) == (0.003, 0.05, 0.02, 1.0)
    tiny = copy.deepcopy(load_config("tiny"))
    assert tiny.moe.capacity_factor is None and tiny.moe.device_aux_alpha == tiny.moe.comm_aux_alpha == 0.0


def test_exempt_sequences_are_chosen_once_per_sequence_for_every_layer():
    """DeepSeek-V2 exempts ~10% of the training *sequences* from dropping: the model picks them from the tokens
    (moe.exempt_sequences) and every MoE layer, MTP included, receives the same choice; none in evaluation."""
    from pretrain.model.moe import exempt_sequences, set_token_dropping
    ids = torch.randint(0, 512, (2000, 16), generator=torch.Generator().manual_seed(0))
    assert 0.08 < exempt_sequences(ids).float().mean() < 0.12
    cfg = load_config("tiny")
    model = build_model(cfg.model)
    set_token_dropping(model, 0.5)
    seen = []
    for m in model.modules():
        if isinstance(m, MoE):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[1] if len(args) > 1 else None))
    batch = ids[:6]
    model(batch, labels=batch)
    assert len(seen) == 2 and all(torch.equal(s, exempt_sequences(batch)) for s in seen)  # layer 1 + MTP
    seen.clear()
    model.eval()
    model(batch, labels=batch)
    assert seen == [None]  # evaluation: no MTP, no dropping
