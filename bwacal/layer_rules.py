"""Per-layer control: keep some layers in float, give others their own weight width.

Patterns are shell globs (``fnmatch``, case-sensitive) matched against a layer's node name and its
weight's name, as ``bwacal inspect`` lists them: ``--exclude 'classifier*'`` keeps every matching
layer in float (as ONNX Runtime's ``nodes_to_exclude`` or NNCF's ``ignored_scope``), ``--layer-bits
'layer3.*=4'`` quantizes the matching layers to 4 bits whatever the protocol says. Width rules apply
in the order given (a later match wins) and exclusions after them. A pattern that matches no layer
is an error, so a typo cannot pass silently.
"""

from __future__ import annotations

from dataclasses import replace
from fnmatch import fnmatchcase

from bwacal.errors import BwacalError


def parse_layer_bits(text: str) -> tuple[str, int]:
    """``"layer3.*=4"`` -> ``("layer3.*", 4)``."""
    pattern, sep, bits = str(text).rpartition("=")
    if not sep or not pattern:
        raise BwacalError(f"--layer-bits takes PATTERN=BITS (e.g. 'layer3.*=4'), got {text!r}")
    try:
        return pattern, check_bits(int(bits), f"--layer-bits {text}")
    except ValueError:
        raise BwacalError(f"--layer-bits takes PATTERN=BITS with an integer BITS, got {text!r}") from None


def check_bits(bits, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise BwacalError(f"{what}: bits must be an integer from 2 to 8, got {bits!r}")
    return bits


def matches(layer, pattern: str) -> bool:
    """Whether ``pattern`` names ``layer`` (a ``QuantLayer``) by its node or its weight."""
    return fnmatchcase(layer.node, pattern) or fnmatchcase(layer.weight, pattern)


def apply_layer_rules(layers: list, exclude=(), layer_bits=()) -> tuple[list, list]:
    """``(kept, excluded)``: ``layers`` with the width rules ``layer_bits`` ((pattern, bits) pairs)
    applied, and the layers ``exclude`` (patterns) keeps in float. Raises ``BwacalError`` for a
    pattern that matches no layer."""
    names = ", ".join(layer.node for layer in layers)
    out = list(layers)
    for pattern, bits in layer_bits:
        hit = [i for i, layer in enumerate(out) if matches(layer, pattern)]
        if not hit:
            raise BwacalError(f"--layer-bits {pattern}={bits}: no quantized layer matches {pattern!r}; layers: {names}")
        for i in hit:
            out[i] = replace(out[i], bits=bits)
    excluded = []
    for pattern in exclude:
        hit = [layer for layer in out if matches(layer, pattern)]
        if not hit and not [layer for layer in excluded if matches(layer, pattern)]:
            raise BwacalError(f"--exclude {pattern}: no quantized layer matches {pattern!r}; layers: {names}")
        excluded += hit
        out = [layer for layer in out if layer not in hit]
    return out, excluded
