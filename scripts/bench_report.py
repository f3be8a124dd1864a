"""``jasper-ray bench``: run the benchmark scripts, write a markdown report with their tables and PNG plots.

The six scripts under ``<repo>/scripts`` (``bench_formats.py``, ``bench_loader.py``,
``bench_convert.py``, ``bench_ray_data.py``, ``bench_actors.py``, ``bench_remote.py``), and
``bench_scale.py`` when ``--only`` names it (``scale``: a dataset larger than RAM, hours and
~65 GB of disk; never in the default set), each run as a
subprocess with ``JASPER_BENCH_JSON`` naming a file: besides their markdown
tables on stdout (captured) they leave every table and their raw numbers there
(``scripts/_bench_common.record``). Their stderr (progress) passes through.

The report directory gets ``report.md`` (the machine, the runs with the load
average before each, the plots, then every script's tables verbatim),
``report.json`` (all raw records) and three PNG plots (matplotlib, Agg):

- ``conversion_scaling.png``: conversion time against Ray workers (gzip), the
  measured points and the scaling model's curve (from ``bench_convert``);
- ``throughput.png``: samples/s of each loading path against its in-memory
  ceiling or baseline (``bench_loader``, ``bench_ray_data``, ``bench_actors``);
- ``rss_vs_size.png``: RSS growth of open + first access against dataset size,
  mmap'd against full loads (``bench_formats``).

A plot whose data is missing (its script was left out with ``--only``, or
failed) is skipped with a note in the report.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

SCRIPTS = ("formats", "loader", "convert", "ray_data", "actors", "remote")  # the default set
# Run only when named in --only: bench_scale takes hours and ~65 GB of disk at its size (more than RAM).
OPT_IN = ("scale",)
KNOWN = SCRIPTS + OPT_IN
JSON_ENV = "JASPER_BENCH_JSON"
SCALES = ("full", "quick", "tiny")

# Each script's default dataset size at each scale ("full": no flag; "quick": --quick).
SIZES = {
    "full": {
        "formats": "2GB",
        "loader": "1GB",
        "convert": "2GB",
        "ray_data": "1GB",
        "actors": "1GB",
        "remote": "1GB",
        "scale": "30GB",
    },
    "quick": {
        "formats": "100MB",
        "loader": "100MB",
        "convert": "200MB",
        "ray_data": "100MB",
        "actors": "100MB",
        "remote": "100MB",
        "scale": "2GB",
    },
    "tiny": {
        "formats": "24MB",
        "loader": "24MB",
        "convert": "32MB",
        "ray_data": "16MB",
        "actors": "16MB",
        "remote": "16MB",
        "scale": "24MB",
    },
}
# "tiny" (for the test suite: every script end to end, numbers meaningless) = --quick, the sizes above and fewer
# repetitions.
TINY_ARGS = {
    "formats": ["--open-reps", "1", "--gather-reps", "5", "--kw-reps", "1"],
    "loader": ["--batches", "3", "--rounds", "1"],
    "convert": ["--codecs", "gzip"],  # the codec the scaling model and the plot are of
    "ray_data": ["--rounds", "1"],
    "actors": ["--rounds", "1"],
    "remote": ["--warm", "1"],
    "scale": ["--baseline-size", "8MB", "--interval", "0.1"],
}
TINY_AT_ONCE = 2
PLOTS = {
    "conversion": "conversion_scaling.png",
    "throughput": "throughput.png",
    "rss": "rss_vs_size.png",
}


# --- locating and running the scripts -------------------------------------------------------


def scripts_dir() -> Path:
    """``<repo>/scripts`` beside the package; a clear error when this is not a source checkout."""
    directory = Path(__file__).resolve().parent
    missing = [f"bench_{name}.py" for name in KNOWN if not (directory / f"bench_{name}.py").is_file()]
    if missing:
        raise FileNotFoundError(
            f"benchmark scripts not found: {directory} lacks {', '.join(missing)} "
            "(jasper-ray bench runs the scripts of a source checkout: install it with pip install -e from a clone)"
        )
    return directory


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(SCRIPTS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in KNOWN]
    if unknown or not names:
        raise ValueError(f"--only {text!r}: expected a comma-separated subset of {','.join(KNOWN)}")
    return [n for n in KNOWN if n in names]  # the report's order


def _size_text(nbytes: float) -> str:
    return f"{nbytes / 1e6:.6g}MB"


def script_args(name: str, scale: str = "full", size_scale: float = 1.0) -> list[str]:
    """The command-line arguments of ``bench_<name>.py`` at a scale (work directory not included)."""
    from jasper_ray.tools.synth import parse_size

    if scale not in SCALES:
        raise ValueError(f"scale {scale!r}: expected one of {', '.join(SCALES)}")
    if not size_scale > 0:
        raise ValueError(f"--size-scale {size_scale}: expected a positive number")
    args = [] if scale == "full" else ["--quick"]
    if scale == "tiny" or size_scale != 1.0:
        args += ["--size", _size_text(parse_size(SIZES[scale][name]) * size_scale)]
    if scale == "tiny":
        args += TINY_ARGS[name]
    return args


@dataclass
class ScriptRun:
    """One script's run: its command, exit code, wall time, load before it, stdout and JSON document."""

    name: str
    args: list[str]
    returncode: int | None = None
    seconds: float = 0.0
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    stdout: str = ""
    stderr_tail: list[str] = field(default_factory=list)
    document: dict[str, Any] | None = None

    @property
    def script(self) -> str:
        return f"bench_{self.name}.py"

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def records(self, name: str) -> list[dict[str, Any]]:
        if not self.document:
            return []
        return [r["values"] for r in self.document.get("records", []) if r.get("name") == name]


