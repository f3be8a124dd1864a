"""config.json: reading it and checking the parts that decide sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import DatasetFormatError, ValidationError
from .schema import CONFIG_FILE, STEERING_VARIANTS


def read_config_file(directory: Path) -> dict[str, Any] | None:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def check_probabilities(probs: object, where: str = f"{CONFIG_FILE} steering_probabilities") -> dict[str, float]:
    """Exactly the four variants, each in [0, 1], summing to 1 (upstream only failed at the first sample)."""
    if not isinstance(probs, dict):
        raise ValidationError(where, type(probs).__name__, f"a mapping of {list(STEERING_VARIANTS)} to probabilities")
    unknown = sorted(set(probs) - set(STEERING_VARIANTS))
    if unknown:
        raise ValidationError(where, f"unknown variant(s) {unknown}", f"only {list(STEERING_VARIANTS)}")
    missing = [v for v in STEERING_VARIANTS if v not in probs]
    if missing:
        raise ValidationError(where, f"missing variant(s) {missing}", f"all of {list(STEERING_VARIANTS)}")
    out = {}
    for variant in STEERING_VARIANTS:
        p = probs[variant]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0) or math.isnan(p):
            raise ValidationError(f"{where}[{variant!r}]", p, "a number in [0, 1]")
        out[variant] = float(p)
    total = sum(out.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValidationError(where, f"probabilities summing to {total:.6g}", "a sum of 1")
    return out
