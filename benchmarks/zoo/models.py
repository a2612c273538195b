"""The zoo's architectures, written out in plain PyTorch (no torchvision).

All take a (N, 1, 28, 28) input normalised with the Fashion-MNIST mean/std and return 10 logits.
BatchNorm stays in the exported graph: bwacal folds it itself.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN with a residual Add; a strided 1x1 Conv-BN shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *conv_bn(cout, cout, 3))
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (He et al. 2016, CIFAR variant): stages of 16/32/64 channels, 3 BasicBlocks each."""

    def __init__(self, num_classes: int = 10, widths=(16, 32, 64), blocks_per_stage: int = 3):
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(1, widths[0]), nn.ReLU(inplace=True)]
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                layers.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), depthwise 3x3 (ReLU6), 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += conv_bn(hidden, cout, 1)
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2Small(nn.Module):
    """A small MobileNetV2 for 28x28 inputs; ``config`` rows are (expansion t, channels c, repeats n, stride s)."""

    config = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 1))

    def __init__(self, num_classes: int = 10, stem: int = 16, head: int = 256):
        super().__init__()
        layers: list[nn.Module] = [*conv_bn(1, stem), nn.ReLU6(inplace=True)]
        cin = stem
        for t, c, n, s in self.config:
            for j in range(n):
                layers.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
                cin = c
        layers += [*conv_bn(cin, head, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class VGGSmall(nn.Module):
    """Plain VGG-style net: Conv-BN-ReLU pairs, MaxPool, Flatten, two Linear (Gemm) layers."""

    def __init__(self, num_classes: int = 10, widths=(32, 64, 128), hidden: int = 256):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for i, w in enumerate(widths):
            layers += [*conv_bn(cin, w), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers += [*conv_bn(w, w), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        side = 28 // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Linear(cin * side * side, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


ARCHITECTURES = {
    "resnet20": ResNet20,
    "mobilenetv2": MobileNetV2Small,
    "vgg_small": VGGSmall,
}
