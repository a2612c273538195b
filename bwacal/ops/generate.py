"""Ops that make tensors from shapes and scalars: ConstantOfShape, Range."""

from __future__ import annotations
