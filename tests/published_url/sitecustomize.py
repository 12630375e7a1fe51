"""Test plumbing, on PYTHONPATH only for the processes test_pretrained.py starts: torchvision's
ResNet-18 weights point at the test's own file name (its sha256 prefix in the name, as published
files have), so the hand-made "published" weights in the test's torch hub cache pass the hash check."""

import os

url = os.environ.get("IMAGENET_RESNET_TEST_RESNET18_URL")
if url:
    import torchvision

    torchvision.models.ResNet18_Weights.IMAGENET1K_V1.value.url = url
