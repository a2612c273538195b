"""Compact PyTorch versions of the architecture families in issue 15's corpus.

Each follows torchvision's definition of the family (timm's for the TF "same" padding and the
explicit-Q/K/V attention, which torchvision does not have) with the same graph structure and
smaller widths and depths: the ops, their attributes and the way tensors are split, concatenated,
reshaped and broadcast are what the corpus tests, not the size. Every builder returns an eval-mode
model with seeded random weights, randomised BatchNorm running statistics and affine parameters,
randomised LayerNorm affine parameters, and 10 classes; ``BUILDERS`` maps a name to
``(builder, image size)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_models import _randomize_batchnorm


def _finish(model: nn.Module, seed: int) -> nn.Module:
    """Randomise BatchNorm statistics, LayerNorm affine parameters and every other parameter that
    starts constant (nn.MultiheadAttention's biases start at zero); eval mode.

    No two parameters may hold equal values: the dynamo exporter stores equal initializers once
    (two zero biases become one initializer read by both layers), and the gradient tests map
    initializers to parameters by their values.
    """
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
        for p in model.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.copy_(torch.rand(p.shape, generator=g) * 0.2 - 0.1)
    return _randomize_batchnorm(model, seed + 1)


def _make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never below 90% of ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias), BatchNorm2d, optional activation: torchvision's Conv2dNormActivation.

    A Sequential, so ``tests.torch_models.fuse_batchnorm`` finds every Conv-BatchNorm pair.
    """

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU, padding=None, eps=1e-5):
        ks = (k, k) if isinstance(k, int) else tuple(k)
        if padding is None:
            padding = tuple((d - 1) // 2 for d in ks)
        layers = [nn.Conv2d(cin, cout, ks, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=eps)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's: global average pool, 1x1 conv, activation, 1x1 conv, gate, channel-wise product."""

    def __init__(self, channels, squeeze, act=nn.ReLU, gate=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.act, self.gate = act(), gate()
        with torch.no_grad():
            self.fc1.bias.uniform_(0.1, 0.5)  # keep the few squeeze units alive for the gradient tests

    def forward(self, x):
        return x * self.gate(self.fc2(self.act(self.fc1(self.avgpool(x)))))


class StochasticDepth(nn.Module):
    """torchvision's row-mode stochastic depth: the identity in eval mode, which is what gets exported."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def _transform_input(x):
    """GoogLeNet's and Inception-v3's ``transform_input``: per-channel affine map via ``x[:, i]``."""
    x0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
    x1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
    x2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
    return torch.cat((x0, x1, x2), 1)


# ---------------------------------------------------------------------------------------------
# ResNet-50 and ResNeXt: bottleneck blocks, stride on the 3x3 (v1.5), grouped 3x3 for ResNeXt

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride, groups, base_width):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        cout = planes * self.expansion
        self.body = nn.Sequential(ConvBNAct(cin, width, 1), ConvBNAct(width, width, 3, stride, groups),
                                  ConvBNAct(width, cout, 1, act=None))
        self.downsample = ConvBNAct(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.body(x) + identity)


class ResNet(nn.Module):
    def __init__(self, layers, planes, groups=1, base_width=64, stem=64, classes=10):
        super().__init__()
        self.stem = nn.Sequential(ConvBNAct(3, stem, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], stem
        for i, (n, p) in enumerate(zip(layers, planes)):
            for j in range(n):
                blocks.append(Bottleneck(cin, p, 2 if i > 0 and j == 0 else 1, groups, base_width))
                cin = p * Bottleneck.expansion
        self.layers = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.avgpool(self.layers(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def resnet50(seed=0):
    """ResNet-50's layout (7x7/2 stem, max pool, 4 bottleneck stages) at 1/8 width, 2-1-1-1 blocks."""
    torch.manual_seed(seed)
    return _finish(ResNet((2, 1, 1, 1), (8, 16, 32, 64), stem=8), seed)


def resnext(seed=0):
    """ResNeXt's layout with 32 groups (32x8d's width per plane, at 1/8 of its planes), one block a stage."""
    torch.manual_seed(seed)
    return _finish(ResNet((1, 1, 1, 1), (8, 16, 32, 64), groups=32, base_width=8, stem=16), seed)


# ---------------------------------------------------------------------------------------------
# DenseNet-121: pre-activation dense layers over the concatenation of all earlier features

class DenseLayer(nn.Module):
    def __init__(self, cin, growth, bn_size):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True),
                                  nn.Conv2d(cin, bn_size * growth, 1, bias=False),
                                  nn.BatchNorm2d(bn_size * growth), nn.ReLU(inplace=True),
                                  nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False))

    def forward(self, features):
        return self.body(torch.cat(features, 1))


