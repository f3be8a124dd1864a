"""Helpers shared by the benchmark scripts under ``scripts/``.

- ``run_fresh``: call a function of a script in a brand-new Python interpreter
  (cold imports, fresh address space) and get its JSON-able result back;
- ``proc_status``: the process's memory counters from ``/proc/self/status``
  (``VmRSS`` = ``RssAnon`` + ``RssFile`` + ``RssShmem``);
- ``timings`` / ``Timing``: repeat a callable and summarise (median, min, max);
- ``markdown_table`` and the ``fmt_*`` helpers: the tables the scripts print;
- ``record``: raw numbers for machine-readable results (``jasper-ray bench``).

Benchmarks print only their tables on stdout; progress and notes go through
``logging`` (stderr), set up by ``setup_logging``.

Machine-readable results: when the environment variable ``JASPER_BENCH_JSON``
names a file, every ``print_table`` (title, headers, rows, notes) and every
``record(name, **values)`` of the process are collected and written there as
one JSON document when the process exits (``atexit``)::

    {"script": "bench_convert", "argv": [...], "tables": [{"title": ..., "headers": [...],
     "rows": [[...]], "notes": [...]}, ...], "records": [{"name": ..., "values": {...}}, ...]}

stdout is the same with or without it. Only a process that recorded something
writes the file (workers run through ``run_fresh`` inherit the variable but
record nothing), replacing it atomically.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("bench")

# --- logging ---------------------------------------------------------------------------


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def section_alone(description: str, **extra: int) -> tuple[Any, int]:
    """The arguments of a benchmark section run on its own (``--size``, ``--out``, ``--rounds`` and ``extra``
    integer options with their defaults), logging set up, and the pairs of ``--size`` at D=768, n_neg=12."""
    import argparse

    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's jasper_ray
    from jasper_ray.tools.synth import pairs_for_size, parse_size

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", default="1GB")
    parser.add_argument("--out", default="/tmp")
    parser.add_argument("--rounds", type=int, default=2)
    for name, default in extra.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    args = parser.parse_args()
    setup_logging()
    return args, pairs_for_size(parse_size(args.size), 768, 12)


# --- memory ----------------------------------------------------------------------------

STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse (``mallopt``): a loop that allocates a fresh ~12 MB
    batch each step otherwise gets it by ``mmap`` and page-faults it in, every batch, for epochs
    (one-off: the local loader's first epochs ran at a quarter of its steady speed). A baseline
    measured at its steady state. False where glibc is not there."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Memory counters of a process in bytes: VmRSS, VmHWM (peak RSS), RssAnon, RssFile, RssShmem.

    RssAnon is memory the process owns (heap, copies); RssFile is file-backed
    page cache mapped into it (mmap'd files), shared and reclaimable.
    """
    out = dict.fromkeys(STATUS_FIELDS, 0)
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in out:
                out[key] = int(rest.split()[0]) * 1024  # values are in kB
    return out


class PeakTracker:
    """Maximum growth of each ``proc_status`` counter over a baseline, sampled on ``sample()``."""

    def __init__(self) -> None:
        self.base = proc_status()
        self.peak = dict.fromkeys(STATUS_FIELDS, 0)

    def sample(self) -> dict[str, int]:
        now = proc_status()
        for key in STATUS_FIELDS:
            self.peak[key] = max(self.peak[key], now[key] - self.base[key])
        return now


# --- fresh-process runs ----------------------------------------------------------------

_RUNNER = """
import importlib.util, json, sys
script, func, kwargs, out = sys.argv[1:5]
sys.path.insert(0, str(__import__("pathlib").Path(script).resolve().parent))
spec = importlib.util.spec_from_file_location("_bench_worker", script)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
result = getattr(module, func)(**json.loads(kwargs))
with open(out, "w") as f:
    json.dump(result, f)
"""


