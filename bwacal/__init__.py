"""bwacal: post-training quantization of ONNX image classifiers with bit-weight adjustment."""

from bwacal import runtime as _runtime

_runtime.apply()  # threading layer, malloc, BLAS threads: see bwacal/runtime.py

from bwacal.errors import BwacalError, DataError, ModelError, UnsupportedOpError  # noqa: E402
from bwacal.model import Model, load_model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["BwacalError", "DataError", "ModelError", "UnsupportedOpError", "Model", "load_model", "__version__"]
