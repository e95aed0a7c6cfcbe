"""Config: defaults, YAML + overrides, and errors that name the key (unknown, wrong type, out of range)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from protoclr import data, loggers, losses, models, optim, targets, views
from protoclr.config import Config, ConfigError, config_from_dict, load_config
from protoclr.sweep import Sweep, SweepError, check_sweep

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_defaults_are_the_cpu_default():
    cfg = load_config(None)
    assert (cfg.data.dataset, cfg.model.backbone, cfg.loss.name) == ("fashion_mnist", "convnet", "balanced")
    assert cfg.lr() == pytest.approx(cfg.optim.base_lr * cfg.train.batch_size / 256)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  batch_size: 512\noptim:\n  base_lr: 0.3\n")
    cfg = load_config(f, ["optim.base_lr=0.6", "trainer.devices=8", "data.view_modifiers=[no_blur, add_cutout]",
                          "loss.similarity=dot", "model.small_images=false"])
    assert load_config(None, ["loss.similarity=neg_euclidean"]).loss.similarity == "neg_euclidean"
    assert cfg.train.batch_size == 512 and cfg.optim.base_lr == 0.6 and cfg.lr() == pytest.approx(1.2)
    assert cfg.trainer.devices == "8" and cfg.data.view_modifiers == ["no_blur", "add_cutout"]
    assert cfg.loss.similarity == "dot" and cfg.model.small_images is False
    assert isinstance(load_config(None, ["optim.base_lr=1"]).optim.base_lr, float)  # int accepted as float
    # the resolved config round-trips through YAML (what a run saves)
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optim.lrr=0.1"], "optim.lrr"),
        (["optimizer.lr=0.1"], "optimizer"),
        (["train.batch_size=64.5"], "train.batch_size"),
        (["train.batch_size=abc"], "train.batch_size"),
        (["model.small_images=3"], "model.small_images"),
        (["optim.base_lr=fast"], "optim.base_lr"),
        (["train.batch_size=1"], "train.batch_size"),
        (["optim.base_lr=-0.1"], "optim.base_lr"),
        (["loss.alpha=0"], "loss.alpha"),
        (["loss.alpha=-2"], "loss.alpha"),
        (["loss.similarity=cos"], "loss.similarity"),
        (["train.on_nonfinite=ignore"], "train.on_nonfinite"),
        (["data.num_views=1"], "data.num_views"),
        (["train.epochs"], "train.epochs"),
        (["loss.nu=0"], "loss.nu"),
        (["loss.chunk_size=-1"], "loss.chunk_size"),
        (["data.class_profile=balanced"], "data.class_profile"),
        (["data.longtail_profile=zipf"], "data.longtail_profile"),
        (["data.imbalance_ratio=0.5"], "data.imbalance_ratio"),
        (["eval.diag_views=1"], "eval.diag_views"),
        (["eval.every=-1"], "eval.every"),
        (["eval.diagnostics=yes please"], "eval.diagnostics"),
        (["model.backbone=resnet19"], "model.backbone"),
        (["optim.name=adam"], "optim.name"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["optim.betas=[0.9, 1.0]"], "optim.betas"),
        (["trainer.loggers=[tensorboard, tb]"], "trainer.loggers"),
        (["model.timm_img_size=32"], "model.timm_img_size"),  # not a timm backbone
        (["model.timm_patch_size=4"], "model.timm_patch_size"),
    ],
)
def test_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_yaml_errors_name_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  batch_size: '256'\n")  # a string where an int belongs (no coercion from files)
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(f)
    f.write_text("trainer:\n  devcies: 2\n")
    with pytest.raises(ConfigError, match=r"trainer\.devcies.*devices"):
        load_config(f)
    f.write_text("model: resnet18\n")
    with pytest.raises(ConfigError, match="model"):
        load_config(f)
    f.write_text("train:\n  epochs: 4\n  epochs: 8\n")  # plain YAML would keep the last one silently
    with pytest.raises(ConfigError, match=r"bad\.yaml: line 3: key 'epochs' is given twice \(first at line 2\)"):
        load_config(f)
    f.write_text("train: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(f)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_open_with_their_command(path):
    text = path.read_text()
    head = text.split("\n\n")[0]
    assert head.startswith("#") and "protoclr pretrain" in head and "accuracy" in head.lower()
    cfg = load_config(path)
    assert isinstance(cfg, Config)


# The loss config's numbers; each preset reads the ones its losses.PRESETS entry names (Preset.params).
LOSS_NUMBERS = {"temperature": 0.25, "alpha": 3.0, "lam": 1.5, "nu": 0.5}


def test_the_loss_table_is_the_presets_and_the_supervised_objective():
    from protoclr.losses import LOSSES, PRESETS

    assert set(LOSSES) == {*PRESETS, "supervised_prototype"}


@pytest.mark.parametrize("name", list(losses.PRESETS))
@pytest.mark.parametrize("scale", ["preset", "none", "inverse_alpha"])
def test_config_to_loss_options_by_value(name, scale):
    """temperature -> alpha for the temperature presets, lam and nu only where the preset reads them, the
    preset's scale unless loss.scale names one, chunk_size 0 -> automatic (None)."""
    import torch
    from loss_oracle import oracle_loss, preset_settings

    from protoclr.losses import LOSSES, config_alpha, config_options, contrastive_loss

    numbers = [f"loss.{k}={v}" for k, v in LOSS_NUMBERS.items()]
    cfg = load_config(None, [f"loss.name={name}", *numbers, f"loss.scale={scale}", "loss.similarity=cosine"])
    want = dict(preset_settings(losses.PRESETS[name], LOSS_NUMBERS), similarity="cosine", chunk_size=None)
    if scale != "preset":
        want["scale"] = scale
    got = config_options(cfg.loss)
    assert got == want and config_alpha(cfg.loss) == want["alpha"]
    assert config_options(load_config(None, [f"loss.name={name}", "loss.chunk_size=64"]).loss)["chunk_size"] == 64
    torch.manual_seed(0)
    z = torch.randn(2, 6, 5)
    value = contrastive_loss(z, **got)
    oracle = {k: v for k, v in got.items() if k != "chunk_size"}
    assert value.item() == pytest.approx(float(oracle_loss(z, **oracle)), rel=1e-5)
    if scale == "preset":  # the module form of the preset is the same loss
        kwargs = {k: getattr(cfg.loss, k) for k in losses.PRESETS[name].params}  # temperature or alpha, not both
        assert LOSSES[name](**kwargs)(*z.unbind(0)).item() == pytest.approx(value.item(), rel=1e-6)



