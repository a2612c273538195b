"""bwacal: post-training quantization of ONNX image classifiers with bit-weight adjustment."""

import os as _os

if "NUMBA_THREADING_LAYER" not in _os.environ:
    import numba as _numba

    # NOTE: the OpenMP layer's threads keep spinning after a parallel kernel and slow the BLAS call
    # that follows (measured: ResNet-20 forward 0.44 s with omp, 0.29 s with workqueue). workqueue
    # must not be entered from two Python threads at once; bwacal runs parallel jobs in processes.
    _numba.config.THREADING_LAYER = "workqueue"

from bwacal.memory import keep_freed_memory as _keep_freed_memory

_keep_freed_memory()  # see bwacal/memory.py: page faults were a quarter of a pass

from bwacal.errors import BwacalError, DataError, ModelError, UnsupportedOpError
from bwacal.model import Model, load_model

__version__ = "0.1.0"
__all__ = ["BwacalError", "DataError", "ModelError", "UnsupportedOpError", "Model", "load_model", "__version__"]
