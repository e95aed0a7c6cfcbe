"""Load an exported protoclr encoder into plain torchvision or timm and fine-tune it with a classifier head.

    protoclr export runs/NAME --format torchvision --out resnet18.pt      # a ResNet-18 run (small_images=true)
    python examples/finetune_exported.py resnet18.pt --library torchvision --small-images --in-channels 3 \\
        --images path/to/labeled/images                                   # <class>/<image> folders
    python examples/finetune_exported.py resnet18.pt --library timm --small-images --in-channels 3

The export is a state dict with torchvision's keys and no ``fc``; timm's ResNets use the same keys, so the same
file loads into ``torchvision.models.resnet18()`` and ``timm.create_model("resnet18")``, each with the two lines of
protoclr's small-image stem when the run had ``model.small_images=true`` (``protoclr export`` prints them).
Without ``--images`` it fine-tunes on torchvision's ``FakeData`` (random images and labels: it shows the mechanics,
not an accuracy). ``--mean`` / ``--std`` must be the run's normalization (printed by ``protoclr export``).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torchvision
from torchvision.transforms import v2


def load_backbone(path: str, *, library: str, arch: str, in_channels: int, small_images: bool) -> nn.Module:
    """The exported backbone in the chosen library's own model, loaded with ``strict=True``: ``(B, C, s, s) ->
    (B, F)`` features."""
    if library == "torchvision":
        model = getattr(torchvision.models, arch)()
        model.fc = nn.Identity()  # protoclr exports features, no classifier
    else:
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_channels)
    if small_images:  # protoclr's small-image stem: a 3x3 stride-1 conv and no max-pool
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3 and library == "torchvision":
        model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("weights", help="a file written by protoclr export --format torchvision")
    p.add_argument("--library", choices=["torchvision", "timm"], default="torchvision")
    p.add_argument("--arch", default="resnet18", help="resnet18 or resnet50, as the run's model.backbone")
    p.add_argument("--small-images", action="store_true", help="the run had model.small_images=true")
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32, help="input side in pixels (the run's view size)")
    p.add_argument("--mean", type=float, nargs="+", default=[0.4914, 0.4822, 0.4465])
    p.add_argument("--std", type=float, nargs="+", default=[0.247, 0.2435, 0.2616])
    p.add_argument("--images", help="labeled images in <class>/<image> folders; default: random FakeData")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)

    backbone = load_backbone(args.weights, library=args.library, arch=args.arch, in_channels=args.in_channels,
                             small_images=args.small_images)
    prepare = v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(args.size, scale=(0.5, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.Grayscale() if args.in_channels == 1 else v2.Identity(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(args.mean, args.std),
    ])
    if args.images:
        data = torchvision.datasets.ImageFolder(args.images, transform=prepare)
        num_classes = len(data.classes)
    else:
        num_classes = 10
        data = torchvision.datasets.FakeData(size=args.steps * args.batch_size, image_size=(3, args.size, args.size),
                                             num_classes=num_classes, transform=prepare)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)

    features = backbone(torch.zeros(1, args.in_channels, args.size, args.size)).shape[1]  # F: 512 for a ResNet-18
    model = nn.Sequential(backbone, nn.Linear(features, num_classes))
    # the pretrained backbone moves slower than the new head (a common fine-tuning default)
    optimizer = torch.optim.AdamW([{"params": backbone.parameters(), "lr": 1e-4},
                                   {"params": model[1].parameters(), "lr": 1e-3}], weight_decay=0.05)
    model.train()
    step = 0
    while step < args.steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % 20 == 0 or step == args.steps - 1:
                print(f"step {step}: cross-entropy {loss.item():.4f}")
            step += 1
            if step == args.steps:
                break
    print(f"done: fine-tuned {args.arch} ({args.library}) with a {num_classes}-class head")


if __name__ == "__main__":
    main()
