"""Your own images: a folder of class folders, torchvision's ImageFolder layout.

Layout:   DATA/train/<class name>/<images>, DATA/test/<class name>/<images> (or DATA/val/): JPEG,
          PNG, BMP or WebP files of any size and colour mode; class names sorted, label = index;
          as many classes as there are folders (num_classes 0: taken from the folders).
Run it:   python -m resnet_flax.main --config=configs/imagefolder.py --config.data_dir=DATA --workdir=runs/mine
Then:     python -m resnet_flax.evaluate --workdir=runs/mine     (per-class accuracy, confusion matrix)
          python -m resnet_flax.predict --workdir=runs/mine photo.jpg   (prints the class's name)
Recipe:   configs/signs_best.py's (the assignment's ResNet-50, Adam, warm-up and cosine decay, the
          on-device shifts and flips), every image resized whole to 64x64 on the host. For photos
          of ImageNet's kind: --config.image_size=224 --config.preprocessing=imagenet (random
          resized crops and flips in training, the centre crop in evaluation) and, for speed, a
          smaller member: --config.model=resnet18 --config.variant=torchvision.
          The images are decoded in threads as batches need them (config.data_threads), never
          all held in memory; a checkpoint every 100 steps, and on SIGTERM, lets a killed run
          resume at the next batch.
Expect:   SIGNS written out as such a folder of PNGs (experiments/signs_as_imagefolder.py): Test
          Accuracy 0.992 (119 of 120; one "2" taken for a "1"), 12 minutes start to end on a
          2-core AMD EPYC (22 s per epoch: SIGNS from memory, configs/signs.py, takes 19-24 s there).
"""

from pathlib import Path

from resnet_flax.config import load_config_file


def get_config():
    config = load_config_file(Path(__file__).with_name("signs_best.py"))  # its recipe, from scratch
    config.dataset = "imagefolder"
    config.data_dir = ""  # required: --config.data_dir=DATA
    config.num_classes = 0  # as many as the class folders
    config.image_size = 64
    config.preprocessing = "resize"
    config.checkpoint_every_steps = 100
    return config
