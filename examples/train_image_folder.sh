#!/usr/bin/env bash
# Pretrain an encoder on your own images from the command line, then export it.
#
#   examples/train_image_folder.sh path/to/images                     # <class>/<image> folders (or a .zip of them)
#   examples/train_image_folder.sh path/to/images model.backbone=resnet18 train.epochs=100 trainer.devices=4  # GPUs
#
# The default is laptop-sized: protoclr's small convnet for 10 epochs at batch 128 on the CPU (seconds for a few
# hundred images, minutes for tens of thousands). On a GPU, pass model.backbone=resnet18 train.epochs=100 (or
# resnet50, more epochs): the ResNet-18 for 100 epochs takes about an hour for 400 images on a laptop CPU.
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

# The views fit the images: grey or RGB, at their size up to 224 px (one printed line says what was chosen;
# data.views=... chooses instead). For large photos on a GPU add model.small_images=false (ResNet's own stem).
protoclr pretrain data.dataset=image_folder data.root="$images" \
    model.backbone=convnet train.epochs=10 train.batch_size=128 \
    train.out_dir="$out" train.run_name=my_images "$@"

# A ResNet as a state dict for torchvision.models.resnet18/50 (examples/finetune_exported.py loads it); any other
# backbone as safetensors with the config in its header. The command prints the lines that load the file.
backbone=convnet
for arg in "$@"; do
    case $arg in model.backbone=*) backbone=${arg#model.backbone=} ;; esac
done
case $backbone in
    resnet*) protoclr export "$out/my_images" --format torchvision --out "$out/my_images/backbone_torchvision.pt" ;;
    *) protoclr export "$out/my_images" --format safetensors --out "$out/my_images/backbone.safetensors" ;;
esac
