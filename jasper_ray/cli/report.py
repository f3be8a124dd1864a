"""What ``inspect``, ``verify`` and ``convert`` report, the exit codes, and the streams they go to.

NOTE [CLI streams]: stdout carries the result and nothing else: the text lines, or with ``--json`` one
JSON document (``Report.document``; the schema is docs/cli.md's). Everything else goes to stderr:
progress bars, status lines ("starting Ray ..."), logs and the one-line error. While a ``--json``
command runs, ``sys.stdout`` points at stderr, so a library that prints cannot break the document.

No dataset work here: the commands fill a ``Report``; ``main`` writes it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

# The exit codes (docs/cli.md, "Exit codes").
EXIT_OK = 0
EXIT_DATA = 1  # a data problem: missing, corrupt or invalid dataset; or what it takes is missing (a library, Ray, disk)
EXIT_USAGE = 2  # bad arguments or flags that do not go together (argparse's code)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention)

# What a command raises about the data or its surroundings (exit 1, one line on stderr). Error classes
# of jasper_ray.errors subclass these (ValueError, FileNotFoundError, ConnectionError, RuntimeError).
DATA_ERRORS = (ValueError, OSError, ImportError, KeyError, RuntimeError)

REPORT_VERSION = 1  # raised when a key changes meaning or goes away; new keys may appear without it


class UsageError(Exception):
    """Arguments that parse but do not go together (``--single-process --workers 2``): exit 2, one line."""


@dataclass
class Report:
    """One command's result: its fields (the JSON document's command keys), problems, and its text lines.

    A command fills it as it goes, so a failure half-way still reports what was found before it.
    """

    command: str
    dataset: str
    fields: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def document(self) -> dict[str, Any]:
        """The ``--json`` document: the shared keys, then the command's, then ``problems``."""
        return {
            "report_version": REPORT_VERSION,
            "command": self.command,
            "ok": self.ok,
            "dataset": self.dataset,
            **self.fields,
            "problems": list(self.problems),
        }


def say(text: str, quiet: bool = False) -> None:
    """A status line for people (stderr; ``-q`` silences it)."""
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def error_line(command: str, message: str) -> None:
    """The one line a failed command ends with: ``jasper-ray <command>: error: <message>``."""
    print(f"jasper-ray {command}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"
