"""Encoder: every backbone in the table, the CIFAR stem, the projector, raw (unnormalized) z, decay groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from protoclr.config import ModelConfig
from protoclr.models import BACKBONES, Encoder, Projector, build_encoder, param_groups

FEATURES = {"resnet18": 512, "resnet50": 2048, "convnet": 256}


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_h_and_z(name):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=name, small_images=True, projector_hidden_dim=64, projector_dim=16)
    enc = build_encoder(cfg, in_channels=3)
    assert isinstance(enc, Encoder) and isinstance(enc.backbone, nn.Module) and isinstance(enc.projector, nn.Module)
    h, z = enc(torch.randn(4, 3, 16, 16))  # small input keeps the resnet50 case fast
    assert h.shape == (4, FEATURES[name]) and enc.feature_dim == FEATURES[name]
    assert z.shape == (4, 16) and enc.out_dim == 16
    # z is not normalized by the model: the loss's similarity decides.
    assert not torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-3)
    h.sum().backward()
    assert all(p.grad is not None for p in enc.backbone.parameters())


def test_small_images_stem_keeps_resolution():
    cifar = build_encoder(ModelConfig(backbone="resnet18", small_images=True), in_channels=3)
    imagenet = build_encoder(ModelConfig(backbone="resnet18", small_images=False), in_channels=3)
    assert cifar.backbone.conv1.kernel_size == (3, 3) and cifar.backbone.conv1.stride == (1, 1)
    assert isinstance(cifar.backbone.maxpool, nn.Identity)
    assert imagenet.backbone.conv1.kernel_size == (7, 7) and isinstance(imagenet.backbone.maxpool, nn.MaxPool2d)
    x = torch.randn(2, 3, 32, 32)
    # layer4 sees 4x4 with the CIFAR stem, 1x1 with the ImageNet stem
    def layer4_hw(net):
        b = net.backbone
        y = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(y)))).shape[-1]

    assert layer4_hw(cifar) == 4 and layer4_hw(imagenet) == 1
    gray = build_encoder(ModelConfig(backbone="resnet18"), in_channels=1)
    assert gray(torch.randn(2, 1, 28, 28))[0].shape == (2, 512)


@pytest.mark.parametrize("layers", [0, 1, 2, 3])
def test_projector_depth(layers):
    p = Projector(32, hidden_dim=24, out_dim=8, num_layers=layers)
    linears = [m for m in p.modules() if isinstance(m, nn.Linear)]
    bns = [m for m in p.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == layers and len(bns) == max(layers - 1, 0)
    assert p(torch.randn(5, 32)).shape == (5, 8 if layers else 32)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_norm_choice(norm):
    enc = build_encoder(ModelConfig(norm=norm, projector_hidden_dim=32, projector_dim=8), in_channels=1)
    kinds = {type(m) for m in enc.modules()}
    assert (nn.BatchNorm2d in kinds) == (norm == "batch") and (nn.GroupNorm in kinds) == (norm == "group")
    if norm != "batch":  # batch-independent: one sample's features do not depend on the rest of the batch
        x = torch.randn(6, 1, 28, 28)
        h_all, _ = enc(x)
        h_one, _ = enc(x[:1])
        torch.testing.assert_close(h_all[:1], h_one, rtol=1e-5, atol=1e-5)


def test_no_weight_decay_on_biases_and_norms():
    enc = build_encoder(ModelConfig(projector_hidden_dim=32, projector_dim=8), in_channels=1)
    decay, no_decay = param_groups(enc, weight_decay=1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"]
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    norm_params = {id(p) for m in enc.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))
                   for p in m.parameters()}
    assert norm_params and norm_params <= {id(p) for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(enc.parameters()))


def test_unknown_backbone_names_the_key():
    with pytest.raises(ValueError, match=r"model\.backbone"):
        build_encoder(ModelConfig(backbone="vit"), in_channels=3)


def test_a_list_of_batches_is_encoded_part_by_part():
    """Multi-crop: global and local views of different sizes in one forward, BatchNorm statistics per part."""
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(projector_hidden_dim=32, projector_dim=16, convnet_widths=[8, 16]),
                        in_channels=3).train()
    a, b = torch.randn(6, 3, 32, 32), torch.randn(9, 3, 16, 16)
    h, z = enc([a, b])
    h_ref = torch.cat([enc.backbone(a), enc.backbone(b)])  # train mode: the same per-part batch statistics
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(z, enc.projector(h_ref))
    assert h.shape == (15, 16) and z.shape == (15, 16)


def test_convnet_widths_set_depth_and_width():
    enc = build_encoder(ModelConfig(convnet_widths=[16, 48, 40]), in_channels=1)
    convs = [m for m in enc.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 48, 40] and enc.feature_dim == 40


# ----------------------------------------------------------------------------------------------------------
# timm backbones (model.backbone=timm/<name>) and the decay groups of a ViT

# (timm name, ModelConfig options, F): a ViT at CIFAR resolution, a CNN, and a model whose pooled features pass a
# head first (MobileNetV3: head_hidden_size 1024 differs from num_features 576)
TIMM_CASES = [
    ("vit_tiny_patch16_224", {"timm_img_size": 32, "timm_patch_size": 4}, 192),
    ("resnet18", {}, 512),
    ("mobilenetv3_small_050", {}, 1024),
]


@pytest.mark.parametrize(("name", "options", "dim"), TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_a_timm_backbone_gives_timms_own_pooled_features(name, options, dim):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(backbone=f"timm/{name}", projector_hidden_dim=32, projector_dim=8, **options),
                        in_channels=1).eval()
    x = torch.randn(3, 1, 32, 32)
    h, z = enc(x)
    assert h.shape == (3, dim) and enc.feature_dim == dim and z.shape == (3, 8)
    # the reference: the model as a timm user builds it, with the same weights loaded strictly
    kw = {k.removeprefix("timm_"): v for k, v in options.items()}
    ref = timm.create_model(name, pretrained=False, num_classes=0, in_chans=1, **kw).eval()
    ref.load_state_dict(enc.backbone.state_dict(), strict=True)
    torch.testing.assert_close(h, ref(x), rtol=0, atol=0)


def test_timm_options_a_model_does_not_take_are_a_config_error():
    pytest.importorskip("timm")
    from protoclr.config import ConfigError

    with pytest.raises(ConfigError, match=r"model\.timm_img_size: timm model 'resnet18' does not take img_size"):
        build_encoder(ModelConfig(backbone="timm/resnet18", timm_img_size=32), in_channels=3)


def test_unknown_backbones_get_the_closest_name():
    from protoclr.config import ConfigError
    from protoclr.models import check_backbone

    with pytest.raises(ConfigError, match=r"model\.backbone: unknown backbone 'resnet19'; did you mean 'resnet18'"):
        check_backbone("resnet19")
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match=r"timm has no model 'vit_tiny_patch16_22'; did you mean "
                                          r"timm/vit_tiny_patch16_224\?"):
        check_backbone("timm/vit_tiny_patch16_22")
    check_backbone("timm/vit_tiny_patch16_224.augreg_in21k")  # a pretrained tag names the same architecture


def test_a_timm_backbone_without_timm_names_the_extra(monkeypatch):
    import sys

    from protoclr.errors import MissingExtra, UserError
    from protoclr.models import check_backbone

    monkeypatch.setitem(sys.modules, "timm", None)  # what an environment without timm sees on import
    with pytest.raises(MissingExtra, match=r"model\.backbone=timm/resnet18 needs the timm package.*"
                                           r"pip install 'protoclr\[timm\]'") as e:
        check_backbone("timm/resnet18")
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


def test_vit_tokens_and_position_embeddings_get_no_decay_and_no_lars_adaptation():
    pytest.importorskip("timm")
    enc = build_encoder(ModelConfig(backbone="timm/vit_tiny_patch16_224", timm_img_size=32, timm_patch_size=4,
                                    projector_hidden_dim=32, projector_dim=8), in_channels=3)
    decay, no_decay = param_groups(enc, weight_decay=0.05)
    names = {id(p): n for n, p in enc.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {"backbone.cls_token", "backbone.pos_embed"} <= exempt and no_decay["lars_exclude"]
    # 3-D and 4-D layer weights still decay: the patch embedding conv and the attention projections
    assert {"backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.weight"} <= decayed
    assert not decay["lars_exclude"] and all(p.ndim >= 2 for p in decay["params"])
    assert len(exempt) + len(decayed) == len(names)


def test_parameters_a_module_declares_decay_free_join_the_exempt_group():
    class Net(nn.Module):  # timm's convention: no_weight_decay() names parameters relative to the module
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.zeros(4, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"table"}

    wrapper = nn.Sequential(Net())
    decay, no_decay = param_groups(wrapper, weight_decay=0.1)
    assert [p.shape for p in no_decay["params"]] == [(4, 4), (4,)]  # the table and the bias
    assert [p.shape for p in decay["params"]] == [(4, 4)] and decay["params"][0] is wrapper[0].proj.weight


def test_convnet_pool_keeps_a_grid_of_the_last_feature_map():
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(convnet_widths=[8, 16], convnet_pool=2, projector_hidden_dim=8, projector_dim=4),
                        in_channels=1).eval()
    x = torch.randn(3, 1, 28, 28)
    fmap = enc.backbone.features(x)  # (3, 16, 14, 14)
    want = fmap.view(3, 16, 2, 7, 2, 7).mean(dim=(3, 5)).flatten(1)  # the four 7x7 quadrants' means, channel-major
    torch.testing.assert_close(enc.backbone(x), want)
    assert enc.feature_dim == 64 and enc(x)[1].shape == (3, 4)
