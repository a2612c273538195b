"""The accuracy gate behind ``bwacal check``: is a quantized model's drop within a budget?

The drop is in percentage points: full-precision top-1 minus quantized top-1 (metric ``top1``), or
100 minus the top-1 agreement with the full-precision model (metric ``agreement``, which needs no
labels).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bwacal.errors import BwacalError
from bwacal.evaluate import EvalResult

METRICS = ("top1", "agreement")
# drops are ratios of integer counts; this only absorbs float rounding at the boundary
_TOLERANCE = 1e-9


@dataclass
class CheckResult:
    """The verdict of one gate. ``value``, ``reference_value``, ``drop`` and ``max_drop`` are in percent /
    points here and in the line for a person; ``to_dict`` gives them as fractions, as all of bwacal's JSON.
    ``warnings`` (a reference that is not the model's source) fail the gate only when ``strict``."""

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
    warnings: list = field(default_factory=list)

    def summary(self) -> str:
        """One line for a CI log, e.g. ``PASS q.onnx: top-1 91.25% vs 91.60% (drop 0.35 <= 1.00 points, 2000 images)``."""
        verdict = "PASS" if self.passed else "FAIL"
        if self.metric == "top1":
            what = f"top-1 {self.value:.2f}% vs {self.reference_value:.2f}%"
        else:
            what = f"agreement {self.value:.2f}% with {self.reference}"
        sign = ">" if self.drop > self.max_drop + _TOLERANCE else "<="
        why = "; --strict: the reference is not the model's source" if not self.passed and sign == "<=" else ""
        return (f"{verdict} {self.model}: {what} (drop {self.drop:.2f} {sign} {self.max_drop:.2f} points, "
                f"{self.n} images{why})")

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("value", "reference_value", "drop", "max_drop"):
            d[key] = d[key] / 100.0
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
            over = self.drop > self.max_drop + _TOLERANCE
            failure = ET.SubElement(case, "failure", message=self.summary(),
                                    type="AccuracyDrop" if over else "WrongReference")
            failure.text = "; ".join(
                ([f"{self.metric} drop of {self.drop:.4f} points exceeds the budget of {self.max_drop:.4f} points "
                  f"(model {self.model}, reference {self.reference}, data {self.data}, {self.n} images)"]
                 if over else []) + self.warnings)
        ET.SubElement(case, "system-out").text = "\n".join([self.summary()] + [f"warning: {w}" for w in self.warnings])
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


def judge(result: EvalResult, metric: str, max_drop: float, model: str, reference: str, data: str,
          warnings=(), strict: bool = False) -> CheckResult:
    """Turn an ``EvalResult`` measured with a reference into a verdict; ``warnings`` fail it when ``strict``."""
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
    passed = drop <= max_drop + _TOLERANCE and not (strict and warnings)
    return CheckResult(model, reference, data, metric, result.n, value, ref, drop, max_drop, passed, list(warnings))


def reference_warning(model, reference, metadata: dict) -> str | None:
    """A warning when ``model`` records (``bwacal_source_sha256``) that it was made from another file
    than ``reference``; None when they match or the model records nothing."""
    from bwacal.files import file_sha256

    source = metadata.get("bwacal_source_sha256")
    if not source:
        return None
    actual = file_sha256(reference)
    if actual == source:
        return None
    return (f"{reference} is not the model {model} was made from (SHA-256 {actual[:12]}..., "
            f"the model records {source[:12]}...); the drop is measured against another model")


def error_junit(message: str, seconds: float = 0.0, model: str = "") -> bytes:
    """A JUnit XML report for a gate that could not run (bad input): one testcase with an ``<error>``,
    so a CI report step has a file to show and the reason in it."""
    suite = ET.Element("testsuite", name="bwacal check", tests="1", failures="0", errors="1", skipped="0",
                       time=f"{seconds:.3f}")
    case = ET.SubElement(suite, "testcase", classname="bwacal.check", name=f"{model} [not run]".strip(),
                         time=f"{seconds:.3f}")
    ET.SubElement(case, "error", message=message, type="BadInput").text = message
    ET.indent(suite)
    return ET.tostring(suite, encoding="utf-8", xml_declaration=True) + b"\n"
