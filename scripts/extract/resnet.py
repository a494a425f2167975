"""ResNet-152 in plain PyTorch with torchvision's state-dict keys (2D stream).

torchvision cannot be installed beside this torch build, so the network is written here with
the same module names (``conv1``, ``bn1``, ``layer1``..``layer4`` of ``Bottleneck`` blocks with
``conv1/bn1/conv2/bn2/conv3/bn3/downsample.0/downsample.1``, ``fc``): torchvision's checkpoint
files (e.g. ``resnet152-b121ed2d.pth``, ImageNet V1) load unchanged. torchvision's "V1.5"
layout is used: the stride sits on the 3x3 convolution. Only the 2048-d global-average-pooled
features are computed; ``fc`` exists so the checkpoint's keys match.
"""
from __future__ import annotations

import torch
from torch import nn

from scripts.extract.recipe import RESNET_DIM, RESNET_MEAN, RESNET_STD

RESNET152_LAYERS = (3, 8, 36, 3)
EXPANSION = 4


class Bottleneck(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride,
                                                      bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet; ``layers`` = blocks per stage ((3, 8, 36, 3) is ResNet-152)."""

    def __init__(self, layers=RESNET152_LAYERS, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = 64
        for idx, depth in enumerate(layers):
            planes = 64 * 2 ** idx
            blocks = []
            for b in range(depth):
                blocks.append(Bottleneck(in_planes, planes, 2 if b == 0 and idx > 0 else 1))
                in_planes = planes * EXPANSION
            setattr(self, f"layer{idx + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 2048) pooled layer4 features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _init(model: nn.Module) -> None:
    """torchvision's initialisation, so random-weight runs (tests) have sane activations."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def resnet152(layers=RESNET152_LAYERS) -> ResNet:
    """ResNet-152 with random weights; ``layers`` may be shrunk (tests) keeping 2048-d output."""
    return ResNet(layers)


class ResNetStream(nn.Module):
    """uint8 frames ``(B, H, W, 3)`` -> ``(B, 2048)`` float32 features (normalises itself)."""

    name = "resnet"
    dim = RESNET_DIM

    def __init__(self, net: ResNet):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(RESNET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(RESNET_STD).view(1, 3, 1, 1), False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 3, 1, 2).float().div_(255)
        x = (x - self.mean) / self.std
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net.features(x).float()
