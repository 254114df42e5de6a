"""Single-view losses: plain CE, KD (Hinton), DKD (Zhao et al.) and DIST (Huang et al.).

Defaults are mdistiller's / the papers' CIFAR-100 settings (docs/losses.md).
"""

import torch
import torch.nn.functional as F

from kdcache.losses.base import DistillLoss
from kdcache.losses.functional import kl_rows, kl_t, pearson


class CrossEntropy(DistillLoss):
    """Training from labels alone: the no-teacher baseline."""

    name = "ce"
    needs_teacher = False
    defaults = {}

    def compute(self, zs, zt, labels, epoch):
        ce = F.cross_entropy(zs[0], labels)
        return ce, {"ce": ce}


class KD(DistillLoss):
    """`ce_weight * CE + kd_weight * mean_i KL_T(zs, zt)_i` (mdistiller weights)."""

    name = "kd"
    defaults = {"ce_weight": 0.1, "kd_weight": 0.9, "T": 4.0}
    positive = ("T",)
    temperature = "T"

    def compute(self, zs, zt, labels, epoch):
        p = self.params
        ce = p["ce_weight"] * F.cross_entropy(zs[0], labels)
        kd = p["kd_weight"] * kl_t(zs[0], zt[0], p["T"]).mean()
        return ce + kd, {"ce": ce, "kd": kd}


class DKD(DistillLoss):
    """Decoupled KD: target-class (TCKD) and non-target-class (NCKD) KL terms.

    As in mdistiller: both terms use `T^2`, the NCKD distributions push the target
    logit down by 1000 (after dividing by T), and the KD terms ramp in linearly over
    `warmup` epochs, `min(epoch / warmup, 1)`. mdistiller counts epochs from 1, so
    pass 1-based epochs to reproduce its ramp.
    """

    name = "dkd"
    defaults = {"ce_weight": 1.0, "alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup": 20.0}
    positive = ("T", "warmup")
    temperature = "T"

    def compute(self, zs, zt, labels, epoch):
        p = self.params
        T = p["T"]
        # Not F.one_hot: it checks the labels' range on the host (a sync per step).
        gt_mask = labels[:, None] == torch.arange(zs[0].shape[-1], device=labels.device)
        tckd = T * T * kl_rows(_binary_log_probs(zs[0] / T, gt_mask),
                               _binary_log_probs(zt[0] / T, gt_mask)).mean()
        nckd = T * T * kl_rows(F.log_softmax(zs[0] / T - 1000.0 * gt_mask, dim=-1),
                               F.log_softmax(zt[0] / T - 1000.0 * gt_mask, dim=-1)).mean()
        ramp = min(epoch / p["warmup"], 1.0)
        ce = p["ce_weight"] * F.cross_entropy(zs[0], labels)
        tckd = ramp * p["alpha"] * tckd
        nckd = ramp * p["beta"] * nckd
        return ce + tckd + nckd, {"ce": ce, "tckd": tckd, "nckd": nckd}


def _binary_log_probs(z: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """`log [p_target, 1 - p_target]` of `softmax(z)`, via logsumexp so p ~ 1 stays finite."""
    log_p = F.log_softmax(z, dim=-1)
    target = log_p.masked_fill(~gt_mask, float("-inf")).logsumexp(-1)
    others = log_p.masked_fill(gt_mask, float("-inf")).logsumexp(-1)
    return torch.stack([target, others], dim=-1)


class DIST(DistillLoss):
    """`CE + tau^2 * (beta * inter + gamma * intra)`, with 1 - Pearson across classes
    (inter, per sample) and across the batch (intra, per class) of softened probabilities."""

    name = "dist"
    defaults = {"ce_weight": 1.0, "beta": 2.0, "gamma": 2.0, "tau": 4.0}
    positive = ("tau",)
    temperature = "tau"

    def compute(self, zs, zt, labels, epoch):
        p = self.params
        tau = p["tau"]
        p_s = F.softmax(zs[0] / tau, dim=-1)
        p_t = F.softmax(zt[0] / tau, dim=-1)
        inter = p["beta"] * tau * tau * (1 - pearson(p_s, p_t).mean())
        intra = p["gamma"] * tau * tau * (1 - pearson(p_s.T, p_t.T).mean())
        ce = p["ce_weight"] * F.cross_entropy(zs[0], labels)
        return ce + inter + intra, {"ce": ce, "inter": inter, "intra": intra}
