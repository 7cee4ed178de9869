"""Document-aware attention: the blocked CPU path and the SDPA path against a dense-mask reference, and a packed
document's output equal to the same document alone (attention modules and the whole model, fp32)."""
import pytest
import torch

import pretrain.model.attention as attention
from pretrain.config import load_config
from pretrain.model import build_model
from pretrain.model.layers import RotaryEmbedding
from pretrain.model.transformer import positions_in_documents

LENGTHS = (50, 70, 136)  # 256 tokens: boundaries inside blocks, one document spans two whole blocks
MODULE_OVERRIDES = {"mha": [], "gqa": ["model.num_key_value_heads=2"], "mla": []}
MODULE_PATHS = [("blocked", "mha"), ("blocked", "mla"), ("sdpa", "mha"), ("sdpa", "gqa"), ("sdpa", "mla")]
"""(path, attention kind): grouped heads always take SDPA."""


def ids_from_lengths(*rows: tuple[int, ...]) -> torch.Tensor:
    """Lengths per batch row -> document_ids (B, T): 0, 0, ..., 1, 1, ..."""
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])


def dense_reference(q, k, v, scale=None, enable_gqa=False, document_ids=None):
    """Plain softmax attention under ``document_mask`` (causal when no documents), in fp64: the reference."""
    T = q.shape[2]
    if document_ids is None:
        document_ids = torch.zeros(q.shape[0], T, dtype=torch.long)
    if enable_gqa:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~attention.document_mask(document_ids), float("-inf"))
    out = scores.softmax(dim=-1) @ v.double()
    return out.to(q.dtype).transpose(1, 2).flatten(2)


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """Within 1e-5 of the largest entry: fp32 rounding grows with the magnitudes (outputs ~5 here)."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got / scale, want / scale, atol=1e-5, rtol=0, msg=name)


@pytest.fixture(params=["blocked", "sdpa"])
def path(request, monkeypatch):
    """Which kernel _causal_sdpa takes: the blocked CPU path (T >= 128) or SDPA with a boolean mask; checks that
    the blocked kernel ran exactly when asked for."""
    if request.param == "sdpa":
        monkeypatch.setattr(attention, "CHUNK_ELEMENTS", 0)
    calls, apply = [], attention.BlockedCausalAttention.apply
    monkeypatch.setattr(attention.BlockedCausalAttention, "apply", lambda *args: (calls.append(1), apply(*args))[1])
    yield request.param
    assert bool(calls) == (request.param == "blocked")


def attention_module(kind: str):
    cfg = load_config("tiny", [f"model.attention={kind}", *MODULE_OVERRIDES[kind]]).model
    torch.manual_seed(0)
    module = attention.build_attention(cfg)
    for p in module.parameters():  # larger than the model's init: sharp attention, so a leak would show
        torch.nn.init.normal_(p, std=0.3)
    rope_dim = cfg.qk_rope_head_dim if kind == "mla" else cfg.attn_head_dim
    return module, RotaryEmbedding(rope_dim, cfg.rope_theta, cfg.rope_scaling), cfg


def test_block_plan_skips_key_blocks_before_the_document():
    doc_start = attention.document_starts(ids_from_lengths((50, 70, 136), (64, 64, 128)))
    assert doc_start[0, [0, 49, 50, 120, 255]].tolist() == [0, 0, 50, 120, 120]
    # Keys from the earliest document start of the block's rows: row 64 is in batch 0's document from 50 (batch 1's
    # from 64); blocks 128+ in documents from 120 and 128. Exact: a later start in the block (50, 120; 128 > 120).
    assert attention.block_plan(256, doc_start) == ((0, 64, 0, True), (64, 128, 50, True), (128, 192, 120, True),
                                                    (192, 256, 120, True))
    one = attention.document_starts(ids_from_lengths((128, 128)))
    assert attention.block_plan(256, one) == ((0, 64, 0, False), (64, 128, 0, False), (128, 192, 128, False),
                                              (192, 256, 128, False))


@pytest.mark.parametrize("path, gqa", [("blocked", False), ("sdpa", False), ("sdpa", True)], indirect=["path"])
def test_kernel_matches_dense_mask(path, gqa):
    """Outputs and q/k/v gradients, fp32, two batch rows with different boundaries (a 1-token document, boundaries
    on block edges) and an MLA-like narrower value head. Grouped heads always take SDPA."""
    torch.manual_seed(0)
    B, H, T = 2, 4, 256
    q = torch.randn(B, H, T, 24, requires_grad=True)
    k = torch.randn(B, H // 2 if gqa else H, T, 24, requires_grad=True)
    v = torch.randn(B, k.shape[1], T, 16, requires_grad=True)
    ids = ids_from_lengths((50, 70, 136), (64, 1, 63, 127, 1))
    out = attention._causal_sdpa(q, k, v, 0.3, gqa, ids)
    ref = dense_reference(q, k, v, 0.3, gqa, ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_one_document_is_bit_identical_to_no_documents():
    """The blocked path with a single document runs the same blocks as without documents."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 16, requires_grad=True) for _ in range(3))
    out = attention._causal_sdpa(q, k, v)
    same = attention._causal_sdpa(q, k, v, document_ids=torch.zeros(2, 256, dtype=torch.long))
    assert torch.equal(out, same)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(same, (q, k, v), grad)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path, kind", MODULE_PATHS, indirect=["path"])
