"""bwacal: post-training quantization of ONNX image classifiers with bit-weight adjustment."""

import os as _os

if "NUMBA_THREADING_LAYER" not in _os.environ:
    import numba as _numba

    # NOTE: measured on 2 cores, ResNet-20 batch 128 forward: OpenMP 98-105 ms and steady,
    # workqueue 115-158 ms (its workers are woken per kernel); tbb was not measured. OpenMP's GNU
    # runtime is not fork-safe: bwacal's own worker processes are spawned, never forked.
    _numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]

from bwacal.memory import keep_freed_memory as _keep_freed_memory

_keep_freed_memory()  # see bwacal/memory.py: page faults were a quarter of a pass

from bwacal.errors import BwacalError, DataError, ModelError, UnsupportedOpError
from bwacal.model import Model, load_model

__version__ = "0.1.0"
__all__ = ["BwacalError", "DataError", "ModelError", "UnsupportedOpError", "Model", "load_model", "__version__"]
