"""Real data: on the shared CIFAR-10 JPEG copy (2,000 train / 1,000 test images, class-balanced), a convnet
pretrained for 60 steps with the balanced contrastive loss beats its own initialisation at weighted kNN, and
its diagnostics are finite and within their ranges."""

from __future__ import annotations

import math

import pytest
import torch

from protoclr import diagnostics as dg

STEPS, BATCH = 60, 128


@pytest.mark.slow
def test_brief_pretraining_beats_init_and_diagnostics_are_in_range(cifar10_jpeg_dir):
    from protoclr.config import ModelConfig
    from protoclr.data import load_dataset
    from protoclr.evaluate import extract_features, knn_accuracy
    from protoclr.losses import balanced_contrastive_loss
    from protoclr.models import build_encoder
    from protoclr.splits import balanced_draw, uniform_subset
    from protoclr.views import eval_images, make_views, view_spec

    # the whole zip is decoded once into the protoclr cache (minutes the first time), then subsets are views
    train = uniform_subset(load_dataset("cifar10_zip", split="train", root=cifar10_jpeg_dir), total=2000, seed=0)
    test = uniform_subset(load_dataset("cifar10_zip", split="test", root=cifar10_jpeg_dir), total=1000, seed=0)
    spec = view_spec("simclr_cifar")
    torch.manual_seed(0)
    encoder = build_encoder(ModelConfig(backbone="convnet"), in_channels=3)

    def knn() -> float:
        encoder.eval()
        f_tr, y_tr = extract_features(
            encoder.backbone, train, batch_size=500, preprocess=lambda x: eval_images(x, spec)
        )
        f_te, y_te = extract_features(encoder.backbone, test, batch_size=500, preprocess=lambda x: eval_images(x, spec))
        encoder.train()
        return knn_accuracy(f_tr, y_tr, f_te, y_te, num_classes=10, k=20, temperature=0.1)["top1"]

    at_init = knn()
    # alpha = 10 (temperature 0.1) learns visibly within a few epochs of 2,000 images; alpha = 2 barely moves
    opt = torch.optim.SGD(encoder.parameters(), lr=0.3, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    step, losses = 0, []
    while step < STEPS:
        order = torch.randperm(len(train), generator=g)
        for s in range(len(train) // BATCH):
            if step == STEPS:
                break
            idx = order[s * BATCH : (s + 1) * BATCH]
            x = make_views(
                train.get_images(idx), spec, num_views=2, seed=0, epoch=step, indices=idx
            )  # (2, B, 3, 32, 32)
            _, z = encoder(x.flatten(0, 1))  # (2B, D)
            loss = balanced_contrastive_loss(z.view(2, BATCH, -1), alpha=10.0, lam=1.0, nu=1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
    trained = knn()
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
    assert trained > at_init, f"kNN top-1 after {STEPS} steps {trained:.3f} vs {at_init:.3f} at initialisation"

    encoder.eval()
    probe = balanced_draw(test, 200, seed=0)
    feats = dg.view_features(encoder, probe, views=4, recipe=spec, seed=0)
    report = dg.diagnose_features(feats, probe.labels, num_classes=10, alphas=(1.0, 10.0), nus=(0.5,))
    assert all(math.isfinite(v) for v in dg.flat_metrics(report).values())
    for head in ("backbone", "projector"):
        b = report["bias"][head]["normalized"]
        assert 0 < b["euclidean"] <= 2 and 0 < b["cosine"] <= 2 and 0 < b["angle_deg"] <= 180
        assert all(0 <= v <= 180 for v in report["bias"][head]["normalized"]["per_class"]["angle_deg"])
    bounds = report["bounds"]
    assert bounds["assumptions"]["balance_ratio"] == 1.0 and bounds["assumptions"]["max_norm_deviation"] < 1e-5
    assert -1 <= bounds["attraction"]["supervised"] <= 1 and bounds["attraction"]["gap"] >= 0
    # wherever the assumptions hold the bound holds (anchor by anchor), on real features
    for alpha in (1.0, 10.0):
        nu = bounds["assumptions"]["prototype_norm_min"]
        t = dg.bound_terms_per_anchor(feats["projector"], probe.labels, num_classes=10, alpha=alpha, nu=nu)
        ok = (t["nearest_prototype_norm"] >= nu) & (t["sup_repulsion"] >= 0) & (t["nearest_class_balance"] >= 1)
        assert ok.float().mean() > 0.5 and (t["repulsion_gap"][ok] >= -1e-5).all()
        assert (t["attraction_gap"][t["positive_mean"] >= 0] >= -1e-5).all()
    g_ = report["geometry"]
    assert 0 <= g_["alignment"] <= 4 and -4 <= g_["uniformity"] <= 0 and 1 <= g_["effective_rank"] <= 128
    assert g_["positive_similarity"] > g_["negative_similarity"] and 0 < g_["contrastive_top1"] <= 1
