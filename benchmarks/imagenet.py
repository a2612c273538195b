"""Full-size ImageNet layouts (3x224x224 input, 1000 classes) of the corpus families, random weights.

The classes are those of ``tests/corpus_models`` (the corpus tests build them narrower and
shallower); here they get the originals' widths and depths. ``BUILDERS`` maps a name to a function
``(seed) -> eval-mode torch model``.
"""

from __future__ import annotations

import torch

from tests import corpus_models as cm
from tests.torch_models import resnet18


def _seeded(make, seed):
    torch.manual_seed(seed)
    return cm._finish(make(), seed)


BUILDERS = {
    "resnet18": lambda seed=0: resnet18(in_ch=3, classes=1000, seed=seed).eval(),
    # torchvision's resnet50: 3-4-6-3 bottlenecks of 64-128-256-512 planes
    "resnet50": lambda seed=0: _seeded(lambda: cm.ResNet((3, 4, 6, 3), (64, 128, 256, 512), stem=64,
                                                         classes=1000), seed),
    # torchvision's efficientnet_b0: width 1.0, depth 1.0
    "efficientnet_b0": lambda seed=0: _seeded(lambda: cm.EfficientNet(width_mult=1.0, depths=(1, 2, 2, 3, 3, 4, 1),
                                                                       classes=1000), seed),
    # torchvision's convnext_tiny: dims 96-192-384-768, 3-3-9-3 blocks
    "convnext_tiny": lambda seed=0: _seeded(lambda: cm.ConvNeXt(dims=(96, 192, 384, 768), depths=(3, 3, 9, 3),
                                                                classes=1000), seed),
    # torchvision's vit_b_16: 16x16 patches, dim 768, 12 heads, MLP 3072, 12 blocks
    "vit_b_16": lambda seed=0: _seeded(lambda: cm.VisionTransformer(224, 16, 768, 12, 3072, 12, classes=1000), seed),
    # timm's vit_small_patch16_224: dim 384, 6 heads, MLP 1536, 12 blocks
    "vit_s_16": lambda seed=0: _seeded(lambda: cm.VisionTransformer(224, 16, 384, 6, 1536, 12, classes=1000), seed),
}
