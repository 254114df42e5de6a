"""Tensor helpers shared by the losses: softened KL, Pearson correlation, ranks.

All functions work row-wise along the last dimension, so `[B, C]` logits give `[B]`
per-sample values (or `[B, C]` ranks); batch reductions are left to the losses.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def kl_rows(log_p_s: torch.Tensor, log_p_t: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_s) per row from log-probabilities; log inputs keep near one-hot rows finite."""
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def kl_t(zs: torch.Tensor, zt: torch.Tensor, T: float) -> torch.Tensor:
    """Per-sample `T^2 * KL(softmax(zt/T) || softmax(zs/T))` (METHODS.md's KL_T)."""
    return T * T * kl_rows(F.log_softmax(zs / T, dim=-1), F.log_softmax(zt / T, dim=-1))


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation per row: cosine of the centred rows, as in DIST (eps 1e-8)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def average_rank(z: torch.Tensor) -> torch.Tensor:
    """Exact 1-based ranks per row, ties given their average rank (no gradient)."""
    ordered = z.detach().sort(dim=-1).values
    below = torch.searchsorted(ordered, z.detach().contiguous(), side="left")
    up_to = torch.searchsorted(ordered, z.detach().contiguous(), side="right")
    return (below + up_to + 1).to(z.dtype) / 2


class _PairwiseSoftRank(torch.autograd.Function):
    """`r_i = 1/2 + sum_j sigmoid((z_i - z_j) / eps)`, computed in class chunks.

    Autograd would keep every `[B, chunk, C]` sigmoid block for the backward pass, i.e.
    `B*C*C` floats (256 MB at B=64, C=1000). This Function saves only `z` and recomputes
    each block in backward, so the peak extra memory is one `[B, chunk, C]` block.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, eps: float, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.eps, ctx.chunk = eps, chunk
        ranks = torch.empty_like(z)
        for start in range(0, z.shape[-1], chunk):
            block = z[..., start:start + chunk, None] - z[..., None, :]
            ranks[..., start:start + chunk] = 0.5 + torch.sigmoid(block / eps).sum(-1)
        return ranks

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # d r_i / d z_k = (delta_ik * sum_j s'_ij - s'_ik) / eps with s' = sigmoid' (even),
        # hence dL/dz_k = sum_j s'_kj * (g_k - g_j) / eps.
        (z,) = ctx.saved_tensors
        eps, chunk = ctx.eps, ctx.chunk
        grad_z = torch.empty_like(z)
        for start in range(0, z.shape[-1], chunk):
            s = torch.sigmoid((z[..., start:start + chunk, None] - z[..., None, :]) / eps)
            diff = grad[..., start:start + chunk, None] - grad[..., None, :]
            grad_z[..., start:start + chunk] = (s * (1 - s) * diff).sum(-1) / eps
        return grad_z, None, None


def soft_rank(z: torch.Tensor, eps: float, chunk: int = 128) -> torch.Tensor:
    """Differentiable ranks per row (pairwise sigmoid); tends to `average_rank` as eps -> 0.

    Costs O(C^2) per row in time and O(B * chunk * C) extra memory.
    """
    return _PairwiseSoftRank.apply(z, float(eps), int(chunk))
