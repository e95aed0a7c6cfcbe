"""Target branches (prototype estimators): gradient flow, the EMA formula, the mean target, the queue, resume.

Unit checks on a tiny encoder; loop checks on the Fashion-MNIST subset of tests/test_train.py, a few steps each.
"""

from __future__ import annotations

import copy

import pytest
import torch
from loss_oracle import logsumexp, sim
from test_train import TINY, tiny
from twoproc import pretrain_one_and_two

from protoclr import checkpoint as ckpt
from protoclr.config import ConfigError, LossConfig, ModelConfig, TargetConfig, load_config
from protoclr.losses import config_options, contrastive_loss
from protoclr.models import build_encoder
from protoclr.targets import TargetBranch, ema_update, enqueue, momentum_schedule
from protoclr.train import pretrain


def test_ema_update_matches_its_formula():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, momentum=0.9)
    for p, p0, po in zip(target.parameters(), before, online.parameters(), strict=True):
        want = p0 * 0.9 + po.detach() * (1 - 0.9)
        torch.testing.assert_close(p.detach(), want, rtol=2e-7, atol=1e-8)  # float32 rounding of the update
        assert not torch.equal(p.detach(), p0)
    m = momentum_schedule(start=0.99, total_steps=10)
    assert m[0] == pytest.approx(0.99) and bool((m.diff() > 0).all()) and m[-1] < 1
    assert m[5] == pytest.approx(1 - 0.01 * 0.5)  # halfway along the cosine


def test_queue_is_fifo_and_sized():
    q = torch.zeros(0, 2)
    rows = torch.arange(16.0).view(8, 2)
    q = enqueue(q, rows[:3], size=5)
    assert torch.equal(q, rows[:3])
    q = enqueue(q, rows[3:7], size=5)  # 7 entered, the 2 oldest left
    assert torch.equal(q, rows[2:7])
    q = enqueue(q, rows[7:], size=5)
    assert torch.equal(q, rows[3:8])


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    enc = build_encoder(ModelConfig(projector_hidden_dim=16, projector_dim=8), in_channels=1)
    x = torch.randn(2 * 6, 1, 28, 28)  # V=2 views of B=6 images, view-major
    return enc, x


@pytest.mark.parametrize("name", ["stop_gradient", "momentum"])
def test_no_gradient_reaches_the_target_side(name):
    online, x = _setup()
    kw = config_options(LossConfig(name="generalized_nt_xent"))
    branch = TargetBranch(TargetConfig(name=name), online, total_steps=10, dim=8)
    target_enc = branch.encoder
    if target_enc is not None:  # a target encoder that differs from the online one, parameters left trainable
        target_enc.requires_grad_(True)
        with torch.no_grad():
            for p in target_enc.parameters():
                p.add_(0.05 * torch.randn_like(p))
    # reference: anchors from one copy, targets from another copy that *does* carry gradient
    ref_a, ref_t = copy.deepcopy(online), copy.deepcopy(target_enc or online)
    contrastive_loss(ref_a(x)[1].view(2, 6, -1), target=ref_t(x)[1].view(2, 6, -1), **kw).backward()
    assert sum(p.grad.abs().sum() for p in ref_t.parameters()) > 0  # the target side would get gradient

    z = online(x)[1].view(2, 6, -1)  # (V, B, D)
    t = branch.side(z, x)
    loss = contrastive_loss(z, target=t, **branch.loss_options(), **kw)
    loss.backward()
    for p, pr in zip(online.parameters(), ref_a.parameters(), strict=True):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-4, atol=1e-6)  # the anchor side's gradient only
    if target_enc is not None:
        assert all(p.grad is None for p in target_enc.parameters())


def _hand_mean_target(z, *, name, alpha, lam, similarity):
    """Per-anchor loss with the attraction target mean_{w != v} of the (normalized, for cosine) other views."""
    z = z.double()
    V, B, _ = z.shape
    u = torch.nn.functional.normalize(z, dim=-1) if similarity == "cosine" else z
    out = []
    for v in range(V):
        for i in range(B):
            a = z[v, i]
            mu = sum(u[w, i] for w in range(V) if w != v) / (V - 1)
            if name == "generalized_nt_xent":  # all rows but the anchor
                lse = logsumexp([alpha * sim(a, z[w, j], similarity) for w in range(V) for j in range(B)
                                 if (w, j) != (v, i)])
                out.append(-alpha * sim(a, mu, similarity) + lam * lse)
            else:  # balanced: cross-view candidates averaged over the positive's views, scaled 1/alpha
                lse = sum(logsumexp([alpha * sim(a, z[w, j], similarity) for j in range(B)])
                          for w in range(V) if w != v) / (V - 1)
                out.append((-alpha * sim(a, mu, similarity) + lam * lse) / alpha)
    return torch.tensor(out).mean()


