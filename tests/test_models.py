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