class DenseBlock(nn.ModuleList):
    def __init__(self, n, cin, growth, bn_size):
        super().__init__(DenseLayer(cin + i * growth, growth, bn_size) for i in range(n))

    def forward(self, x):
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    def __init__(self, blocks, growth, init_features, bn_size=4, classes=10):
        super().__init__()
        layers = [nn.Conv2d(3, init_features, 7, 2, 3, bias=False), nn.BatchNorm2d(init_features),
                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
        c = init_features
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, c, growth, bn_size))
            c += n * growth
            if i != len(blocks) - 1:  # transition: BN-ReLU-1x1 conv halving the channels, 2x2 average pool
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.Conv2d(c, c // 2, 1, bias=False),
                           nn.AvgPool2d(2, 2)]
                c //= 2
        layers.append(nn.BatchNorm2d(c))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.features(x), inplace=True)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


def densenet121(seed=0):
    """DenseNet-121's layout (4 dense blocks, 3 transitions, bottleneck factor 4), growth 4, 2 layers a block."""
    torch.manual_seed(seed)
    return _finish(DenseNet((2, 2, 2, 2), growth=4, init_features=8), seed)


# ---------------------------------------------------------------------------------------------
# Inception-v3 and GoogLeNet: parallel branches concatenated, BN eps 1e-3, transform_input

def _basic_conv(cin, cout, k, stride=1, padding=0):
    return ConvBNAct(cin, cout, k, stride, padding=padding, eps=0.001)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features, w):
        super().__init__()
        self.branch1x1 = _basic_conv(cin, w(64), 1)
        self.branch5x5 = nn.Sequential(_basic_conv(cin, w(48), 1), _basic_conv(w(48), w(64), 5, padding=2))
        self.branch3x3dbl = nn.Sequential(_basic_conv(cin, w(64), 1), _basic_conv(w(64), w(96), 3, padding=1),
                                          _basic_conv(w(96), w(96), 3, padding=1))
        self.branch_pool = _basic_conv(cin, pool_features, 1)
        self.out_channels = w(64) + w(64) + w(96) + pool_features

    def forward(self, x):
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), self.branch5x5(x), self.branch3x3dbl(x), pool], 1)


class InceptionB(nn.Module):
    def __init__(self, cin, w):
        super().__init__()
        self.branch3x3 = _basic_conv(cin, w(384), 3, stride=2)
        self.branch3x3dbl = nn.Sequential(_basic_conv(cin, w(64), 1), _basic_conv(w(64), w(96), 3, padding=1),
                                          _basic_conv(w(96), w(96), 3, stride=2))
        self.out_channels = w(384) + w(96) + cin

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl(x), F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7, w):
        super().__init__()
        self.branch1x1 = _basic_conv(cin, w(192), 1)
        self.branch7x7 = nn.Sequential(_basic_conv(cin, c7, 1), _basic_conv(c7, c7, (1, 7), padding=(0, 3)),
                                       _basic_conv(c7, w(192), (7, 1), padding=(3, 0)))
        self.branch7x7dbl = nn.Sequential(
            _basic_conv(cin, c7, 1), _basic_conv(c7, c7, (7, 1), padding=(3, 0)),
            _basic_conv(c7, c7, (1, 7), padding=(0, 3)), _basic_conv(c7, c7, (7, 1), padding=(3, 0)),
            _basic_conv(c7, w(192), (1, 7), padding=(0, 3)))
        self.branch_pool = _basic_conv(cin, w(192), 1)
        self.out_channels = 4 * w(192)

    def forward(self, x):
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), self.branch7x7(x), self.branch7x7dbl(x), pool], 1)