@pytest.mark.parametrize("similarity", ["cosine", "neg_euclidean"])
@pytest.mark.parametrize("name", ["generalized_nt_xent", "balanced"])
def test_multi_view_mean_equals_the_hand_computed_mean_target(name, similarity):
    torch.manual_seed(1)
    z = torch.randn(3, 5, 4, requires_grad=True)  # V=3
    kw = config_options(LossConfig(name=name, alpha=2.0, lam=1.5, similarity=similarity))
    branch = TargetBranch(TargetConfig(name="multi_view_mean"), torch.nn.Identity(), total_steps=1, dim=4)
    got = contrastive_loss(z, **branch.loss_options(), **kw)
    want = _hand_mean_target(z.detach(), name=name, alpha=2.0, lam=1.5, similarity=similarity)
    assert got.item() == pytest.approx(float(want), rel=1e-5)
    shared = contrastive_loss(z, **kw)
    assert got.item() < shared.item() - 1e-4  # Jensen: s(a, mean) > mean s(a, t), so the two differ
    got.backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize(
    ("overrides", "keys"),
    [
        (["target.name=multi_view_mean"], ["target.name", "data.num_views"]),
        (["target.queue_size=64"], ["target.queue_size", "loss.name=balanced"]),
        (["target.name=momentum", "loss.name=supervised_prototype"], ["target.name", "supervised_prototype"]),
        (["target.name=ema"], ["target.name"]),
        (["target.momentum_start=1.5"], ["target.momentum_start"]),
    ],
)
def test_invalid_target_combinations_name_the_keys(overrides, keys):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert all(k in str(info.value) for k in keys), str(info.value)
    load_config(None, ["target.name=multi_view_mean", "data.num_views=3"])  # the valid forms build
    load_config(None, ["target.queue_size=64", "loss.name=generalized_nt_xent"])


MQ = ["target.name=momentum", "target.momentum_start=0.9", "target.queue_size=200", "loss.name=generalized_nt_xent",
      "eval.every=0", "trainer.loggers=[]"]


def test_momentum_loop_applies_the_ema_after_the_step(tmp_path, fashion_mnist_dir):
    cfg = tiny(tmp_path, "train.run_name=one", "train.max_steps=1", *MQ)
    state = ckpt.load(pretrain(cfg) / "checkpoint.pt")
    torch.manual_seed(cfg.train.seed)
    init = build_encoder(cfg.model, in_channels=1).state_dict()  # the weights the run started from
    m0 = float(momentum_schedule(start=0.9, total_steps=8)[0])  # the update after step 0
    assert m0 == pytest.approx(0.9) and state["step"] == 1
    for k, w in state["target"]["encoder"].items():
        if "running" in k or "num_batches" in k:
            continue  # BatchNorm statistics: the target's own, from its forward passes
        want = init[k].clone().mul_(m0).add_(state["model"][k], alpha=1 - m0)  # m * target + (1 - m) * online
        assert torch.equal(w, want), k
        assert not torch.equal(w, init[k]) and not torch.equal(w, state["model"][k])
    assert state["target"]["queue"].shape == (128, 32)  # V * B = 2 * 64 rows after one step (size 200)


def test_momentum_and_queue_resume_bit_identical(tmp_path, fashion_mnist_dir):
    full = pretrain(tiny(tmp_path, "train.run_name=full", *MQ))
    part = pretrain(tiny(tmp_path, "train.run_name=part", "train.max_steps=3", *MQ))
    q3 = ckpt.load(part / "checkpoint.pt")["target"]["queue"]
    assert q3.shape == (200, 32)  # 3 steps x 128 rows entered; the newest 200 kept
    pretrain(tiny(tmp_path, "train.run_name=part", *MQ))  # resumes from step 3 with the saved EMA and queue
    a, b = ckpt.load(full / "checkpoint.pt"), ckpt.load(part / "checkpoint.pt")
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["target"]["encoder"]:
        assert torch.equal(a["target"]["encoder"][k], b["target"]["encoder"][k]), k
    assert torch.equal(a["target"]["queue"], b["target"]["queue"])


@pytest.mark.distributed
def test_queue_and_ema_match_across_two_gloo_processes(tmp_path, fashion_mnist_dir):
    """torchrun with 2 CPU processes (local batch 32): the gathered queue, in global batch order, and the
    EMA encoder match one process with batch 64 (group norm: batch-independent statistics)."""
    common = [*TINY, *MQ, "model.norm=group", "train.max_steps=2", f"train.out_dir={tmp_path}",
              "trainer.accelerator=cpu"]
    pretrain_one_and_two(common)
    a, b = ckpt.load(tmp_path / "one" / "checkpoint.pt"), ckpt.load(tmp_path / "two" / "checkpoint.pt")
    assert b["target"]["queue"].shape == (200, 32)
    torch.testing.assert_close(a["target"]["queue"], b["target"]["queue"], rtol=1e-4, atol=1e-5)
    for k in a["target"]["encoder"]:
        torch.testing.assert_close(a["target"]["encoder"][k], b["target"]["encoder"][k], rtol=1e-4, atol=1e-5)
