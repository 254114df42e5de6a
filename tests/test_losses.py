"""kdcache.losses against slow per-sample re-implementations of METHODS.md's formulas."""

import math

import numpy as np
import pytest
import torch

from kdcache.errors import KdcacheError
from kdcache.losses import get_loss, list_losses
from kdcache.losses.functional import average_rank, soft_rank

B, C = 12, 10
RTOL = 1e-4


# ---- independent references: numpy float64, one sample at a time ------------------

def softmax(v):
    e = np.exp(v - v.max())
    return e / e.sum()


def kl(p_t, p_s):
    return sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s) if pt > 0)


def ce(z, y):
    return np.mean([-math.log(softmax(z[i])[y[i]]) for i in range(len(y))])


def corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def tie_rank(v):
    return np.array([sum(u < x for u in v) + (sum(u == x for u in v) + 1) / 2 for x in v])


def ref_kd(zs, zt, y, T=4.0):
    kls = [T * T * kl(softmax(zt[i] / T), softmax(zs[i] / T)) for i in range(len(y))]
    return 0.1 * ce(zs, y) + 0.9 * np.mean(kls)


def ref_dkd(zs, zt, y, epoch, alpha=1.0, beta=8.0, T=4.0):
    tckd, nckd = [], []
    for i in range(len(y)):
        ps, pt = softmax(zs[i] / T), softmax(zt[i] / T)
        tckd.append(kl([pt[y[i]], 1 - pt[y[i]]], [ps[y[i]], 1 - ps[y[i]]]))
        rest = [c for c in range(zs.shape[1]) if c != y[i]]
        nckd.append(kl(pt[rest] / pt[rest].sum(), ps[rest] / ps[rest].sum()))
    ramp = min(epoch / 20, 1.0)
    return ce(zs, y) + ramp * T * T * (alpha * np.mean(tckd) + beta * np.mean(nckd))


def ref_dist(zs, zt, y, tau=4.0):
    ps = np.stack([softmax(z / tau) for z in zs])
    pt = np.stack([softmax(z / tau) for z in zt])
    inter = 1 - np.mean([corr(ps[i], pt[i]) for i in range(ps.shape[0])])
    intra = 1 - np.mean([corr(ps[:, c], pt[:, c]) for c in range(ps.shape[1])])
    return ce(zs, y) + 2 * tau * tau * inter + 2 * tau * tau * intra


def ref_crld(zs_w, zs_s, zt_w, zt_s, y, T=4.0):
    wv = cv = 0.0
    for i in range(len(y)):
        def kl_t(a, b):
            return T * T * kl(softmax(b[i] / T), softmax(a[i] / T))
        if softmax(zt_w[i]).max() >= 0.9:
            wv += kl_t(zs_w, zt_w) + kl_t(zs_s, zt_s)
        if softmax(zt_s[i]).max() >= 0.2:
            cv += kl_t(zs_s, zt_w) + kl_t(zs_w, zt_s)
    return ce(zs_w, y) + ce(zs_s, y) + 2.0 * wv / len(y) + 0.5 * cv / len(y)


def ref_cmkd(zs, zt, y, lam=2.0, T=4.0, eps=0.1, d_T=1.0, t2="none"):
    w_p = T * T if t2 in ("pearson", "both") else 1.0
    w_s = T * T if t2 == "both" else 1.0
    terms = []
    for i in range(len(y)):
        ps, pt = softmax(zs[i] / T), softmax(zt[i] / T)
        scale = eps * (np.std(zs[i], ddof=1) + 1e-6)
        n = len(zs[i])
        soft = [1 + sum(1 / (1 + math.exp(-(zs[i][a] - zs[i][b]) / scale))
                        for b in range(n) if b != a) for a in range(n)]
        d = -sum(q * math.log(q) for q in softmax(zt[i] / d_T) if q > 0) / math.log(n)
        l_p = 1 - corr(ps, pt)
        l_s = 1 - corr(np.array(soft), tie_rank(zt[i]))
        terms.append((1 - d) * w_p * l_p + d * w_s * l_s)
    return ce(zs, y) + lam * np.mean(terms)


# ---- helpers ------------------------------------------------------------------------

def logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def labels(n=B, classes=C, seed=1):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def run(name, zs, zt, y, epoch=100, **params):
    """The loss and the gradient w.r.t. every student view."""
    zs = [z.clone().requires_grad_() for z in zs]
    loss, parts = get_loss(name, **params)(zs, zt, y, epoch)
    loss.backward()
    return loss, {k: v.item() for k, v in parts.items()}, [z.grad for z in zs]


