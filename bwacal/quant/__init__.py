"""Quantizers: uniform integer grids, quantized weight tensors (bit weights, learned rounding), activations."""

from bwacal.quant.activations import ActivationQuantizer, calibrate_activation_step
from bwacal.quant.bwa import bit_scale, code_bits, code_levels
from bwacal.quant.uniform import dequantize, qrange, quantize
from bwacal.quant.weights import QuantizedWeight, SoftRounding, quantize_weights

__all__ = [
    "ActivationQuantizer",
    "QuantizedWeight",
    "SoftRounding",
    "bit_scale",
    "calibrate_activation_step",
    "code_bits",
    "code_levels",
    "dequantize",
    "qrange",
    "quantize",
    "quantize_weights",
]
