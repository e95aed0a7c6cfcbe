"""Tests for protoclr.evaluate: kNN against a float64 brute force and scikit-learn, extraction, cache."""

from __future__ import annotations

import math

import pytest
import torch

from protoclr import atomic, measure, splits
from protoclr import evaluate as ev
from protoclr.config import load_config
from protoclr.data import LabeledImages
from protoclr.diagnostics import diagnose_features
from protoclr.splits import class_groups


def _knn_reference(train, train_y, test, *, num_classes, k, temperature):
    """One test row at a time, float64, full sort: the formula of Wu et al. 2018 written out."""
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    test = test.double() / test.double().norm(dim=1, keepdim=True)
    out = torch.zeros(test.shape[0], num_classes, dtype=torch.float64)
    for i in range(test.shape[0]):
        sims = [(float(test[i] @ train[j]), j) for j in range(train.shape[0])]
        sims.sort(reverse=True)
        for s, j in sims[:k]:
            out[i, int(train_y[j])] += math.exp(s / temperature)
    return out


@pytest.mark.parametrize("k,temperature,chunk_size", [(1, 0.1, None), (7, 0.07, 3), (60, 0.5, 1000)])
def test_knn_predict_matches_float64_reference(k, temperature, chunk_size):
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(60, 5, generator=g), torch.randn(13, 5, generator=g)
    train_y = torch.randint(0, 4, (60,), generator=g)
    got = ev.knn_predict(train, train_y, test, num_classes=4, k=k, temperature=temperature, chunk_size=chunk_size)
    want = _knn_reference(train, train_y, test, num_classes=4, k=k, temperature=temperature)
    assert got.dtype == torch.float32 and got.shape == (13, 4)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6)
    got64 = ev.knn_predict(train.double(), train_y, test.double(), num_classes=4, k=k, temperature=temperature)
    torch.testing.assert_close(got64, want, rtol=1e-10, atol=1e-12)


def test_knn_chunking_does_not_change_scores():
    g = torch.Generator().manual_seed(1)
    train, test, y = torch.randn(300, 16, generator=g), torch.randn(101, 16, generator=g), torch.randint(0, 10, (300,))
    a = ev.knn_predict(train, y, test, num_classes=10, k=20, chunk_size=1)
    b = ev.knn_predict(train, y, test, num_classes=10, k=20, chunk_size=7)
    c = ev.knn_predict(train, y, test, num_classes=10, k=20)
    # float32 matmuls of different row blocks round differently: relative 1e-5, not bitwise
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=0)


def test_knn_separable_clusters_are_perfect():
    g = torch.Generator().manual_seed(2)
    centers = torch.eye(8)[:5] * 10  # (C, D) orthogonal directions
    y_train, y_test = torch.arange(5).repeat(40), torch.arange(5).repeat(10)
    train = centers[y_train] + torch.randn(200, 8, generator=g)
    test = centers[y_test] + torch.randn(50, 8, generator=g)
    acc = ev.knn_accuracy(train, y_train, test, y_test, num_classes=5, k=20)
    assert acc == {"top1": 1.0, "top5": 1.0}


def test_knn_matches_sklearn_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    neighbors = pytest.importorskip("sklearn.neighbors")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float64) + 0.01  # no all-zero rows
    x = x - x.mean(0)  # centring makes cosine neighbourhoods informative
    y = torch.tensor(y)
    tr, te = slice(0, 1200), slice(1200, None)
    k, t = 15, 0.1
    scores = ev.knn_predict(x[tr], y[tr], x[te], num_classes=10, k=k, temperature=t)
    weights = lambda d: torch.exp((1 - torch.tensor(d)) / t).numpy()  # noqa: E731  cosine distance = 1 - sim
    clf = neighbors.KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute", weights=weights)
    clf.fit(x[tr].numpy(), y[tr].numpy())
    want = torch.tensor(clf.predict(x[te].numpy()))
    assert (scores.argmax(1) == want).double().mean().item() == 1.0
    acc = ev.knn_accuracy(x[tr], y[tr], x[te], y[te], num_classes=10, k=k, temperature=t)
    assert acc["top1"] == pytest.approx(float((want == y[te]).double().mean()))
    assert acc["top1"] > 0.9 and acc["top5"] >= acc["top1"]


