"""The plan of a conversion: every output dataset cut into pieces of work.

A plan splits every dataset of the output (a ``Column``) into row ranges
aligned to checksum blocks (themselves whole HDF5 chunks), of about
``piece_bytes`` each; small tensors go whole. The same sources and options
always give the same pieces and the same key, so an interrupted conversion can
find and reuse what it finished. Plans hold paths, names and integers only:
they travel to Ray tasks.

One word per meaning: a *piece* is a unit of conversion work (one task, one
part file); *shards* are the files of the sharded layout (there, each piece's
file becomes a shard). Public names from before this distinction keep
"shard" for a piece: ``convert(shard_bytes=...)``, ``--shard-size``,
``ConversionReport.shards``, and the keys of ``plan.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fingerprint import fingerprint
from ..formats.base import Reader
from ..formats.checksum import block_rows
from ..formats.chunks import CompressionOpts, check_options
from ..formats.columns import KEYWORD_SOURCE, Column, keyword_columns, tensor_columns
from ..schema import FORMAT_VERSION, HDF5_FILE, LAYOUT_SINGLE, PRECISION_FLOAT32, SHARDS_DIR, piece_file, work_dir_name

if TYPE_CHECKING:
    from ..storage import Location
    from .ranged import RangedTensor, RemoteOutput

PIECE_BYTES = 256 << 20


def work_dir_for(output: Path) -> Path:
    """Where the pieces of a conversion into ``output`` live until assembly (hidden: never auto-detected)."""
    return output.with_name(work_dir_name(output.name))


@dataclass(frozen=True)
class Piece:
    """Rows ``start:stop`` of the dataset at ``h5_path``: one task's work, written to one part file."""

    piece_id: str
    h5_path: str
    start: int
    stop: int

    @property
    def file_name(self) -> str:
        return piece_file(self.piece_id)


@dataclass(frozen=True)
class PieceTask:
    """Everything one task needs: paths, names and integers, never data or handles."""

    dataset_dir: str
    work_dir: str
    piece: Piece
    column: Column
    compression: str | None
    compression_opts: CompressionOpts
    shuffle: bool
    # Where the column's bytes begin in the work directory's preallocated file, when the piece writes its rows
    # there in place (NOTE [in-place assembly] in pieces); None: the piece writes a part file of its own.
    in_place_offset: int | None = None
    # A remote PT source: its directory, and this column's byte ranges there when it is a tensor
    # (NOTE [ranged sources] in ranged); a remote sharded output: where the shard and its record go.
    source: Location | None = None
    ranged: RangedTensor | None = None
    upload: RemoteOutput | None = None
    # A float table's source file or object, named when the piece refuses a value that is not finite
    # (NOTE [floats checked as written] in validate); "": nothing refused here.
    refuse_nonfinite: str = ""


