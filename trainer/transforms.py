"""Preprocessing that the device reproduces exactly.

Evaluation preprocessing is deliberately the simplest thing a numpy-only runtime can copy:
resize the whole image to the input size (PIL bilinear), scale to 0..1, normalize per channel.
Training adds only label-preserving, orientation-free augmentations: overhead imagery has no
"up", so flips and 90-degree rotations are free data.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomRot90:
    def __call__(self, img):
        from PIL import Image

        k = int(torch.randint(0, 4, ()).item())
        if k == 0:
            return img
        return img.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[k - 1])


def eval_transform(size: Sequence[int], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(tuple(size), interpolation=T.InterpolationMode.BILINEAR),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def train_transform(size: Sequence[int], mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(tuple(size), interpolation=T.InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip(),
            RandomRot90(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