def test_knn_and_probe_bars_count_their_chunks_and_decays_and_change_no_number(monkeypatch):
    """``progress=True`` wraps the kNN's chunks and the probe's decay path in a rich bar (its total is what the
    remaining time is estimated from) and leaves every score as it was."""
    import rich.progress

    bars = []

    def track(seq, *, description, total, transient):
        bars.append((description, total, transient))
        yield from seq

    monkeypatch.setattr(rich.progress, "track", track)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), torch.randint(0, 3, (300,), generator=g)
    quiet = ev.knn_predict(x, y, x[:50], num_classes=3, k=10, chunk_size=20)
    assert torch.equal(ev.knn_predict(x, y, x[:50], num_classes=3, k=10, chunk_size=20, progress=True), quiet)
    assert bars == [("kNN", 3, True)]
    plain = ev.linear_probe_cached(x, y, x[:50], y[:50], num_classes=3, weight_decays=(1e-3, 1e-2, 1e-1))
    shown = ev.linear_probe_cached(x, y, x[:50], y[:50], num_classes=3, weight_decays=(1e-3, 1e-2, 1e-1),
                                   progress=True)
    assert shown == plain and bars[1] == ("probe (decays)", 3, True)


def test_topk_accuracy_hand_values():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = torch.tensor([2, 0, 0, 2])
    acc = ev.topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert acc == {"top1": 0.25, "top2": 0.5, "top5": 1.0}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(k=0), "k must be a positive"),
        (dict(k=11), "k=11 exceeds"),
        (dict(temperature=0.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(num_classes=2), "train_labels must lie"),
        (dict(test_features=torch.randn(4, 3)), "dimension 3"),
        (dict(train_labels=torch.zeros(9, dtype=torch.long)), "one label per feature row"),
        (dict(train_features=torch.randn(10)), "2-D tensor"),
        (dict(train_labels=torch.zeros(10)), "integer class indices"),
    ],
)
def test_knn_bad_inputs_raise(kwargs, match):
    args = dict(
        train_features=torch.randn(10, 4),
        train_labels=torch.arange(10) % 3,
        test_features=torch.randn(4, 4),
        num_classes=3,
        k=5,
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ev.knn_predict(args.pop("train_features"), args.pop("train_labels"), args.pop("test_features"), **args)


class _Images:
    """Minimal stand-in for protoclr.data.LabeledImages: labels and get_images(indices)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return self.images.shape[0]

    def get_images(self, idx):
        return self.images[idx]


def test_extract_features_batches_and_cache(tmp_path):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (23, 3, 4, 4), dtype=torch.uint8, generator=g)
    data = _Images(images, torch.arange(23) % 2)
    weight = torch.randn(48, 6, generator=g)
    calls = []

    def model_fn(x):
        calls.append(x.shape[0])
        return x.flatten(1) @ weight

    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"x")
    cache = ev.feature_cache_path(tmp_path / "cache", ckpt, split="toy:test")
    feats, labels = ev.extract_features(model_fn, data, batch_size=5, cache=cache, precision="32-true")
    assert calls == [5, 5, 5, 5, 3]
    torch.testing.assert_close(feats, (images.double() / 255).flatten(1).float() @ weight)
    assert torch.equal(labels, torch.arange(23) % 2)
    assert cache.is_file() and not list(cache.parent.glob("*.tmp"))
    feats2, labels2 = ev.extract_features(model_fn, data, batch_size=5, cache=cache)
    assert len(calls) == 5 and torch.equal(feats, feats2) and torch.equal(labels, labels2)
    # a rewritten checkpoint gets a new key; another split too
    assert ev.feature_cache_path(tmp_path / "cache", ckpt, split="toy:train") != cache
    bare, none = ev.extract_features(model_fn, images, batch_size=100, precision="32-true")
    assert none is None
    torch.testing.assert_close(bare, feats)
    with pytest.raises(ValueError, match="batch_size"):
        ev.extract_features(model_fn, images, batch_size=0)


@pytest.mark.parametrize("stored", ["contiguous", "channels_last"])
def test_extract_features_runs_channels_last_weights_and_gives_the_module_back(stored):
    """Inside, the convolution weights are channels-last (what makes oneDNN stay NHWC); afterwards every
    parameter holds its own tensor again (same storage, same strides) and the features equal the NCHW path's."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten()).eval()
    if stored == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    before = [(p.data_ptr(), p.stride()) for p in net.parameters()]
    seen = []
    net[0].register_forward_pre_hook(lambda m, args: seen.append(m.weight.is_contiguous(
        memory_format=torch.channels_last)))
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    fast, _ = ev.extract_features(net, images, batch_size=4, precision="32-true")
    assert seen == [True] * 3
    assert [(p.data_ptr(), p.stride()) for p in net.parameters()] == before
    plain, _ = ev.extract_features(net, images, batch_size=4, precision="32-true", channels_last=False)
    assert seen[3:] == [stored == "channels_last"] * 3
    with torch.no_grad():
        reference = net.double()(images.double() / 255).float()
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# linear probes


def test_fit_linear_classifier_matches_sklearn_float64():
    datasets = pytest.importorskip("sklearn.datasets")
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = datasets.load_digits(return_X_y=True)
    x, y = x[:400], y[:400]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    wd = 1e-2
    w, b = ev.fit_linear_classifier(torch.tensor(x), torch.tensor(y), num_classes=10, weight_decay=wd, max_iter=1000)
    clf = linear_model.LogisticRegression(C=1 / (wd * len(y)), tol=1e-12, max_iter=10000).fit(x, y)
    p_ours = torch.softmax(torch.tensor(x) @ w.T + b, dim=1)
    p_sk = torch.tensor(clf.predict_proba(x))
    torch.testing.assert_close(p_ours, p_sk, rtol=0, atol=1e-5)
    # the penalised optimum has sum_c W_c = 0 (the softmax redundancy is removed by the penalty)
    torch.testing.assert_close(w, torch.tensor(clf.coef_), rtol=0, atol=1e-4)


def test_linear_probe_cached_learns_a_linear_rule_exactly():
    g = torch.Generator().manual_seed(4)
    rule = torch.randn(3, 12, dtype=torch.float64, generator=g)  # (C, D): label = argmax(rule @ x)
    x = torch.randn(900, 12, dtype=torch.float64, generator=g)
    margins = (x @ rule.T).topk(2, dim=1).values
    x = x[(margins[:, 0] - margins[:, 1]) > 0.3]  # a margin, so a finite-weight classifier is exact
    y = (x @ rule.T).argmax(1)
    tr, te = slice(0, 500), slice(500, None)
    out = ev.linear_probe_cached(x[tr], y[tr], x[te], y[te], num_classes=3, weight_decays=(1e-5, 1e-1))
    assert out["top1"] == 1.0 and out["top5"] == 1.0
    assert set(out["val_top1"]) == {1e-5, 1e-1} and out["weight_decay"] in out["val_top1"]
    assert out["val_top1"][out["weight_decay"]] == max(out["val_top1"].values())


def test_linear_probe_cached_groups_and_errors():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, 6, generator=g)
    y = torch.randint(0, 4, (200,), generator=g)
    groups = class_groups(torch.tensor([150, 100, 20, 19]))  # many / medium / medium / few
    out = ev.linear_probe_cached(x, y, x, y, num_classes=4, weight_decays=(1e-3,), groups=groups)
    assert set(out["groups"]) == {"many", "medium", "few"}
    with pytest.raises(ValueError, match="val_fraction"):
        ev.linear_probe_cached(x, y, x, y, num_classes=4, val_fraction=1.0)
    with pytest.raises(ValueError, match="weight_decays"):
        ev.linear_probe_cached(x, y, x, y, num_classes=4, weight_decays=())
    with pytest.raises(ValueError, match="test_labels"):
        ev.linear_probe_cached(x, y, x, y[:5], num_classes=4)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="patience"):
            ev.linear_probe_cached(x, y, x, y, num_classes=4, patience=bad)