def np64(t):
    return t.double().numpy()


def assert_finite_grads(grads):
    for g in grads:
        assert torch.isfinite(g).all()
        assert g.abs().sum() > 0


# ---- values against the references ------------------------------------------------

def test_ce_needs_no_teacher():
    zs, y = logits(B, C), labels()
    loss, parts, grads = run("ce", [zs], None, y)
    assert loss.item() == pytest.approx(ce(np64(zs), y.numpy()), rel=RTOL)
    assert parts == {"ce": pytest.approx(loss.item())}
    assert not get_loss("ce").needs_teacher
    assert_finite_grads(grads)


def test_kd_matches_reference():
    zs, zt, y = logits(B, C, seed=0), logits(B, C, seed=1), labels()
    loss, parts, grads = run("kd", [zs], [zt], y)
    assert loss.item() == pytest.approx(ref_kd(np64(zs), np64(zt), y.numpy()), rel=RTOL)
    assert parts["ce"] + parts["kd"] == pytest.approx(loss.item(), rel=1e-6)
    assert_finite_grads(grads)


def test_kd_temperature_override():
    zs, zt, y = logits(B, C, seed=0), logits(B, C, seed=1), labels()
    loss, _, _ = run("kd", [zs], [zt], y, T=2)
    assert loss.item() == pytest.approx(ref_kd(np64(zs), np64(zt), y.numpy(), T=2.0), rel=RTOL)


def test_dkd_matches_reference():
    zs, zt, y = logits(B, C, seed=2), logits(B, C, seed=3), labels()
    loss, parts, grads = run("dkd", [zs], [zt], y, epoch=30)
    ref = ref_dkd(np64(zs), np64(zt), y.numpy(), epoch=30)
    assert loss.item() == pytest.approx(ref, rel=RTOL)
    assert parts["ce"] + parts["tckd"] + parts["nckd"] == pytest.approx(loss.item(), rel=1e-6)
    assert_finite_grads(grads)


@pytest.mark.parametrize("epoch, ramp", [(0, 0.0), (10, 0.5), (20, 1.0), (40, 1.0)])
def test_dkd_warmup(epoch, ramp):
    zs, zt, y = logits(B, C, seed=2), logits(B, C, seed=3), labels()
    loss, parts, _ = run("dkd", [zs], [zt], y, epoch=epoch)
    _, full, _ = run("dkd", [zs], [zt], y, epoch=1000)
    assert parts["tckd"] == pytest.approx(ramp * full["tckd"], rel=1e-6, abs=1e-9)
    assert parts["nckd"] == pytest.approx(ramp * full["nckd"], rel=1e-6, abs=1e-9)
    ref = ref_dkd(np64(zs), np64(zt), y.numpy(), epoch=epoch)
    assert loss.item() == pytest.approx(ref, rel=RTOL)


def test_dist_matches_reference():
    zs, zt, y = logits(B, C, seed=4), logits(B, C, seed=5), labels()
    loss, parts, grads = run("dist", [zs], [zt], y)
    assert loss.item() == pytest.approx(ref_dist(np64(zs), np64(zt), y.numpy()), rel=RTOL)
    assert parts["ce"] + parts["inter"] + parts["intra"] == pytest.approx(loss.item(), rel=1e-6)
    assert_finite_grads(grads)


def crld_teacher(seed):
    """Teacher logits whose confidence spans all mask cases (< 0.2, between, >= 0.9)."""
    scales = torch.linspace(0.0, 8.0, B)[:, None]
    return logits(B, C, scale=1.0, seed=seed) * scales


def test_crld_matches_reference():
    zs_w, zs_s = logits(B, C, seed=6), logits(B, C, seed=7)
    zt_w, zt_s = crld_teacher(8), crld_teacher(9).flip(0)
    y = labels()
    m_w = torch.softmax(zt_w, -1).amax(-1) >= 0.9
    m_s = torch.softmax(zt_s, -1).amax(-1) >= 0.2
    assert 0 < m_w.sum() < B and 0 < m_s.sum() < B and (m_w != m_s).any()
    loss, parts, grads = run("crld", [zs_w, zs_s], [zt_w, zt_s], y)
    ref = ref_crld(np64(zs_w), np64(zs_s), np64(zt_w), np64(zt_s), y.numpy())
    assert loss.item() == pytest.approx(ref, rel=RTOL)
    assert parts["ce"] + parts["wv"] + parts["cv"] == pytest.approx(loss.item(), rel=1e-6)
    assert parts["mask_w"] == pytest.approx(m_w.float().mean().item())
    assert_finite_grads(grads)


