"""bwacal: post-training quantization of ONNX image classifiers with bit-weight adjustment."""

from bwacal.errors import BwacalError, DataError, ModelError, UnsupportedOpError
from bwacal.model import Model, load_model

__version__ = "0.1.0"
__all__ = ["BwacalError", "DataError", "ModelError", "UnsupportedOpError", "Model", "load_model", "__version__"]
