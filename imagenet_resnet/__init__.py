"""imagenet-resnet: ResNet-family image classifiers on ImageNet and CIFAR, one trainer.

    python -m imagenet_resnet.train --config configs/cifar10_resnet20.yaml data.root=data
    torchrun --nproc_per_node=8 -m imagenet_resnet.train --config configs/imagenet_resnet50.yaml
"""

__version__ = "0.1.0"
