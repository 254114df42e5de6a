"""CRLD: cross-view consistency regularisation for logit distillation (ACM MM 2024)."""

import torch.nn.functional as F

from kdcache.losses.base import DistillLoss
from kdcache.losses.functional import kl_t


class CRLD(DistillLoss):
    """Within-view and cross-view KL between a weak and a strong view, teacher-gated.

    Exactly METHODS.md: the weak-view teacher confidence mask gates both within-view
    terms, the strong-view mask both cross-view terms; masked sums are divided by the
    batch size (dropped samples count as zeros); CE on both views; no warm-up.
    """

    name = "crld"
    views = ("weak", "strong")
    defaults = {"w_ce": 1.0, "w_wv": 2.0, "w_cv": 0.5, "T": 4.0, "tau_w": 0.9, "tau_s": 0.2}
    positive = ("T",)
    temperature = "T"

    def compute(self, zs, zt, labels, epoch):
        p = self.params
        T = p["T"]
        (zs_w, zs_s), (zt_w, zt_s) = zs, zt
        # Confidence at temperature 1; masks are floats so dropped samples add exact zeros.
        m_w = (F.softmax(zt_w, dim=-1).amax(-1) >= p["tau_w"]).float()
        m_s = (F.softmax(zt_s, dim=-1).amax(-1) >= p["tau_s"]).float()
        ce = p["w_ce"] * (F.cross_entropy(zs_w, labels) + F.cross_entropy(zs_s, labels))
        wv = p["w_wv"] * (m_w * (kl_t(zs_w, zt_w, T) + kl_t(zs_s, zt_s, T))).mean()
        cv = p["w_cv"] * (m_s * (kl_t(zs_s, zt_w, T) + kl_t(zs_w, zt_s, T))).mean()
        parts = {"ce": ce, "wv": wv, "cv": cv, "mask_w": m_w.mean(), "mask_s": m_s.mean()}
        return ce + wv + cv, parts
