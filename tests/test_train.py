"""The pretraining loop: smoke run, exact resume, atomic checkpoints, divergence guard, CLI, 2-process DDP.

Everything runs on a tiny Fashion-MNIST subset with the CPU default model, a few steps each.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from twoproc import pretrain_one_and_two

from protoclr import checkpoint as ckpt
from protoclr import splits
from protoclr.config import load_config
from protoclr.losses import config_alpha
from protoclr.measure import diagnostics_metrics
from protoclr.models import build_encoder
from protoclr.runs import ResultsDB, load_run
from protoclr.splits import load_data
from protoclr.train import LARS, TrainingDiverged, cli_main, lr_schedule, pretrain

REPO = Path(__file__).resolve().parents[1]
# 256 images, batch 64 -> 4 steps per epoch; monitors on 256 bank images and 200 test images.
TINY = ["data.train_subset=256", "train.batch_size=64", "train.epochs=2", "model.projector_hidden_dim=64",
        "model.projector_dim=32", "eval.train_images=256", "eval.test_images=200", "trainer.progress=false",
        "train.log_every=1", "optim.warmup_epochs=0.5", "trainer.precision=32-true"]


def tiny(out_dir: Path, *overrides: str):
    return load_config(None, [*TINY, f"train.out_dir={out_dir}", *overrides])


def weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    s = ckpt.load(run_dir / "checkpoint.pt")
    return {"model": s["model"], "probe": s["probe"]}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, fashion_mnist_dir):
    out = tmp_path_factory.mktemp("runs")
    return pretrain(tiny(out, "train.run_name=full", "train.checkpoint_every=3"))


def test_lr_schedule_warmup_then_cosine():
    lrs = lr_schedule(peak=1.0, total_steps=10, warmup_steps=2, final=0.1)
    assert lrs.shape == (10,)
    torch.testing.assert_close(lrs[:3], torch.tensor([0.5, 1.0, 1.0], dtype=torch.float64))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert bool((lrs[2:].diff() <= 0).all())  # monotone decay after warmup
    assert load_config(None, ["optim.base_lr=0.3", "train.batch_size=512"]).lr() == pytest.approx(0.6)


def test_lars_matches_hand_computation():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    w.grad, b.grad = torch.randn(4, 3), torch.randn(4)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars_exclude": False},
                {"params": [b], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5, momentum=0.9, eta=0.01)
    opt.step()
    d = gw + 0.1 * w0
    torch.testing.assert_close(w.detach(), w0 - 0.5 * (0.01 * w0.norm() / d.norm()) * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # excluded: plain SGD, no decay


def test_smoke_two_epochs(full_run):
    run = full_run
    for name in ("config.yaml", "meta.json", "checkpoint.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "csv").glob("version_*/metrics.csv"))
    cfg = load_config(run / "config.yaml")
    assert cfg.train.batch_size == 64 and cfg.data.train_subset == 256
    meta = json.loads((run / "meta.json").read_text())
    assert meta["version"] and "git_commit" in meta
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [-1, 0, 1] and [e["step"] for e in epochs] == [0, 4, 8]
    steps = [r for r in records if r["kind"] == "step"]
    assert len(steps) == 8 and all(math.isfinite(r["loss"]) for r in steps)
    # monitors: a chance-level encoder scores ~0.1 on 10 classes; these are fractions in [0, 1]
    assert all(0.0 <= e["knn_top1"] <= 1.0 and 0.0 <= e["probe_top1"] <= 1.0 for e in epochs)
    assert epochs[-1]["knn_top1"] > 0.2
    db = ResultsDB(run.parent / "runs.db")
    row = db.get_run(run.name)
    assert row["status"] == "finished" and row["final_metrics"]["knn_top1"] == epochs[-1]["knn_top1"]
    assert [e["epoch"] for e in db.epochs(run.name)] == [-1, 0, 1]
    encoder, cfg2 = load_run(run)
    assert cfg2 == cfg and not encoder.training
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, ckpt.load(run / "checkpoint.pt")["model"][k])
    # the checkpoint file works as well as the folder
    assert load_run(run / "checkpoint.pt")[1] == cfg


def test_class_profiles_set_the_training_counts(fashion_mnist_dir):
    from protoclr.splits import longtail_counts

    base = ["data.train_subset=3000", "data.imbalance_ratio=10"]
    sub = load_data(load_config(None, base))[0]
    n_max = int(sub.class_counts(10).min())  # longtail's largest class: the subset's smallest class size
    for profile in ("exp", "pareto"):
        lt = load_data(load_config(None, [*base, "data.class_profile=longtail", f"data.longtail_profile={profile}"]))[0]
        want = longtail_counts(n_max, 10, profile=profile, imbalance_ratio=10)
        assert lt.class_counts(10).tolist() == want and 9.5 < want[0] / want[-1] < 10.5
    lt = load_data(load_config(None, [*base, "data.class_profile=longtail"]))[0]
    uni = load_data(load_config(None, [*base, "data.class_profile=uniform"]))[0]
    counts = uni.class_counts(10)
    assert int(counts.sum()) == len(lt) < len(sub) and int(counts.max() - counts.min()) <= 1


def test_tracked_diagnostics_reach_metrics_and_db(tmp_path, fashion_mnist_dir):
    run = pretrain(tiny(tmp_path, "train.run_name=tracked", "eval.diagnostics=true", "eval.every=2",
                        "eval.diag_images=100", "eval.diag_views=2"))
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    keys = ("diag_attraction_gap", "diag_repulsion_gap", "diag_bias_angle_deg", "diag_alignment")
    assert [(r["epoch"], r["step"]) for r in epochs] == [(-1, 0), (0, 4), (1, 8)]  # step 0, then each epoch end
    assert not any(k in epochs[1] for k in (*keys, "knn_top1"))  # eval.every=2: epoch 0 is not measured
    # the last epoch's record is measure.diagnostics_metrics of the saved checkpoint's encoder (no step between)
    encoder, cfg = load_run(run)
    encoder = encoder.to(memory_format=torch.channels_last)  # as the loop's (trainer.channels_last)
    _, test, spec = load_data(cfg)
    probe = splits.balanced_draw(test, cfg.eval.diag_images, seed=splits.HELD_OUT)
    again = diagnostics_metrics(encoder, probe, spec=spec, views=cfg.eval.diag_views, alphas=(config_alpha(cfg.loss),),
                                seed=cfg.train.seed)
    assert {k: epochs[2][k] for k in again} == again and set(keys) <= set(again)
    db_epochs = ResultsDB(tmp_path / "runs.db").epochs("tracked")
    assert [r["epoch"] for r in db_epochs] == [-1, 0, 1]
    assert all(db_epochs[i][k] == epochs[i][k] for k in keys for i in (0, 2))


def test_the_step_0_record_measures_the_encoder_as_initialized(tmp_path, fashion_mnist_dir):
    """The epoch -1 record is the encoder before any step: the same numbers as the monitor on an encoder built
    from the run's seed alone (not the weights after step 1, not the final ones)."""
    from protoclr.measure import Monitor

    cfg = tiny(tmp_path, "train.run_name=initial", "eval.diagnostics=true", "eval.diag_images=100",
               "eval.diag_views=2")
    run = pretrain(cfg)
    first = ResultsDB(tmp_path / "runs.db").epochs("initial")[0]
    torch.manual_seed(cfg.train.seed)  # how the loop seeds the encoder it builds
    train, test, spec = load_data(cfg)
    fresh = build_encoder(cfg.model, in_channels=spec.channels)
    expected = Monitor(cfg, train, test, spec).measure(fresh, None)
    assert first["epoch"] == -1 and first["step"] == 0
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key  # channels_last in the loop only
    trained = Monitor(cfg, train, test, spec).measure(load_run(run)[0], None)
    assert any(first[k] != pytest.approx(v, rel=1e-3) for k, v in trained.items())  # not the final weights
    off = pretrain(tiny(tmp_path, "train.run_name=no_initial", "eval.initial=false"))
    assert [r["epoch"] for r in ResultsDB(tmp_path / "runs.db").epochs(off.name)] == [0, 1]


