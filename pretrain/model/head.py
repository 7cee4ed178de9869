"""Output head with a fused, chunked linear + cross-entropy (the (tokens x vocab) logits are never materialised).

``LMHead`` is an ``nn.Linear`` (same parameter, same state-dict key, exports unchanged): ``head(h)`` returns
logits as before, ``head(h, labels=labels)`` returns the summed cross-entropy through ``LinearCrossEntropy``.
Going through the module's ``forward`` matters for ZeRO-3, which gathers a partitioned weight in the module's
forward pre-hook.

``LinearCrossEntropy`` runs over chunks of tokens: logits of one chunk (in fp32), its log-sum-exp and target
logit, and, when a gradient is needed, the gradient of the summed loss with respect to the chunk's logits
(softmax minus one-hot, zero on ignored rows), turned at once into the chunk's share of dL/dh and dL/dW by two
GEMMs. Backward only scales those by the incoming gradient. Compared with ``lm_head`` + ``F.cross_entropy``:
no (N, V) logits, log-probabilities or logit gradients are kept between forward and backward
(for DeepSeek-V3's 129,280-token vocabulary that is 2 GiB per 4,096-token micro-batch in fp32, here replaced by
a weight-sized fp32 gradient), and the softmax passes run on a cache-sized chunk, which is faster too (measured
in bench/results.md, "Components vs the plain PyTorch op"). Same technique as Liger-Kernel's fused linear
cross-entropy, in plain PyTorch ops so it runs on CPU and GPU alike.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 22
"""Logit elements per chunk (16 MiB in fp32); at least ``MIN_CHUNK_TOKENS`` tokens so the GEMMs stay efficient."""
MIN_CHUNK_TOKENS = 256


def chunk_tokens(vocab_size: int) -> int:
    return max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // vocab_size)


class LinearCrossEntropy(torch.autograd.Function):
    """sum over non-ignored rows of CE(h @ weight.T, labels): h (N, H), weight (V, H), labels (N,) -> () fp32."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = chunk_tokens(weight.shape[0])
        for start in range(0, h.shape[0], step):
            hc, lc = h[start:start + step], labels[start:start + step]
            logits = (hc @ weight.t()).float()  # (n, V)
            valid = lc != IGNORE_INDEX
            target = lc.masked_fill(~valid, 0).unsqueeze(1)
            target_logit = logits.gather(1, target)
            row_max = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(row_max).exp_()  # in place: five passes over the chunk in all, one exp
            sum_exp = exp.sum(dim=-1, keepdim=True)
            total += ((row_max + sum_exp.log() - target_logit).squeeze(1) * valid).sum()
            if not (need_h or need_w):
                continue
            # d(sum loss)/d logits = softmax - one_hot on valid rows, 0 on ignored ones
            keep = valid.unsqueeze(1).to(exp.dtype)
            grad = exp.mul_(keep / sum_exp).scatter_add_(1, target, -keep)
            grad = grad.to(h.dtype)
            if need_h:
                torch.mm(grad, weight, out=grad_h[start:start + step])
            if need_w and hc.dtype == torch.float32:
                grad_w.addmm_(grad.t(), hc)
            elif need_w:  # bf16/fp16 GEMM (fp32 accumulation inside), chunk sums accumulated in fp32
                grad_w += grad.t() @ hc
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (None if grad_h is None else grad_h * grad_out.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_out.to(grad_w.dtype), None)


class LMHead(nn.Linear):
    """The vocabulary projection (no bias). ``forward(h)`` -> logits; ``forward(h, labels)`` -> summed CE (fp32)."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        return LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), self.weight, labels.reshape(-1))
