"""The loss family against a float64 loop oracle, gradcheck, analytic values and invariants."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from loss_oracle import oracle_loss, oracle_supervised, preset_settings

from protoclr import losses as L
from protoclr.losses import contrastive_loss

OPTIONS = list(
    itertools.product(["all", "cross"], [True, False], ["none", "inverse_alpha"], ["cosine", "dot", "neg_euclidean"])
)
# One value for each hyperparameter a preset may read; a preset takes the ones its Preset.params names.
HPARAMS = {"temperature": 0.3, "alpha": 2.5, "lam": 1.7, "nu": 0.7}


def preset_case(name: str) -> tuple[dict, dict]:
    """``(kwargs, settings)`` of losses.PRESETS[name]: its hyperparameters, and the oracle's settings they mean."""
    preset = L.PRESETS[name]
    return {k: HPARAMS[k] for k in preset.params}, preset_settings(preset, HPARAMS)


def preset_function(name: str):
    """The functional form of preset ``name``: the function its module (losses.LOSSES[name]) calls."""
    return L.LOSSES[name]()._fn


@pytest.mark.parametrize("negatives,pos_in,scale,similarity", OPTIONS)
@pytest.mark.parametrize("shape,alpha", [((2, 5, 4), 2.0), ((3, 4, 6), 0.7)])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_matches_oracle(negatives, pos_in, scale, similarity, shape, alpha, chunk_size):
    torch.manual_seed(zlib.crc32(repr((negatives, pos_in, scale, similarity, shape)).encode()) % 1000)
    z = torch.randn(*shape)
    kw = dict(alpha=alpha, lam=1.3, nu=0.8, negatives=negatives, positive_in_denominator=pos_in, scale=scale,
              similarity=similarity)
    ref = oracle_loss(z, **kw, reduction="none")
    out64 = contrastive_loss(z.double(), **kw, reduction="none", chunk_size=chunk_size)
    torch.testing.assert_close(out64, ref, rtol=1e-10, atol=1e-10)
    out32 = contrastive_loss(z, **kw, chunk_size=chunk_size)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref.mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("negatives,pos_in,scale,similarity", OPTIONS)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_mean_positive_matches_oracle(negatives, pos_in, scale, similarity, chunk_size):
    """positive="mean" (the multi_view_mean target): the attraction to the mean of the other views, V = 3."""
    torch.manual_seed(zlib.crc32(repr((negatives, pos_in, scale, similarity)).encode()) % 1000)
    z = torch.randn(3, 4, 5, dtype=torch.float64)
    kw = dict(alpha=1.7, lam=1.3, nu=0.8, negatives=negatives, positive_in_denominator=pos_in, scale=scale,
              similarity=similarity)
    ref = oracle_loss(z, **kw, positive="mean", reduction="none")
    got = contrastive_loss(z, **kw, positive="mean", reduction="none", chunk_size=chunk_size)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    pairs = oracle_loss(z, **kw, reduction="none")
    if similarity == "dot":  # the mean of dot products is the dot product with the mean
        torch.testing.assert_close(got, pairs, rtol=1e-10, atol=1e-10)
    else:  # Jensen: s(a, mu) >= mean_w s(a, t_w) for -||.|| always, for cosine where a . mean_w u_w >= 0
        u = torch.nn.functional.normalize(z, dim=-1)
        mean_sim = ((u.sum(0, keepdim=True) - u) / 2 * u).sum(-1).flatten()  # (V*B,) mean_w s(a, t_w), V = 3
        holds = torch.ones_like(mean_sim, dtype=torch.bool) if similarity == "neg_euclidean" else mean_sim >= 0
        assert bool(holds.any()) and bool((got[holds] <= pairs[holds] + 1e-12).all())
        assert not torch.allclose(got, pairs)
    zg = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: contrastive_loss(x, **kw, positive="mean", chunk_size=chunk_size),
                                    (zg,))