def _count_steps(monkeypatch) -> list[int]:
    """Record the step of every training step this process makes (TrainViews.make is called once per step)."""
    import protoclr.views as V

    calls, make = [], V.TrainViews.make

    def counting(self, images, **kw):
        calls.append(kw["step"])
        return make(self, images, **kw)

    monkeypatch.setattr(V.TrainViews, "make", counting)
    return calls


def _step_records(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "step"]


def test_resume_is_bit_identical(full_run, tmp_path, monkeypatch):
    out = full_run.parent
    seen = []

    def on_epoch_end(encoder, metrics):  # consumes RNG and switches mode: the loop must undo both
        seen.append(metrics["epoch"])
        encoder.eval()
        torch.randn(100)
        return {"callback_norm": float(sum(p.detach().norm() for p in encoder.parameters()))}

    part = pretrain(tiny(out, "train.run_name=part", "train.checkpoint_every=3", "train.max_steps=3"))
    state = ckpt.load(part / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"], state["step"]) == (0, 3, 3)  # stopped inside epoch 0
    assert ResultsDB(out / "runs.db").get_run("part")["status"] == "interrupted"
    steps = _count_steps(monkeypatch)
    pretrain(tiny(out, "train.run_name=part", "train.checkpoint_every=3"), on_epoch_end=on_epoch_end)  # resumes
    assert steps == [3, 4, 5, 6, 7]  # the second launch made only the steps after the checkpoint
    assert json.loads((part / "meta.json").read_text())["resumed_at_step"] == 3
    assert seen == [0, 1] and _step_records(part) == list(range(1, 9))
    a, b = weights(full_run), weights(part)
    for group in a:
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}.{k} differs after resume"
    ea = [e for e in ResultsDB(out / "runs.db").epochs("full")]
    eb = [e for e in ResultsDB(out / "runs.db").epochs("part")]
    assert "callback_norm" not in eb[0]  # the step-0 record is not an epoch end: no callback
    assert all(math.isfinite(e.pop("callback_norm")) for e in eb[1:])  # the callback's scalars joined each epoch
    assert ea == eb  # identical per-epoch metrics, including the epoch that was interrupted
    # a run cannot be resumed under a different recipe
    with pytest.raises(ValueError, match=r"optim\.base_lr: 0\.3 at the start, 1\.0 now"):
        pretrain(tiny(out, "train.run_name=part", "optim.base_lr=1.0"))