def test_group_accuracy_hand_values():
    scores = torch.eye(3)[torch.tensor([0, 0, 1, 2, 2, 0])]  # predictions 0 0 1 2 2 0
    labels = torch.tensor([0, 1, 1, 2, 2, 2])
    acc = ev.group_accuracy(scores, labels, {"a": [0], "b": [1, 2], "none": []})
    assert acc["a"] == 1.0 and acc["b"] == pytest.approx(3 / 5) and math.isnan(acc["none"])


def test_random_crop_flip_is_a_window_of_the_padded_image():
    g = torch.Generator().manual_seed(6)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    same = ev.random_crop_flip(x, padding=0, generator=g)
    for i in range(16):  # no padding: the image itself or its mirror
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(-1))
    out = ev.random_crop_flip(x, padding=2, generator=g)
    padded = torch.nn.functional.pad(x.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    for i in range(16):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_linear_probe_augmented_on_colour_coded_images():
    # class = which channel is bright; crops and flips keep it, so the probe must reach 100%
    g = torch.Generator().manual_seed(7)
    y_tr, y_te = torch.arange(3).repeat(40), torch.arange(3).repeat(10)

    def images(y):
        x = torch.randint(0, 60, (len(y), 3, 8, 8), dtype=torch.uint8, generator=g)
        x[torch.arange(len(y)), y] += 150
        return x

    train, test = _Images(images(y_tr), y_tr), _Images(images(y_te), y_te)
    out = ev.linear_probe_augmented(
        lambda x: x.mean(dim=(2, 3)), train, test, num_classes=3, epochs=30, batch_size=32, lr=5.0
    )
    assert out["top1"] == 1.0 and math.isfinite(out["train_loss"])


def test_write_json_atomic_is_strict_json(tmp_path):
    import json

    path = tmp_path / "eval.json"
    atomic.write_json(path, {"knn": {"top1": 0.5, "groups": {"few": float("nan")}}, "wd": {1e-4: 0.3}})
    assert json.loads(path.read_text()) == {"knn": {"top1": 0.5, "groups": {"few": None}}, "wd": {"0.0001": 0.3}}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_cli_evaluates_a_run_writes_eval_json_and_records_it(tmp_path, fashion_mnist_dir):
    import json

    train = pytest.importorskip("protoclr.train")
    from protoclr import evaluate_cmd
    from protoclr import measure as M
    from protoclr.config import load_config
    from protoclr.data import load_dataset
    from protoclr.runs import ResultsDB

    cfg = load_config(
        None,
        [f"train.out_dir={tmp_path}", "train.run_name=tiny", "train.epochs=1", "train.max_steps=2",
         "train.batch_size=32", "data.train_subset=128", "data.views=simclr_small", "eval.every=0",
         f"data.root={fashion_mnist_dir}", "trainer.accelerator=cpu"],
    )  # fmt: skip
    run_dir = train.pretrain(cfg)
    argv = [str(run_dir), "--knn", "--linear", "cached", "--train-subset", "300", "--k", "20"]
    assert evaluate_cmd.cli_main(argv) == 0
    out = json.loads((run_dir / "eval.json").read_text())
    assert out["train_images"] == 300 and out["test_images"] == 10000
    # the command's numbers are the protocol's functions on its cached features of the seeded 300-image draw
    cached = [torch.load(f, weights_only=True) for f in (run_dir / "features").glob("*.pt")]
    (tr,), (te,) = ([c for c in cached if len(c["labels"]) == n] for n in (300, 10000))
    full_train = load_dataset(cfg.data.dataset, split=cfg.data.train_split, root=fashion_mnist_dir)
    drawn = splits.draw(full_train, 300, seed=splits.EVAL_FIT)
    assert torch.equal(tr["labels"].long(), torch.as_tensor(drawn.labels).long())
    args = (tr["features"], tr["labels"], te["features"], te["labels"])
    knn = M.knn_scores(*args, num_classes=10, k=20)
    linear = M.cached_probe_scores(*args, num_classes=10)
    assert (out["knn"]["top1"], out["knn"]["top5"], out["knn"]["k"]) == (knn["top1"], knn["top5"], 20)
    assert (out["linear_cached"]["top1"], out["linear_cached"]["top5"]) == (linear["top1"], linear["top5"])
    row = ResultsDB(tmp_path / "runs.db").get_run("tiny")["final_metrics"]
    # its own protocol (300 drawn training images, every test image, k = 20), so its own keys, never final_metrics'
    assert row["eval_knn_top1_fit300_k20"] == out["knn"]["top1"]
    assert row["eval_linear_top1_fit300"] == out["linear_cached"]["top1"]
    assert M.EVAL_KNN not in row and M.EVAL_LINEAR not in row
    assert len(list((run_dir / "features").glob("*.pt"))) == 2  # train and test features cached
    assert evaluate_cmd.cli_main([a for a in argv if a not in ("--linear", "cached")]) == 0  # cache; keeps the probe
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["knn"]["top1"] == out["knn"]["top1"] and "linear_cached" in again


@pytest.mark.parametrize("protocol", ["cached", "augmented"])
def test_final_metrics_follow_the_linear_protocol(protocol):
    """eval.linear_protocol picks the probe: the cached L-BFGS fit on features or the augmented SGD protocol;
    each gives what a direct call of its function gives on the same draws."""
    from protoclr.config import ModelConfig, load_config
    from protoclr.data import LabeledImages
    from protoclr.measure import final_metrics
    from protoclr.models import build_encoder
    from protoclr.views import eval_images, view_spec

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    imgs = (torch.rand(60, 3, 8, 8, generator=g) * 80 + 60 * labels[:, None, None, None]).to(torch.uint8)
    train = LabeledImages(labels=labels[:40], classes=list("abc"), images=imgs[:40])
    test = LabeledImages(labels=labels[40:], classes=list("abc"), images=imgs[40:])
    spec = view_spec("simclr_cifar", size=8)
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(convnet_widths=[8], projector_hidden_dim=8, projector_dim=4), in_channels=3).eval()
    cfg = load_config(None, [f"eval.linear_protocol={protocol}", "eval.linear_epochs=3"])
    out = final_metrics(enc, {"": train}, test, spec, cfg)
    pre = lambda x: eval_images(x, spec)  # noqa: E731
    if protocol == "augmented":
        want = ev.linear_probe_augmented(enc.backbone, train, test, num_classes=3, epochs=3, batch_size=40,
                                         preprocess=pre)["top1"]
    else:
        f_tr, y_tr = ev.extract_features(enc.backbone, train, preprocess=pre)
        f_te, y_te = ev.extract_features(enc.backbone, test, preprocess=pre)
        want = ev.linear_probe_cached(f_tr, y_tr, f_te, y_te, num_classes=3)["top1"]
    assert out["eval_linear_top1"] == pytest.approx(want) and out["eval_train_images"] == 40


