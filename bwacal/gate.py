"""The accuracy gate behind ``bwacal check``: is a quantized model's drop within a budget?

The drop is in percentage points: full-precision top-1 minus quantized top-1 (metric ``top1``), or
100 minus the top-1 agreement with the full-precision model (metric ``agreement``, which needs no
labels).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from bwacal.errors import BwacalError
from bwacal.evaluate import EvalResult

METRICS = ("top1", "agreement")
# drops are ratios of integer counts; this only absorbs float rounding at the boundary
_TOLERANCE = 1e-9


@dataclass
class CheckResult:
    """The verdict of one gate. ``value``, ``reference_value``, ``drop`` and ``max_drop`` are in percent / points."""

    model: str
    reference: str
    data: str
    metric: str
    n: int
    value: float
    reference_value: float
    drop: float
    max_drop: float
    passed: bool

    def summary(self) -> str:
        """One line for a CI log, e.g. ``PASS q.onnx: top-1 91.25% vs 91.60% (drop 0.35 <= 1.00 points, 2000 images)``."""
        verdict = "PASS" if self.passed else "FAIL"
        if self.metric == "top1":
            what = f"top-1 {self.value:.2f}% vs {self.reference_value:.2f}%"
        else:
            what = f"agreement {self.value:.2f}% with {self.reference}"
        sign = "<=" if self.passed else ">"
        return f"{verdict} {self.model}: {what} (drop {self.drop:.2f} {sign} {self.max_drop:.2f} points, {self.n} images)"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary()
        return d

    def to_junit(self, seconds: float = 0.0) -> bytes:
        """A JUnit XML report: one testsuite with one testcase, a ``<failure>`` when the gate failed."""
        suite = ET.Element("testsuite", name="bwacal check", tests="1", failures="0" if self.passed else "1",
                           errors="0", skipped="0", time=f"{seconds:.3f}")
        props = ET.SubElement(suite, "properties")
        for key in ("model", "reference", "data", "metric", "n", "value", "reference_value", "drop", "max_drop"):
            ET.SubElement(props, "property", name=key, value=str(getattr(self, key)))
        case = ET.SubElement(suite, "testcase", classname="bwacal.check", name=f"{self.model} [{self.metric}]",
                             time=f"{seconds:.3f}")
        if not self.passed:
            failure = ET.SubElement(case, "failure", message=self.summary(), type="AccuracyDrop")
            failure.text = (f"{self.metric} drop of {self.drop:.4f} points exceeds the budget of "
                            f"{self.max_drop:.4f} points (model {self.model}, reference {self.reference}, "
                            f"data {self.data}, {self.n} images)")
        ET.SubElement(case, "system-out").text = self.summary()
        ET.indent(suite)
        return ET.tostring(suite, encoding="utf-8", xml_declaration=True) + b"\n"


def check_max_drop(max_drop: float) -> float:
    """``max_drop`` as a float, or BwacalError if negative or not finite."""
    if not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop) or max_drop < 0:
        raise BwacalError(f"--max-drop must be a finite number of points >= 0, got {max_drop!r}")
    return float(max_drop)


def choose_metric(metric: str | None, has_labels: bool, data_name: str = "the data") -> str:
    """The metric to gate on: ``metric`` if given (``top1`` needs labels), else top1 with labels, agreement without."""
    if metric is None:
        return "top1" if has_labels else "agreement"
    if metric not in METRICS:
        raise BwacalError(f"unknown metric '{metric}', expected one of: {', '.join(METRICS)}")
    if metric == "top1" and not has_labels:
        raise BwacalError(f"{data_name}: has no 'labels', so --metric top1 cannot be measured; "
                          "use --metric agreement")
    return metric


def judge(result: EvalResult, metric: str, max_drop: float, model: str, reference: str, data: str) -> CheckResult:
    """Turn an ``EvalResult`` measured with a reference into a verdict."""
    if result.agreement is None:
        raise ValueError("judge needs an EvalResult measured with a reference")
    if metric == "top1":
        if result.correct is None:
            raise BwacalError(f"{data}: has no 'labels', so --metric top1 cannot be measured")
        value, ref = 100.0 * result.correct / result.n, 100.0 * result.reference_correct / result.n
        drop = 100.0 * (result.reference_correct - result.correct) / result.n
    else:
        value, ref = 100.0 * result.agreement, 100.0
        drop = 100.0 - value
    passed = drop <= max_drop + _TOLERANCE
    return CheckResult(model, reference, data, metric, result.n, value, ref, drop, max_drop, passed)


def write_junit(check: CheckResult, path, seconds: float = 0.0) -> None:
    """Write the JUnit report atomically (temporary file in the same folder, then rename)."""
    from bwacal.onnx_io import write_bytes_atomically

    write_bytes_atomically(Path(path), check.to_junit(seconds))


def check_output_path(path, inputs=()) -> Path:
    """Refuse an output path that is an input, a directory, or in a folder that is missing or not writable."""
    path = Path(path)
    for p in inputs:
        if p is not None and Path(p).exists() and path.exists() and path.resolve() == Path(p).resolve():
            raise BwacalError(f"{path}: the output would overwrite an input file")
    if path.is_dir():
        raise BwacalError(f"{path}: is a directory, expected a file name")
    parent = path.parent
    if not parent.is_dir():
        raise BwacalError(f"{path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise BwacalError(f"{path}: the folder {parent} is not writable")
    return path
