"""The fast paths of pretrain.model are taken and give the reference numbers (speed itself: bench/run_all.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import profile

import pretrain.model.moe as moe
from pretrain.config import ModelConfig
from pretrain.model import build_model
import pretrain.model.attention as attention
from pretrain.model.attention import _causal_sdpa

TINY_MLA = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                v_head_dim=8, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
                first_k_dense_replace=1, n_group=2, topk_group=1, scoring_func="sigmoid", norm_topk_prob=True)


def _ops(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_mla_attention_takes_the_cpu_flash_kernel_with_the_math_path_numbers():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 32, 24, requires_grad=True), torch.randn(2, 4, 32, 24, requires_grad=True)
    v = torch.randn(2, 4, 32, 8, requires_grad=True)  # value head narrower than q/k (MLA)
    ops = _ops(lambda: _causal_sdpa(q, k, v).sum().backward())
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ref.sum().backward()
    torch.testing.assert_close(_causal_sdpa(q, k, v), ref.transpose(1, 2).flatten(2), rtol=1e-5, atol=1e-5)
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)


def _math_reference(q, k, v, dout):
    q, k, v = (t.detach().float().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
    out.backward(dout.float())
    return [out, q.grad, k.grad, v.grad]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_blocked_attention_on_cpu_equals_the_math_path(dtype, tol):
    g = torch.Generator().manual_seed(0)
    T = 200  # three full blocks of 64 rows and a partial one
    q, k = torch.randn(2, 3, T, 24, generator=g), torch.randn(2, 3, T, 24, generator=g)
    v, dout = torch.randn(2, 3, T, 8, generator=g), torch.randn(2, T, 3 * 8, generator=g)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    ops = _ops(lambda: _causal_sdpa(q, k, v).backward(dout.to(dtype)))
    assert "BlockedCausalAttention" in ops and not any("scaled_dot_product" in o for o in ops)
    got = [_causal_sdpa(q, k, v), q.grad, k.grad, v.grad]
    for a, b in zip(got, _math_reference(q, k, v, dout)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)


def test_attention_takes_sdpa_when_the_score_block_is_too_large(monkeypatch):
    q = k = torch.randn(1, 2, 256, 16)
    v = torch.randn(1, 2, 256, 16)
    assert attention._blocked_ok(q, k, False) and not attention._blocked_ok(q, k, True)  # GQA: SDPA
    assert not attention._blocked_ok(q[:, :, :100], k[:, :, :100], False)  # under two blocks: SDPA
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 1 << 14)
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in _ops(lambda: _causal_sdpa(q, k, v))


def test_model_step_uses_grouped_mm_and_flash_and_no_bincount():
    model = build_model(ModelConfig(**TINY_MLA)).train()
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))
    ops = _ops(lambda: model(ids[:, :-1], labels=ids[:, 1:]).lm_loss.backward())
    assert "aten::_grouped_mm" in ops and "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::bincount" not in ops  # bincount reads its maximum back to the host on CUDA


def test_expert_counts_equal_bincount():
    idx = torch.randint(0, 16, (1000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(moe.expert_counts(idx, 16), torch.bincount(idx, minlength=16))
    assert moe.expert_counts(torch.tensor([3, 3]), 5).tolist() == [0, 0, 0, 2, 0]


def test_grouped_mm_op_equals_torch_grouped_mm_with_gradients():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=g, requires_grad=True), torch.randn(3, 8, 4, generator=g, requires_grad=True)
    offs = torch.tensor([20, 20, 50], dtype=torch.int32)  # one empty group
    dy = torch.randn(50, 4, generator=g)
    moe._grouped_mm_op(a, b, offs).backward(dy)
    ref_a, ref_b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch._grouped_mm(ref_a, ref_b, offs=offs).backward(dy)
    torch.testing.assert_close(moe._grouped_mm_op(a, b, offs), torch._grouped_mm(a, b, offs=offs), rtol=0, atol=0)
    torch.testing.assert_close(a.grad, ref_a.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, ref_b.grad, rtol=1e-6, atol=1e-6)


def test_gather_rows_backward_is_index_add_with_the_index_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, requires_grad=True)
    index = torch.tensor([5, 0, 0, 3, 5, 5])  # repeats accumulate, unused rows get zero
    dy = torch.randn(6, 4, generator=g)
    moe.gather_rows(x, index).backward(dy)
    ref = x.detach().clone().requires_grad_()
    ref[index].backward(dy)
    assert torch.equal(moe.gather_rows(x, index), x[index])
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=1e-6)
    ops = _ops(lambda: moe.gather_rows(x, index).sum().backward())
    assert "aten::index_add_" in ops and "aten::_index_put_impl_" not in ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_traces_without_graph_breaks(dtype):
    """train.compile=model sees the whole step as one graph: blocked attention, grouped experts (fp32 through the
    opaque pretrain::grouped_mm op), fused head."""
    torch._dynamo.reset()
    model = build_model(ModelConfig(**TINY_MLA)).train().to(dtype)
    ids = torch.randint(0, 128, (2, 129), generator=torch.Generator().manual_seed(0))  # T = 128: blocked attention
    explain = torch._dynamo.explain(lambda i, l: model(i, labels=l).lm_loss)(ids[:, :-1], ids[:, 1:])
    assert explain.graph_break_count == 0, explain.break_reasons
