"""Errors bwacal raises for problems with the user's input (models, data, options).

Every one of them is meant to be shown as a single line; the CLI turns them into exit code 2.
"""


class BwacalError(Exception):
    """Base class: a problem with the input, not a bug in bwacal."""


class ModelError(BwacalError):
    """The model file cannot be read or is not a graph bwacal can work on."""


class UnsupportedOpError(ModelError):
    """One or more nodes use an op (or an op variant) the engine does not implement.

    ``problems`` holds one ``(op_type, node_name, reason)`` tuple per offending node.
    """

    def __init__(self, problems, opset=None, supported=()):
        self.problems = list(problems)
        self.opset = opset
        self.supported = sorted(supported)
        parts = [f"{op} (node '{name}'): {why}" for op, name, why in self.problems]
        where = f" at opset {opset}" if opset is not None else ""
        msg = f"unsupported op{'s' if len(parts) > 1 else ''}{where}: " + "; ".join(parts)
        if self.supported:
            msg += ". Supported ops: " + ", ".join(self.supported)
        super().__init__(msg)


class DataError(BwacalError):
    """A calibration or evaluation file is missing, malformed or does not fit the model."""
