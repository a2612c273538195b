"""Forward+backward of the element-wise activations on a 64x256x28x28 float32 tensor: bwacal's ops
(numba kernels in bwacal/kernels/pointwise.py) against PyTorch autograd and plain NumPy+SciPy.

    python -m benchmarks.pointwise [--threads 2] [--repeat 7]

Prints the best and median milliseconds of each row.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)

    import numba
    import scipy.special as sp
    import torch

    from bwacal.ops.elementwise import Elu, Erf, Gelu, Mish, Softplus

    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256, 28, 28), dtype=np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)

    def ours(op):
        def run():
            y, ctx = op.forward(x)
            op.backward(ctx, dy, (True,))
        return run

    def torch_fb(fn):
        def run():
            a = xt.detach().requires_grad_(True)
            fn(a).backward(dyt)
        return run

    def numpy_gelu():
        cdf = 0.5 * (1 + sp.erf(x * np.float32(1 / np.sqrt(2))))
        return x * cdf, dy * (cdf + x * np.exp(-0.5 * x * x) * np.float32(1 / np.sqrt(2 * np.pi)))

    def numpy_erf():
        return sp.erf(x), dy * np.float32(2 / np.sqrt(np.pi)) * np.exp(-x * x)

    nn = torch.nn.functional
    rows = [
        ("Gelu none  bwacal", ours(Gelu())), ("Gelu none  torch", torch_fb(nn.gelu)),
        ("Gelu none  numpy+scipy", numpy_gelu),
        ("Gelu tanh  bwacal", ours(Gelu("tanh"))), ("Gelu tanh  torch", torch_fb(lambda a: nn.gelu(a, approximate="tanh"))),
        ("Erf        bwacal", ours(Erf())), ("Erf        torch", torch_fb(torch.erf)), ("Erf        numpy+scipy", numpy_erf),
        ("Mish       bwacal", ours(Mish())), ("Mish       torch", torch_fb(nn.mish)),
        ("Softplus   bwacal", ours(Softplus())), ("Softplus   torch", torch_fb(nn.softplus)),
        ("Elu        bwacal", ours(Elu())), ("Elu        torch", torch_fb(nn.elu)),
    ]
    for name, run in rows:
        run()
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(f"{name:24s} fwd+bwd best {1e3 * min(times):7.1f} ms  median {1e3 * float(np.median(times)):7.1f} ms",
              flush=True)


if __name__ == "__main__":
    main()