def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-4 as a string; in a float field, on the command line or in a file, it is the number."""
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  weight_decay: 5e-4\n")
    cfg = load_config(f, ["optim.base_lr=3E-1", "loss.alpha=+2e0"])
    assert cfg.optim.weight_decay == 5e-4 and cfg.optim.base_lr == 0.3 and cfg.loss.alpha == 2.0
    with pytest.raises(ConfigError, match=r"optim\.weight_decay: expected a number"):
        load_config(None, ["optim.weight_decay=1e-4x"])
    with pytest.raises(ConfigError, match=r"train\.run_name"):
        load_config(None, ["train.run_name=[1e-4]"])


def test_a_vit_input_side_must_match_the_views():
    pytest.importorskip("timm")
    vit = ["model.backbone=timm/vit_tiny_patch16_224", "model.timm_patch_size=4"]
    assert load_config(None, [*vit, "model.timm_img_size=28"]).model.timm_img_size == 28  # simclr_small: 28 px
    with pytest.raises(ConfigError, match=r"model\.timm_img_size: 32 differs from the 28-pixel views of "
                                          r"data\.views=simclr_small; set model\.timm_img_size=28"):
        load_config(None, [*vit, "model.timm_img_size=32"])


# Every choice key and the table it is validated against: the module that owns the names (STYLE.md).
CHOICE_KEYS = [
    ("data.dataset", data, "DATASETS"),
    ("data.views", views, "PRESETS"),
    ("data.view_modifiers", views, "MODIFIERS"),
    ("model.norm", models, "NORMS"),
    ("loss.name", losses, "LOSSES"),
    ("loss.similarity", losses, "SIMILARITIES"),
    ("loss.scale", losses, "SCALES"),
    ("optim.name", optim, "OPTIMIZERS"),
    ("target.name", targets, "TARGETS"),
    ("trainer.loggers", loggers, "LOGGERS"),
]


@pytest.mark.parametrize(("key", "owner", "table"), CHOICE_KEYS, ids=[k for k, _, _ in CHOICE_KEYS])
def test_a_bad_choice_is_one_line_naming_the_key_the_value_and_the_owners_choices(key, owner, table):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=nonesuch"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}: ") and "'nonesuch'" in msg, msg
    assert all(name in msg for name in getattr(owner, table)), msg


@pytest.mark.parametrize(("key", "owner", "table"), CHOICE_KEYS, ids=[k for k, _, _ in CHOICE_KEYS])
def test_a_choice_is_read_from_its_owners_table(key, owner, table, monkeypatch):
    """A name added to the owner's table is valid in the config at once: a list re-spelled in config.py would
    refuse it."""
    names = getattr(owner, table)
    if isinstance(names, dict):
        monkeypatch.setitem(names, "added", next(iter(names.values())))
    else:
        monkeypatch.setattr(owner, table, (*names, "added"))
    load_config(None, [f"{key}=added"])


def test_a_misspelt_choice_gets_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"^loss\.name: unknown loss 'balancd'; .* did you mean 'balanced'\?$"):
        load_config(None, ["loss.name=balancd"])


@pytest.mark.parametrize("name", sorted(losses.LOSSES))
def test_a_queue_is_allowed_exactly_for_the_presets_with_all_negatives(name):
    overrides = [f"loss.name={name}", "target.queue_size=64"]
    if name in losses.PRESETS and losses.PRESETS[name].negatives == "all":
        load_config(None, overrides)
    else:
        with pytest.raises(ConfigError, match=r"target\.queue_size"):
            load_config(None, overrides)


def test_a_sweep_over_an_unknown_loss_is_refused_before_it_runs():
    with pytest.raises(SweepError, match=r"loss\.name: unknown loss 'foo'"):
        check_sweep(Sweep(name="s", base=None, grid={"loss.name": ["balanced", "foo"]}, seeds=1))


def test_an_unquoted_list_of_key_value_items_gets_the_override_that_parses():
    """data.view_overrides=[crop_scale=[0.08,1.0], size=32] is not YAML; the error spells the quoted override, and
    that override, as a shell passes it, gives the list meant."""
    import shlex

    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.view_overrides=[crop_scale=[0.08,1.0], size=32]"])
    fix = str(err.value).split("the argument for the shell: ")[1]
    assert fix == """'data.view_overrides=["crop_scale=[0.08,1.0]", "size=32"]'"""
    assert load_config(None, shlex.split(fix)).data.view_overrides == ["crop_scale=[0.08,1.0]", "size=32"]