@pytest.mark.parametrize("name", list(L.PRESETS))
def test_presets_match_oracle_and_modules(name):
    """Each preset's function, module and preset_options against the oracle with the settings its entry declares."""
    kwargs, settings = preset_case(name)
    torch.manual_seed(1)
    z = torch.randn(3, 6, 5, dtype=torch.float64)
    ref = oracle_loss(z, **settings)
    torch.testing.assert_close(preset_function(name)(z, **kwargs), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(L.LOSSES[name](**kwargs)(*z.unbind(0)), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(contrastive_loss(z, **L.preset_options(name, **kwargs)), ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(L.LOSSES))
def test_loss_table_entries_build_and_run(name):
    module = L.LOSSES[name]()
    torch.manual_seed(2)
    if name == "supervised_prototype":
        z, labels, protos = torch.randn(8, 4), torch.arange(8) % 3, torch.randn(3, 4)
        value = module(z, labels, protos)
        torch.testing.assert_close(value.double(), oracle_supervised(z, labels, protos), rtol=1e-5, atol=1e-5)
    else:
        z = torch.randn(2, 8, 4)
        value = module(*z.unbind(0))
        assert value.shape == () and torch.isfinite(value)
        assert name in L.PRESETS  # every named contrastive entry is proven against the oracle above


def test_nt_xent_matches_simclr_cross_entropy_reference():
    """NT-Xent as commonly written: cross-entropy over the masked (2B, 2B) cosine matrix / temperature."""
    torch.manual_seed(3)
    B, t = 7, 0.5
    z = torch.randn(2, B, 5, dtype=torch.float64)
    zz = F.normalize(torch.cat([z[0], z[1]]), dim=1)
    logits = (zz @ zz.T / t).masked_fill(torch.eye(2 * B, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(B)])
    ref = F.cross_entropy(logits, target)
    torch.testing.assert_close(L.nt_xent_loss(z, temperature=t), ref)


@pytest.mark.parametrize("B", [2, 5, 16])
def test_identical_embeddings_analytic_values(B):
    z = torch.ones(2, B, 8, dtype=torch.float64)
    torch.testing.assert_close(L.nt_xent_loss(z), torch.tensor(math.log(2 * B - 1), dtype=torch.float64))
    torch.testing.assert_close(L.decoupled_contrastive_loss(z), torch.tensor(math.log(2 * B - 2), dtype=torch.float64))


def test_balanced_times_alpha_is_symmetric_cross_view_infonce():
    torch.manual_seed(4)
    alpha, B = 3.0, 9
    z = torch.randn(2, B, 6, dtype=torch.float64)
    a, b = F.normalize(z[0], dim=1), F.normalize(z[1], dim=1)
    logits = alpha * a @ b.T
    target = torch.arange(B)
    infonce = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    torch.testing.assert_close(L.balanced_contrastive_loss(z, alpha=alpha, lam=1.0, nu=1.0) * alpha, infonce)


@pytest.mark.parametrize("negatives,pos_in,scale,similarity", OPTIONS[::3])
def test_permutation_invariance(negatives, pos_in, scale, similarity):
    torch.manual_seed(5)
    z = torch.randn(3, 6, 4, dtype=torch.float64)
    kw = dict(alpha=1.5, negatives=negatives, positive_in_denominator=pos_in, scale=scale, similarity=similarity)
    base = contrastive_loss(z, **kw)
    torch.testing.assert_close(contrastive_loss(z[[2, 0, 1]], **kw), base)
    torch.testing.assert_close(contrastive_loss(z[:, torch.randperm(6)], **kw), base)


# --- gradients -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(L.PRESETS))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck_presets(name, chunk_size):
    fn, (kwargs, _) = preset_function(name), preset_case(name)
    torch.manual_seed(6)
    z = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fn(x, chunk_size=chunk_size, **kwargs), (z,))


@pytest.mark.parametrize("negatives,pos_in,similarity", list(itertools.product(["all", "cross"], [True, False],
                                                                               ["cosine", "dot", "neg_euclidean"])))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_tiled_path(negatives, pos_in, similarity, reduction):
    torch.manual_seed(7)
    z = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    kw = dict(alpha=1.3, lam=1.5, negatives=negatives, positive_in_denominator=pos_in, similarity=similarity,
              reduction=reduction, chunk_size=3)
    assert torch.autograd.gradcheck(lambda x: contrastive_loss(x, **kw), (z,))


@pytest.mark.parametrize("negatives,pos_in,similarity", [("all", True, "cosine"), ("cross", True, "cosine"),
                                                         ("all", False, "dot"), ("cross", False, "neg_euclidean")])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tiled_equals_dense_float32(negatives, pos_in, similarity, reduction):
    torch.manual_seed(8)
    z = torch.randn(2, 300, 32, requires_grad=True)
    kw = dict(alpha=4.0, negatives=negatives, positive_in_denominator=pos_in, similarity=similarity,
              reduction=reduction)
    weights = torch.rand(600) if reduction == "none" else torch.tensor(1.0)
    dense = contrastive_loss(z, **kw)
    (g_dense,) = torch.autograd.grad((dense * weights).sum(), z)
    tiled = contrastive_loss(z, chunk_size=37, **kw)
    (g_tiled,) = torch.autograd.grad((tiled * weights).sum(), z)
    torch.testing.assert_close(tiled, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_tiled, g_dense, rtol=1e-5, atol=1e-5 * g_dense.abs().max().item())


def test_automatic_tiling_above_threshold(monkeypatch):
    torch.manual_seed(9)
    z = torch.randn(2, 64, 8, requires_grad=True)
    dense = contrastive_loss(z, alpha=2.0)
    (g_dense,) = torch.autograd.grad(dense, z)
    monkeypatch.setattr(L, "DENSE_MAX_ENTRIES", 100)
    calls = []
    sweep = L._lse_sweep
    monkeypatch.setattr(L, "_lse_sweep", lambda *a, **kw: calls.append(kw["chunk"]) or sweep(*a, **kw))
    tiled = contrastive_loss(z, alpha=2.0)
    (g_tiled,) = torch.autograd.grad(tiled, z)
    assert calls, "the tiled path was not taken above DENSE_MAX_ENTRIES"
    torch.testing.assert_close(tiled, dense)
    torch.testing.assert_close(g_tiled, g_dense)


# --- numerics ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("similarity", ["cosine", "dot", "neg_euclidean"])
def test_large_alpha_stays_finite(chunk_size, similarity):
    torch.manual_seed(10)
    z = torch.randn(2, 32, 16, requires_grad=True)
    loss = contrastive_loss(z, alpha=100.0, similarity=similarity, chunk_size=chunk_size)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    ref = oracle_loss(z[:, :8], alpha=100.0, similarity=similarity)
    out = contrastive_loss(z[:, :8].double(), alpha=100.0, similarity=similarity, chunk_size=chunk_size)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_input_computes_in_float32(dtype):
    torch.manual_seed(11)
    z = torch.randn(2, 16, 8).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = contrastive_loss(z, alpha=2.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, contrastive_loss(z.float(), alpha=2.0))


def test_gradient_reaches_reduced_precision_input():
    z = torch.randn(2, 8, 4).bfloat16().requires_grad_()
    contrastive_loss(z, alpha=2.0, chunk_size=4).backward()
    assert z.grad is not None and z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()


# --- bad input -----------------------------------------------------------------------------------------

BAD = [
    (lambda: torch.randn(4, 3), {}, "z must have shape"),
    (lambda: torch.randn(1, 4, 3), {}, "V >= 2"),
    (lambda: torch.randn(2, 1, 3), {}, "at least 2 images"),
    (lambda: torch.randint(0, 3, (2, 4, 3)), {}, "floating-point"),
    (lambda: torch.randn(2, 4, 3), {"alpha": 0.0}, "alpha"),
    (lambda: torch.randn(2, 4, 3), {"alpha": float("inf")}, "alpha"),
    (lambda: torch.randn(2, 4, 3), {"nu": -1.0}, "nu"),
    (lambda: torch.randn(2, 4, 3), {"lam": -0.5}, "lam"),
    (lambda: torch.randn(2, 4, 3), {"negatives": "some"}, "negatives"),
    (lambda: torch.randn(2, 4, 3), {"scale": "log"}, "scale"),
    (lambda: torch.randn(2, 4, 3), {"similarity": "l1"}, "similarity"),
    (lambda: torch.randn(2, 4, 3), {"reduction": "sum"}, "reduction"),
    (lambda: torch.randn(2, 4, 3), {"chunk_size": 0}, "chunk_size"),
    (lambda: torch.randn(2, 4, 3).index_fill(1, torch.tensor([2]), float("nan")), {"check_finite": True}, "non-finite"),
]


@pytest.mark.parametrize("make,kwargs,message", BAD)
def test_bad_input_names_the_argument(make, kwargs, message):
    kwargs = {"alpha": 2.0, **kwargs}
    with pytest.raises(ValueError, match=message):
        contrastive_loss(make(), **kwargs)


def test_module_rejects_mismatched_views():
    with pytest.raises(ValueError, match="same shape"):
        L.NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="V >= 2"):
        L.BalancedContrastiveLoss()(torch.randn(4, 3))
    with pytest.raises(ValueError, match="temperature"):
        L.NTXentLoss(temperature=0)