def _pump(stream: Any, tail: collections.deque, sink: Any) -> None:
    for line in iter(stream.readline, ""):
        tail.append(line.rstrip("\n"))
        sink.write(line)
        sink.flush()
    stream.close()


def run_script(name: str, args: Sequence[str], directory: Path, work: Path, stderr: Any = None) -> ScriptRun:
    """Run ``bench_<name>.py`` with ``JASPER_BENCH_JSON`` set; stderr streams through, stdout is kept."""
    run = ScriptRun(name, list(args))
    json_path = work / f"{name}.json"
    json_path.unlink(missing_ok=True)
    env = dict(os.environ)
    env[JSON_ENV] = str(json_path)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(directory.parent), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(directory / run.script), *args, "--out", str(work)]
    run.loadavg = os.getloadavg()
    tail: collections.deque = collections.deque(maxlen=40)
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", env=env, cwd=directory.parent
    )
    pump = threading.Thread(target=_pump, args=(proc.stderr, tail, stderr or sys.stderr), daemon=True)
    pump.start()
    try:
        run.stdout = proc.stdout.read()
        run.returncode = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        pump.join(timeout=10)
    run.seconds = time.perf_counter() - started
    run.stderr_tail = list(tail)
    if json_path.is_file():
        try:
            run.document = json.loads(json_path.read_text())
        except ValueError:
            run.document = None
    return run


# --- the machine -------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit(repo: Path) -> str | None:
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def machine_info(repo: Path | None = None) -> dict[str, Any]:
    """CPU count and model, RAM, OS, package versions, date; read without importing torch or ray."""
    info: dict[str, Any] = {"cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None
            )
    except OSError:
        info["cpu_model"] = None
    try:
        with open("/proc/meminfo") as f:
            info["ram_bytes"] = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        info["ram_bytes"] = None
    info["platform"] = platform.platform()
    info["python"] = platform.python_version()
    info["versions"] = {
        p: _version(p) for p in ("jasper-ray", "torch", "ray", "h5py", "numpy", "pyarrow", "matplotlib")
    }
    info["commit"] = _git_commit(repo) if repo else None
    info["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["loadavg_start"] = list(os.getloadavg())
    return info


# --- plots ---------------------------------------------------------------------------------------


class MissingData(Exception):
    """A plot's data is not in this run (its script was not run, or failed before recording it)."""


def _records(runs: dict[str, ScriptRun], script: str, name: str) -> list[dict[str, Any]]:
    run = runs.get(script)
    return run.records(name) if run else []


def _fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M/s"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k/s"
    return f"{x:.0f}/s"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)  # Agg, without pyplot's global state
    return fig