def test_keys_name_their_protocol():
    """measure builds every key: the full splits and a diverged run's last good checkpoint get their own names."""
    from protoclr import measure as M

    final = {M.EVAL_KNN: 0.5, M.EVAL_LINEAR + M.PRETRAIN_SET: 0.4, M.EVAL_TRAIN_IMAGES: 100.0}
    assert M.as_last_good(final) == {"eval_knn_top1_last_good": 0.5, "eval_linear_top1_pretrain_set_last_good": 0.4,
                                     "eval_train_images": 100.0}
    res = {"knn": {"top1": 0.5, "top5": 0.9, "groups": {"few": 0.1}}, "linear_cached": {"top1": 0.6, "top5": 0.95}}
    assert M.command_metrics(res) == {"eval_knn_top1_full": 0.5, "eval_knn_top5_full": 0.9,
                                      "eval_knn_few_top1_full": 0.1, "eval_linear_top1_full": 0.6,
                                      "eval_linear_top5_full": 0.95}
    keys = M.command_metrics(res, fit_images=300, k=20, dataset="cifar10")
    assert set(keys) == {"eval_cifar10_knn_top1_fit300_k20", "eval_cifar10_knn_top5_fit300_k20",
                         "eval_cifar10_knn_few_top1_fit300_k20", "eval_cifar10_linear_top1_fit300",
                         "eval_cifar10_linear_top5_fit300"}
    assert M.full_metrics({M.SCORE_KNN: 0.3}, of=M.RAW_PIXEL) == {"raw_pixel_knn_top1_full": 0.3}
    assert M.on_dataset(M.BIAS, "cifar10") == "diag_cifar10_bias_angle_deg"


