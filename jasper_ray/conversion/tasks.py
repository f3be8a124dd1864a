"""Piece tasks on Ray: each piece one task, retried, the largest first, results handled as they return.

No format logic and no Ray import here: the driver (``parallel``) passes the
``ray`` module it connected, and ``pieces.write_piece`` does the work in the task.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .. import faults
from ..errors import ConversionError, ValidationError
from .pieces import PieceResult, write_piece
from .plan import PieceTask
from .writer import _progress

# NOTE [prestarted workers]: piece tasks run in the workers Ray starts with the cluster, whose runtime_env is
# empty: a runtime_env of their own (even a job's env_vars alone) has Ray start new workers for it, and the
# first tasks then began 1.4 s after they were submitted against 0.4 s (2 CPUs, idle workers up). So the tasks
# carry none (the faults variable, in tests, is the exception) and open their HDF5 files with ``locking=False``
# themselves: HDF5 2.0 reads HDF5_USE_FILE_LOCKING once, when h5py is first imported in a process, so a task
# setting it works only in a worker where no earlier task imported h5py; the flag does not depend on that.
# While the driver plans, one empty task per CPU imports this module (numpy, the plan and the piece writer;
# h5py is imported by the first piece) in the workers the pieces will run in.


# How often the driver looks for pieces planned late (NOTE [keyword lists beside the pieces] in
# parallel) while it waits for one.
LATER_POLL_S = 0.05


def _task_options() -> dict[str, Any]:
    env = faults.task_env()  # NOTE [prestarted workers]: no runtime_env otherwise
    return {"runtime_env": {"env_vars": env}} if env else {}


def warm_up(ray: ModuleType) -> list[Any]:
    """One empty task per CPU: the workers import this module and the piece writer while the driver plans."""
    warm = ray.remote(num_cpus=1)(_no_op).options(**_task_options())
    return [warm.remote() for _ in range(max(1, int(ray.cluster_resources().get("CPU", 1))))]


@dataclass
class LaterTasks:
    """Tasks known only once ``ready`` resolves (NOTE [keyword lists beside the pieces] in parallel); ``make``
    turns its result into tasks, in the driver's thread."""

    ready: Future
    make: Callable[[Any], list[PieceTask]]


def _no_op() -> None:
    """Nothing: a worker that unpickles it has imported this module."""


def _piece_task(task: PieceTask) -> PieceResult | ValidationError:
    try:
        return write_piece(task)
    except ValidationError as exc:  # the input is refused: returned, so Ray does not retry it
        return exc


def _reason(exc: BaseException) -> str:
    """Why a task failed, on one line: the task's own exception (a RayTaskError's first line is only
    ``ray::_piece_task() (pid=..., ip=...)``), else Ray's (a worker that died)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"


def _source_bytes(task: PieceTask) -> int:
    return task.column.nbytes * (task.piece.stop - task.piece.start) // max(task.column.shape[0], 1)


def run_pieces(
    ray: ModuleType,
    tasks: list[PieceTask],
    *,
    max_retries: int,
    progress: bool,
    total_bytes: int,
    max_in_flight: int | None = None,
    on_result: Callable[[PieceResult, int], object] | None = None,
    later: LaterTasks | None = None,
) -> dict[str, PieceResult]:
    """Run every piece task, the largest first (the last ones to finish are then short), and ``later``'s once
    they are known; return results by piece id, or raise the ValidationError of a piece that refused its input
    (or ``later``'s error: no new piece starts after it), or ConversionError naming the failures.
    ``on_result(result, in_flight_bytes)`` runs in this process as each piece returns, while the others go on
    (``in_flight_bytes``: their source bytes)."""
    remote = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=True)(_piece_task)
    remote = remote.options(**_task_options())
    queue = sorted(tasks, key=lambda t: -_source_bytes(t))
    limit = max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: dict[Any, PieceTask] = {}
    results: dict[str, PieceResult] = {}
    failures: list[str] = []
    refused: Exception | None = None
    with _progress(total_bytes, progress, "convert") as bar:
        while queue or pending or later is not None:
            if later is not None and (later.ready.done() or not (queue or pending)):
                try:  # waits only when nothing else is left to run
                    extra = later.make(later.ready.result())
                except Exception as exc:  # noqa: BLE001 - the dataset refused: raised below, once nothing runs
                    refused, queue = refused or exc, []
                else:
                    queue = sorted(queue + extra, key=lambda t: -_source_bytes(t))
                    bar.total += sum(map(_source_bytes, extra))
                later = None
            while queue and len(pending) < limit:
                task = queue.pop(0)
                pending[remote.remote(task)] = task
            if not pending:
                continue
            done, _ = ray.wait(list(pending), num_returns=1, timeout=None if later is None else LATER_POLL_S)
            for ref in done:
                task = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - reported by piece id below
                    failures.append(
                        f"{task.piece.piece_id} (rows {task.piece.start}:{task.piece.stop} of "
                        f"{task.column.h5_path}): {_reason(exc)}"
                    )
                    continue
                if isinstance(result, ValidationError):  # raised as the single-process writer raises it
                    refused, queue = refused or result, []
                    continue
                results[result.piece_id] = result
                if on_result is not None and not failures and refused is None:
                    on_result(result, sum(map(_source_bytes, pending.values())))
                bar.update(_source_bytes(task))
    if refused is not None:
        raise refused
    if failures:
        # "shard(s)": the documented wording (docs/troubleshooting.md), from before the word "piece".
        raise ConversionError(f"{len(failures)} shard(s) failed after {max_retries} retries: " + "; ".join(failures))
    return results
