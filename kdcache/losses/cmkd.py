"""CMKD: correlation matching KD (Niu et al. 2024), in kdcache's reading (docs/losses.md)."""

import math

import torch.nn.functional as F

from kdcache.losses.base import DistillLoss
from kdcache.losses.functional import average_rank, pearson, soft_rank


class CMKD(DistillLoss):
    """`CE + lam * T^2 * mean_i[(1 - d_i) * L_P,i + d_i * L_S,i]`.

    L_P: 1 - Pearson of softened probabilities; L_S: 1 - Spearman, i.e. Pearson of the
    student's soft ranks and the teacher's exact (tie-averaged) ranks; d_i: teacher
    entropy / log C, so uncertain samples lean on the ranking, confident ones on values.
    The soft-rank temperature `eps` is relative to each sample's logit standard
    deviation (held constant), so one value suits any logit scale.
    """

    name = "cmkd"
    defaults = {"ce_weight": 1.0, "lam": 2.0, "T": 4.0, "eps": 0.1, "rank_chunk": 128}
    positive = ("T", "eps", "rank_chunk")

    def compute(self, zs, zt, labels, epoch):
        p = self.params
        T = p["T"]
        zs, zt = zs[0], zt[0]
        log_p_t = F.log_softmax(zt / T, dim=-1)
        p_t = log_p_t.exp()
        l_p = 1 - pearson(F.softmax(zs / T, dim=-1), p_t)
        scaled = zs / (zs.std(-1, keepdim=True).detach() + 1e-6)
        l_s = 1 - pearson(soft_rank(scaled, p["eps"], p["rank_chunk"]), average_rank(zt))
        difficulty = -(p_t * log_p_t).sum(-1) / math.log(zs.shape[-1])
        kd = p["lam"] * T * T * ((1 - difficulty) * l_p + difficulty * l_s).mean()
        ce = p["ce_weight"] * F.cross_entropy(zs, labels)
        parts = {"ce": ce, "kd": kd, "pearson": l_p.mean(), "spearman": l_s.mean(),
                 "difficulty": difficulty.mean()}
        return ce + kd, parts