# --- the supervised objective --------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [None, 2.0])
@pytest.mark.parametrize("similarity", ["cosine", "dot", "neg_euclidean"])
def test_supervised_prototype_loss_matches_oracle(alpha, similarity):
    torch.manual_seed(12)
    z, labels, protos = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 4, (10,)), torch.randn(4, 5)
    out = L.supervised_prototype_loss(z, labels, protos.double(), lam=1.5, alpha=alpha, similarity=similarity)
    ref = oracle_supervised(z, labels, protos, lam=1.5, alpha=alpha, similarity=similarity)
    torch.testing.assert_close(out, ref)


def test_smooth_repulsion_bounds_the_max():
    torch.manual_seed(13)
    z, labels, protos = torch.randn(20, 5), torch.randint(0, 4, (20,)), torch.randn(4, 5)
    hard = L.supervised_prototype_loss(z, labels, protos, reduction="none")
    for alpha in [1.0, 4.0, 50.0]:
        smooth = L.supervised_prototype_loss(z, labels, protos, alpha=alpha, reduction="none")
        assert (smooth >= hard - 1e-6).all() and (smooth <= hard + math.log(3) / alpha + 1e-6).all()


@pytest.mark.parametrize("alpha", [None, 3.0])
def test_gradcheck_supervised(alpha):
    torch.manual_seed(14)
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda a, b: L.supervised_prototype_loss(a, labels, b, alpha=alpha), (z, protos))


