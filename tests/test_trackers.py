"""Experiment trackers through Fabric's loggers (trainer.loggers): W&B offline and MLflow on a local store receive
the resolved config as hyperparameters and every epoch record, the last one included; each is read back with its
own reader (the W&B run file's records, MlflowClient)."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import yaml

from protoclr.config import load_config
from protoclr.runs import flat_config
from protoclr.train import pretrain

# 64 images, batch 32, 2 steps = 1 epoch; a small convnet
TINY = ["data.train_subset=64", "train.batch_size=32", "train.steps=2", "eval.every=0", "trainer.precision=32-true",
        "trainer.progress=false", "model.convnet_widths=[8,16]", "model.projector_hidden_dim=32",
        "model.projector_dim=16", "train.log_every=1"]


def _run(tmp_path: Path, logger: str) -> tuple[Path, dict, dict]:
    """A 2-step run with ``logger``; ``(run_dir, flattened config.yaml, last epoch record of metrics.jsonl)``."""
    run = pretrain(load_config(None, [*TINY, f"train.out_dir={tmp_path}", "train.run_name=r",
                                      f"trainer.loggers=[{logger}]"]))
    # every key of the resolved config; an empty list arrives as "[]" (Lightning's loggers would drop it)
    saved = flat_config(yaml.safe_load((run / "config.yaml").read_text()))
    config = {k: "[]" if v == [] else v for k, v in saved.items()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (last,) = [r for r in records if r["kind"] == "epoch"]
    return run, config, last


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_logger_whose_package_is_missing_names_the_extra_when_the_run_starts(name, tmp_path, monkeypatch):
    import sys

    from protoclr.errors import MissingExtra
    from protoclr.train import setup_fabric

    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    cfg = load_config(None, [f"trainer.loggers=[{name}]"])  # a config (or a saved run) naming it still loads
    with pytest.raises(MissingExtra, match=rf"^trainer\.loggers={name} needs the {name} package, which is not "
                                           rf"installed: pip install 'protoclr\[{name}\]'$"):
        setup_fabric(cfg, tmp_path / "run")


def test_flat_config_joins_section_and_key():
    assert flat_config({"optim": {"base_lr": 0.3, "betas": [0.9, 0.99]}, "a": {"b": {"c": 1}}}) == {
        "optim.base_lr": 0.3, "optim.betas": [0.9, 0.99], "a.b.c": 1}


def _wandb_records(path: Path) -> list:
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header, then a LevelDB-style log of 32 KiB
    blocks, each record ``crc32 (4) | length (2) | type (1)`` + protobuf bytes, split across blocks as
    first (2) / middle (3) / last (4) pieces (type 1 = whole). wandb ships no reader for it any more."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, piece, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # a record still being written
            break
        piece += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(piece)
            out.append(record)
            piece = b""
    return out


def test_wandb_offline_gets_the_config_and_the_final_epoch_record(tmp_path, monkeypatch, fashion_mnist_dir):
    pytest.importorskip("wandb")
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)  # the default: offline, no account, no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    run, config, last = _run(tmp_path, "wandb")
    (run_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")  # offline, inside the run folder
    # wandb's service process writes the file on its own schedule: wait for the run's last record (exit)
    deadline = time.monotonic() + 60
    records = _wandb_records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "the W&B run file never got its exit record"
        time.sleep(0.5)
        records = _wandb_records(run_file)
    (header,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert header.project == "protoclr" and header.display_name == run.name
    logged = {u.key: json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for u in r.config.update}
    assert {k: logged[k] for k in config} == config  # every resolved key, with its value
    assert logged["optim.betas"] == [0.9, 0.999] and logged["model.backbone"] == "convnet"
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    for k in ("loss", "lr", "step", "epoch"):
        assert summary[f"epoch/{k}"] == pytest.approx(last[k], rel=1e-12), k


def test_mlflow_local_store_gets_the_config_and_the_final_epoch_record(tmp_path, monkeypatch, fashion_mnist_dir):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    run, config, last = _run(tmp_path, "mlflow")
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")  # in the run folder, no server
    (tracked,) = client.search_runs([client.get_experiment_by_name("protoclr").experiment_id])
    assert tracked.info.run_name == run.name and tracked.info.status == "FINISHED"
    params = tracked.data.params  # MLflow keeps parameters as strings
    assert params == {k: str(v) for k, v in config.items()}
    for k in ("loss", "lr", "step", "epoch"):
        assert tracked.data.metrics[f"epoch/{k}"] == pytest.approx(last[k], rel=1e-12), k
    history = client.get_metric_history(tracked.info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]  # every step record too (train.log_every=1)