@dataclass
class ConversionPlan:
    dataset_dir: str
    compression: str | None
    compression_opts: CompressionOpts
    shuffle: bool
    piece_bytes: int
    config: dict[str, Any]
    source_fingerprint: dict[str, Any]
    columns: list[Column]
    pieces: list[Piece]
    precision: str = PRECISION_FLOAT32
    key: str = field(default="")

    def __post_init__(self) -> None:
        if not self.key:
            body = json.dumps(self._body(), sort_keys=True, default=str)
            self.key = hashlib.sha256(body.encode()).hexdigest()[:16]

    def _body(self) -> dict[str, Any]:
        """What the key hashes, and plan.json holds. Its keys predate the word "piece" ("shards", "jobs"): kept.
        Its source fingerprint has no crc32s (NOTE [crc32 beside the work] in ``fingerprint``), and it leaves
        out the keyword columns, planned later (NOTE [keyword lists beside the pieces] in parallel): their
        shapes follow from the sources, which the fingerprint covers. A conversion interrupted under a version
        that planned otherwise starts over."""
        tensors = [c for c in self.columns if c.source_kind != KEYWORD_SOURCE]
        paths = {c.h5_path for c in tensors}
        jobs = [
            {"h5_path": c.h5_path, "shape": list(c.shape), "dtype": c.dtype.str, "source": c.source} for c in tensors
        ]
        pieces = [
            {"shard_id": p.piece_id, "h5_path": p.h5_path, "start": p.start, "stop": p.stop}
            for p in self.pieces
            if p.h5_path in paths
        ]
        precision = {} if self.precision == PRECISION_FLOAT32 else {"precision": self.precision}
        return {
            **precision,
            "format_version": FORMAT_VERSION,
            "compression": self.compression,
            "compression_opts": self.compression_opts,
            "shuffle": self.shuffle,
            "shard_bytes": self.piece_bytes,
            "config": self.config,
            "source_fingerprint": self.source_fingerprint,
            "jobs": jobs,
            "shards": pieces,
        }

    def add_columns(self, found: list[Column]) -> list[Piece]:
        """Plan ``found`` after the columns planned so far; return their pieces. The key stays what it was."""
        added = cut_pieces(found, self.piece_bytes, first=len(self.pieces))
        self.columns += found
        self.pieces += added
        return added

    def tasks(
        self, work_dir: Path, offsets: dict[str, int] | None = None, pieces: list[Piece] | None = None
    ) -> list[PieceTask]:
        """One task per piece (of ``pieces``, default all); with ``offsets`` (each column's place in the
        preallocated file), in place."""
        column_of = {c.h5_path: c for c in self.columns}
        return [
            PieceTask(
                self.dataset_dir,
                str(work_dir),
                p,
                column_of[p.h5_path],
                self.compression,
                self.compression_opts,
                self.shuffle,
                None if offsets is None else offsets[p.h5_path],
            )
            for p in (self.pieces if pieces is None else pieces)
        ]

    def pieces_of(self, column: Column) -> list[Piece]:
        return [p for p in self.pieces if p.h5_path == column.h5_path]

    @property
    def total_bytes(self) -> int:
        return sum(c.nbytes for c in self.columns)


def plan_conversion(
    reader: Reader,
    compression: str | None = "gzip",
    compression_opts: CompressionOpts = None,
    shuffle: bool = True,
    piece_bytes: int = PIECE_BYTES,
    precision: str = PRECISION_FLOAT32,
    source_fingerprint: dict[str, Any] | None = None,
    *,
    keywords: bool = True,
) -> ConversionPlan:
    """A deterministic plan: the same sources and options always give the same pieces and key.
    ``source_fingerprint``: given for sources that are not local files (the objects' identities).
    The keyword columns are planned last (``keywords=False``: not yet, ``add_columns`` later)."""
    check_options(compression, compression_opts, shuffle)
    found = tensor_columns(reader, precision)
    plan = ConversionPlan(
        str(reader.directory),
        compression,
        compression_opts,
        shuffle,
        int(piece_bytes),
        reader.config,
        fingerprint(reader.files()) if source_fingerprint is None else source_fingerprint,
        found,
        cut_pieces(found, piece_bytes),
        precision,
    )
    if keywords:
        plan.add_columns(keyword_columns(reader))
    return plan


def cut_pieces(found: list[Column], piece_bytes: int, first: int = 0) -> list[Piece]:
    """The pieces of ``found``, numbered from ``first`` in order."""
    pieces: list[Piece] = []
    for column in found:
        for i, (start, stop) in enumerate(piece_ranges(column, piece_bytes)):
            piece_id = f"{first + len(pieces):05d}-{column.h5_path.replace('/', '.')}-{i}"
            pieces.append(Piece(piece_id, column.h5_path, start, stop))
    return pieces


def piece_ranges(column: Column, piece_bytes: int) -> list[tuple[int, int]]:
    """The column's row ranges: whole checksum blocks, about ``piece_bytes`` each (one range when empty)."""
    rows = column.shape[0]
    row_bytes = max(1, column.nbytes // max(rows, 1))
    block = block_rows(column.shape, column.dtype.itemsize)
    per_piece = block * max(1, piece_bytes // (block * row_bytes))
    return [(start, min(start + per_piece, rows)) for start in range(0, rows, per_piece)] if rows else [(0, 0)]


def default_output(dataset_dir: Path, layout: str) -> Path:
    return dataset_dir / (HDF5_FILE if layout == LAYOUT_SINGLE else SHARDS_DIR)
