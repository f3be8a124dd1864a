"""The columns of a converted file: every dataset it holds, and which of a reader's arrays fills each.

Names, shapes, dtypes and source strings only, so a plan's columns travel to conversion tasks; the
writers (``hdf5_writer``) and the conversion plan share them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..schema import KEYWORD_IDS, PRECISION_FLOAT32, SPLIT_DTYPE, SPLIT_H5_GROUP, TENSORS, split_h5_path
from .arrays import RowArray
from .base import Reader
from .precision import stored_dtype

# The top-level groups of the file, in upstream's order (its converter writes them so): the schema's
# tensor groups as they first appear, then the splits.
GROUP_ORDER = (*dict.fromkeys(s.h5_path.split("/")[0] for s in TENSORS), SPLIT_H5_GROUP)
# Column sources: which of a reader's arrays fills a dataset.
TENSOR_SOURCE, SPLIT_SOURCE, KEYWORD_SOURCE = "tensor", "split", "keywords"
KEYWORD_VALUES, KEYWORD_OFFSETS = "values", "offsets"


@dataclass(frozen=True)
class Column:
    """One dataset of the file: where it goes, its shape and dtype, and which of a reader's arrays fills it.

    Names, integers and strings only: columns travel to conversion tasks.
    """

    h5_path: str
    shape: tuple[int, ...]
    dtype: np.dtype  # as stored: a reducible tensor's at the conversion's precision
    source: str  # "tensor:<name>", "split:<name>", "keywords:values", "keywords:offsets"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def group(self) -> str:
        return self.h5_path.split("/")[0]

    @property
    def source_kind(self) -> str:
        """``TENSOR_SOURCE``, ``SPLIT_SOURCE`` or ``KEYWORD_SOURCE``."""
        return self.source.partition(":")[0]

    @property
    def source_name(self) -> str:
        """The tensor's or split's name, or which keyword array (``KEYWORD_VALUES``, ``KEYWORD_OFFSETS``)."""
        return self.source.partition(":")[2]

    def rows(self, reader: Reader) -> RowArray:
        """The array this column's rows come from (lazily read: a mapping or chunked rows)."""
        if self.source_kind == TENSOR_SOURCE:
            return reader.array(self.source_name)
        if self.source_kind == SPLIT_SOURCE:
            return reader.split(self.source_name)
        values, offsets = reader.keyword_csr()
        return values if self.source_name == KEYWORD_VALUES else offsets


def tensor_columns(reader: Reader, precision: str = PRECISION_FLOAT32) -> list[Column]:
    """The datasets of the tensors and splits, in upstream's group order: known from the files' metadata, without
    parsing the keyword lists."""
    found = [
        Column(s.h5_path, reader.shape(s.name), stored_dtype(s.name, precision), f"{TENSOR_SOURCE}:{s.name}")
        for s in TENSORS
    ]
    for split in reader.split_names():
        found.append(Column(split_h5_path(split), (len(reader.split(split)),), SPLIT_DTYPE, f"{SPLIT_SOURCE}:{split}"))
    return sorted(found, key=lambda c: GROUP_ORDER.index(c.group))


def keyword_columns(reader: Reader) -> list[Column]:
    """The keyword ids' two datasets (CSR values and offsets): their shapes need the keyword lists parsed."""
    values, offsets = reader.keyword_csr()
    return [
        Column(KEYWORD_IDS.h5_values, (values.shape[0],), KEYWORD_IDS.dtype, f"{KEYWORD_SOURCE}:{KEYWORD_VALUES}"),
        Column(KEYWORD_IDS.h5_offsets, (len(offsets),), np.dtype("int64"), f"{KEYWORD_SOURCE}:{KEYWORD_OFFSETS}"),
    ]


def columns(reader: Reader, precision: str = PRECISION_FLOAT32) -> list[Column]:
    """Every dataset of the file for ``reader``'s dataset at ``precision``, in upstream's group order."""
    found = tensor_columns(reader, precision) + keyword_columns(reader)
    return sorted(found, key=lambda c: GROUP_ORDER.index(c.group))
