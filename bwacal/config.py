"""Calibration options from TOML: ``bwacal calibrate --config FILE.toml`` and the batch manifest.

Keys are the command-line names with underscores (``act_bits``, ``weight_method``, ...), plus
``all_layers``, ``format``, the files (``calib``, ``data``; ``eval`` is the old name of ``data``) and
the per-layer rules, ``exclude = ["fc*"]`` and a ``[layer_bits]`` table of ``"pattern" = bits``:

    bits = 2
    act_bits = 4
    epochs = 3
    exclude = ["classifier"]

    [layer_bits]
    "layer1.*" = 4
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from bwacal.errors import BwacalError

# keys that go straight into CalibrationOptions, with the types TOML must give them
OPTION_TYPES = {"bits": int, "act_bits": int, "act_bwa": bool, "protocol": str, "epochs": int, "batch_size": int,
                "lr": (int, float), "holdout": (int, float), "split": str, "micro_batch": int, "loss": str,
                "seed": int, "weight_method": str, "act_method": str, "method": str, "adaround_iterations": int,
                "adaround_images": int, "input_shape": (list, str), "num_images": int, "exclude": list,
                "layer_bits": dict, "avg_bits": (int, float), "size_budget": (int, float)}
# keys that are not CalibrationOptions fields: the files, the output format, all_layers
OTHER_TYPES = {"calib": str, "data": str, "format": str, "all_layers": bool}
CONFIG_KEYS = set(OPTION_TYPES) | set(OTHER_TYPES)


def read_toml(path) -> dict:
    """A TOML file as a dict; ``BwacalError`` naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise BwacalError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise BwacalError(f"{path}: is a directory, expected a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BwacalError(f"{path}: not valid TOML: {exc}") from None


def renamed(table: dict, label: str) -> dict:
    """``table`` with the old key ``eval`` under its new name ``data``."""
    if "eval" not in table:
        return table
    if "data" in table:
        raise BwacalError(f"{label}: 'eval' is the old name of 'data'; give only 'data'")
    table = dict(table)
    table["data"] = table.pop("eval")
    return table


def check_types(table: dict, label: str, known=CONFIG_KEYS) -> dict:
    """Refuse an unknown key or a value of the wrong type, naming both; returns ``table``."""
    bad = sorted(set(table) - set(known))
    if bad:
        raise BwacalError(f"{label}: unknown key {bad[0]!r}; known keys: {', '.join(sorted(known))}")
    for key, value in table.items():
        kind = {**OPTION_TYPES, **OTHER_TYPES}.get(key)
        if kind is None or value is None:
            continue
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise BwacalError(f"{label}: {key!r} has the wrong type ({type(value).__name__}: {value!r})")
    if "all_layers" in table and "protocol" in table:
        raise BwacalError(f"{label}: give 'protocol' or 'all_layers', not both")
    return table


def option_overrides(table: dict) -> dict:
    """The ``CalibrationOptions`` fields ``table`` sets (``all_layers`` as the protocol)."""
    out = {k: table[k] for k in OPTION_TYPES if k in table}
    if "all_layers" in table:
        out["protocol"] = "all-layers" if table["all_layers"] else "first-last-8bit"
    return out


def read_config(path) -> dict:
    """The checked keys of a ``--config`` file; relative file paths in it are relative to the file."""
    path = Path(path)
    table = check_types(renamed(read_toml(path), str(path)), str(path))
    for key in ("calib", "data"):
        if key in table:
            table[key] = path.parent / table[key]
    return table