_KILLED_RUN = """
import os, signal, sys
import protoclr.views as V
from protoclr.config import load_config
from protoclr.train import pretrain
make = V.TrainViews.make
def dying(self, images, **kw):
    if kw["step"] == int(sys.argv[2]):  # SIGKILL as this step starts: after its predecessors were logged
        os.kill(os.getpid(), signal.SIGKILL)
    return make(self, images, **kw)
V.TrainViews.make = dying
pretrain(load_config(None, sys.argv[3:] + ["train.out_dir=" + sys.argv[1]]))
"""


@pytest.mark.slow
def test_run_killed_between_checkpoints_resumes_bit_identical(full_run, tmp_path, monkeypatch):
    """SIGKILL as the 6th step starts (checkpoints after steps 3, 4 (the epoch end) and 6): the resumed run redoes
    step 5 from the step-4 checkpoint, writes each step record once, and ends with the uninterrupted run's
    weights and epoch records."""
    args = [*TINY, "train.run_name=killed", "train.checkpoint_every=3"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(tmp_path), "5", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
    run = tmp_path / "killed"
    assert ckpt.load(run / "checkpoint.pt")["step"] == 4 and _step_records(run) == [1, 2, 3, 4, 5]
    steps = _count_steps(monkeypatch)
    pretrain(load_config(None, [*args, f"train.out_dir={tmp_path}"]))
    assert steps == [4, 5, 6, 7] and json.loads((run / "meta.json").read_text())["resumed_at_step"] == 4
    assert _step_records(run) == list(range(1, 9))  # step 5 once, from the resumed run
    a, b = weights(full_run), weights(run)
    for group in a:
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]), f"{group}.{k} differs after the kill and resume"
    assert ResultsDB(tmp_path / "runs.db").epochs("killed") == ResultsDB(full_run.parent / "runs.db").epochs("full")


# One epoch of 4 steps, nothing measured: the resume tests below compare weights only.
SHORT = ["train.epochs=1", "eval.every=0", "eval.online_probe=false", "trainer.loggers=[]"]


def _noisy_steps(monkeypatch) -> None:
    """Every step reads the global torch RNG (as dropout or noise in the views would): the loss gains a random
    term, so a resumed run matches only if the global RNG resumes exactly where the interrupted run left it."""
    import protoclr.targets as T

    def noisy(loss):
        def wrapped(z, *args, **kw):
            return loss(z, *args, **kw) + 0.1 * (z * torch.rand_like(z)).mean()
        return wrapped

    monkeypatch.setattr(T, "contrastive_loss", noisy(T.contrastive_loss))
    monkeypatch.setattr(T, "supervised_prototype_loss", noisy(T.supervised_prototype_loss))


def _stopped_and_resumed(out: Path, *overrides: str) -> tuple[Path, Path]:
    """``(uninterrupted, resumed)``: the same run made in one go, and stopped by train.max_steps after step 2 of
    4 (inside the epoch) then resumed in this process."""
    full = pretrain(tiny(out, "train.run_name=full", *SHORT, *overrides))
    pretrain(tiny(out, "train.run_name=part", "train.max_steps=2", *SHORT, *overrides))
    assert ckpt.load(out / "part" / "checkpoint.pt")["step"] == 2
    part = pretrain(tiny(out, "train.run_name=part", *SHORT, *overrides))
    assert json.loads((part / "meta.json").read_text())["resumed_at_step"] == 2
    return full, part


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = ckpt.load(a / "checkpoint.pt")["model"], ckpt.load(b / "checkpoint.pt")["model"]
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"weights differ after resume: {differ[:5]}"


def test_resume_is_bit_identical_when_steps_read_the_global_rng(tmp_path, monkeypatch, fashion_mnist_dir):
    """Catches a resume one global-RNG draw ahead (the epoch's DataLoader drawing its base seed from the global
    RNG after the checkpoint's RNG state is restored) and a resume that restores no RNG state at all."""
    _noisy_steps(monkeypatch)
    _assert_same_weights(*_stopped_and_resumed(tmp_path))