class InceptionD(nn.Module):
    def __init__(self, cin, w):
        super().__init__()
        self.branch3x3 = nn.Sequential(_basic_conv(cin, w(192), 1), _basic_conv(w(192), w(320), 3, stride=2))
        self.branch7x7x3 = nn.Sequential(
            _basic_conv(cin, w(192), 1), _basic_conv(w(192), w(192), (1, 7), padding=(0, 3)),
            _basic_conv(w(192), w(192), (7, 1), padding=(3, 0)), _basic_conv(w(192), w(192), 3, stride=2))
        self.out_channels = w(320) + w(192) + cin

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch7x7x3(x), F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, w):
        super().__init__()
        self.branch1x1 = _basic_conv(cin, w(320), 1)
        self.branch3x3_1 = _basic_conv(cin, w(384), 1)
        self.branch3x3_2a = _basic_conv(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = _basic_conv(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = nn.Sequential(_basic_conv(cin, w(448), 1), _basic_conv(w(448), w(384), 3, padding=1))
        self.branch3x3dbl_3a = _basic_conv(w(384), w(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _basic_conv(w(384), w(384), (3, 1), padding=(1, 0))
        self.branch_pool = _basic_conv(cin, w(192), 1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_1(x)
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b3, bd, pool], 1)


class InceptionV3(nn.Module):
    """Stem of 5 convs and 2 max pools, then one block of each of the five Inception types (A-E)."""

    def __init__(self, div=8, classes=10):
        super().__init__()

        def w(c):
            return max(c // div, 2)

        self.stem = nn.Sequential(
            _basic_conv(3, w(32), 3, stride=2), _basic_conv(w(32), w(32), 3), _basic_conv(w(32), w(64), 3, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2), _basic_conv(w(64), w(80), 1), _basic_conv(w(80), w(192), 3),
            nn.MaxPool2d(kernel_size=3, stride=2))
        blocks = [InceptionA(w(192), w(32), w)]
        blocks.append(InceptionB(blocks[-1].out_channels, w))
        blocks.append(InceptionC(blocks[-1].out_channels, w(128), w))
        blocks.append(InceptionD(blocks[-1].out_channels, w))
        blocks.append(InceptionE(blocks[-1].out_channels, w))
        self.blocks = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(blocks[-1].out_channels, classes)

    def forward(self, x):
        x = self.avgpool(self.blocks(self.stem(_transform_input(x))))
        return self.fc(torch.flatten(self.dropout(x), 1))


def inception_v3(seed=0):
    """Inception-v3 (eval: no aux head) at 1/8 width on 75x75, the smallest input its stem allows."""
    torch.manual_seed(seed)
    return _finish(InceptionV3(), seed)


class Inception(nn.Module):
    """GoogLeNet's block: 1x1; 1x1-3x3; 1x1-3x3 (torchvision's "5x5" is 3x3); 3x3/1 max pool (ceil)-1x1."""

    def __init__(self, cin, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj):
        super().__init__()
        self.branch1 = _basic_conv(cin, ch1x1, 1)
        self.branch2 = nn.Sequential(_basic_conv(cin, ch3x3red, 1), _basic_conv(ch3x3red, ch3x3, 3, padding=1))
        self.branch3 = nn.Sequential(_basic_conv(cin, ch5x5red, 1), _basic_conv(ch5x5red, ch5x5, 3, padding=1))
        self.branch4 = nn.Sequential(nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
                                     _basic_conv(cin, pool_proj, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    SPECS = {  # torchvision's (in, 1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5", pool projection)
        "3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
        "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
        "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
        "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
        "5b": (832, 384, 192, 384, 48, 128, 128)}

    def __init__(self, div=8, classes=10):
        super().__init__()

        def block(name):
            return Inception(*(c // div for c in self.SPECS[name]))

        self.stem = nn.Sequential(
            _basic_conv(3, 64 // div, 7, stride=2, padding=3), nn.MaxPool2d(3, stride=2, ceil_mode=True),
            _basic_conv(64 // div, 64 // div, 1), _basic_conv(64 // div, 192 // div, 3, padding=1),
            nn.MaxPool2d(3, stride=2, ceil_mode=True))
        self.blocks = nn.Sequential(
            block("3a"), block("3b"), nn.MaxPool2d(3, stride=2, ceil_mode=True),
            *(block(n) for n in ("4a", "4b", "4c", "4d", "4e")), nn.MaxPool2d(2, stride=2, ceil_mode=True),
            block("5a"), block("5b"))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(1024 // div, classes)

    def forward(self, x):
        x = self.avgpool(self.blocks(self.stem(_transform_input(x))))
        return self.fc(self.dropout(torch.flatten(x, 1)))


def googlenet(seed=0):
    """GoogLeNet (eval: no aux heads, transform_input on) at 1/8 width: all nine Inception blocks."""
    torch.manual_seed(seed)
    return _finish(GoogLeNet(), seed)


# ---------------------------------------------------------------------------------------------
# SqueezeNet 1.1: fire modules, ceil-mode max pools, conv classifier then ReLU and average pool

class Fire(nn.Module):
    def __init__(self, cin, squeeze, expand1x1, expand3x3):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1x1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3x3, 3, padding=1)
        with torch.no_grad():
            self.squeeze.bias.uniform_(0.0, 0.3)  # no BatchNorm here: keep the narrow squeezes alive

    def forward(self, x):
        x = F.relu(self.squeeze(x), inplace=True)
        return torch.cat([F.relu(self.expand1x1(x), inplace=True), F.relu(self.expand3x3(x), inplace=True)], 1)


class SqueezeNet11(nn.Module):
    def __init__(self, div=4, classes=10):
        super().__init__()

        def fire(cin, s, e):
            return Fire(cin // div, s // div, e // div, e // div)

        self.features = nn.Sequential(
            nn.Conv2d(3, 64 // div, 3, stride=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            fire(64, 16, 64), fire(128, 16, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
            fire(128, 32, 128), fire(256, 32, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
            fire(256, 48, 192), fire(384, 48, 192), fire(384, 64, 256), fire(512, 64, 256))
        final_conv = nn.Conv2d(512 // div, classes, 1)
        with torch.no_grad():
            final_conv.bias.uniform_(0.5, 1.0)  # the logits pass through a ReLU: keep them positive
        self.classifier = nn.Sequential(nn.Dropout(0.5), final_conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1)))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def squeezenet1_1(seed=0):
    """SqueezeNet 1.1 at 1/4 width: 8 fire modules, logits from a 1x1 conv, ReLU and average pool."""
    torch.manual_seed(seed)
    return _finish(SqueezeNet11(), seed)


# ---------------------------------------------------------------------------------------------
# ShuffleNetV2: chunk into two halves, concatenate, channel shuffle by 5-D view and transpose

def channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride = stride
        bf = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(ConvBNAct(cin, cin, 3, stride, groups=cin, act=None), ConvBNAct(cin, bf, 1))
        self.branch2 = nn.Sequential(ConvBNAct(cin if stride > 1 else bf, bf, 1),
                                     ConvBNAct(bf, bf, 3, stride, groups=bf, act=None), ConvBNAct(bf, bf, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats=(2, 2, 2), channels=(8, 16, 32, 64, 128), classes=10):
        super().__init__()
        self.conv1 = ConvBNAct(3, channels[0], 3, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        units, cin = [], channels[0]
        for n, cout in zip(repeats, channels[1:4]):
            units += [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]
            cin = cout
        self.stages = nn.Sequential(*units)
        self.conv5 = ConvBNAct(cin, channels[4], 1)
        self.fc = nn.Linear(channels[4], classes)

    def forward(self, x):
        x = self.conv5(self.stages(self.maxpool(self.conv1(x))))
        return self.fc(x.mean([2, 3]))  # globalpool


def shufflenet_v2(seed=0):
    """ShuffleNetV2 (x0.5's stage layout at 1/3 width, 2 units a stage): chunk, concat, channel shuffle."""
    torch.manual_seed(seed)
    return _finish(ShuffleNetV2(), seed)


# ---------------------------------------------------------------------------------------------
# MobileNetV3-Large: inverted residuals with hardswish and hard-sigmoid squeeze-excite

class InvertedResidualV3(nn.Module):
    def __init__(self, cin, k, expanded, cout, use_se, act, stride):
        super().__init__()
        layers = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act, eps=0.001))
        layers.append(ConvBNAct(expanded, expanded, k, stride, groups=expanded, act=act, eps=0.001))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4, 8), gate=nn.Hardsigmoid))
        layers.append(ConvBNAct(expanded, cout, 1, act=None, eps=0.001))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return y + x if self.residual else y


class MobileNetV3(nn.Module):
    # torchvision's large configuration, one row of each kind: (in, kernel, expanded, out, SE, act, stride)
    SETTING = ((16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
               (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 3, 240, 80, False, "HS", 2),
               (80, 3, 480, 112, True, "HS", 1), (112, 5, 672, 160, True, "HS", 2))

    def __init__(self, width_mult=0.25, classes=10):
        super().__init__()

        def c(v):
            return _make_divisible(v * width_mult, 8)

        acts = {"RE": nn.ReLU, "HS": nn.Hardswish}
        layers = [ConvBNAct(3, c(16), 3, 2, act=nn.Hardswish, eps=0.001)]
        for cin, k, exp, cout, se, act, s in self.SETTING:
            layers.append(InvertedResidualV3(c(cin), k, c(exp), c(cout), se, acts[act], s))
        last_conv = 6 * c(160)
        layers.append(ConvBNAct(c(160), last_conv, 1, act=nn.Hardswish, eps=0.001))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last_conv, 64), nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(64, classes))

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def mobilenet_v3_large(seed=0):
    """MobileNetV3-Large at width 0.25 with one inverted residual of each configuration kind."""
    torch.manual_seed(seed)
    return _finish(MobileNetV3(), seed)


# ---------------------------------------------------------------------------------------------
# EfficientNet-B0: MBConv with SiLU and squeeze-excite; optionally TensorFlow "same" padding

def _same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    """timm's get_same_padding: TensorFlow's "same" total padding, the odd pixel at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame: pads computed from the input's size at run time, applied through F.pad."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        top, bottom = _same_pads(ih, self.kernel_size[0], self.stride[0])
        left, right = _same_pads(iw, self.kernel_size[1], self.stride[1])
        x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ConvBNActSame(nn.Sequential):
    """ConvBNAct with TensorFlow padding as timm's tf_ models have it: strided convs pad at run time
    through F.pad (asymmetric on even inputs), stride-1 convs pad symmetrically; BatchNorm eps 1e-3."""

    def __init__(self, cin, cout, k=3, stride=1, groups=1, act=nn.ReLU, eps=0.001):
        if stride > 1:
            conv = Conv2dSame(cin, cout, k, stride, 0, groups=groups, bias=False)
        else:
            conv = nn.Conv2d(cin, cout, k, 1, (k - 1) // 2, groups=groups, bias=False)
        layers = [conv, nn.BatchNorm2d(cout, eps=eps)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class MBConv(nn.Module):
    def __init__(self, expand_ratio, k, stride, cin, cout, conv, sd_prob):
        super().__init__()
        expanded = _make_divisible(cin * expand_ratio, 8)
        layers = []
        if expanded != cin:
            layers.append(conv(cin, expanded, 1, act=nn.SiLU))
        layers += [conv(expanded, expanded, k, stride, groups=expanded, act=nn.SiLU),
                   SqueezeExcitation(expanded, max(1, cin // 4), act=nn.SiLU),
                   conv(expanded, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        y = self.block(x)
        return self.stochastic_depth(y) + x if self.residual else y


class EfficientNet(nn.Module):
    # torchvision's B0 stages: (expand ratio, kernel, stride, in, out, layers)
    STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
              (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))

    def __init__(self, width_mult=0.25, depths=(1, 2, 1, 2, 1, 1, 1), same_padding=False, classes=10):
        super().__init__()

        def c(v):
            return _make_divisible(v * width_mult, 8)

        conv = ConvBNActSame if same_padding else ConvBNAct
        layers = [conv(3, c(32), 3, 2, act=nn.SiLU)]
        total, done = sum(depths), 0
        for (t, k, s, cin, cout, _), n in zip(self.STAGES, depths):
            for i in range(n):
                sd = 0.2 * done / total  # torchvision's linearly growing stochastic depth (identity in eval)
                layers.append(MBConv(t, k, s if i == 0 else 1, c(cin) if i == 0 else c(cout), c(cout), conv, sd))
                done += 1
        last = 4 * c(320)
        layers.append(conv(c(320), last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, classes))

    def forward(self, x):
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def efficientnet_b0(seed=0):
    """EfficientNet-B0's seven MBConv stages at width 0.25 (stride 2 convs padded symmetrically)."""
    torch.manual_seed(seed)
    return _finish(EfficientNet(), seed)


def efficientnet_b0_same(seed=0):
    """EfficientNet-B0 as timm's tf_efficientnet_b0 pads it: TensorFlow "same" through F.pad."""
    torch.manual_seed(seed)
    return _finish(EfficientNet(same_padding=True), seed)


# ---------------------------------------------------------------------------------------------
# RegNetY: residual bottlenecks with grouped 3x3 (fixed group width) and squeeze-excite

class ResBottleneckBlock(nn.Module):
    def __init__(self, cin, cout, stride, group_width, se_ratio):
        super().__init__()
        self.f = nn.Sequential(ConvBNAct(cin, cout, 1), ConvBNAct(cout, cout, 3, stride, groups=cout // group_width),
                               SqueezeExcitation(cout, int(round(se_ratio * cin))), ConvBNAct(cout, cout, 1, act=None))
        self.proj = ConvBNAct(cin, cout, 1, stride, act=None) if cin != cout or stride != 1 else None
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x if self.proj is None else self.proj(x)
        return self.activation(shortcut + self.f(x))


class RegNet(nn.Module):
    def __init__(self, depths=(1, 2, 1, 1), widths=(16, 32, 64, 128), group_width=8, se_ratio=0.25, classes=10):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2)
        blocks, cin = [], 16
        for n, w in zip(depths, widths):
            for i in range(n):
                blocks.append(ResBottleneckBlock(cin, w, 2 if i == 0 else 1, group_width, se_ratio))
                cin = w
        self.trunk_output = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.avgpool(self.trunk_output(self.stem(x)))
        return self.fc(x.flatten(start_dim=1))


def regnet_y(seed=0):
    """RegNetY-400MF's block (bottleneck ratio 1, group width 8, SE 0.25) in 4 stages of 1-2 blocks."""
    torch.manual_seed(seed)
    return _finish(RegNet(), seed)


# ---------------------------------------------------------------------------------------------
# MNASNet: separable stem, stacks of inverted residuals, ReduceMean head

class MnasInvertedResidual(nn.Module):
    def __init__(self, cin, cout, k, stride, expansion):
        super().__init__()
        mid = cin * expansion
        self.layers = nn.Sequential(ConvBNAct(cin, mid, 1), ConvBNAct(mid, mid, k, stride, groups=mid),
                                    ConvBNAct(mid, cout, 1, act=None))
        self.residual = cin == cout and stride == 1

    def forward(self, x):
        return self.layers(x) + x if self.residual else self.layers(x)


class MNASNet(nn.Module):
    # torchvision's stacks: (kernel, stride, expansion, repeats); depths for alpha 0.25 rounded to 8
    STACKS = ((3, 2, 3, 2), (5, 2, 3, 1), (5, 2, 6, 1), (3, 1, 6, 2), (5, 2, 6, 1), (3, 1, 6, 1))

    def __init__(self, depths=(8, 8, 8, 16, 24, 24, 48, 80), classes=10):
        super().__init__()
        d = depths
        layers = [ConvBNAct(3, d[0], 3, 2), ConvBNAct(d[0], d[0], 3, 1, groups=d[0]), ConvBNAct(d[0], d[1], 1, act=None)]
        for (k, s, e, n), cin, cout in zip(self.STACKS, d[1:-1], d[2:]):
            layers += [MnasInvertedResidual(cin, cout, k, s, e)] + [MnasInvertedResidual(cout, cout, k, 1, e)
                                                                   for _ in range(n - 1)]
        layers.append(ConvBNAct(d[-1], 160, 1))
        self.layers = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(160, classes))

    def forward(self, x):
        return self.classifier(self.layers(x).mean([2, 3]))


def mnasnet(seed=0):
    """MNASNet at alpha 0.25: depthwise-separable stem, six inverted-residual stacks, spatial mean."""
    torch.manual_seed(seed)
    return _finish(MNASNet(), seed)


# ---------------------------------------------------------------------------------------------
# ConvNeXt-Tiny: depthwise 7x7, LayerNorm channels-last via permute, GELU MLP, layer scale

class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, by permuting to channels-last and back."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim, sd_prob):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        # torchvision starts layer scale at 1e-6; a trained network's are O(0.1-1), and at 1e-6 the
        # branch would vanish from the logits and its gradients below float32's resolution
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1) * 0.8 + 0.2)
        self.stochastic_depth = StochasticDepth(sd_prob)

    def forward(self, x):
        return self.stochastic_depth(self.layer_scale * self.block(x)) + x


class ConvNeXt(nn.Module):
    def __init__(self, dims=(16, 32, 64, 128), depths=(1, 1, 2, 1), classes=10):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
        total, done = sum(depths), 0
        for i, (dim, n) in enumerate(zip(dims, depths)):
            blocks = []
            for _ in range(n):
                blocks.append(CNBlock(dim, 0.1 * done / max(total - 1, 1)))
                done += 1
            layers.append(nn.Sequential(*blocks))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(seed=0):
    """ConvNeXt-Tiny's layout (4x4/4 patchify stem, LayerNorm2d + 2x2/2 downsampling) at 1/6 width."""
    torch.manual_seed(seed)
    return _finish(ConvNeXt(), seed)


# ---------------------------------------------------------------------------------------------
# ViT: patch-embedding conv, class token, position embedding, pre-norm encoder blocks

class ExplicitAttention(nn.Module):
    """timm's Attention: one QKV Linear, heads split by reshape and permute, Q K^T and A V as MatMuls."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        x = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(x)


class EncoderBlock(nn.Module):
    def __init__(self, dim, heads, mlp_dim, explicit):
        super().__init__()
        self.explicit = explicit
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        if explicit:
            self.self_attention = ExplicitAttention(dim, heads)
        else:
            self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(mlp_dim, dim),
                                 nn.Dropout(0.0))

    def forward(self, x):
        y = self.ln_1(x)
        if self.explicit:
            y = self.self_attention(y)
        else:
            y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, image_size=32, patch=8, dim=32, heads=4, mlp_dim=64, layers=2, explicit=False, classes=10):
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (image_size // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.randn(1, 1, dim) * 0.5)
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.5)
        self.layers = nn.Sequential(*(EncoderBlock(dim, heads, mlp_dim, explicit) for _ in range(layers)))
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        n = x.shape[0]
        x = self.conv_proj(x)
        x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        x = self.ln(self.layers(x + self.pos_embedding))
        return self.head(x[:, 0])


def vit(seed=0):
    """torchvision's ViT (nn.MultiheadAttention) at 32x32: 4x4 patches of 8, dim 32, 4 heads, 2 blocks."""
    torch.manual_seed(seed)
    return _finish(VisionTransformer(explicit=False), seed)


def vit_qkv(seed=0):
    """The same ViT with timm's attention: explicit Q/K/V MatMuls and softmax."""
    torch.manual_seed(seed)
    return _finish(VisionTransformer(explicit=True), seed)


# ---------------------------------------------------------------------------------------------
# Swin: window partition by reshape/permute, relative position bias, shifted windows by torch.roll

def shifted_window_attention(x, qkv, proj, bias, window, heads, shift):
    """torchvision's shifted_window_attention (v1) on an NHWC tensor, without dropout."""
    b, h, w, c = x.shape
    pad_r, pad_b = (window[1] - w % window[1]) % window[1], (window[0] - h % window[0]) % window[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, ph, pw, _ = x.shape
    shift = [0 if window[0] >= ph else shift[0], 0 if window[1] >= pw else shift[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    nw = (ph // window[0]) * (pw // window[1])
    x = x.view(b, ph // window[0], window[0], pw // window[1], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b * nw, window[0] * window[1], c)
    qkv_out = qkv(x).reshape(x.size(0), x.size(1), 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv_out[0], qkv_out[1], qkv_out[2]
    attn = (q * (c // heads) ** -0.5).matmul(k.transpose(-2, -1)) + bias
    if sum(shift) > 0:
        mask = x.new_zeros((ph, pw))
        h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
        w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        mask = mask.view(ph // window[0], window[0], pw // window[1], window[1])
        mask = mask.permute(0, 2, 1, 3).reshape(nw, window[0] * window[1])
        mask = mask.unsqueeze(1) - mask.unsqueeze(2)
        mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
        attn = attn.view(x.size(0) // nw, nw, heads, x.size(1), x.size(1)) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, x.size(1), x.size(1))
    x = F.softmax(attn, dim=-1).matmul(v).transpose(1, 2).reshape(x.size(0), x.size(1), c)
    x = proj(x)
    x = x.view(b, ph // window[0], pw // window[1], window[0], window[1], c)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


class ShiftedWindowAttention(nn.Module):
    def __init__(self, dim, window, shift, heads):
        super().__init__()
        self.window, self.shift, self.heads = window, shift, heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(
            torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(window[0]), torch.arange(window[1]), indexing="ij"))
        coords = torch.flatten(coords, 1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += window[0] - 1
        rel[:, :, 1] += window[1] - 1
        rel[:, :, 0] *= 2 * window[1] - 1
        self.register_buffer("relative_position_index", rel.sum(-1).flatten())

    def forward(self, x):
        n = self.window[0] * self.window[1]
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1)
        bias = bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        return shifted_window_attention(x, self.qkv, self.proj, bias, self.window, self.heads, self.shift)


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, window, shift, mlp_ratio=2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = ShiftedWindowAttention(dim, window, shift, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(0.0),
                                 nn.Linear(mlp_ratio * dim, dim), nn.Dropout(0.0))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhoods by strided slicing, concatenated on channels, LayerNorm, Linear to 2C."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x):
        h, w = x.shape[-3:-1]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        return self.reduction(self.norm(x))


class Swin(nn.Module):
    def __init__(self, dim=16, heads=2, window=(4, 4), classes=10):
        super().__init__()
        self.patch_embed = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), Permute([0, 2, 3, 1]), nn.LayerNorm(dim))
        self.blocks = nn.Sequential(
            SwinBlock(dim, heads, list(window), [0, 0]), SwinBlock(dim, heads, list(window), [w // 2 for w in window]),
            PatchMerging(dim), SwinBlock(2 * dim, 2 * heads, list(window), [w // 2 for w in window]))
        self.norm = nn.LayerNorm(2 * dim)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.norm(self.blocks(self.patch_embed(x))).permute(0, 3, 1, 2)
        return self.head(torch.flatten(self.avgpool(x), 1))


def swin(seed=0):
    """Swin-T's first stages at dim 16 on 32x32 (8x8 tokens, 4x4 windows): a plain and a shifted
    window block, patch merging, and a block whose window covers the map (shift dropped)."""
    torch.manual_seed(seed)
    return _finish(Swin(), seed)


# ---------------------------------------------------------------------------------------------
# MLP-Mixer: token-mixing MLPs on the transposed token axis, channel-mixing MLPs

class MixerBlock(nn.Module):
    def __init__(self, tokens, dim, token_mlp, channel_mlp):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = nn.Sequential(nn.Linear(tokens, token_mlp), nn.GELU(), nn.Linear(token_mlp, tokens))
        self.mlp_channels = nn.Sequential(nn.Linear(dim, channel_mlp), nn.GELU(), nn.Linear(channel_mlp, dim))

    def forward(self, x):
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MlpMixer(nn.Module):
    def __init__(self, image_size=32, patch=8, dim=32, depth=2, classes=10):
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.stem = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*(MixerBlock(tokens, dim, 16, 64) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def mlp_mixer(seed=0):
    """MLP-Mixer (timm's layout) at 32x32: 16 tokens of dim 32, two mixer blocks, token mean."""
    torch.manual_seed(seed)
    return _finish(MlpMixer(), seed)


BUILDERS = {
    "resnet50": (resnet50, 32),
    "resnext": (resnext, 32),
    "densenet121": (densenet121, 32),
    "inception_v3": (inception_v3, 75),
    "googlenet": (googlenet, 32),
    "squeezenet1_1": (squeezenet1_1, 32),
    "shufflenet_v2": (shufflenet_v2, 32),
    "mobilenet_v3_large": (mobilenet_v3_large, 32),
    "efficientnet_b0": (efficientnet_b0, 32),
    "efficientnet_b0_same": (efficientnet_b0_same, 32),
    "regnet_y": (regnet_y, 32),
    "mnasnet": (mnasnet, 32),
    "convnext_tiny": (convnext_tiny, 32),
    "vit": (vit, 32),
    "vit_qkv": (vit_qkv, 32),
    "swin": (swin, 32),
    "mlp_mixer": (mlp_mixer, 32),
}