def test_class_prototypes_and_errors():
    z = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 5.0]])
    protos = L.class_prototypes(z, torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(protos, torch.tensor([[2.0, 1.0], [0.0, 5.0]]))
    with pytest.raises(ValueError, match=r"classes \[2\] have no sample"):
        L.class_prototypes(z, torch.tensor([0, 0, 1]), 3)
    with pytest.raises(ValueError, match="labels must lie in"):
        L.class_prototypes(z, torch.tensor([0, 5, 1]), 3)
    with pytest.raises(ValueError, match="labels must have shape"):
        L.class_prototypes(z, torch.tensor([0, 1]), 2)


def test_prototype_bank_ema_formula():
    bank = L.PrototypeBank(3, 2, momentum=0.75)
    assert not bank.ready()
    bank.update(torch.tensor([[2.0, 0.0], [4.0, 2.0]]), torch.tensor([1, 1]))
    torch.testing.assert_close(bank.prototypes[1], torch.tensor([3.0, 1.0]))  # first sighting: the batch mean
    bank.update(torch.tensor([[7.0, 5.0], [1.0, 1.0]]), torch.tensor([1, 0]))
    torch.testing.assert_close(bank.prototypes[1], 0.75 * torch.tensor([3.0, 1.0]) + 0.25 * torch.tensor([7.0, 5.0]))
    torch.testing.assert_close(bank.prototypes[0], torch.tensor([1.0, 1.0]))
    assert bank.seen.tolist() == [True, True, False] and not bank.ready()
    state = bank.state_dict()
    assert set(state) == {"prototypes", "seen"}
    with pytest.raises(ValueError, match="momentum"):
        L.PrototypeBank(3, 2, momentum=1.0)


# --- target branch and queue ---------------------------------------------------------------------------


@pytest.mark.parametrize("negatives,pos_in,scale,similarity", OPTIONS[::2])
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_target_branch_matches_oracle(negatives, pos_in, scale, similarity, chunk_size):
    torch.manual_seed(15)
    z, t = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
    kw = dict(alpha=1.7, lam=1.2, negatives=negatives, positive_in_denominator=pos_in, scale=scale,
              similarity=similarity)
    out = contrastive_loss(z, target=t, reduction="none", chunk_size=chunk_size, **kw)
    torch.testing.assert_close(out, oracle_loss(z, target=t, reduction="none", **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("similarity", ["cosine", "neg_euclidean"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_queue_matches_oracle_and_gets_no_gradient(similarity, chunk_size):
    torch.manual_seed(16)
    z = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    queue = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    kw = dict(alpha=2.0, similarity=similarity, positive_in_denominator=False)
    out = contrastive_loss(z, queue=queue, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(out, oracle_loss(z, queue=queue, **kw), rtol=1e-10, atol=1e-10)
    out.backward()
    assert queue.grad is None and z.grad is not None
    assert torch.autograd.gradcheck(lambda x: contrastive_loss(x, queue=queue, chunk_size=chunk_size, **kw), (z,))


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_reach_each_side_that_asks(chunk_size, reduction):
    torch.manual_seed(17)
    z = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    kw = dict(alpha=1.5, chunk_size=chunk_size, reduction=reduction)
    assert torch.autograd.gradcheck(lambda a, b: contrastive_loss(a, target=b, **kw), (z, t))
    # Stop-gradient target: the anchor side alone, and nothing at all reaches the detached branch.
    w = torch.rand(8, dtype=torch.float64) if reduction == "none" else 1.0
    (g_sg,) = torch.autograd.grad((contrastive_loss(z, target=t.detach(), **kw) * w).sum(), z)
    (g_full,) = torch.autograd.grad((contrastive_loss(z, **kw) * w).sum(), z)
    (g_anchor, _) = torch.autograd.grad((contrastive_loss(z, target=t, **kw) * w).sum(), (z, t))
    torch.testing.assert_close(g_sg, g_anchor)
    assert not torch.allclose(g_sg, g_full)  # the shared branch also sends gradient through the targets
    (g_same,) = torch.autograd.grad((contrastive_loss(z, target=z, **kw) * w).sum(), z)
    torch.testing.assert_close(g_same, g_full)


def test_target_and_queue_errors():
    z = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="target must be a tensor shaped like z"):
        contrastive_loss(z, alpha=1.0, target=torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="negatives='all' only"):
        contrastive_loss(z, alpha=1.0, negatives="cross", queue=torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"queue must have shape \(Q, D\) with D=3"):
        contrastive_loss(z, alpha=1.0, queue=torch.randn(4, 2))
    with pytest.raises(ValueError, match="target has"):
        contrastive_loss(z, alpha=1.0, target=torch.full_like(z, float("nan")), check_finite=True)


MODULES = {"nt_xent": L.NTXentLoss, "generalized_nt_xent": L.GeneralizedNTXentLoss,
           "decoupled": L.DecoupledContrastiveLoss, "balanced": L.BalancedContrastiveLoss}


def test_every_preset_has_a_module():
    assert set(MODULES) == set(L.PRESETS)


@pytest.mark.parametrize("name", list(MODULES))
def test_a_misspelled_keyword_fails_at_construction_naming_it_and_the_valid_ones(name):
    cls = MODULES[name]
    wrong, right = ("alpah", "alpha") if "alpha" in L.PRESETS[name].params else ("temprature", "temperature")
    with pytest.raises(TypeError) as e:
        cls(**{wrong: 2})
    msg = str(e.value)
    assert "\n" not in msg and f"{cls.__name__}: unknown keyword {wrong!r}; did you mean {right!r}?" in msg
    assert "valid keywords: " in msg and "similarity" in msg
    with pytest.raises(ValueError, match="similarity="):
        cls(similarity="cos")
    with pytest.raises(ValueError, match=f"{right} must be a finite number > 0"):
        cls(**{right: -1.0})
    with pytest.raises(TypeError):
        cls(0.5)  # hyperparameters are keyword-only


@pytest.mark.parametrize("name", ["generalized_nt_xent", "balanced"])
def test_temperature_is_the_reciprocal_of_alpha_where_the_preset_takes_alpha(name):
    cls = MODULES[name]
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    by_alpha, by_temperature = cls(alpha=4.0, lam=2.0), cls(temperature=0.25, lam=2.0)
    assert by_temperature.hparams["alpha"] == 4.0
    assert torch.equal(by_alpha(z1, z2), by_temperature(z1, z2))
    assert not torch.equal(cls(alpha=2.0, lam=2.0)(z1, z2), by_alpha(z1, z2))  # alpha reaches the loss
    with pytest.raises(TypeError, match="alpha or temperature"):
        cls(alpha=4.0, temperature=0.25)
