"""The fused chunked linear + cross-entropy head (pretrain/model/head.py) against lm_head + F.cross_entropy."""
import pytest
import torch
import torch.nn.functional as F

import pretrain.model.head as head
from pretrain.config import load_config
from pretrain.model import build_model, cross_entropy_loss


def _reference(h, w, labels):
    return F.cross_entropy((h @ w.t()).float(), labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk_elements", [64 * 32, 1 << 22])  # 3 chunks of 32 tokens (+ remainder) / one chunk
def test_loss_and_gradients_equal_the_unfused_head(monkeypatch, chunk_elements):
    monkeypatch.setattr(head, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(head, "MIN_CHUNK_TOKENS", 1)
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(100, 16, generator=g), torch.randn(64, 16, generator=g)
    labels = torch.randint(0, 64, (100,), generator=g)
    labels[:40] = -100  # the first chunk wholly ignored, the second partly
    labels[50] = -100
    grads = []
    for fn in (_reference, head.LinearCrossEntropy.apply):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(hh, ww, labels)
        (2.5 * loss).backward()  # backward scales the forward-computed gradients by the incoming one
        grads.append((loss.detach(), hh.grad, ww.grad))
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_bf16_close_to_fp32_and_no_grad_mode():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(64, 32, generator=g), torch.randn(128, 32, generator=g) * 0.2
    labels = torch.randint(0, 128, (64,), generator=g)
    ref = _reference(h, w, labels)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    loss = head.LinearCrossEntropy.apply(hb, wb, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)
    hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
    _reference(hf, wf, labels).backward()
    torch.testing.assert_close(wb.grad.float(), wf.grad, rtol=0.05, atol=0.02)
    with torch.no_grad():  # eval: the loss only, no gradient buffers
        torch.testing.assert_close(head.LinearCrossEntropy.apply(h, w, labels), ref, rtol=1e-5, atol=1e-5)


def test_all_ignored_gives_zero_loss_and_zero_grads():
    model = build_model(load_config("tiny").model)
    ids = torch.randint(0, 100, (2, 8))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.lm_loss.item() == 0.0
    out.lm_loss.backward()
    assert model.lm_head.weight.grad.abs().sum() == 0


def test_model_uses_the_fused_head_and_keeps_no_vocab_sized_tensor():
    cfg = load_config("tiny", ["model.num_nextn_predict_layers=1"]).model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(0)
    ids, labels = (torch.randint(0, cfg.vocab_size, (4, 64), generator=g),
                   torch.randint(0, cfg.vocab_size, (4, 64), generator=g))
    labels[1, :5] = -100
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.numel()), t)[1], lambda t: t):
        out = model(ids, labels=labels)
    assert out.logits is None and max(saved) < 4 * 64 * cfg.vocab_size  # only weight-sized (V x H) gradients
    fused = [out.lm_loss, *out.mtp_losses]
    torch.autograd.backward(fused)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.loss_fn = lambda logits, y: cross_entropy_loss(logits, y)  # any other loss_fn takes the logits path
    ref = model(ids, labels=labels)
    assert ref.logits.shape == (4, 64, cfg.vocab_size)
    for a, b in zip(fused, [ref.lm_loss, *ref.mtp_losses]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.autograd.backward([ref.lm_loss, *ref.mtp_losses])
    for n, p in model.named_parameters():
        if n in got:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
