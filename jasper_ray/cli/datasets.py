"""``jasper-ray inspect`` and ``jasper-ray verify``: what a dataset holds, and whether it is intact.

Both fill a ``Report`` (its fields are the ``--json`` keys of docs/cli.md) and print nothing themselves.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..formats import open_dataset
from ..formats.base import Reader, is_mapped
from ..formats.checksum import verify_checksums
from ..formats.pt import PTReader
from ..formats.sharded import ShardedHDF5Reader
from ..schema import LAYOUT_SHARDED, LAYOUT_SINGLE, PRECISION_BFLOAT16, PT_CHECKSUMS, TENSORS
from ..validate import validate_dataset
from .report import Report, human_bytes


def open_reader(args: argparse.Namespace, report: Report) -> Reader:
    """The reader ``--format`` asks for; the report gets the format, layout and size it found."""
    reader = open_dataset(
        args.dir, storage_format=args.format, use_mmap=True, cache_dir=args.cache_dir, progress=not args.quiet
    )
    report.fields["format"] = reader.storage_format
    report.fields["layout"] = layout_of(reader)
    return reader


def layout_of(reader: Reader) -> str | None:
    """``single`` (dataset.h5), ``sharded`` (dataset.shards/) or None (PT files have no layout choice)."""
    if reader.storage_format != "hdf5":
        return None
    return LAYOUT_SHARDED if isinstance(reader, ShardedHDF5Reader) else LAYOUT_SINGLE


def _format_text(report: Report) -> str:
    layout = report.fields["layout"]
    return report.fields["format"] + (f", {layout}" if layout else "")


# --- inspect ---------------------------------------------------------------------------------------


def storage(reader: Reader, name: str) -> dict[str, Any]:
    """How one tensor is stored and served: ``kind`` is ``mmap``, ``chunked`` or ``memory``."""
    arr: Any = reader.array(name)
    parts = getattr(arr, "parts", None)  # the sharded layout's rows, one array per shard
    if parts:
        arr = parts[0][2]
    dset = getattr(arr, "dset", None)  # chunked HDF5 rows, read through h5py
    mapped = is_mapped(arr) or (reader.storage_format == "pt" and reader.use_mmap)
    return {
        "kind": "mmap" if mapped else "chunked" if dset is not None else "memory",
        "chunks": list(dset.chunks) if dset is not None and dset.chunks else None,
        "compression": dset.compression if dset is not None else None,
        "shuffle": bool(dset.shuffle) if dset is not None else False,
        "shards": len(parts) if parts is not None else None,
    }


def _storage_text(s: dict[str, Any]) -> str:
    text = {"mmap": "mmap", "memory": "in RAM"}.get(s["kind"], "")
    if s["kind"] == "chunked":
        text = f"chunks={tuple(s['chunks'])} {s['compression']}{'+shuffle' if s['shuffle'] else ''}"
    return text + (f" in {s['shards']} shards" if s["shards"] is not None else "")


def run_inspect(args: argparse.Namespace, report: Report) -> None:
    with open_reader(args, report) as reader:
        _inspect(reader, report, args.dir)


def _inspect(reader: Reader, report: Report, asked: str) -> None:
    f = report.fields
    served_from = None if Path(asked).resolve() == reader.directory.resolve() else str(reader.directory)
    f["served_from"] = served_from  # the node-local cache's copy (a remote or compressed dataset), else null
    f["bytes_on_disk"] = reader.nbytes_on_disk()
    f["n_pairs"] = reader.n_pairs
    f["precision"] = reader.precision  # of the embedding and steering tensors (NOTE [16-bit storage])
    f["config"] = reader.config
    f["splits"] = {s: len(reader.split(s)) for s in reader.split_names()}
    f["tensors"] = [
        {
            "name": spec.name,
            "shape": list(reader.shape(spec.name)),
            "dtype": str(reader.dtype(spec.name)),
            "storage": storage(reader, spec.name),
        }
        for spec in TENSORS
    ]
    values, offsets = reader.keyword_csr()
    f["keywords"] = {"pairs": len(offsets) - 1, "ids": int(values.shape[0])}

    cfg = f["config"]
    report.lines += [
        f"dataset   {asked}" + (f" (served from the cache: {served_from})" if served_from else ""),
        f"format    {_format_text(report)} ({f['bytes_on_disk'] / 1e6:.1f} MB on disk)",
        f"config    embedding_dim={cfg.get('embedding_dim')} n_neg={cfg.get('n_neg')} "
        f"steering_probabilities={json.dumps(cfg.get('steering_probabilities'))}",
        f"splits    {', '.join(f'{s}={n}' for s, n in f['splits'].items())}",
        f"precision {f['precision']} (embedding and steering tensors"
        + ("; bfloat16 bits stored as uint16)" if f["precision"] == PRECISION_BFLOAT16 else ")"),
        f"{'tensor':<27} {'shape':<18} {'dtype':<8} storage",
    ]
    report.lines += [
        f"{t['name']:<27} {str(tuple(t['shape'])):<18} {t['dtype']:<8} {_storage_text(t['storage'])}"
        for t in f["tensors"]
    ]
    report.lines.append(f"{'pair_keyword_ids':<27} {f['keywords']['pairs']} pairs, {f['keywords']['ids']} ids")


# --- verify ----------------------------------------------------------------------------------------


def _verify_pt_sidecar(reader: Reader, report: Report) -> str | None:
    """The PT checksum sidecar's blocks checked (NOTE [PT checksum sidecar]); None when one does not match."""
    covered = reader.sidecar_tensors() if isinstance(reader, PTReader) else 0
    if not covered:
        return "schema validated; no checksum sidecar covers these PT files (`jasper-ray checksum DIR` records one)"
    problems = reader.verify_checksums()
    report.fields["checksums"].update(recorded=covered, mismatched=len(problems))
    if problems:
        report.problems += problems
        return None
    return f"schema validated; {PT_CHECKSUMS} matches the blocks of {covered} tensors"


def run_verify(args: argparse.Namespace, report: Report) -> None:
    with open_reader(args, report) as reader:
        _verify(reader, report, quiet=args.quiet)


def _verify(reader: Reader, report: Report, quiet: bool) -> None:
    recorded = reader.recorded_checksums()
    total = sum(entry.nbytes for entry in recorded)  # what the bar counts, so it reaches 100%
    f = report.fields
    f["checksums"] = {"recorded": len(recorded), "bytes": total, "mismatched": 0}
    f["schema_valid"] = None
    if recorded:
        with tqdm(total=total, unit="B", unit_scale=True, desc="checksums", disable=quiet) as bar:
            problems = verify_checksums(recorded, on_block=bar.update)
        f["checksums"]["mismatched"] = len(problems)
        if problems:
            report.problems += problems
            return  # the schema is not checked over bytes known to be wrong
    try:
        validate_dataset(reader, progress=not quiet, scan_floats=True)
    except ValueError:
        f["schema_valid"] = False
        raise
    f["schema_valid"] = True
    if recorded:
        what = f"{len(recorded)} checksums match ({human_bytes(total)} read); schema validated"
    elif reader.storage_format == "pt":
        checked = _verify_pt_sidecar(reader, report)
        if checked is None:
            return
        what = checked
    else:  # upstream's converter records none
        what = "schema validated; no checksums recorded in this file (reconvert with jasper-ray convert to add them)"
    report.lines.append(f"ok: {reader.directory} ({_format_text(report)}): {what}")
