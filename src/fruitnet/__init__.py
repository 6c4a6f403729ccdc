"""fruitnet: fine-tune an ImageNet-pretrained CNN on a folder of photos."""

__version__ = "0.1.0"
