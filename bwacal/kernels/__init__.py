"""numba kernels, by family, compiled with the options of ``flags.py`` (each set once there):

- ``quant``: bit planes (decompose, compose, gradients, pack) and the weight-step search;
- ``frames``: direct convolution on padded, flattened frames (dense and depthwise convs);
- ``winograd``: Winograd F(2x2, 3x3) convs; ``patches``: im2col/col2im (grouped convs);
  ``blas``: BLAS calls from inside numba's threads;
- ``pools``: MaxPool and AveragePool; ``pointwise``: one-pass element-wise ops;
- ``block``: an inverted-residual block in one kernel; ``simd``: 16-float vector intrinsics;
- ``rounding``: AdaRound's fused step (gradient, Adam, next weights).

A private ``_name`` kernel sits beside its public NumPy-facing wrapper; kernels other modules call
directly are public. Slow reference versions live in ``tests/naive.py``.
"""