def test_crld_masks_gate_the_right_terms():
    zs = [logits(B, C, seed=6), logits(B, C, seed=7)]
    confident, uniform = logits(B, C, scale=30.0, seed=8), torch.zeros(B, C)
    y = labels()
    _, parts, _ = run("crld", zs, [confident, uniform], y)  # m_w = 1, m_s = 0
    assert parts["wv"] > 0 and parts["cv"] == 0
    _, parts, _ = run("crld", zs, [uniform, confident], y)  # m_w = 0, m_s = 1
    assert parts["wv"] == 0 and parts["cv"] > 0


def test_crld_everything_masked_is_ce_only():
    zs_w, zs_s, y = logits(B, C, seed=6), logits(B, C, seed=7), labels()
    uniform = torch.zeros(B, C)  # confidence 1/C < tau_s < tau_w
    loss, parts, grads = run("crld", [zs_w, zs_s], [uniform, uniform], y)
    assert loss.item() == pytest.approx(ce(np64(zs_w), y.numpy()) + ce(np64(zs_s), y.numpy()),
                                        rel=RTOL)
    assert parts["wv"] == 0 and parts["cv"] == 0
    assert_finite_grads(grads)


def test_crld_reports_accuracy_from_weak_view():
    zs = [logits(B, C, seed=6), logits(B, C, seed=7)]
    assert get_loss("crld").views == ("weak", "strong")
    assert get_loss("crld").accuracy_logits(zs) is zs[0]


def test_cmkd_matches_reference():
    zs, zt, y = logits(B, C, seed=10), logits(B, C, seed=11), labels()
    loss, parts, grads = run("cmkd", [zs], [zt], y)
    assert loss.item() == pytest.approx(ref_cmkd(np64(zs), np64(zt), y.numpy()), rel=RTOL)
    assert parts["ce"] + parts["kd"] == pytest.approx(loss.item(), rel=1e-6)
    assert 0 < parts["difficulty"] < 1
    assert_finite_grads(grads)


def test_cmkd_teacher_ties_use_average_ranks():
    zs, y = logits(B, C, seed=10), labels()
    zt = logits(B, C, seed=11).round()  # many ties, as with coarse cached logits
    zt[:, :4] = 1.0
    loss, _, grads = run("cmkd", [zs], [zt], y, lam=3.0, eps=0.5)
    ref = ref_cmkd(np64(zs), np64(zt), y.numpy(), lam=3.0, eps=0.5)
    assert loss.item() == pytest.approx(ref, rel=RTOL)
    assert_finite_grads(grads)


@pytest.mark.parametrize("params", [dict(t2="pearson"), dict(t2="both", d_T=4.0),
                                    dict(t2="none", d_T=2.0, T=2.0, lam=0.5)])
def test_cmkd_t2_and_difficulty_temperature_options(params):
    # t2="both", d_T=T is METHODS.md's formula; the default (t2="none", d_T=1) is kdcache's.
    zs, zt, y = logits(B, C, seed=10), logits(B, C, seed=11), labels()
    loss, parts, grads = run("cmkd", [zs], [zt], y, **params)
    assert loss.item() == pytest.approx(ref_cmkd(np64(zs), np64(zt), y.numpy(), **params), rel=RTOL)
    assert_finite_grads(grads)


def test_cmkd_difficulty_uses_teacher_confidence_at_d_T():
    zs, zt, y = logits(B, C, seed=10), logits(B, C, seed=11), labels()
    d = {t: run("cmkd", [zs], [zt], y, d_T=t)[1]["difficulty"] for t in (1.0, 4.0)}
    expected = np.mean([-sum(q * math.log(q) for q in softmax(z)) / math.log(C) for z in np64(zt)])
    assert d[1.0] == pytest.approx(expected, rel=RTOL)
    assert d[1.0] < d[4.0] < 1  # softening raises the entropy towards log C


def test_cmkd_rejects_unknown_t2_mode():
    with pytest.raises(KdcacheError, match="t2 must be one of none, pearson, both"):
        get_loss("cmkd", t2="rank")


def test_average_rank_ties():
    z = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[4.0, 1.0, 4.0, 2.0, 4.0], [3.0, 3.0, 3.0, 3.0, 3.0]])
    assert torch.equal(average_rank(z), expected)


# ---- soft rank ----------------------------------------------------------------------