def test_epoch_batches_leave_the_global_rng_alone():
    data = splits.FakeImages(8, (1, 4, 4), 2)
    before = torch.get_rng_state()
    for _ in splits.epoch_batches(data, seed=0, epoch=0, batch_size=4):
        pass
    assert torch.equal(torch.get_rng_state(), before)


def test_supervised_resume_keeps_the_prototype_bank(tmp_path, monkeypatch, fashion_mnist_dir):
    """loss.name=supervised_prototype: the class-prototype bank (targets.TargetBranch state) after step 2 is what
    step 3's loss pulls toward; a resume that restarts it from zero ends with other weights."""
    _noisy_steps(monkeypatch)
    full, part = _stopped_and_resumed(tmp_path, "loss.name=supervised_prototype")
    bank = ckpt.load(part / "checkpoint.pt")["target"]["bank"]
    assert bank is not None and any(v.abs().sum() > 0 for v in bank.values() if v.is_floating_point())
    _assert_same_weights(full, part)


_KILLED_WRITER = """
import sys, torch
from protoclr.checkpoint import atomic_save
path, i = sys.argv[1], 0
big = torch.arange(8_000_000, dtype=torch.float32)  # 32 MB per write, so the kill lands mid-write
while True:
    i += 1
    atomic_save({"i": i, "w": big + i}, path)
    print(i, flush=True)
"""


