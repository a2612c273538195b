"""Small hand-written PyTorch classifiers used as oracles for the engine (tests and benchmarks).

Every builder returns a model in eval mode with random weights and randomised BatchNorm running
statistics and affine parameters, so BatchNorm folding changes the weights nontrivially.
``export`` writes one to ONNX with a dynamic batch dimension and the input named ``input``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.1)
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
    return model.eval()


def _conv_bn(cin, cout, k, stride=1, groups=1):
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs plus identity, or a strided 1x1 conv-BN shortcut when the shape changes."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *_conv_bn(cout, cout, 3))
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth, in_ch, width, classes):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth {depth} is not 6n+2")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(*_conv_bn(in_ch, width, 3), nn.ReLU(inplace=True))
        blocks, cin = [], width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet_cifar(depth=20, in_ch=3, width=16, classes=10, seed=0) -> nn.Module:
    """ResNet-20-style CIFAR net: 3 stages of basic blocks, residual Add, strided 1x1 conv+BN shortcuts."""
    torch.manual_seed(seed)
    return _randomize_batchnorm(ResNetCifar(depth, in_ch, width, classes), seed + 1)


class ResNet18(nn.Module):
    def __init__(self, in_ch, classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.pool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet18(in_ch=3, classes=1000, seed=0) -> nn.Module:
    """The ImageNet ResNet-18 layout: 7x7/2 stem, 3x3/2 max pool, 4 stages of 2 basic blocks."""
    torch.manual_seed(seed)
    return _randomize_batchnorm(ResNet18(in_ch, classes), seed + 1)


class InvertedResidual(nn.Module):
    """1x1 expansion, depthwise 3x3, 1x1 linear projection; residual Add when shapes match."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True),
                   *_conv_bn(hidden, cout, 1)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


def _round_channels(c, width_mult):
    return max(4, int(round(c * width_mult / 4)) * 4)


class MobileNetV2Small(nn.Module):
    # (expansion, channels, repeats, stride) per stage: a shortened MobileNetV2 schedule
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 1, 2))

    def __init__(self, in_ch, classes, width_mult):
        super().__init__()
        cin = _round_channels(32, width_mult)
        layers = [*_conv_bn(in_ch, cin, 3), nn.ReLU6(inplace=True)]
        for t, c, n, s in self.STAGES:
            cout = _round_channels(c, width_mult)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        last = _round_channels(128, width_mult)
        layers += [*_conv_bn(cin, last, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv2_small(in_ch=3, classes=10, width_mult=0.5, seed=0) -> nn.Module:
    """A MobileNetV2-style net: inverted residuals with expansion, depthwise 3x3, ReLU6, residual Add."""
    torch.manual_seed(seed)
    return _randomize_batchnorm(MobileNetV2Small(in_ch, classes, width_mult), seed + 1)


class SqueezeExcite(nn.Module):
    """x * sigmoid(expand(relu(reduce(mean(x))))); 1x1 convs after a global average pool, or Linear
    layers after a spatial mean (ReduceMean) with ``x.view(b, c, 1, 1)`` to broadcast back."""

    def __init__(self, channels, reduction, linear):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.linear = linear
        if linear:
            self.reduce, self.expand = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        else:
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.reduce, self.expand = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)
        with torch.no_grad():
            self.reduce.bias.uniform_(0.1, 0.5)  # keep the few hidden units alive for the gradient tests

    def forward(self, x):
        if self.linear:
            s = x.mean((2, 3))
            s = torch.sigmoid(self.expand(torch.relu(self.reduce(s))))
            return x * s.view(x.size(0), x.size(1), 1, 1)
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(self.pool(x)))))
        return x * s


class SENet(nn.Module):
    def __init__(self, in_ch, classes, width, reduction):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_ch, width, 3), nn.ReLU(inplace=True), SqueezeExcite(width, reduction, linear=False),
            *_conv_bn(width, 2 * width, 3, 2), nn.ReLU(inplace=True), SqueezeExcite(2 * width, reduction, linear=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


def se_net(in_ch=3, classes=10, width=16, reduction=4, seed=0) -> nn.Module:
    """Two conv-BN-ReLU stages, each followed by a squeeze-excite block (conv form, then Linear form)."""
    torch.manual_seed(seed)
    return _randomize_batchnorm(SENet(in_ch, classes, width, reduction), seed + 1)


class VGGSmall(nn.Module):
    def __init__(self, in_ch, classes, width, hidden, image_size):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_ch, width, 3), nn.ReLU(inplace=True), *_conv_bn(width, width, 3), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            *_conv_bn(width, 2 * width, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        flat = 2 * width * (image_size // 4) ** 2
        self.fc1 = nn.Linear(flat, hidden)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def vgg_small(in_ch=3, classes=10, width=8, hidden=32, image_size=16, seed=0) -> nn.Module:
    """VGG-style: Conv-BN-ReLU, MaxPool, ``x.view(x.size(0), -1)`` flatten, two Linear layers."""
    torch.manual_seed(seed)
    return _randomize_batchnorm(VGGSmall(in_ch, classes, width, hidden, image_size), seed + 1)


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d that directly follows a Conv2d in a Sequential folded
    into it (what the dynamo exporter's optimiser does), the BatchNorm replaced by Identity."""
    model = copy.deepcopy(model).eval()
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
                seq[i + 1] = nn.Identity()
    for p in model.parameters():
        p.requires_grad_(True)  # fuse_conv_bn_eval makes the new bias a constant
    return model


def export(model: nn.Module, path, x: torch.Tensor, exporter: str = "torchscript", opset: int | None = None,
           keep_batchnorm: bool = True) -> None:
    """Write ``model`` to ONNX at ``path`` with input ``input``, output ``logits`` and a dynamic batch.

    ``exporter`` is ``"torchscript"`` (default opset 17) or ``"dynamo"`` (default opset 18). With
    ``keep_batchnorm`` the TorchScript exporter leaves BatchNormalization nodes in the graph (its
    eval-mode export would fuse them into the convs); initializer names are then the parameter names.
    """
    model.eval()
    path = str(path)
    if exporter == "torchscript":
        training = torch.onnx.TrainingMode.PRESERVE if keep_batchnorm else torch.onnx.TrainingMode.EVAL
        torch.onnx.export(model, (x,), path, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset or 17, training=training, dynamo=False)
    elif exporter == "dynamo":
        torch.onnx.export(model, (x,), path, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset or 18,
                          dynamo=True, verbose=False)
    else:
        raise ValueError(f"exporter '{exporter}' is not 'torchscript' or 'dynamo'")
