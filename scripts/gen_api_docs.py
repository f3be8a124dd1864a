#!/usr/bin/env python
"""Write docs/api.md from the docstrings of jasper_ray's public names (``jasper_ray.__all__``).

python scripts/gen_api_docs.py            # rewrite docs/api.md
python scripts/gen_api_docs.py --check    # exit 1 if docs/api.md is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jasper_ray  # noqa: E402

OUT = REPO / "docs" / "api.md"


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__) if obj.__doc__ else "(no docstring)"


def _signature(obj: object) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _members(cls: type) -> list[str]:
    out = []
    for name, member in cls.__dict__.items():
        if name.startswith("_") and name not in ("__getitem__", "__getitems__", "__len__", "__iter__"):
            continue
        if isinstance(member, property):
            out.append(f"- `{name}` (property): {_doc(member).splitlines()[0]}")
        elif isinstance(member, (staticmethod, classmethod)):
            out.append(f"- `{name}{_signature(member.__func__)}`: {_doc(member.__func__).splitlines()[0]}")
        elif inspect.isfunction(member) and member.__doc__:
            out.append(f"- `{name}{_signature(member)}`: {_doc(member).splitlines()[0]}")
    return out


def render() -> str:
    parts = [
        "# jasper_ray API reference",
        "",
        "Generated from the docstrings by `scripts/gen_api_docs.py`; do not edit by hand.",
        "",
    ]
    for name in sorted(jasper_ray.__all__, key=str.lower):
        obj = getattr(jasper_ray, name)
        module = getattr(obj, "__module__", "jasper_ray")
        if inspect.isclass(obj):
            parts += [f"## class `{name}{_signature(obj)}`", "", f"*{module}*", "", _doc(obj), ""]
            members = _members(obj)
            if members:
                parts += members + [""]
        elif callable(obj):
            parts += [f"## `{name}{_signature(obj)}`", "", f"*{module}*", "", _doc(obj), ""]
        else:
            parts += [
                f"## `{name}`",
                "",
                f"A constant of *{module}*: `{type(obj).__name__}` with "
                f"{len(obj) if hasattr(obj, '__len__') else 1} entries.",
                "",
            ]
    return "\n".join(parts).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