def test_killed_checkpoint_write_leaves_previous_loadable(tmp_path):
    path = tmp_path / "checkpoint.pt"
    ckpt.atomic_save({"i": 0, "w": torch.zeros(3)}, path)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    proc.stdout.readline()  # at least one complete write happened; the next one is in flight
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = torch.load(path, weights_only=True)  # a whole file: the last completed write
    assert state["i"] >= 1 and torch.equal(state["w"], torch.arange(8_000_000, dtype=torch.float32) + state["i"])
    # and a write that fails part-way (a crash inside torch.save) leaves the old file and no new temp file
    ckpt.atomic_save({"i": 41}, path)
    temps = set(tmp_path.glob(".checkpoint.pt.*.tmp"))  # the SIGKILLed writer may have left one

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("crash during write")

    with pytest.raises(RuntimeError, match="crash during write"):
        ckpt.atomic_save({"i": 42, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["i"] == 41
    assert set(tmp_path.glob(".checkpoint.pt.*.tmp")) == temps


def test_divergence_guard_stops_and_keeps_last_good_checkpoint(tmp_path, fashion_mnist_dir):
    cfg = tiny(tmp_path, "train.run_name=dot", "loss.similarity=dot", "optim.base_lr=200", "optim.warmup_epochs=0",
               "train.checkpoint_every=1", "eval.every=0")
    with pytest.raises(TrainingDiverged, match=r"at step \d+.*similarity=dot") as info:
        pretrain(cfg)
    run = info.value.run_dir
    row = ResultsDB(tmp_path / "runs.db").get_run("dot")
    assert row["status"] == "diverged" and "similarity=dot" in row["message"]
    state = ckpt.load(run / "checkpoint.pt")
    bad_step = int(row["final_metrics"]["step"])
    assert state["step"] == bad_step  # the checkpoint before the failing step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # skip instead: the same bad steps are skipped (no update), counted, and the run goes on
    cfg = tiny(tmp_path, "train.run_name=skip", "loss.similarity=dot", "optim.base_lr=200",
               "optim.warmup_epochs=0", "eval.every=0", "train.on_nonfinite=skip", "train.max_skips=100")
    run = pretrain(cfg)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in records if r["kind"] == "skip"]
    assert bad_step in skipped and "diverged" not in {r["kind"] for r in records}
    row = ResultsDB(tmp_path / "runs.db").get_run("skip")
    assert row["status"] == "finished" and row["final_metrics"]["skips"] == len(skipped)
    state = ckpt.load(run / "checkpoint.pt")
    assert state["step"] == 8 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_cli_config_errors_dry_run_and_print_config(tmp_path, capsys, fashion_mnist_dir):
    from protoclr.cli import main

    assert main(["pretrain", "train.batch_size=1"]) == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert main(["pretrain", "optim.nope=1"]) == 2
    assert "optim.nope" in capsys.readouterr().err
    assert cli_main(["--print-config", "optim.base_lr=0.6"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["base_lr"] == 0.6
    assert cli_main(["--dry-run", f"train.out_dir={tmp_path}", "trainer.progress=false"]) == 0
    assert "dry run ok" in capsys.readouterr().out
    # the supervised objective runs through the loop too (labels and the prototype bank updated by the loop)
    assert cli_main(["--dry-run", "loss.name=supervised_prototype", "trainer.progress=false"]) == 0
    assert not (tmp_path / "runs.db").exists()  # a dry run records nothing


def test_shipped_configs_build_their_model():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        enc = build_encoder(cfg.model, in_channels=3)
        assert enc.out_dim == cfg.model.projector_dim


@pytest.mark.distributed
def test_two_gloo_processes_match_one(tmp_path, fashion_mnist_dir):
    """torchrun with 2 CPU processes (local batch 32) reproduces one process with batch 64.

    Group norm (batch-independent) stands in for BatchNorm, whose statistics are per process on CPU
    (SyncBatchNorm needs a GPU); views and data order are per-sample deterministic, negatives are gathered.
    """
    common = [*TINY, "model.norm=group", "train.max_steps=3", "eval.every=0", f"train.out_dir={tmp_path}",
              "trainer.accelerator=cpu", "trainer.loggers=[]"]
    pretrain_one_and_two(common)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert ckpt.load(tmp_path / "two" / "checkpoint.pt")["step"] == 3
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["world_size"] == 2
    for group in a:
        for k in a[group]:
            torch.testing.assert_close(a[group][k], b[group][k], rtol=1e-4, atol=1e-5, msg=f"{group}.{k}")


def test_monitors_score_a_draw_of_every_class_of_a_class_sorted_split():
    from protoclr.data import LabeledImages
    from protoclr.splits import held_out

    labels = torch.arange(10).repeat_interleave(1000)  # stored in class order, as the CIFAR-10 copy
    test = LabeledImages(labels=labels, classes=list("abcdefghij"),
                         images=torch.arange(10000, dtype=torch.int64).remainder(256).to(torch.uint8).view(-1, 1, 1, 1))
    scored = held_out(test, 1000)
    counts = torch.bincount(scored.labels, minlength=10)
    assert len(scored) == 1000 and int(counts.min()) >= 70
    assert torch.equal(scored.labels, held_out(test, 1000).labels)  # the same images for every run
    assert held_out(test, 0) is test


def test_train_steps_spans_the_schedule_and_ends_in_a_cut_epoch(tmp_path, fashion_mnist_dir):
    """train.steps=6 with 4 steps per epoch: two passes, the second cut after 2 steps; the cosine reaches 0 at
    step 6 (not at 8) and the run is finished, not interrupted."""
    run = pretrain(tiny(tmp_path, "train.steps=6", "train.epochs=99", "eval.every=0"))
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    steps = [r for r in records if r["kind"] == "step"]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(0, 4), (1, 6)]
    ref = lr_schedule(peak=0.3 * 64 / 256, total_steps=6, warmup_steps=2)
    assert [s["lr"] for s in steps] == pytest.approx(ref.tolist())
    assert ResultsDB(tmp_path / "runs.db").get_run(run.name)["status"] == "finished"
    assert ckpt.load(run / "checkpoint.pt")["step"] == 6


def test_local_views_progressive_sizes_and_bf16_reach_the_encoder_and_loss(tmp_path, fashion_mnist_dir,
                                                                          monkeypatch):
    import protoclr.targets as T
    from protoclr.models import Encoder

    seen_x, seen_z = [], []
    forward, loss_fn = Encoder.forward, T.contrastive_loss

    def spy_forward(self, x):
        if self.training:
            seen_x.append(([tuple(xi.shape) for xi in (x if isinstance(x, list) else [x])],
                           torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
        return forward(self, x)

    def spy_loss(z, **k):
        seen_z.append((tuple(z.shape), z.dtype))
        return loss_fn(z, **k)

    monkeypatch.setattr(Encoder, "forward", spy_forward)
    monkeypatch.setattr(T, "contrastive_loss", spy_loss)
    run = pretrain(tiny(tmp_path, "data.local_views=3", "data.local_size=12", "data.view_sizes=16,28",
                        "train.epochs=1", "eval.every=0", "trainer.precision=bf16-mixed"))
    small, full = [(128, 1, 16, 16), (192, 1, 12, 12)], [(128, 1, 28, 28), (192, 1, 12, 12)]
    assert seen_x == [(small, torch.bfloat16)] * 2 + [(full, torch.bfloat16)] * 2  # 2 steps per size, autocast
    assert seen_z == [((5, 64, 32), torch.float32)] * 4  # 2 global + 3 local views of 64 images
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "step")
    assert "bf16-mixed" in (run / "meta.json").read_text()


def test_adamw_decays_weights_only_and_decoupled():
    """With zero gradients Adam's update is 0, so one AdamW step is the decoupled decay alone: p <- p (1 - lr wd)
    for layer weights, nothing for biases, norms, a ViT's class token and position embeddings."""
    from protoclr.config import ModelConfig, OptimConfig
    from protoclr.train import build_optimizer

    pytest.importorskip("timm")
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(backbone="timm/vit_tiny_patch16_224", timm_img_size=16, timm_patch_size=8,
                                    projector_hidden_dim=16, projector_dim=8), in_channels=1)
    opt = build_optimizer(enc, OptimConfig(name="adamw", weight_decay=0.1, betas=[0.8, 0.9]), lr=0.5)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    before = {n: p.detach().clone() for n, p in enc.named_parameters()}
    for p in enc.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(enc.named_parameters())
    for n in ("backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight", "projector.net.0.weight"):
        torch.testing.assert_close(after[n].detach(), before[n] * (1 - 0.5 * 0.1), msg=n)
    for n in ("backbone.cls_token", "backbone.pos_embed", "backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias"):
        torch.testing.assert_close(after[n].detach(), before[n], rtol=0, atol=0, msg=n)


def test_the_vit_tiny_config_dry_runs_and_trains_a_few_steps(tmp_path, capsys, fashion_mnist_dir):
    """configs/cifar10_vit_tiny.yaml: its dry run (fake CIFAR-sized data, no dataset needed), then 2 real steps of
    the same recipe on a Fashion-MNIST subset (28 px gray views, so img_size 28; the CIFAR copy may be absent)."""
    pytest.importorskip("timm")
    config = REPO / "configs" / "cifar10_vit_tiny.yaml"
    assert cli_main(["--config", str(config), "--dry-run", "trainer.progress=false", "trainer.precision=32-true",
                     "model.projector_hidden_dim=64"]) == 0
    assert "dry run ok: built timm/vit_tiny_patch16_224" in capsys.readouterr().out
    cfg = load_config(config, ["data.dataset=fashion_mnist", "data.views=simclr_small", "model.timm_img_size=28",
                               "data.train_subset=32", "train.batch_size=16", "train.steps=2", "eval.every=0",
                               "trainer.progress=false", "trainer.loggers=[]", "trainer.precision=32-true",
                               "model.projector_hidden_dim=64", f"train.out_dir={tmp_path}", "train.run_name=vit"])
    run = pretrain(cfg)
    state = ckpt.load(run / "checkpoint.pt")
    assert state["step"] == 2 and "backbone.pos_embed" in state["model"]
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.05  # AdamW's two groups resumed as saved
    encoder, _ = load_run(run)
    h, _ = encoder(torch.randn(2, 1, 28, 28))
    assert h.shape == (2, 192) and torch.isfinite(h).all()


def test_measuring_during_training_leaves_training_unchanged(full_run, tmp_path):
    """Per-epoch monitors and diagnostics (and the step-0 record) change no weight: protoclr.claims pairs a run
    measured every epoch with one measured never (eval.every is not a treatment)."""
    quiet = pretrain(tiny(tmp_path, "train.run_name=quiet", "eval.every=0"))
    loud = pretrain(tiny(tmp_path, "train.run_name=loud", "eval.every=1", "eval.diagnostics=true",
                         "eval.diag_images=100", "eval.diag_views=2"))
    a, b, c = weights(quiet), weights(loud), weights(full_run)
    for group in a:
        for k in a[group]:
            assert torch.equal(a[group][k], b[group][k]) and torch.equal(a[group][k], c[group][k]), f"{group}.{k}"


def _rgb_folder(root: Path, *, n: int = 16, side: int = 40) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            a = torch.randint(0, 256, (side, side, 3), dtype=torch.uint8, generator=g)
            Image.fromarray(a.numpy()).save(root / c / f"{i}.png")
    return root


SMALL = ["train.batch_size=16", "train.steps=1", "eval.every=0", "eval.online_probe=false", "trainer.progress=false",
         "trainer.loggers=[]", "model.convnet_widths=[8]", "model.projector_hidden_dim=16", "model.projector_dim=8",
         "trainer.precision=32-true"]


def test_an_rgb_image_folder_trains_and_saves_rgb_views_of_its_size(tmp_path, capsys, monkeypatch):
    """RGB 40x40 photos with the default (grey 28 px) preset: one line says what was chosen, and the run trains
    and saves RGB 40-pixel views, so that evaluate and export read (B, 3, 40, 40)."""
    from protoclr.views import config_view_spec

    monkeypatch.setenv("PROTOCLR_CACHE", str(tmp_path / "cache"))
    folder = _rgb_folder(tmp_path / "photos")
    cfg = load_config(None, ["data.dataset=image_folder", f"data.root={folder}", *SMALL, f"train.out_dir={tmp_path}",
                             "train.run_name=rgb"])
    run = pretrain(cfg)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data.views")]
    assert len(lines) == 1 and f"{folder} holds RGB images of about 40 px" in lines[0]
    assert "simclr_cifar at 40 px instead of the default simclr_small" in lines[0]
    _, saved = load_run(run)
    spec = config_view_spec(saved.data)
    assert (spec.channels, spec.size) == (3, 40)
    assert ckpt.load(run / "checkpoint.pt")["in_channels"] == 3
    assert cfg.data.views == "simclr_small"  # the caller's config is not changed under it


def test_a_vit_without_timm_img_size_is_built_for_the_views(tmp_path, capsys):
    pytest.importorskip("timm")
    assert cli_main(["--dry-run", "model.backbone=timm/vit_tiny_patch16_224", "model.timm_patch_size=4",
                     "trainer.progress=false", "trainer.precision=32-true", "model.projector_hidden_dim=32"]) == 0
    out = capsys.readouterr().out
    assert "model.timm_img_size: timm/vit_tiny_patch16_224 takes 224-pixel input; built for the 28-pixel views" in out
    assert "dry run ok" in out


def test_skip_bad_leaves_out_a_broken_image_and_lists_it_in_the_run_folder(tmp_path, capsys, monkeypatch):
    from protoclr.cli import main

    monkeypatch.setenv("PROTOCLR_CACHE", str(tmp_path / "cache"))
    folder = _rgb_folder(tmp_path / "photos")
    broken = folder / "dog" / "broken.png"
    broken.write_bytes((folder / "dog" / "0.png").read_bytes()[:40])  # truncated
    assert main(["pretrain", "data.dataset=image_folder", f"data.root={folder}", *SMALL, f"train.out_dir={tmp_path}",
                 "train.run_name=skip", "--skip-bad"]) == 0
    out = capsys.readouterr()
    said = [ln for ln in out.out.splitlines() if "bad image" in ln]
    assert said == [f"skipped 1 bad image file(s) in {folder} (data.on_bad=skip); listed in "
                    f"{tmp_path / 'skip' / 'skipped_files.txt'}"]
    assert "bad image" not in out.err  # no loader warning besides the run's one line
    listed = (tmp_path / "skip" / "skipped_files.txt").read_text().splitlines()
    assert len(listed) == 1 and str(broken) in listed[0]
    assert load_config(tmp_path / "skip" / "config.yaml").data.on_bad == "skip"


MEASURED = [o for o in SMALL if not o.startswith("eval.")] + ["eval.train_images=0", "eval.test_images=0"]


@pytest.mark.parametrize("layout", ["one_class", "no_test_split"])
def test_accuracy_on_training_images_or_one_class_is_never_shown(layout, tmp_path, capsys, monkeypatch):
    """A one-class folder, or one with no test split, scored 1.0 on the training images: the run now says why it
    does not measure accuracy (one line), prints no knn_top1 / probe_top1, and evaluate refuses in one line."""
    import shutil

    from protoclr.cli import main

    monkeypatch.setenv("PROTOCLR_CACHE", str(tmp_path / "cache"))
    folder = _rgb_folder(tmp_path / "photos" / "train")
    if layout == "one_class":  # with a test split, so that only the class count is wrong
        shutil.rmtree(folder / "dog")
        shutil.copytree(folder, tmp_path / "photos" / "test")
    root = tmp_path / "photos"
    assert main(["pretrain", "data.dataset=image_folder", f"data.root={root}", *MEASURED, f"train.out_dir={tmp_path}",
                 "train.run_name=r"]) == 0
    out = capsys.readouterr().out
    assert "knn_top1" not in out and "probe_top1" not in out
    said = [ln for ln in out.splitlines() if ln.startswith("eval: ")]
    why = "has one class (cat)" if layout == "one_class" else "has no test split apart from the training images"
    assert len(said) == 1 and why in said[0] and "accuracy is not measured" in said[0]
    saved = load_config(tmp_path / "r" / "config.yaml")
    assert (saved.eval.every, saved.eval.online_probe, saved.eval.linear) == (0, False, False)
    assert main(["evaluate", str(tmp_path / "r"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("protoclr evaluate: ")
    assert ("one class (cat)" if layout == "one_class" else "accuracy would be scored on the training images") in err


def test_the_readme_train_from_python_block_runs(tmp_path, monkeypatch, capsys, fashion_mnist_dir):
    """README's "Train from Python" block, run as written with tiny overrides appended to its load_config."""
    import json

    import protoclr.config

    section = (REPO / "README.md").read_text().split("## Train from Python")[1]
    code = section.split("```python\n")[1].split("```")[0]
    real = protoclr.config.load_config
    monkeypatch.setattr(protoclr.config, "load_config", lambda path=None, overrides=None: real(
        REPO / path if path else None, [*(overrides or []), *TINY, "train.steps=4", f"train.out_dir={tmp_path}",
                                        "trainer.loggers=[]", "eval.initial=false"]))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "epoch 0: loss " in capsys.readouterr().out
    run = namespace["run_dir"]
    epochs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [r for r in epochs if r["kind"] == "epoch"]
    assert epoch["weight_norm"] > 0 and "knn_top1" in epoch
    assert namespace["cfg"].train.out_dir == str(tmp_path)


def test_ctrl_c_says_the_step_saved_and_the_exact_resume_command(full_run, tmp_path, monkeypatch, capsys):
    """Ctrl-C at the 6th step (checkpoints after steps 3 and 4, the epoch end): the run says where it stopped, the
    step its checkpoint resumes from and the command that resumes it; that command ends with the uninterrupted
    run's weights."""
    import shlex

    import protoclr.views as V
    from protoclr.train import cli_main

    make = V.TrainViews.make

    def interrupted(self, images, **kw):
        if kw["step"] == 5:
            raise KeyboardInterrupt
        return make(self, images, **kw)

    monkeypatch.setattr(V.TrainViews, "make", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny(tmp_path, "train.run_name=stopped", "train.checkpoint_every=3"))
    run = tmp_path / "stopped"
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("interrupted"))
    assert line == f"interrupted at step 5; the checkpoint saved at step 4 resumes it: protoclr pretrain --resume {run}"
    assert ckpt.load(run / "checkpoint.pt")["step"] == 4
    monkeypatch.setattr(V.TrainViews, "make", make)
    assert cli_main(shlex.split(line.split(": ", 1)[1])[2:]) == 0  # the printed command, as typed
    a, b = weights(full_run), weights(run)
    assert all(torch.equal(a[g][k], b[g][k]) for g in a for k in a[g])


def test_an_epoch_line_shows_the_headline_keys_and_says_where_the_rest_are(tmp_path, capsys):
    from protoclr.measure import CONSOLE

    run = pretrain(tiny(tmp_path, "train.run_name=lines", "eval.diagnostics=true", "eval.diag_images=100",
                        "eval.diag_views=2", "train.epochs=1"))
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("epoch 0 |")]
    record = next(r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if r.pop("kind") == "epoch" and r["epoch"] == 0)
    shown = [part.split(" ")[0] for part in lines[0].split(" | ")[:-1]]
    assert shown == [k for k in record if k in CONSOLE] and "diag_attraction_gap" in shown
    assert lines[0].endswith(f" | +{len(record) - len(shown)} more in metrics.jsonl") and len(record) > 20
    assert len(lines[0]) < 300  # was about 1,800 characters with diagnostics on


def test_the_bars_advance_every_step_with_the_whole_runs_bar(tmp_path, monkeypatch):
    """train.log_every=3 on an 8-step run: the run's bar and each epoch's bar still move at every step."""
    import protoclr.train as T

    seen = []
    advance = T.Bars.advance

    def watched(self, pos):
        advance(self, pos)
        tasks = {t.fields["what"]: t.completed for t in self.progress.tasks}
        seen.append((tasks["run"], tasks[f"epoch {pos.epoch}"]))

    monkeypatch.setattr(T.Bars, "advance", watched)
    pretrain(tiny(tmp_path, "train.run_name=bars", "train.log_every=3", "eval.every=0"))
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 1), (6, 2), (7, 3), (8, 4)]


def test_keep_best_copies_the_epoch_end_with_the_highest_online_knn(tmp_path, monkeypatch):
    """Monitor scores 0.9 at step 0 (not an epoch end), then 0.7 and 0.6 at the two epoch ends: best.pt is the
    step-4 checkpoint, checkpoint.pt the step-8 one; a run stopped after epoch 0 and resumed keeps that choice."""
    import protoclr.measure as M
    from protoclr.runs import RunDir

    def scripted(values):
        it = iter(values)
        return lambda self, encoder, probe, **kw: {"knn_top1": next(it)}

    monkeypatch.setattr(M.Monitor, "measure", scripted([0.9, 0.7, 0.6]))
    run = pretrain(tiny(tmp_path, "train.run_name=kept", "train.keep=best"))
    best, last = ckpt.load(RunDir(run).best), ckpt.load(run / "checkpoint.pt")
    assert (best["step"], last["step"], best["best"], last["best"]) == (4, 8, 0.7, 0.7)
    steps = _count_steps(monkeypatch)
    monkeypatch.setattr(M.Monitor, "measure", scripted([0.9, 0.7]))
    pretrain(tiny(tmp_path, "train.run_name=split", "train.keep=best", "train.max_steps=4"))
    monkeypatch.setattr(M.Monitor, "measure", scripted([0.65]))  # the resumed epoch 1: below the saved best
    resumed = pretrain(tiny(tmp_path, "train.run_name=split", "train.keep=best"))
    assert steps == list(range(8)) and ckpt.load(RunDir(resumed).best)["step"] == 4
    with pytest.raises(ValueError, match=r"train\.keep"):
        tiny(tmp_path, "train.keep=best", "eval.every=0").validate()
    monkeypatch.setattr(M.Monitor, "measure", scripted([0.5, 0.6, 0.7]))
    assert not RunDir(pretrain(tiny(tmp_path, "train.run_name=plain"))).best.exists()  # keep=last: no copy