def test_module_matches_dense_mask(path, kind, monkeypatch):
    """Module outputs and parameter gradients with document_ids equal the module run on the dense reference."""
    module, rotary, cfg = attention_module(kind)
    torch.manual_seed(1)
    ids = ids_from_lengths(LENGTHS, (100, 20, 1, 135))
    x = torch.randn(2, ids.shape[1], cfg.hidden_size)
    cos, sin = rotary(positions_in_documents(ids), x.dtype)

    def run():
        module.zero_grad()
        out = module(x, cos, sin, document_ids=ids)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}

    out, grads = run()
    monkeypatch.setattr(attention, "_causal_sdpa", dense_reference)
    ref, ref_grads = run()
    for name, got, want in [("output", out, ref), *((n, grads[n], ref_grads[n]) for n in grads)]:
        assert_close_scaled(got, want, name)


@pytest.mark.parametrize("path, kind", MODULE_PATHS, indirect=["path"])
def test_module_packed_equals_alone(path, kind):
    module, rotary, cfg = attention_module(kind)
    torch.manual_seed(1)
    ids = ids_from_lengths(LENGTHS)
    x = torch.randn(1, ids.shape[1], cfg.hidden_size)
    with torch.no_grad():
        packed = module(x, *rotary(positions_in_documents(ids), x.dtype), document_ids=ids)
        start = 0
        for n in LENGTHS:
            alone = module(x[:, start:start + n], *rotary(torch.arange(n)[None], x.dtype))
            assert_close_scaled(packed[:, start:start + n], alone, f"document of {n}")
            start += n


@pytest.mark.parametrize("overrides", [[], ["model.attention=gqa", "model.num_key_value_heads=2"]],
                         ids=["mla", "gqa"])
def test_model_packed_equals_alone(overrides):
    """The tiny model (MoE, fp32, eval): each packed document's logits are that document's logits alone."""
    cfg = load_config("tiny", overrides).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = ids_from_lengths(LENGTHS)
    tokens = torch.randint(0, cfg.vocab_size, ids.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = model(tokens, document_ids=ids)
        start = 0
        for n in LENGTHS:
            alone = model(tokens[:, start:start + n])
            torch.testing.assert_close(packed[:, start:start + n], alone, atol=1e-5, rtol=0)
            start += n


@pytest.mark.slow
def test_compiled_blocks_take_new_boundaries_without_recompiling():
    """train.compile=blocks with documents: the blocked kernel runs outside the graph (its plan comes from the data),
    so new boundaries reuse the compiled blocks, and the logits are the eager ones."""
    from torch._dynamo.utils import counters

    cfg = load_config("tiny", []).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    boundaries = [LENGTHS, (100, 156), (10, 20, 30, 196)]
    with torch.no_grad():
        eager = [model(tokens, document_ids=ids_from_lengths(b)) for b in boundaries]
        model.compile_blocks()
        graphs = []
        for b, want in zip(boundaries, eager):
            torch.testing.assert_close(model(tokens, document_ids=ids_from_lengths(b)), want, atol=1e-5, rtol=0)
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:] == graphs[:1] * 2