def test_the_knn_protocol_weights_neighbours_at_temperature_0_1():
    """One test row, three neighbours (k = 3 <= KNN_K: all of them): class 0 one at cosine 0.90, class 1 two at
    0.84. Scores exp(s / T): class 0 wins iff 0.06 / T > log 2, so T = 0.1 says class 1, T = 0.07 (DINO's) class 0."""
    def at(cos: float) -> list[float]:
        return [cos, math.sqrt(1 - cos**2)]

    f_train = torch.tensor([at(0.90), at(0.84), at(0.84)])
    y_train = torch.tensor([0, 1, 1])
    f_test, y_test = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    got = measure.score_features(f_train, y_train, f_test, y_test, num_classes=2, linear=False)
    assert got == {"knn_top1": 1.0}
    # the case is sharp: at T = 0.07 the same rows say class 0
    other = ev.knn_accuracy(f_train, y_train, f_test, y_test, num_classes=2, k=3, temperature=0.07)["top1"]
    assert other == 0.0


def _indexed_images(n: int, num_classes: int) -> LabeledImages:
    """Image ``i`` carries ``i`` in its first two pixels, so a draw's indices can be read back from its images."""
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = torch.arange(n) // 256, torch.arange(n) % 256
    return LabeledImages(labels=torch.arange(n) % num_classes, classes=[str(c) for c in range(num_classes)],
                         images=images)


