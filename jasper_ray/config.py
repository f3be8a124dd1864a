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


CURRICULUM_MODES = ("fixed", "linear", "cosine")
CURRICULUM_KEYS = {
    "mode",
    "zero_prob_start",
    "zero_prob_end",
    "epochs_total",
    "warmup_epochs",
    "start_distance",
    "end_distance",
}


def check_curriculum(curriculum: object) -> dict[str, Any]:
    """config.json's ``curriculum``: the one check that validation (verify, convert) and sampling (load) share."""
    where = f"{CONFIG_FILE} curriculum"
    if curriculum is None:
        return {}
    if not isinstance(curriculum, dict):
        raise ValidationError(where, type(curriculum).__name__, "a mapping")
    unknown = sorted(set(curriculum) - CURRICULUM_KEYS)
    if unknown:
        raise ValidationError(where, f"unknown key(s) {unknown}", f"only {sorted(CURRICULUM_KEYS)}")
    mode = curriculum.get("mode")
    if mode is not None and mode not in CURRICULUM_MODES:
        raise ValidationError(f"{where}['mode']", repr(mode), f"one of {list(CURRICULUM_MODES)}")
    for key in ("zero_prob_start", "zero_prob_end"):
        value = curriculum.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValidationError(f"{where}[{key!r}]", repr(value), "a probability in [0, 1]")
    for key in ("epochs_total", "warmup_epochs"):
        value = curriculum.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValidationError(f"{where}[{key!r}]", repr(value), "a number of epochs >= 0")
    return curriculum


# config.json's opt-out for datasets that really store NaN or inf in their float tensors.
ALLOW_NONFINITE = "allow_nonfinite"


def allows_nonfinite(config: dict[str, Any]) -> bool:
    """Whether config.json lets NaN and inf through (``"allow_nonfinite": true``; default false)."""
    value = config.get(ALLOW_NONFINITE, False)
    if not isinstance(value, bool):
        raise ValidationError(f"{CONFIG_FILE} {ALLOW_NONFINITE!r}", repr(value), "true or false")
    return value