def plot_conversion(runs: dict[str, ScriptRun], path: Path) -> str:
    """Conversion time (gzip) against workers: Ray measured at 1 and all cores, the model, references."""
    measured = {r["method"]: r for r in _records(runs, "convert", "convert") if r["codec"] == "gzip"}
    models = _records(runs, "convert", "convert_model")
    if not models or not all(m in measured for m in ("upstream", "single", "ray1", "rayN")):
        raise MissingData("bench_convert's gzip conversions and scaling model")
    model = models[-1]
    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot()
    ax.plot(
        model["workers"],
        model["predicted_seconds"],
        "o--",
        color="tab:blue",
        label="scaling model (1-worker shard times; no ray.init)",
    )
    for method, marker, color in (("ray1", "s", "tab:green"), ("rayN", "D", "tab:purple")):
        r = measured[method]
        ax.scatter(
            [r["workers"]],
            [r["seconds"]],
            marker=marker,
            s=70,
            color=color,
            zorder=3,
            label=f"measured, Ray, {r['workers']} worker{'s' if r['workers'] > 1 else ''}: {r['seconds']:.1f} s "
            "(ray.init included)",
        )
    for method, style, color in (("upstream", ":", "tab:red"), ("single", "-.", "tab:orange")):
        r = measured[method]
        ax.axhline(r["seconds"], ls=style, color=color, label=f"{r['label']}: {r['seconds']:.1f} s")
    workers = sorted(set(model["workers"]) | {measured["rayN"]["workers"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers)
    ax.set_xticklabels([str(w) for w in workers])
    top = max([*model["predicted_seconds"], *(r["seconds"] for r in measured.values())])
    ax.set_ylim(0, top * 1.5)  # room for the legend above every line
    ax.set_xlabel("Ray workers (CPUs)")
    ax.set_ylabel("wall seconds")
    source = measured["upstream"]["source_bytes"]
    ax.set_title(f"PT -> HDF5 conversion, gzip, {source / 1e9:.2f} GB of PT files")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    return (
        "Conversion time against Ray workers (gzip). Points: measured wall time with 1 worker and with every core "
        "(ray.init and worker start-up included); dashed curve: bench_convert's scaling model (the 1-worker run's "
        "shard times scheduled on W workers, plus the serial plan and assembly; ray.init left out, as on a running "
        "cluster); horizontal lines: the single-process writer and the upstream-style converter."
    )


def _throughput_panels(
    runs: dict[str, ScriptRun],
) -> list[tuple[str, str, list[tuple[str, float, str]], float, str]]:
    """(script, title, [(label, rate, kind)], reference rate, reference name) per script that has data."""
    panels = []
    loader = _records(runs, "loader", "loader")
    if any(r["path"] == "ceiling" for r in loader):
        top = next(r["samples_per_s"] for r in loader if r["path"] == "ceiling")
        bars = [("in-RAM vectorised gather (ceiling)", top, "base")]
        bars += [
            (f"upstream-style per-sample, {r['workers']} workers", r["samples_per_s"], "upstream")
            for r in loader
            if r["path"] == "upstream-style"
        ]
        for path, kind in (("batched", "batched"), ("per-sample", "persample")):
            bars += [
                (f"{path}: {r['storage']}, {r['workers']} workers", r["samples_per_s"], kind)
                for r in loader
                if r["path"] == path
            ]
        panels.append(("loader", "local dataset through a DataLoader (bench_loader), samples/s", bars, top, "ceiling"))
    ray_data = _records(runs, "ray_data", "ray_data")
    if any(r["source"].startswith("in-memory baseline") for r in ray_data):
        base = next(r["rows_per_s"] for r in ray_data if r["source"].startswith("in-memory baseline"))
        bars = [(r["source"], r["rows_per_s"], _bar_kind(r["source"], "in-memory baseline", "ray")) for r in ray_data]
        panels.append(("ray_data", "Ray Data iter_torch_batches (bench_ray_data), rows/s", bars, base, "baseline"))
    actors = _records(runs, "actors", "actors")
    if any(r["way"].startswith("local") for r in actors):
        local = next(r["samples_per_s"] for r in actors if r["way"].startswith("local"))
        bars = [
            (
                _actor_label(r["way"]),
                r["samples_per_s"],
                _bar_kind(r["way"], "local", "actors"),
            )
            for r in actors
        ]
        panels.append(("actors", "shard actors, one epoch (bench_actors), samples/s", bars, local, "local"))
    return panels


def _actor_label(way: str) -> str:
    if way.startswith("local"):
        return "local get_batch (baseline)"
    return way if way.startswith("ceiling") else f"ShardedJasper, {way}"


def _bar_kind(name: str, baseline: str, measured: str) -> str:
    """A bar's colour: the baseline, a reference or ceiling measured beside it, or the path measured."""
    if name.startswith(baseline):
        return "base"
    return "reference" if name.startswith(("reference", "ceiling")) else measured


_COLORS = {
    "base": "dimgray",
    "upstream": "tab:red",
    "reference": "silver",
    "batched": "tab:blue",
    "persample": "lightsteelblue",
    "ray": "tab:green",
    "actors": "tab:orange",
}


def plot_throughput(runs: dict[str, ScriptRun], path: Path) -> str:
    """Samples/s per loading path, one panel per script, against the ceiling/baseline measured beside it."""
    panels = _throughput_panels(runs)
    if not panels:
        raise MissingData("bench_loader, bench_ray_data or bench_actors")
    counts = [len(bars) for _, _, bars, _, _ in panels]
    fig = _figure(9.5, 1.0 + 0.3 * sum(counts) + 0.7 * len(panels))
    axes = fig.subplots(len(panels), 1, gridspec_kw={"height_ratios": [c + 1.5 for c in counts]}, squeeze=False)
    for ax, (_, title, bars, ref, ref_name) in zip(axes[:, 0], panels):
        labels = [b[0] for b in bars]
        rates = [b[1] for b in bars]
        y = list(range(len(bars)))[::-1]
        ax.barh(y, rates, color=[_COLORS[b[2]] for b in bars], height=0.7)
        ax.axvline(ref, color="black", ls="--", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=7.5)
        ax.set_xscale("log")
        lo, hi = min(rates), max(rates)
        ax.set_xlim(lo / 3, hi * 6)
        for yi, rate in zip(y, rates):
            ax.text(rate * 1.08, yi, f"{_fmt_rate(rate)}  {rate / ref:.2f}x {ref_name}", va="center", fontsize=7)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    shown = {script for script, *_ in panels}
    missing = [s for s in ("loader", "ray_data", "actors") if s not in shown]
    note = (
        "Samples/s (rows/s for Ray Data) of each loading path, log scale; the gray bar and the dashed line are the "
        "ceiling or baseline measured in the same run of that script (bench_loader: assemble_batch on tensors in "
        "RAM, no DataLoader; bench_ray_data: the same samples already in Ray's object store; bench_actors: the "
        "local dataset's get_batch); each bar says its ratio to it."
    )
    if missing:
        note += f" No panel for {', '.join('bench_' + m for m in missing)}: not in this run."
    return note


_RSS_FLOOR = 64 << 10  # log scale: growth under 64 KiB (or a shrink) is drawn at 64 KiB


def plot_rss(runs: dict[str, ScriptRun], path: Path) -> str:
    """RSS growth of open + first access against dataset size, per format: mmap'd (dashed) against full loads."""
    opens = _records(runs, "formats", "formats_open")
    sizes = sorted({r["dataset_bytes"] for r in opens})
    if len(sizes) < 2:
        raise MissingData("bench_formats' open-time table (both dataset sizes)")
    fig = _figure(10, 4.4)
    axes = fig.subplots(1, 2, squeeze=False)[0]
    labels = {r["dataset_bytes"]: r["size_label"] for r in opens}
    formats: dict[str, list[dict[str, Any]]] = {}
    for r in opens:
        formats.setdefault(r["format"], []).append(r)
    for ax, key, what in (
        (axes[0], "rss", "VmRSS growth (owned + mapped file pages)"),
        (axes[1], "anon", "RssAnon growth (memory the process owns)"),
    ):
        for i, rows in enumerate(formats.values()):
            rows = sorted(rows, key=lambda r: r["dataset_bytes"])
            mmap = rows[0]["mmap"]
            ax.plot(
                [r["dataset_bytes"] / 1e9 for r in rows],
                [max(r[key], _RSS_FLOOR) / 2**20 for r in rows],
                ls="--" if mmap else "-",
                marker="os^vDP"[i % 6],
                markersize=7 - i % 3,
                color=f"C{i}",
                label=rows[0]["label"] + (" [mmap/lazy]" if mmap else " [full load]"),
            )
        ax.set_xlabel("dataset size (GB of PT files)")
        ax.set_ylabel("MiB (log scale)")
        ax.set_title(what, fontsize=9)
        ax.set_xticks([s / 1e9 for s in sizes])
        ax.set_xticklabels([f"{labels[s]}\n{s / 1e9:.3g} GB" for s in sizes], fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="center right")
    fig.suptitle("Memory of opening a dataset (+ first access) against its size", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return (
        "RSS growth of opening each format and touching all 13 tensors and the train split (the open-time table), "
        "at bench_formats' two dataset sizes; median over fresh processes; log scale (values under 64 KiB drawn "
        "at 64 KiB). Full loads grow with the dataset; memory-mapped (and lazily chunked) opens stay flat."
    )


PLOT_FUNCS: dict[str, tuple[str, Callable[[dict[str, ScriptRun], Path], str]]] = {
    "conversion": ("Conversion time against workers", plot_conversion),
    "throughput": ("Samples/s per loading path against its ceiling", plot_throughput),
    "rss": ("RSS against dataset size, mmap against full loads", plot_rss),
}


# --- the report --------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RAY_LOG = re.compile(r"^\((raylet|pid=\d+|[\w.:-]+ pid=\d+)[^)]*\) ")


def split_stdout(text: str) -> tuple[str, list[str]]:
    """A script's stdout as (its own output, the lines Ray's log monitor printed into it), colour codes dropped."""
    own, ray = [], []
    for line in text.splitlines():
        clean = _ANSI.sub("", line)
        (ray if _RAY_LOG.match(clean) else own).append(clean)
    return "\n".join(own).strip(), ray


def _bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


@dataclass
class Report:
    directory: Path
    runs: list[ScriptRun]
    plots: dict[str, str | None]  # name -> file (None: skipped)
    plot_notes: dict[str, str]
    plot_errors: list[str]

    @property
    def failed(self) -> list[ScriptRun]:
        return [r for r in self.runs if not r.ok]


def write_report(
    out: Path, runs: list[ScriptRun], machine: dict[str, Any], command: str, scale: str = "full"
) -> Report:
    """Plots, ``report.md`` and ``report.json`` in ``out`` from finished runs (any subset of the scripts)."""
    out.mkdir(parents=True, exist_ok=True)
    by_name = {r.name: r for r in runs if r.document}
    plots: dict[str, str | None] = {}
    notes: dict[str, str] = {}
    errors: list[str] = []
    for name, (_, func) in PLOT_FUNCS.items():
        target = out / PLOTS[name]
        target.unlink(missing_ok=True)  # never leave a plot of an earlier run beside this report
        try:
            notes[name] = func(by_name, target)
            plots[name] = PLOTS[name]
        except MissingData as exc:
            plots[name] = None
            notes[name] = f"Skipped: no data from {exc} in this run."
        except Exception as exc:  # a plotting bug must not lose a long run's tables
            plots[name] = None
            notes[name] = f"Skipped: plotting failed ({type(exc).__name__}: {exc})."
            errors.append(f"plot {PLOTS[name]}: {type(exc).__name__}: {exc}")

    lines = [
        "# jasper_ray benchmark report",
        "",
        f"`{command}`, {machine['date']}. Every table below is a script's stdout, verbatim; each table's ratios "
        "are against baselines that script measured in the same run. Raw numbers: `report.json`.",
    ]
    if scale == "tiny":
        lines += ["", "**Scale: tiny** (the test suite's scale: every script end to end; the numbers mean nothing)."]
    elif scale == "quick":
        lines += ["", "**Scale: quick** (the scripts' --quick sizes: for trying things, not for the record)."]
    v = machine["versions"]
    ram = _bytes(machine.get("ram_bytes"))
    lines += [
        "",
        "## Machine",
        "",
        "| | |",
        "| :-- | :-- |",
        f"| CPUs | {machine['cpus']} ({machine.get('cpu_model') or 'unknown model'}) |",
        f"| RAM | {ram} |",
        f"| OS | {machine['platform']} |",
        f"| Python | {machine['python']} |",
        f"| packages | torch {v['torch']}, ray {v['ray']}, h5py {v['h5py']}, numpy {v['numpy']}, "
        f"pyarrow {v['pyarrow']}, matplotlib {v['matplotlib']} |",
        f"| jasper_ray | {v['jasper-ray']}" + (f", commit {machine['commit']}" if machine.get("commit") else "") + " |",
        f"| date | {machine['date']} |",
        "",
        "## Runs",
        "",
        "| script | arguments | load average before (1/5/15 min) | wall time | exit code |",
        "| :-- | :-- | --: | --: | --: |",
    ]
    for r in runs:
        load = " / ".join(f"{x:.2f}" for x in r.loadavg)
        lines.append(
            f"| {r.script} | `{shlex.join(r.args) or '(defaults)'}` | {load} | {_duration(r.seconds)} | "
            f"{r.returncode}{'' if r.ok else ' **FAILED**'} |"
        )
    lines += [
        "",
        f"Load average on {machine['cpus']} CPUs: a script's numbers mean something only if it ran on a quiet "
        "machine (load well under the CPU count before it).",
        "",
        "## Plots",
        "",
    ]
    for name, (title, _) in PLOT_FUNCS.items():
        lines += [f"### {title}", ""]
        if plots[name]:
            lines += [f"![{title}]({plots[name]})", ""]
        lines += [notes[name], ""]
    for r in runs:
        lines += [f"## {r.script}", ""]
        if not r.ok:
            lines += [f"**{r.script} failed** (exit code {r.returncode}); the last lines of its stderr:", "", "```"]
            lines += r.stderr_tail[-25:] + ["```", ""]
        own, ray_lines = split_stdout(r.stdout)
        lines += [own or "(no tables)", ""]
        if ray_lines:
            lines += [
                "<details><summary>Ray's log monitor wrote "
                f"{len(ray_lines)} line{'s' if len(ray_lines) > 1 else ''} to {r.script}'s stdout "
                "(moved here from between its tables)</summary>",
                "",
                "```",
                *ray_lines,
                "```",
                "",
                "</details>",
                "",
            ]
    (out / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    doc = {
        "command": command,
        "scale": scale,
        "machine": machine,
        "runs": [
            {
                "script": r.script,
                "args": r.args,
                "returncode": r.returncode,
                "seconds": r.seconds,
                "loadavg_before": list(r.loadavg),
                "stdout": r.stdout,
                "stderr_tail": r.stderr_tail,
                "tables": (r.document or {}).get("tables", []),
                "records": (r.document or {}).get("records", []),
            }
            for r in runs
        ],
        "plots": {name: {"file": plots[name], "note": notes[name]} for name in PLOT_FUNCS},
    }
    (out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
    return Report(out, runs, plots, notes, errors)


def load_runs(report_json: str | os.PathLike) -> tuple[list[ScriptRun], dict[str, Any], str, str]:
    """(runs, machine, command, scale) of a written ``report.json``: to draw its report again."""
    doc = json.loads(Path(report_json).read_text())
    runs = []
    for r in doc["runs"]:
        run = ScriptRun(
            r["script"][len("bench_") : -len(".py")],
            r["args"],
            returncode=r["returncode"],
            seconds=r["seconds"],
            loadavg=tuple(r["loadavg_before"]),
            stdout=r.get("stdout", ""),
            stderr_tail=r.get("stderr_tail", []),
            document={"tables": r["tables"], "records": r["records"]},
        )
        runs.append(run)
    return runs, doc["machine"], doc["command"], doc.get("scale", "full")


def run_bench(
    out: str | os.PathLike = "bench-report",
    only: str | Sequence[str] | None = None,
    scale: str = "full",
    size_scale: float = 1.0,
    work_dir: str | os.PathLike | None = None,
    command: str | None = None,
    announce: Callable[[str], None] | None = None,
) -> Report:
    """Run the chosen scripts one after another (``--tiny``: ``TINY_AT_ONCE`` at a time) and write the report;
    see the module docstring.

    Every script runs even if one before it failed; the returned report's ``failed`` names them.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError("jasper-ray bench draws its plots with matplotlib: pip install 'jasper-ray[bench]'") from exc
    names = parse_only(only if isinstance(only, str) or only is None else ",".join(only))
    directory = scripts_dir()
    all_args = {name: script_args(name, scale, size_scale) for name in names}
    say = announce or (lambda text: None)
    machine = machine_info(directory.parent)
    work_root = Path(work_dir) if work_dir else Path(tempfile.gettempdir())
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="jasper-bench-", dir=work_root))  # private: runs side by side never collide
    started = time.perf_counter()

    def one(i: int, name: str) -> ScriptRun:
        say(
            f"[{i}/{len(names)}] {shlex.join([f'bench_{name}.py', *all_args[name]])} "
            f"(load average {os.getloadavg()[0]:.2f})"
        )
        run = run_script(name, all_args[name], directory, work)
        say(f"[{i}/{len(names)}] bench_{name}.py: exit code {run.returncode} after {_duration(run.seconds)}")
        return run

    try:
        if scale == "tiny":  # its numbers mean nothing: two scripts at a time (the test suite's time)
            with ThreadPoolExecutor(TINY_AT_ONCE) as pool:
                runs = list(pool.map(one, range(1, len(names) + 1), names))
        else:  # one at a time: a script's numbers mean something only on a quiet machine
            runs = [one(i, name) for i, name in enumerate(names, 1)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = write_report(
        Path(out), runs, machine, command or f"jasper-ray bench ({scale}, {','.join(names)})", scale=scale
    )
    say(f"report: {Path(out) / 'report.md'} ({_duration(time.perf_counter() - started)} in all)")
    return report
