#!/usr/bin/env bash
# Pretrain an encoder on your own images from the command line, then export it for torchvision.
#
#   examples/train_image_folder.sh path/to/images                     # <class>/<image> folders (or a .zip of them)
#   examples/train_image_folder.sh path/to/images train.epochs=50 model.backbone=resnet50 trainer.devices=4
#
# The folder is <class>/<image> (unlabeled images: put them all in one class folder; labels only feed the kNN and
# online-probe monitors, never the loss), or holds train/ and test/ trees of that layout (or train.zip, test.zip);
# with one tree, the monitors score the training images themselves. Images of any size: same-size images are
# decoded once into memory (cached under $PROTOCLR_CACHE, default ~/.cache/protoclr); mixed sizes are decoded batch
# by batch and the views cropped from the full images.
# Extra arguments are config overrides (`protoclr pretrain --print-config` lists every key). Running it again
# continues the run in $OUT_DIR/my_images (default runs/); remove that folder to start over.
set -euo pipefail
images=${1:?usage: examples/train_image_folder.sh PATH/TO/IMAGES [key=value ...]}
shift
out=${OUT_DIR:-runs}

# 32-px SimCLR views and a ResNet-18 with the small-image stem: a start for small photos; for large ones use
# data.views=simclr (224 px) model.small_images=false
protoclr pretrain data.dataset=image_folder data.root="$images" data.views=simclr_cifar \
    model.backbone=resnet18 train.epochs=100 train.batch_size=256 \
    train.out_dir="$out" train.run_name=my_images "$@"

# the backbone as a state dict for torchvision.models.resnet18 (the command prints the lines that load it)
protoclr export "$out/my_images" --format torchvision --out "$out/my_images/backbone_torchvision.pt"