def test_soft_rank_tends_to_exact_rank():
    z = logits(4, 50, scale=1.0, seed=12)
    exact = average_rank(z)
    errors = [(soft_rank(z, eps) - exact).abs().max().item() for eps in (1.0, 0.1, 1e-2, 1e-5)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-2
    tied = torch.tensor([[2.0, 1.0, 2.0, 0.5]])
    assert torch.allclose(soft_rank(tied, 1e-5), average_rank(tied))


def test_soft_rank_gradient_matches_finite_differences():
    z = logits(3, 11, scale=1.0, seed=13).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: soft_rank(v, 0.3, 4), (z,))


def test_soft_rank_chunking_bounds_saved_memory_at_1000_classes():
    n, classes = 8, 1000
    zs, zt, y = logits(n, classes, seed=14), logits(n, classes, seed=15), labels(n, classes)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    zs_grad = zs.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = get_loss("cmkd", rank_chunk=96)([zs_grad], [zt], y, 0)
    assert max(saved) <= n * classes  # no [B, chunk, C] block is kept for backward
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs_grad.grad).all()
    one_chunk = soft_rank(zs, 0.1, chunk=classes)
    assert torch.allclose(soft_rank(zs, 0.1, chunk=96), one_chunk)


# ---- numerical edge cases ------------------------------------------------------------

@pytest.mark.parametrize("name", ["ce", "kd", "dkd", "dist", "crld", "cmkd"])
def test_one_dominant_class_stays_finite(name):
    loss_fn = get_loss(name)
    y = labels()
    onehot = torch.nn.functional.one_hot(y, C).float()
    zs = [logits(B, C, scale=1.0, seed=16) + 200.0 * onehot for _ in loss_fn.views]
    zt = [logits(B, C, scale=1.0, seed=17) + 500.0 * onehot for _ in loss_fn.views]
    loss, parts, grads = run(name, zs, zt, y)
    assert torch.isfinite(loss)
    assert all(math.isfinite(v) for v in parts.values())
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["dist", "cmkd"])
def test_constant_student_logits_stay_finite(name):
    zs, zt, y = torch.zeros(B, C), logits(B, C, seed=18), labels()  # e.g. a zero-init head
    loss, _, grads = run(name, [zs], [zt], y)
    assert torch.isfinite(loss) and torch.isfinite(grads[0]).all()


# ---- registry -----------------------------------------------------------------------

def test_registry_lists_every_loss_with_its_views():
    assert set(list_losses()) == {"ce", "kd", "dkd", "dist", "crld", "cmkd"}
    for name in list_losses():
        loss = get_loss(name)
        assert loss.name == name
        assert loss.views == (("weak", "strong") if name == "crld" else ("weak",))
        assert loss.needs_teacher == (name != "ce")


def test_defaults_and_overrides():
    assert get_loss("kd").params == {"ce_weight": 0.1, "kd_weight": 0.9, "T": 4.0}
    assert get_loss("crld").params == {"w_ce": 1.0, "w_wv": 2.0, "w_cv": 0.5, "T": 4.0,
                                       "tau_w": 0.9, "tau_s": 0.2}
    assert get_loss("dkd", beta="6").params["beta"] == 6.0  # CLI strings are converted
    assert get_loss("cmkd", rank_chunk="64").params["rank_chunk"] == 64
    assert get_loss("cmkd").params == {"ce_weight": 1.0, "lam": 2.0, "T": 4.0, "d_T": 1.0,
                                       "t2": "none", "eps": 0.1, "rank_chunk": 128}


def test_unknown_loss_is_a_user_error():
    with pytest.raises(KdcacheError, match="unknown loss 'kdd'.*dkd"):
        get_loss("kdd")


def test_unknown_hyperparameter_lists_valid_keys():
    with pytest.raises(KdcacheError, match="no hyperparameter temperature; valid: .*T"):
        get_loss("kd", temperature=2)


def test_bad_hyperparameter_values():
    with pytest.raises(KdcacheError, match="T must be > 0"):
        get_loss("crld", T=0)
    with pytest.raises(KdcacheError, match="not a valid float"):
        get_loss("dist", beta="high")


def test_missing_teacher_or_view_is_a_user_error():
    zs, y = logits(B, C), labels()
    with pytest.raises(KdcacheError, match="needs teacher logits"):
        get_loss("kd")([zs], None, y, 0)
    with pytest.raises(KdcacheError, match="views \\('weak', 'strong'\\)"):
        get_loss("crld")([zs], [zs], y, 0)
