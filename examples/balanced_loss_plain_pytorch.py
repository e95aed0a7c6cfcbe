"""The balanced contrastive loss in a plain PyTorch loop: your encoder, your DataLoader, your optimizer.

    python examples/balanced_loss_plain_pytorch.py                             # 20 steps of 128 random images
    python examples/balanced_loss_plain_pytorch.py --steps 3 --batch-size 16   # what the test suite runs

On a CPU a step takes seconds: 20 steps took 80 s of CPU time on a busy 2-core machine (2.5 min of wall time
there). Raise ``--steps`` on a GPU or a faster machine.

protoclr contributes one line, the loss: ``BalancedContrastiveLoss(alpha, lam)(z1, z2)`` on the projections of two
augmented views of each image, ``z1, z2`` each ``(B, D)``. Everything else is ordinary PyTorch you can replace:
``TwoViews`` wraps any dataset of images (here torchvision's ``FakeData``, random pictures, so that the script runs
anywhere; put ``torchvision.datasets.ImageFolder("path/to/images")`` or your own ``Dataset`` in its place), the
encoder is any ``nn.Module`` that returns a feature vector per image.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torchvision
from torchvision.transforms import v2

from protoclr.losses import BalancedContrastiveLoss


class TwoViews(torch.utils.data.Dataset):
    """Two independent random augmentations of each image of ``images`` (labels are not used)."""

    def __init__(self, images: torch.utils.data.Dataset, augment: v2.Transform):
        self.images, self.augment = images, augment

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, _label = self.images[i]
        return self.augment(image), self.augment(image)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)

    # SimCLR's CIFAR augmentations (Chen et al. 2020), 32 px
    augment = v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(32, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
    ])
    images = torchvision.datasets.FakeData(size=args.steps * args.batch_size, image_size=(3, 40, 40))
    loader = torch.utils.data.DataLoader(TwoViews(images, augment), batch_size=args.batch_size, shuffle=True,
                                         drop_last=True)

    encoder = nn.Sequential(  # your backbone: (B, 3, 32, 32) -> (B, 128) features
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    projector = nn.Sequential(nn.Linear(128, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 64))
    loss_fn = BalancedContrastiveLoss(alpha=2.0, lam=1.0)  # the loss, scaled by 1/alpha (docs/losses.md)
    params = [*encoder.parameters(), *projector.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.3 * args.batch_size / 256, momentum=0.9, weight_decay=5e-4)

    for step, (x1, x2) in enumerate(loader):
        if step == args.steps:
            break
        z1, z2 = projector(encoder(x1)), projector(encoder(x2))  # (B, D) each
        loss = loss_fn(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 20 == 0 or step == args.steps - 1:
            print(f"step {step}: balanced loss {loss.item():.4f}")
    print("done: `encoder` is the pretrained backbone; torch.save(encoder.state_dict(), path) keeps it")


if __name__ == "__main__":
    main()