def _drawn(data: LabeledImages) -> torch.Tensor:
    return data.images[:, 0, 0, 0].long() * 256 + data.images[:, 0, 0, 1].long()


def test_the_probe_fit_set_is_the_seeded_draw_of_the_run():
    """The final probes fit on a draw fixed by train.seed (seed + PROBE_FIT): every call, every process and every
    evaluation of a run picks the same images. Reference: a permutation written out here."""
    split = _indexed_images(1000, 10)
    cfg = load_config(None, ["train.seed=3", "eval.train_images=100"])
    want = torch.randperm(1000, generator=torch.Generator().manual_seed(3 + 2))[:100].sort().values
    for _ in range(2):
        assert torch.equal(_drawn(splits.probe_fit_set(split, cfg)), want)
    other = load_config(None, ["train.seed=4", "eval.train_images=100"])
    assert not torch.equal(_drawn(splits.probe_fit_set(split, other)), want)
    # a class-profiled run: a class-balanced draw, also fixed by the seed
    lt = load_config(None, ["train.seed=3", "eval.train_images=100", "data.class_profile=longtail"])
    first, second = (_drawn(splits.probe_fit_set(split, lt)) for _ in range(2))
    assert torch.equal(first, second) and torch.bincount(split.labels[first], minlength=10).tolist() == [10] * 10


