"""CMKD: correlation matching KD (Niu et al. 2024), in kdcache's reading (docs/losses.md)."""

import math

import torch.nn.functional as F

from kdcache.errors import KdcacheError
from kdcache.losses.base import DistillLoss
from kdcache.losses.functional import average_rank, pearson, soft_rank

T2_MODES = ("none", "pearson", "both")


class CMKD(DistillLoss):
    """`CE + lam * mean_i[(1 - d_i) * L_P,i + d_i * L_S,i]`.

    L_P: 1 - Pearson of the probabilities softened at `T`; L_S: 1 - Spearman, i.e. Pearson
    of the student's soft ranks and the teacher's exact (tie-averaged) ranks; d_i: entropy
    / log C of the teacher's distribution at `d_T` (default 1, its own confidence), so
    uncertain samples lean on the ranking, confident ones on the values. The soft-rank
    temperature `eps` is relative to each sample's logit standard deviation (held
    constant), so one value suits any logit scale.

    Deviation from METHODS.md (docs/losses.md): no `T^2` factor by default. Both terms are
    correlations, whose gradients do not shrink like 1/T^2 (KL's do), so `T^2` only
    over-weighted them (16x at T=4) and the student stayed at chance. `t2="pearson"` puts
    `T^2` on L_P only (DIST's convention); `t2="both", d_T=T` is METHODS.md's formula.
    """

    name = "cmkd"
    defaults = {"ce_weight": 1.0, "lam": 2.0, "T": 4.0, "d_T": 1.0, "t2": "none", "eps": 0.1,
                "rank_chunk": 128}
    positive = ("T", "d_T", "eps", "rank_chunk")
    temperature = "T"

    def __init__(self, **overrides):
        super().__init__(**overrides)
        if self.params["t2"] not in T2_MODES:
            raise KdcacheError(f"loss 'cmkd': t2 must be one of {', '.join(T2_MODES)}, "
                               f"got {self.params['t2']!r}")

    def compute(self, zs, zt, labels, epoch):
        p = self.params
        T = p["T"]
        zs, zt = zs[0], zt[0]
        l_p = 1 - pearson(F.softmax(zs / T, dim=-1), F.softmax(zt / T, dim=-1))
        scaled = zs / (zs.std(-1, keepdim=True).detach() + 1e-6)
        l_s = 1 - pearson(soft_rank(scaled, p["eps"], p["rank_chunk"]), average_rank(zt))
        log_q_t = F.log_softmax(zt / p["d_T"], dim=-1)
        difficulty = -(log_q_t.exp() * log_q_t).sum(-1) / math.log(zs.shape[-1])
        w_p = T * T if p["t2"] in ("pearson", "both") else 1.0
        w_s = T * T if p["t2"] == "both" else 1.0
        kd = p["lam"] * ((1 - difficulty) * w_p * l_p + difficulty * w_s * l_s).mean()
        ce = p["ce_weight"] * F.cross_entropy(zs, labels)
        parts = {"ce": ce, "kd": kd, "pearson": l_p.mean(), "spearman": l_s.mean(),
                 "difficulty": difficulty.mean()}
        return ce + kd, parts
