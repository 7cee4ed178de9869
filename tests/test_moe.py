"""DeepSeekMoE pieces: router parity with transformers, grouped experts vs a per-token reference, bias update."""
import pytest
import torch

import pretrain.model.moe as moe
from pretrain.config import ModelConfig
from pretrain.model.moe import GroupedExperts, Router, balance_losses, update_expert_bias

transformers = pytest.importorskip("transformers")


def router_cfg(**kw):
    base = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, norm_topk_prob=True, scoring_func="sigmoid")
    return ModelConfig(**{**base, **kw})


def sorted_routing(idx, weight):
    order = idx.argsort(dim=-1)
    return idx.gather(1, order), weight.gather(1, order)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_router_matches_transformers(scoring):
    torch.manual_seed(0)
    cfg = router_cfg(scoring_func=scoring, norm_topk_prob=scoring == "sigmoid")
    ours = Router(cfg)
    torch.nn.init.normal_(ours.weight, std=0.3)
    if scoring == "sigmoid":
        ours.e_score_correction_bias.copy_(0.2 * torch.randn(16))
        hf_cfg = transformers.DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                               topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter as HFRouter
    else:
        hf_cfg = transformers.DeepseekV2Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                               topk_group=2, routed_scaling_factor=2.5,
                                               topk_method="group_limited_greedy")
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter as HFRouter
    theirs = HFRouter(hf_cfg)
    theirs.load_state_dict(ours.state_dict(), strict=scoring == "sigmoid")
    x = torch.randn(200, 32)
    idx, w, _ = ours(x)
    _, hf_w, hf_idx = theirs(x)
    idx, w = sorted_routing(idx, w)
    hf_idx, hf_w = sorted_routing(hf_idx, hf_w)
    assert torch.equal(idx, hf_idx)
    torch.testing.assert_close(w, hf_w, rtol=0, atol=1e-6)
    # group limit really bites: every token's experts lie in at most topk_group groups
    assert ((idx // 4).unsqueeze(-1) == torch.arange(4)).any(1).sum(-1).max() <= 2


def naive_experts(experts, x, idx, weight):
    """Reference: every token through each of its k experts, one at a time."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[n, k]
            h = torch.nn.functional.silu(experts.gate_proj[e] @ x[n]) * (experts.up_proj[e] @ x[n])
            out[n] += weight[n, k] * (experts.down_proj[e] @ h)
    return out


@pytest.mark.parametrize("grouped_mm", [True, False])
def test_grouped_experts_match_reference(grouped_mm, monkeypatch):
    monkeypatch.setattr(moe, "_HAS_GROUPED_MM", grouped_mm and moe._HAS_GROUPED_MM)
    torch.manual_seed(0)
    experts = GroupedExperts(6, 16, 8)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(30, 16, requires_grad=True)
    idx = torch.stack([torch.randperm(5)[:2] for _ in range(30)])  # expert 5 gets no token: empty group
    weight = torch.rand(30, 2)
    got = experts(x, idx, weight)
    want = naive_experts(experts, x, idx, weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), [x, experts.down_proj])
    g_want = torch.autograd.grad(want.square().sum(), [x, experts.down_proj])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert g_got[1][5].abs().sum() == 0


def test_balance_losses_follow_the_formulas():
    torch.manual_seed(0)
    B, T, E, K = 2, 5, 4, 2
    scores = torch.rand(B * T, E)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(B * T)])
    terms = balance_losses(scores, idx, B)
    seq_aux, expert_aux = terms["seq_aux"], terms["expert_aux"]
    probs = scores / scores.sum(-1, keepdim=True)
    want_seq = 0.0
    for b in range(B):
        rows = range(b * T, (b + 1) * T)
        for i in range(E):
            f = E / (K * T) * sum(int(i in idx[t].tolist()) for t in rows)
            want_seq += f * sum(probs[t, i].item() for t in rows) / T / B
    assert seq_aux.item() == pytest.approx(want_seq, rel=1e-6)
    assert expert_aux.item() == pytest.approx(want_seq, rel=1e-6)  # V2's expert-level loss is per sequence too


def test_bias_update_moves_selection_not_gating_weights():
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.router = Router(router_cfg(n_group=1, topk_group=1, norm_topk_prob=False))
    router = holder.router
    torch.nn.init.normal_(router.weight, std=0.3)
    x = torch.randn(64, 32)
    idx0, w0, _ = router(x)
    load = torch.bincount(idx0.flatten(), minlength=16).float()
    before = router.e_score_correction_bias.clone()
    update_expert_bias(holder, load.unsqueeze(0), gamma=0.03125)
    delta = router.e_score_correction_bias - before
    over, under = load > load.mean(), load < load.mean()
    assert torch.equal(delta[over], torch.full_like(delta[over], -0.03125))
    assert torch.equal(delta[under], torch.full_like(delta[under], 0.03125))
    assert torch.equal(delta[load == load.mean()], torch.zeros_like(delta[load == load.mean()]))
    idx1, w1, _ = router(x)
    assert not torch.equal(idx0.sort(-1).values, idx1.sort(-1).values)  # selection moved
    new_load = torch.bincount(idx1.flatten(), minlength=16).float()
    assert (new_load[over] <= load[over]).all() and new_load[over].sum() < load[over].sum()
    # gating weight of a (token, expert) pair comes from the unbiased score: unchanged where still selected
    for n in range(64):
        for k in range(4):
            hit = (idx1[n] == idx0[n, k]).nonzero()
            if len(hit):
                assert w1[n, hit[0, 0]] == w0[n, k]


def test_bias_update_checks_layer_count():
    holder = torch.nn.Module()
    holder.router = Router(router_cfg())
    with pytest.raises(ValueError, match="2 rows but the model has 1 MoE layers"):
        update_expert_bias(holder, torch.zeros(2, 16), 0.001)


def test_few_token_copies_skip_empty_experts_with_equal_results(monkeypatch):
    """On the CPU a handful of copies (decoding) runs only the experts hit, per expert, instead of ``_grouped_mm``
    over all of them: the same per-expert products (float reassociation apart: the kernels differ);
    MoE(stats=False) (decoding) returns the same output and no balance statistics."""
    from pretrain.model.moe import MoE, _grouped_swiglu
    torch.manual_seed(0)
    experts = GroupedExperts(64, 32, 48)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    for copies in (1, 2, 8):
        idx = torch.randint(0, 64, (copies,)).sort().values
        counts = moe.expert_counts(idx, 64)
        x = torch.randn(copies, 32)
        assert copies * moe.SMALL_BATCH_COPIES <= 64  # the per-expert path
        calls = []
        monkeypatch.setattr(moe, "_grouped_swiglu", lambda *a: calls.append(1) or _grouped_swiglu(*a))
        with torch.no_grad():
            got = experts.compute(x, counts)
        assert not calls  # the per-expert loop ran
        want = _grouped_swiglu(x, counts, experts.gate_proj, experts.up_proj, experts.down_proj)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer = MoE(router_cfg(hidden_size=32, n_routed_experts=64, n_group=8, topk_group=4, moe_intermediate_size=48,
                           n_shared_experts=1))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 1, 32)
    y, stats = layer(x)
    y_decode, none = layer(x, stats=False)
    assert torch.equal(y, y_decode) and none is None and set(stats) >= {"load", "seq_aux", "dropped"}