def test_the_headline_keys_carry_the_reports_own_values():
    """measure.headline copies each bound term of the report into its own key: the supervised and the surrogate
    attraction (and the repulsion terms) are not interchangeable."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    centers = torch.randn(4, 8, generator=g)
    feats = {head: centers[labels] + 0.5 * torch.randn(3, 40, 8, generator=g) for head in ("backbone", "projector")}
    report = diagnose_features(feats, labels, num_classes=4, alphas=(2.0,), nus=(1.0,))
    out = measure.headline(report, alpha=2.0, nu=1.0)
    a, r = report["bounds"]["attraction"], report["bounds"]["repulsion"]["alpha=2,nu=1"]
    assert a["supervised"] != a["surrogate"] and r["supervised"] != r["self_supervised"]
    # the key names written out: they are what runs.db and the report read
    assert out["diag_attraction_sup"] == a["supervised"]
    assert out["diag_attraction_surrogate"] == a["surrogate"]
    assert out["diag_attraction_ssl"] == a["self_supervised"]
    assert out["diag_attraction_gap"] == a["gap"]
    assert out["diag_repulsion_sup"] == r["supervised"] and out["diag_repulsion_ssl"] == r["self_supervised"]


def test_a_cached_floor_is_recomputed_when_the_protocol_or_the_data_changes(tmp_path, monkeypatch):
    from protoclr import measure as M

    calls = []

    def compute():
        calls.append(1)
        return {"knn_top1": 0.5 + 0.1 * len(calls)}

    key = {"train": {"rows": 100, "labels": "abc"}}
    first, cached = M.cached_floor("raw_pixels", key, compute, cache_dir=tmp_path)
    assert (first, cached, len(calls)) == ({"knn_top1": 0.6}, False, 1)
    assert M.cached_floor("raw_pixels", key, compute, cache_dir=tmp_path) == ({"knn_top1": 0.6}, True)
    assert len(calls) == 1  # read back, not recomputed
    other_data = {"train": {"rows": 101, "labels": "abc"}}
    assert M.cached_floor("raw_pixels", other_data, compute, cache_dir=tmp_path)[1] is False
    for name, value in (("KNN_K", 20), ("KNN_TEMPERATURE", 0.07), ("PROTOCOL_REVISION", 99)):
        with monkeypatch.context() as m:
            m.setattr(M, name, value)
            n = len(calls)
            assert M.cached_floor("raw_pixels", key, compute, cache_dir=tmp_path)[1] is False and len(calls) == n + 1
    monkeypatch.setattr(M, "linear_probe_cached", lambda *a, val_fraction=0.2, **k: None)  # another probe default
    assert M.cached_floor("raw_pixels", key, compute, cache_dir=tmp_path)[1] is False


def test_cli_shows_no_top5_where_five_classes_or_fewer_make_it_100_percent(tmp_path, capsys):
    """Top-5 of a 3-class folder is 100% whatever the encoder: the table shows "-" there, top-1 as measured."""
    import json

    import numpy as np
    from PIL import Image

    from protoclr import evaluate_cmd
    from protoclr.config import load_config
    from protoclr.train import pretrain

    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for c in ("a", "b", "c"):
            (tmp_path / "img" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / split / c
                                                                                         / f"{i}.png")
    run = pretrain(load_config(None, [
        f"train.out_dir={tmp_path}", "train.run_name=r", "train.steps=1", "train.batch_size=8", "eval.every=0",
        "data.dataset=image_folder", f"data.root={tmp_path / 'img'}", "eval.linear=false", "eval.online_probe=false",
        "trainer.progress=false", "trainer.loggers=[]"]))
    capsys.readouterr()
    assert evaluate_cmd.cli_main([str(run), "--knn", "--k", "5"]) == 0
    out = capsys.readouterr().out
    (row,) = [ln for ln in out.splitlines() if " knn " in ln]
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    top1 = json.loads((run / "eval.json").read_text())["knn"]["top1"]
    assert cells == ["knn", f"{100 * top1:.2f}%", "-"]