def run_fresh(script: str | os.PathLike, func: str, timeout: float | None = None, **kwargs: Any) -> Any:
    """Run ``func(**kwargs)`` from ``script`` in a new interpreter and return its (JSON) result.

    The script is imported as a module (its ``__main__`` block does not run);
    the function does its own imports and timing, so interpreter start-up and
    imports can be excluded from what it measures. Its stderr passes through.
    """
    with tempfile.TemporaryDirectory(prefix="jr-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-c", _RUNNER, str(script), func, json.dumps(kwargs), str(out)]
        proc = subprocess.run(cmd, timeout=timeout, stdout=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{func}({kwargs}) failed in a subprocess (exit code {proc.returncode})")
        return json.loads(out.read_text())


# --- timing ----------------------------------------------------------------------------


@dataclass
class Timing:
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    @property
    def n(self) -> int:
        return len(self.seconds)


def timings(fn: Callable[[int], Any], repeats: int, *, warmup: int = 0, max_seconds: float | None = None) -> Timing:
    """Call ``fn(i)`` ``repeats`` times (after ``warmup`` untimed calls) and return the wall times.

    With ``max_seconds``, stops early (after at least one timed call) once the
    timed calls took that long in total: slow baselines are not repeated 50x.
    """
    for i in range(warmup):
        fn(-1 - i)
    out: list[float] = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        out.append(time.perf_counter() - t0)
        if max_seconds is not None and sum(out) >= max_seconds:
            break
    return Timing(out)


def interleaved_timings(
    fns: Sequence[Callable[[Any], Any]], args: Sequence[Any], *, stride: int = 0, seed: int | None = None
) -> list[Timing]:
    """Time ``fn(arg)`` for every fn over ``args``, round robin: round i runs every fn once.

    Interleaving spreads load from other processes over all fns alike, so
    their ratios stay fair on a busy machine. With ``stride`` > 0, fn j reads
    ``args[(i + j * stride) % len(args)]`` in round i: every fn still gets every
    arg once, but no two fns get the same arg in the same or adjacent rounds
    (stride >= 3), so none is served from CPU caches warmed by another (two
    mappings of one file share physical pages). With ``seed``, the order of
    the fns is shuffled each round, so none always runs right after a slow one.
    """
    rng = random.Random(seed)
    out: list[list[float]] = [[] for _ in fns]
    order = list(range(len(fns)))
    for i in range(len(args)):
        if seed is not None:
            rng.shuffle(order)
        for j in order:
            arg = args[(i + j * stride) % len(args)]
            t0 = time.perf_counter()
            fns[j](arg)
            out[j].append(time.perf_counter() - t0)
    return [Timing(t) for t in out]


# --- files -----------------------------------------------------------------------------


def dir_bytes(paths: Iterable[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


# --- machine-readable results ----------------------------------------------------------

JSON_ENV = "JASPER_BENCH_JSON"
_document: dict[str, Any] | None = None


def _plain(value: Any) -> Any:
    """JSON-able copy of ``value``: numpy scalars and arrays, paths and tuples become plain types; NaN/inf -> None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _plain(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _write_document() -> None:
    path = os.environ.get(JSON_ENV)
    if not path or _document is None or _document["pid"] != os.getpid():
        return
    doc = {k: v for k, v in _document.items() if k != "pid"}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _collect() -> dict[str, Any] | None:
    """The document of this process, or None when ``JASPER_BENCH_JSON`` is not set."""
    global _document
    if not os.environ.get(JSON_ENV):
        return None
    if _document is None or _document["pid"] != os.getpid():  # a forked child starts its own
        _document = {
            "pid": os.getpid(),
            "script": Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "",
            "argv": list(sys.argv[1:]),
            "tables": [],
            "records": [],
        }
        atexit.register(_write_document)
    return _document


def record(name: str, **values: Any) -> None:
    """Keep raw numbers (floats, not formatted strings) for ``JASPER_BENCH_JSON``; a no-op without it."""
    doc = _collect()
    if doc is not None:
        doc["records"].append({"name": name, "values": _plain(values)})


# --- tables ----------------------------------------------------------------------------


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one char per column: 'l', 'r' or 'c' (default: first l, rest r)."""
    rows = [[str(c) for c in row] for row in rows]
    align = align or ("l" + "r" * (len(headers) - 1))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def cell(text: str, i: int) -> str:
        return text.ljust(widths[i]) if align[i] == "l" else text.rjust(widths[i])

    rule = {
        "l": lambda w: ":" + "-" * (w - 1),
        "r": lambda w: "-" * (w - 1) + ":",
        "c": lambda w: ":" + "-" * (w - 2) + ":",
    }
    lines = ["| " + " | ".join(cell(h, i) for i, h in enumerate(headers)) + " |"]
    lines.append("| " + " | ".join(rule[align[i]](max(widths[i], 3)) for i in range(len(headers))) + " |")
    lines += ["| " + " | ".join(cell(c, i) for i, c in enumerate(r)) + " |" for r in rows]
    return "\n".join(lines)


def print_table(
    title: str,
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    notes: Sequence[str] = (),
    align: str | None = None,
) -> None:
    """Print a titled markdown table (and notes under it) to stdout, flushed; recorded for ``JASPER_BENCH_JSON``."""
    rows = [list(row) for row in rows]
    doc = _collect()
    if doc is not None:
        doc["tables"].append(
            {"title": title, "headers": _plain(headers), "rows": _plain(rows), "notes": _plain(list(notes))}
        )
    parts = [f"### {title}", "", markdown_table(headers, rows, align)]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    print("\n".join(parts) + "\n", flush=True)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 10_000:
        return f"{seconds:.1f} s"
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.3f} ms"


def fmt_rate(x: float, unit: str = "") -> str:
    """1234567 -> '1.23 M', with ``unit`` (e.g. ' rows/s') appended: '1.23 M rows/s', '383.9 rows/s'."""
    if x >= 1e6:
        return f"{x / 1e6:.2f} M{unit}"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k{unit}"
    return f"{x:.1f}{unit}"


def fmt_ratio(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}x"
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def fmt_pct(x: float) -> str:
    return f"{x:.1f}%" if abs(x) >= 0.1 else f"{x:.2f}%"


# --- shared workers: upstream's converter, synthetic data ----------------------------------------


def w_synth(out: str, n_pairs: int, dim: int, n_neg: int, seed: int) -> dict[str, Any]:
    from jasper_ray.tools.synth import synth_dataset

    t0 = time.perf_counter()
    synth_dataset(out, n_pairs, dim, n_neg, seed)
    return {"seconds": time.perf_counter() - t0}


def upstream_path(spec: Any) -> str:
    """The HDF5 path upstream's converter writes a tensor to (``negatives/hardnegatives`` for negatives)."""
    return spec.h5_aliases[0] if spec.h5_aliases else spec.h5_path


def upstream_convert(dataset_dir: Path, output: Path, compression: str | None) -> None:
    """Upstream's ``convert_pt_to_hdf5`` (UPSTREAM.md section 4), writing to ``output``.

    Each tensor is ``torch.load``-ed whole and written with
    ``create_dataset(data=..., compression=...)``: no shuffle, h5py's
    auto-chunking, no attributes; keyword ids as one int32 dataset per pair;
    mode "w" in place, no fsync. (Upstream loads the keyword pickle with
    weights_only=False; a list of lists loads with weights_only=True at the same cost.)
    """
    import h5py
    import numpy as np
    import torch

    from jasper_ray.schema import CONFIG_FILE, KEYWORD_IDS, SPLIT_NAMES, TENSORS, split_h5_path, split_pt_file

    with open(dataset_dir / CONFIG_FILE) as f:
        json.load(f)  # read and never used, as upstream
    with h5py.File(output, "w") as f:
        for group in ("embeddings", "pair_data", "negatives", "steering", "splits"):
            f.create_group(group)
        for spec in TENSORS:
            tensor = torch.load(dataset_dir / spec.pt_file, weights_only=True)
            f.create_dataset(upstream_path(spec), data=tensor.numpy(), compression=compression)
            del tensor
            if spec.name == "pair_relevance":  # upstream writes keyword ids with the pair data
                keyword_lists = torch.load(dataset_dir / KEYWORD_IDS.pt_file, weights_only=True)
                kw_group = f.create_group(KEYWORD_IDS.h5_group)
                for i, kw_list in enumerate(keyword_lists):
                    kw_group.create_dataset(str(i), data=np.array(kw_list, dtype=np.int32))
                del keyword_lists
        for split in SPLIT_NAMES:
            path = dataset_dir / split_pt_file(split)
            if path.is_file():
                ids = torch.load(path, weights_only=True)
                f.create_dataset(split_h5_path(split), data=ids.numpy(), compression=compression)
