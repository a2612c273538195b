"""Quantizers: uniform integer grids, per-channel weight quantization, bit weights, activations."""

from bwacal.quant.activations import (
    ActivationBWA,
    bwa_alpha_grad,
    calibrate_activation_step,
    fake_quantize,
    fake_quantize_bwa,
)
from bwacal.quant.bwa import BitWeights
from bwacal.quant.uniform import dequantize, qrange, quantize
from bwacal.quant.weights import WeightQuant, quantize_weights

__all__ = [
    "ActivationBWA",
    "BitWeights",
    "WeightQuant",
    "bwa_alpha_grad",
    "calibrate_activation_step",
    "dequantize",
    "fake_quantize",
    "fake_quantize_bwa",
    "qrange",
    "quantize",
    "quantize_weights",
]
