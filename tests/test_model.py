"""The model's training interface: losses, MTP wiring and gradients, balance stats, checkpointing, meta build."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.model import ModelOutput, build_model
from pretrain.model.moe import Router


def tiny(**overrides):
    cfg = load_config("tiny", [f"model.{k}={v}" for k, v in overrides.items()]).model
    torch.manual_seed(0)
    return build_model(cfg), cfg


def batch(cfg, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:].clone()


def test_eval_returns_logits_and_never_runs_mtp():
    model, cfg = tiny()
    calls = []
    model.mtp[0].register_forward_hook(lambda *a: calls.append(1))
    ids, _ = batch(cfg)
    logits = model.eval()(ids)
    assert logits.shape == (2, 16, cfg.vocab_size) and not calls
    assert torch.is_tensor(model.train()(ids)) and not calls  # labels=None also in train mode


def test_training_outputs_and_mtp_targets():
    model, cfg = tiny(num_nextn_predict_layers=2)
    seen = []
    model.loss_fn = lambda logits, labels: (seen.append((logits, labels)), F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=-100))[1]
    ids, labels = batch(cfg)
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    assert isinstance(out, ModelOutput) and len(out.mtp_losses) == 2 and len(seen) == 3
    ref_logits = model.eval()(ids)
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(),
                                                            ignore_index=-100), rtol=0, atol=0)
    for k in (1, 2):  # depth k targets labels shifted left by k; its last k positions are ignored
        want = torch.full_like(labels, -100)
        want[:, :-k] = labels[:, k:]
        assert torch.equal(seen[k][1], want)
    # 2 MoE layers in the main model (first_k_dense_replace=1) + one per MTP block
    assert out.expert_load.shape == (3, cfg.n_routed_experts)
    assert torch.equal(out.expert_load.sum(1), torch.full((3,), 2.0 * 16 * cfg.num_experts_per_tok))
    assert out.seq_aux_loss.requires_grad and out.expert_aux_loss.item() > 0


def test_mtp_depth_k_sees_only_tokens_up_to_i_plus_k():
    model, cfg = tiny()
    seen = []
    model.loss_fn = lambda logits, labels: (seen.append(logits), logits.sum() * 0)[1]
    ids, labels = batch(cfg, B=1)
    model(ids, labels=labels)
    ids2 = ids.clone()
    ids2[0, 10] = (ids[0, 10] + 1) % cfg.vocab_size
    model(ids2, labels=labels)
    main_diff, mtp_diff = [(a[0] - b[0]).abs().amax(-1) for a, b in (seen[0::2], seen[1::2])]
    # exact up to float noise: the expert groups' sizes change with the routing of later tokens
    assert main_diff[:10].max() < 1e-6 and main_diff[10] > 1e-3
    assert mtp_diff[:9].max() < 1e-6 and mtp_diff[9] > 1e-3


def test_mtp_gradient_reaches_shared_embedding_and_head():
    model, cfg = tiny()
    with torch.no_grad():  # cut the main-path input of the MTP module: only its own embedding path remains
        model.mtp[0].hnorm.weight.zero_()
    ids, labels = batch(cfg)
    out = model(ids, labels=labels)
    emb_grad, head_grad = torch.autograd.grad(out.mtp_losses[0], [model.embed_tokens.weight, model.lm_head.weight])
    used = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    used[ids[:, 1:].flatten()] = True  # MTP embeds tokens 1..T-1 (position T-1 wraps; its label is ignored)
    used[ids[:, 0]] = True
    assert emb_grad[used].abs().sum() > 0 and emb_grad[~used].abs().sum() == 0
    assert head_grad.abs().sum() > 0


def test_seq_aux_and_load_match_the_routers():
    model, cfg = tiny()
    routed = []
    for m in model.modules():
        if isinstance(m, Router):
            m.register_forward_hook(lambda mod, inp, outp: routed.append(outp))
    ids, labels = batch(cfg)
    out = model(ids, labels=labels)
    loads = torch.stack([torch.bincount(r[0].flatten(), minlength=cfg.n_routed_experts).float() for r in routed])
    assert torch.equal(out.expert_load, loads)
    E, K, T = cfg.n_routed_experts, cfg.num_experts_per_tok, 16
    total = 0.0
    for idx, _, scores in routed:
        probs = (scores / scores.sum(-1, keepdim=True)).view(2, T, E)
        counts = F.one_hot(idx.view(2, T * K), E).sum(1).float()
        total += (counts * E / (K * T) * probs.mean(1)).sum(-1).mean()
    torch.testing.assert_close(out.seq_aux_loss, total)


@pytest.mark.parametrize("mode, T", [("full", 16), ("selective", 16), ("full", 128), ("selective", 128)])
def test_activation_checkpointing_keeps_loss_and_grads(mode, T):
    ids, labels = batch(tiny()[1], T=T)  # T=128: the CPU blocked attention (pretrain.model.attention)
    results = []
    for m in ("none", mode):
        model, _ = tiny()
        model.set_activation_checkpointing(m)
        out = model(ids, labels=labels)
        loss = out.lm_loss + 0.3 * out.mtp_losses[0] + 1e-4 * out.seq_aux_loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_position_ids_default_and_bad_mode():
    model, cfg = tiny()
    ids, _ = batch(cfg)
    model.eval()
    pos = torch.arange(16).expand(2, 16)
    assert torch.equal(model(ids), model(ids, position_ids=pos))
    assert not torch.equal(model(ids), model(ids, position_ids=pos + 5))
    with pytest.raises(ValueError, match="use none, full or selective"):
        model.set_activation_checkpointing("some")


def test_builds_on_meta_device_with_published_size():
    cfg = load_config("deepseek-v3").model
    with torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for p in model.mtp.parameters())
    assert abs(total - mtp - 671e9) / 671e9 < 0.02
    assert all(p.is_meta for p in model.parameters())


def test_tied_embeddings_and_init():
    model, cfg = tiny(tie_word_embeddings="true")
    assert model.lm_head.weight is model.embed_tokens.weight
    model, cfg = tiny()
    w = model.layers[1].mlp.experts.gate_proj
    assert abs(w.std().item() - cfg.initializer_range) < 0.002
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    assert torch.equal(model.layers[1].mlp.gate.e_score_correction_bias, torch.zeros(cfg.n_routed_experts))
    assert "layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()


def test_bf16_model_keeps_fp32_correction_bias():
    model, cfg = tiny()
    model.to(torch.bfloat16)
    router = model.layers[1].mlp.gate
    assert router.weight.dtype == torch.bfloat16 and router.e_score_correction_bias.dtype == torch.float32
    ids, labels = batch(cfg)
    out = model(ids, labels=labels)
    out.lm_loss.backward()
    assert model.layers[1].mlp.experts.gate_proj.grad.dtype == torch.bfloat16
