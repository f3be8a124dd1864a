"""Format layer: the reader contract on every reader (PT, HDF5, sharded HDF5), the writers, the HDF5 layout,
processes, opening."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _reader_contract import Case, ReaderContract
from _support import (
    UPSTREAM_H5_PATHS,
    ReaderTorchDataset,
    assert_bits_equal,
    block_checksum,
    edit_config,
    load_pt,
    mapping_of,
    save_pt,
    sha256_file,
    take_in_worker,
    take_into_queue,
    write_sharded,
    write_upstream_hdf5,
)

import jasper_ray.formats as formats
from jasper_ray import DatasetFormatError, DatasetNotFoundError, convert_pt_to_hdf5, open_dataset
from jasper_ray.fingerprint import fingerprint
from jasper_ray.formats import MMAP_THRESHOLD_BYTES, decide_mmap
from jasper_ray.formats.base import Writer
from jasper_ray.formats.hdf5 import ChunkedRows, HDF5Reader
from jasper_ray.formats.hdf5_files import ALIGNMENT
from jasper_ray.formats.hdf5_writer import HDF5Writer
from jasper_ray.formats.pt import PTReader, PTWriter
from jasper_ray.formats.sharded import ConcatRows, ShardedHDF5Reader
from jasper_ray.schema import (
    ATTR_CHECKSUM,
    ATTR_CHECKSUM_BLOCK_ROWS,
    ATTR_CONFIG,
    ATTR_FINGERPRINT,
    ATTR_FORMAT_VERSION,
    ATTR_LAYOUT,
    FORMAT_VERSION,
    KEYWORD_IDS,
    PT_CHECKSUMS,
    PT_FILES,
    TENSOR,
    TENSORS,
    split_h5_path,
)

COMPRESSIONS = ["gzip", "lzf", None]


# --- the reader contract ----------------------------------------------------------------------------


class TestPTReader(ReaderContract):
    @pytest.fixture(params=[True, False], ids=["mmap", "load"])
    def case(self, request, small_dir, small_expected) -> Case:
        reader = open_dataset(small_dir, storage_format="pt", use_mmap=request.param)
        assert isinstance(reader, PTReader) and reader.use_mmap is request.param
        return Case(reader, small_expected)


class TestHDF5Reader(ReaderContract):
    @pytest.fixture(
        params=[(c, m) for c in COMPRESSIONS for m in (True, False)],
        ids=lambda p: f"{p[0] or 'none'}-{'mmap' if p[1] else 'load'}",
    )
    def case(self, request, converted, small_expected) -> Case:
        compression, use_mmap = request.param
        reader = open_dataset(converted(compression), storage_format="hdf5", use_mmap=use_mmap)
        assert isinstance(reader, HDF5Reader) and reader.use_mmap is use_mmap
        return Case(reader, small_expected)


@pytest.fixture(scope="session")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path, str | None], Path]:
    """``sharded(source_dir, compression)``: a copy of a PT dataset with ``dataset.shards/`` beside its files,
    tensors cut into several shards (cached)."""
    cache: dict[tuple[Path, str | None], Path] = {}

    def get(source: Path, compression: str | None) -> Path:
        if (source, compression) not in cache:
            out = tmp_path_factory.mktemp(f"sharded-{compression or 'none'}") / "ds"
            shutil.copytree(source, out)
            write_sharded(out, compression)
            cache[source, compression] = out
        return cache[source, compression]

    return get


class TestShardedHDF5Reader(ReaderContract):
    @pytest.fixture(
        params=[("gzip", True), ("gzip", False), (None, True), ("lzf", True)],
        ids=lambda p: f"{p[0] or 'none'}-{'mmap' if p[1] else 'load'}",
    )
    def case(self, request, sharded, small_dir, small_expected) -> Case:
        compression, use_mmap = request.param
        reader = open_dataset(sharded(small_dir, compression), storage_format="hdf5", use_mmap=use_mmap)
        assert isinstance(reader, ShardedHDF5Reader) and reader.use_mmap is use_mmap
        assert isinstance(reader.array("steering_centroid"), ConcatRows), "rows span several shard files"
        return Case(reader, small_expected)


class TestEmptyKeywordTable(ReaderContract):
    """keyword_embs is [0, D] and every pair has no keywords (upstream's placeholder)."""

    @pytest.fixture(params=["pt", "gzip", "none", "sharded"])
    def case(self, request, empty_keywords_dir, empty_keywords_converted, empty_keywords_expected, sharded) -> Case:
        assert empty_keywords_expected.tensors["keyword_embs"].shape == (0, 32)
        if request.param == "pt":
            return Case(open_dataset(empty_keywords_dir, "pt", use_mmap=True), empty_keywords_expected)
        if request.param == "sharded":
            reader = open_dataset(sharded(empty_keywords_dir, "gzip"), "hdf5", use_mmap=True)
            assert isinstance(reader, ShardedHDF5Reader)
            return Case(reader, empty_keywords_expected)
        compression = None if request.param == "none" else request.param
        return Case(open_dataset(empty_keywords_converted(compression), "hdf5", use_mmap=True), empty_keywords_expected)

    def test_empty_table_gathers(self, case: Case) -> None:
        assert case.reader.shape("keyword_embs") == (0, 32)
        assert case.reader.take("keyword_embs", []).shape == (0, 32)
        with pytest.raises(IndexError, match=r"index 0 out of range \[0, 0\)"):
            case.reader.take("keyword_embs", [0])


# --- how each format serves its arrays ----------------------------------------------------------------


def _mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}


def test_pt_mmap_maps_the_file_and_load_does_not(small_dir: Path) -> None:
    path = str((small_dir / TENSOR["steering_residual"].pt_file).resolve())
    mapped = open_dataset(small_dir, "pt", use_mmap=True)
    arr = mapped.array("steering_residual")
    assert path in _mapped_files()
    loaded = open_dataset(small_dir, "pt", use_mmap=False)
    other = str((small_dir / TENSOR["steering_keyword_weighted"].pt_file).resolve())
    arr2 = loaded.array("steering_keyword_weighted")
    assert other not in _mapped_files()
    del arr, arr2


def test_keyword_lists_load_with_the_collector_paused(small_dir: Path, small_expected, monkeypatch) -> None:
    """The keyword lists are unpickled with the cyclic collector off (a list per pair, no cycles), and it is
    on again after, whether the load succeeds or fails; the lists come out as they were saved."""
    import gc

    from jasper_ray.formats import pt as pt_format

    real_load, seen = pt_format.load_pt, []

    def load(path: Path, *, mmap: bool) -> object:
        seen.append(gc.isenabled())
        return real_load(path, mmap=mmap)

    monkeypatch.setattr(pt_format, "load_pt", load)
    values, offsets = open_dataset(small_dir, "pt").keyword_csr()
    assert seen == [False] and gc.isenabled()
    lists = [values[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    assert lists == [list(ids) for ids in small_expected.keyword_ids]

    def refuse(path: Path, *, mmap: bool) -> object:
        raise DatasetFormatError(f"{path}: refused")

    monkeypatch.setattr(pt_format, "load_pt", refuse)
    with pytest.raises(DatasetFormatError, match="refused"):
        open_dataset(small_dir, "pt").keyword_csr()
    assert gc.isenabled()


def test_uncompressed_hdf5_is_served_through_memmap(converted) -> None:
    reader = open_dataset(converted(None), "hdf5", use_mmap=True)
    for spec in TENSORS:
        arr = reader.array(spec.name)
        if reader.shape(spec.name)[0]:
            mapping = mapping_of(arr)
            assert mapping is not None, f"{spec.name} is not served from a mapping"
            assert Path(mapping.filename) == reader.path.resolve()
            assert mapping.offset == reader.file[spec.h5_path].id.get_offset()
            assert not arr.flags.writeable, f"{spec.name}: a writable mapping could corrupt dataset.h5"
    values, _ = reader.keyword_csr()
    assert mapping_of(values) is not None


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=lambda c: c or "none")
def test_our_hdf5_files_align_every_tensor(converted, compression) -> None:
    """Mapped tensors start on 64-byte boundaries: aligned for every dtype, rows on cache lines."""
    reader = open_dataset(converted(compression), "hdf5", use_mmap=True)
    for spec in TENSORS:
        offset = reader.file[spec.h5_path].id.get_offset()
        if compression is None and reader.shape(spec.name)[0]:
            assert offset % ALIGNMENT == 0, f"{spec.name} starts at byte {offset}"


def test_unaligned_mapped_tensors_gather_their_values(dataset_copy: Path, small_expected) -> None:
    """Upstream's h5py writes tensors at any offset; mapped, some are not aligned for their dtype, and
    numpy's unaligned path is 20-70x slower: they are gathered as rows of bytes, to the same values."""
    write_upstream_hdf5(dataset_copy, compression=None)
    with h5py.File(dataset_copy / "dataset.h5", "a") as f:  # rewrite each tensor after 3 bytes of padding
        for i, h5_path in enumerate(UPSTREAM_H5_PATHS.values()):
            data = f[h5_path][...]
            del f[h5_path]
            f.create_dataset(f"padding_{i}", data=np.zeros(3, np.uint8))
            f.create_dataset(h5_path, data=data)
    reader = open_dataset(dataset_copy, "hdf5", use_mmap=True)
    unaligned = [s.name for s in TENSORS if not reader.array(s.name).flags.aligned]
    assert unaligned, "precondition: the upstream-style file has a tensor at an unaligned offset"
    rng = np.random.default_rng(0)
    for name in unaligned:
        want = small_expected.tensors[name]
        idx = rng.integers(0, len(want), 50)
        assert_bits_equal(reader.take(name, idx), want[idx], name)
        out = np.full_like(want[idx], 7)
        assert reader.take(name, idx, out) is out
        assert_bits_equal(out, want[idx], f"{name} (out=)")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux smaps needed to see madvise flags")
def test_mapped_tensors_ask_for_huge_pages(converted, small_dir: Path) -> None:
    """Every mapping a reader makes carries MADV_HUGEPAGE (smaps VmFlags "hg"): random gathers over
    4 KB pages miss the TLB on nearly every row."""
    for reader, file in (
        (open_dataset(converted(None), "hdf5", use_mmap=True), "dataset.h5"),
        (open_dataset(small_dir, "pt", use_mmap=True), TENSOR["source_embs"].pt_file),
    ):
        arr = reader.array("source_embs")
        address = arr.__array_interface__["data"][0]
        flags, inside = None, False
        for line in Path("/proc/self/smaps").read_text().splitlines():
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                inside = lo <= address < hi and fields[-1].endswith(file)
            elif fields and fields[0] == "VmFlags:" and inside:
                flags = fields[1:]
        assert flags is not None, f"{file}: no mapping holds source_embs"
        assert "hg" in flags, f"{file}: VmFlags {flags}"


def test_compressed_hdf5_gathers_by_chunk_and_load_reads_into_ram(converted) -> None:
    mapped = open_dataset(converted("gzip"), "hdf5", use_mmap=True)
    assert isinstance(mapped.array("steering_centroid"), ChunkedRows)
    loaded = open_dataset(converted("gzip"), "hdf5", use_mmap=False)
    arr = loaded.array("steering_centroid")
    assert type(arr) is np.ndarray and arr.flags.owndata
    loaded_none = open_dataset(converted(None), "hdf5", use_mmap=False)
    arr = loaded_none.array("steering_centroid")
    assert mapping_of(arr) is None and arr.flags.owndata


def test_legacy_pt_file_falls_back_to_a_full_load(dataset_copy: Path, small_expected, caplog) -> None:
    """A pre-1.6 (non-zip) torch.save file cannot be mapped; mmap mode loads it whole, with a warning."""
    want = small_expected.tensors["centroid_embs"]
    torch.save(torch.from_numpy(want), dataset_copy / "centroid_embs.pt", _use_new_zipfile_serialization=False)
    reader = open_dataset(dataset_copy, "pt", use_mmap=True)
    with caplog.at_level(logging.WARNING, logger="jasper_ray"):
        assert_bits_equal(reader.take("centroid_embs", [3, 0, 3]), want[[3, 0, 3]], "legacy centroid_embs")
    assert any("cannot be memory-mapped" in r.getMessage() for r in caplog.records)


class Evil:
    """Any object beyond tensors and plain containers: weights_only must refuse it."""

    def __reduce__(self):
        return (os.getpid, ())


def test_pt_reader_never_unpickles_arbitrary_objects(dataset_copy: Path) -> None:
    torch.save([[1, 2], Evil()], dataset_copy / KEYWORD_IDS.pt_file)
    reader = open_dataset(dataset_copy, "pt")
    with pytest.raises(DatasetFormatError, match=r"pair_keyword_ids\.pt: refused to load"):
        reader.keyword_ids([0])


def test_pt_reader_rejects_a_list_where_a_tensor_belongs(dataset_copy: Path) -> None:
    save_pt(dataset_copy, "pair_relevance.pt", [0.5, 0.7])
    with pytest.raises(DatasetFormatError, match=r"pair_relevance\.pt: expected a tensor, found list"):
        open_dataset(dataset_copy, "pt").take("pair_relevance", [0])


def test_pt_keyword_ids_must_be_lists_of_ints(dataset_copy: Path) -> None:
    save_pt(dataset_copy, KEYWORD_IDS.pt_file, [[1], "abc"])
    with pytest.raises(DatasetFormatError, match=r"pair_keyword_ids\.pt at position 1: expected a list"):
        open_dataset(dataset_copy, "pt").keyword_ids([0])


def test_missing_tensor_file_is_named(dataset_copy: Path) -> None:
    (dataset_copy / "negative_tiers.pt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"Required tensor file not found: .*negative_tiers\.pt"):
        open_dataset(dataset_copy, "pt").take("negative_tiers", [0])


# --- the PT writer: upstream's exact layout -------------------------------------------------------------


def test_pt_writer_writes_upstreams_files(small_dir: Path, small_expected) -> None:
    names = {p.name for p in small_dir.iterdir()}
    upstream = set(PT_FILES) | {"train_idx.pt", "val_idx.pt", "test_idx.pt", "config.json"}
    assert names == upstream | {PT_CHECKSUMS}  # synth adds the checksum sidecar (tests/formats/test_pt_checksums.py)
    for spec in TENSORS:
        obj = load_pt(small_dir / spec.pt_file)
        assert isinstance(obj, torch.Tensor) and obj.dtype == torch.from_numpy(np.empty(0, spec.dtype)).dtype
    kw = load_pt(small_dir / KEYWORD_IDS.pt_file)  # a pickled List[List[int]], loadable with weights_only=True
    assert type(kw) is list and len(kw) == small_expected.n_pairs
    assert all(type(ids) is list and all(type(k) is int for k in ids) for ids in kw)
    assert all(ids == sorted(set(ids)) for ids in kw), "upstream's lists are sorted and de-duplicated"
    for split in ("train", "val", "test"):
        assert load_pt(small_dir / f"{split}_idx.pt").dtype == torch.int64
    config = json.loads((small_dir / "config.json").read_text())
    for key in ("embedding_dim", "n_neg", "steering_probabilities", "curriculum", "n_pairs"):
        assert key in config
    assert not list(small_dir.glob(".*tmp-*")), "no temp files left behind"


def test_synthetic_data_is_realistic(small_expected) -> None:
    t = small_expected.tensors
    for name in ("question_embs", "source_embs", "keyword_embs", "centroid_embs"):
        np.testing.assert_allclose(np.linalg.norm(t[name], axis=1), 1.0, rtol=1e-5, err_msg=name)
    q = t["question_embs"][t["pair_index"][:, 0]]
    c = t["centroid_embs"][t["pair_cluster_id"]]
    assert (q * c).sum(1).mean() > 0.5, "questions cluster around their centroid, not white noise"
    assert set(np.unique(t["negative_tiers"]).tolist()) == {1, 2, 3, 4}
    splits = small_expected.splits
    all_ids = np.concatenate(list(splits.values()))
    assert sorted(all_ids.tolist()) == list(range(small_expected.n_pairs)), "splits partition the pairs"
    questions = {s: set(t["pair_index"][ids, 0].tolist()) for s, ids in splits.items()}
    assert not questions["train"] & questions["val"] and not questions["train"] & questions["test"]


# --- the Writer contract: every writer writes what any reader reads -----------------------------------------


def _writer(kind: str, directory: Path) -> Writer:
    return PTWriter(directory) if kind == "pt" else HDF5Writer(directory / "dataset.h5", "gzip")


@pytest.mark.parametrize("kind", ["pt", "hdf5"])
def test_a_writer_writes_any_readers_dataset(tmp_path: Path, converted, small_expected, kind: str) -> None:
    """Streamed from a chunked, lazily read HDF5 source, read back bit for bit in the writer's format."""
    source = open_dataset(converted("lzf"), "hdf5", use_mmap=True)
    with _writer(kind, tmp_path) as writer:
        writer.write_from(source)
    back = open_dataset(tmp_path, kind)
    for spec in TENSORS:
        assert_bits_equal(back.read(spec.name), small_expected.tensors[spec.name], f"{kind} {spec.name}")
    assert [ids.tolist() for ids in back.keyword_ids(np.arange(back.n_pairs))] == small_expected.keyword_ids
    for split, ids in small_expected.splits.items():
        assert_bits_equal(back.split(split), ids, f"{kind} split {split}")
    assert back.config == small_expected.config
    assert back.verify_checksums() == []
    assert not list(tmp_path.glob(".*tmp-*")), "no temp files left behind"


@pytest.mark.parametrize("kind", ["pt", "hdf5"])
def test_a_writer_copying_pt_files_writes_the_converters_bytes(tmp_path: Path, small_dir: Path, kind: str) -> None:
    """PT to PT gives upstream's files again, byte for byte; PT to HDF5 gives convert_pt_to_hdf5's file."""
    source = open_dataset(small_dir, "pt", use_mmap=True)
    with _writer(kind, tmp_path) as writer:
        writer.write_from(source, fingerprint(source.files()) if kind == "hdf5" else None)
    if kind == "pt":
        assert {p.name: sha256_file(p) for p in tmp_path.iterdir()} == {
            p.name: sha256_file(p)
            for p in small_dir.iterdir()
            if p.name != PT_CHECKSUMS  # synth's, not upstream's
        }
    else:
        reference = tmp_path / "reference.h5"
        convert_pt_to_hdf5(small_dir, "gzip", output=reference, progress=False, validate=False)
        assert sha256_file(tmp_path / "dataset.h5") == sha256_file(reference)


def test_an_error_in_the_hdf5_writers_block_publishes_nothing(converted, tmp_path: Path) -> None:
    source = open_dataset(converted("gzip"), "hdf5", use_mmap=True)
    previous = tmp_path / "dataset.h5"
    previous.write_bytes(b"the previous file")
    with pytest.raises(RuntimeError, match="stop"), HDF5Writer(previous, "gzip") as writer:
        writer.write_config(source.config)
        writer.write_tensor("pair_index", source.array("pair_index"))
        raise RuntimeError("stop")
    assert previous.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset.h5"], "no temp file is left"


# --- the HDF5 writer's layout ------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", COMPRESSIONS, ids=lambda c: c or "none")
def test_hdf5_layout(converted, small_expected, compression) -> None:
    directory = converted(compression)
    with h5py.File(directory / "dataset.h5", "r") as f:
        assert f.attrs[ATTR_FORMAT_VERSION] == FORMAT_VERSION
        assert json.loads(f.attrs[ATTR_CONFIG]) == small_expected.config
        fingerprint = json.loads(f.attrs[ATTR_FINGERPRINT])
        assert set(fingerprint) == set(PT_FILES) | {"train_idx.pt", "val_idx.pt", "test_idx.pt"}
        for spec in TENSORS:
            dset = f[spec.h5_path]
            want = small_expected.tensors[spec.name]
            assert dset.dtype == spec.dtype and dset.shape == want.shape
            block_rows = int(dset.attrs[ATTR_CHECKSUM_BLOCK_ROWS])
            assert dset.attrs[ATTR_CHECKSUM] == block_checksum(want, block_rows), spec.name
            if compression is None:
                assert dset.chunks is None and dset.compression is None, f"{spec.name} must be contiguous"
                if dset.size:
                    assert dset.id.get_offset() is not None
            else:
                assert dset.compression == compression and dset.shuffle, spec.name
                assert dset.chunks[1:] == want.shape[1:], f"{spec.name}: chunks must hold whole rows"
                assert dset.chunks[0] * dset.dtype.itemsize * max(1, int(np.prod(want.shape[1:]))) <= 64 << 10
        group = f[KEYWORD_IDS.h5_group]
        assert group.attrs[ATTR_LAYOUT] == "csr" and set(group) == {"values", "offsets"}
        lengths = [len(k) for k in small_expected.keyword_ids]
        assert f[KEYWORD_IDS.h5_offsets][...].tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
        for split, ids in small_expected.splits.items():
            assert_bits_equal(f[split_h5_path(split)][...], ids, split)
            attrs = f[split_h5_path(split)].attrs
            assert attrs[ATTR_CHECKSUM] == block_checksum(ids, int(attrs[ATTR_CHECKSUM_BLOCK_ROWS]))


def test_conversion_keeps_pt_files_and_reports_real_sizes(dataset_copy: Path, caplog) -> None:
    before = {p.name: sha256_file(p) for p in dataset_copy.iterdir()}
    with caplog.at_level(logging.INFO, logger="jasper_ray"):
        report = convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
    after = {p.name: sha256_file(p) for p in dataset_copy.iterdir() if p.name != "dataset.h5"}
    assert after == before, "PT files are preserved unchanged"
    h5 = dataset_copy / "dataset.h5"
    assert report.output == h5 and report.output_bytes == h5.stat().st_size
    assert report.source_bytes == sum(p.stat().st_size for p in dataset_copy.glob("*.pt"))
    assert report.saving_percent == pytest.approx((1 - report.output_bytes / report.source_bytes) * 100)
    messages = [r.getMessage() for r in caplog.records]
    for line in (
        f"Converting PT format to HDF5 in {dataset_copy}",
        "Converting embeddings...",
        "Converting pair data...",
        "Converting negatives...",
        "Converting steering tensors...",
        "Converting split indices...",
        f"Conversion complete. HDF5 file saved to {h5}",
    ):
        assert line in messages
    sizes = next(m for m in messages if m.startswith("File sizes:"))
    assert sizes == (
        f"File sizes: PT format={report.source_bytes / 2**20:.1f} MB, HDF5={report.output_bytes / 2**20:.1f} MB "
        f"(compression: {report.saving_percent:.1f}%)"
    )
    assert not list(dataset_copy.glob(".*tmp-*"))


@pytest.mark.parametrize("compression", ["gzip", None], ids=["gzip", "none"])
def test_tiny_blocks_give_the_same_file_contents(dataset_copy: Path, converted, compression) -> None:
    """Streaming in small row blocks (one chunk, or a few rows at a time) writes the same data as big blocks."""
    convert_pt_to_hdf5(dataset_copy, compression, progress=False, block_bytes=1000)
    with h5py.File(dataset_copy / "dataset.h5", "r") as small, h5py.File(converted(compression) / "dataset.h5") as big:
        names: list[str] = []
        big.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert len(names) == len(TENSORS) + 2 + 3
        for name in names:
            assert_bits_equal(small[name][...], big[name][...], name)
            assert small[name].attrs[ATTR_CHECKSUM] == big[name].attrs[ATTR_CHECKSUM]


def test_bad_compression_is_rejected_before_writing(dataset_copy: Path) -> None:
    with pytest.raises(ValueError, match="compression must be 'gzip', 'lzf' or None, got 'zstd'"):
        convert_pt_to_hdf5(dataset_copy, "zstd", progress=False)
    assert not (dataset_copy / "dataset.h5").exists() and not list(dataset_copy.glob(".*tmp-*"))


def test_reconversion_replaces_the_file(dataset_copy: Path, small_expected) -> None:
    convert_pt_to_hdf5(dataset_copy, "gzip", progress=False)
    convert_pt_to_hdf5(dataset_copy, None, progress=False)
    reader = open_dataset(dataset_copy, "hdf5", use_mmap=True)
    assert reader.file.attrs["compression"] == "none"
    assert mapping_of(reader.array("steering_centroid")) is not None
    assert_bits_equal(reader.read("steering_centroid"), small_expected.tensors["steering_centroid"], "steering")


def test_opening_the_h5_file_directly(converted, small_expected) -> None:
    reader = open_dataset(converted("lzf") / "dataset.h5", use_mmap=True)
    assert reader.storage_format == "hdf5"
    assert_bits_equal(reader.take("pair_index", [9, 1]), small_expected.tensors["pair_index"][[9, 1]], "index")


# --- processes: fork, spawn, DataLoader ------------------------------------------------------------------


@pytest.fixture(scope="module")
def used_readers(small_dir, converted, sharded):
    """One reader per storage kind, each already used in this process (handles and mappings open)."""
    readers = {
        "pt": open_dataset(small_dir, "pt", use_mmap=True),
        "h5_gzip": open_dataset(converted("gzip"), "hdf5", use_mmap=True),
        "h5_none": open_dataset(converted(None), "hdf5", use_mmap=True),
        "sharded_gzip": open_dataset(sharded(small_dir, "gzip"), "hdf5", use_mmap=True),
    }
    for reader in readers.values():
        reader.take("steering_centroid", [0, 5])
        reader.keyword_ids([1])
        reader.split("val")
    assert readers["h5_gzip"]._file is not None  # a live h5py handle that fork inherits
    return readers


def _check_worker_result(result, reader_name, small_expected, idx) -> None:
    assert not isinstance(result, str), f"{reader_name}: worker failed: {result}"
    assert result["pid"] != os.getpid()
    want = small_expected.tensors["steering_centroid"]
    assert_bits_equal(result["rows"], want[idx], f"{reader_name} rows")
    assert_bits_equal(result["range"], want[3:11], f"{reader_name} range")
    assert [k.tolist() for k in result["keywords"]] == [small_expected.keyword_ids[p] for p in idx[:7]]
    assert_bits_equal(result["split"], small_expected.splits["val"], f"{reader_name} split")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_readers_pickle_into_worker_processes(used_readers, small_expected, method) -> None:
    idx = np.random.default_rng(11).integers(0, small_expected.n_pairs, size=64)
    args = [(reader, "steering_centroid", idx) for reader in used_readers.values()]
    with mp.get_context(method).Pool(1) as pool:
        results = pool.starmap(take_in_worker, args)
    for name, result in zip(used_readers, results):
        _check_worker_result(result, name, small_expected, idx)
    # The parent's readers still work after their children read.
    for name, reader in used_readers.items():
        assert_bits_equal(reader.take("steering_centroid", idx), small_expected.tensors["steering_centroid"][idx], name)


def test_readers_inherited_over_fork_reopen(used_readers, small_expected) -> None:
    """fork without pickling: the child finds the parent's open handles and must reopen its own."""
    ctx = mp.get_context("fork")
    idx = np.arange(40)[::-1].copy()
    for name, reader in used_readers.items():
        queue = ctx.Queue()
        proc = ctx.Process(target=take_into_queue, args=(reader, "steering_centroid", idx, queue))
        proc.start()
        result = queue.get(timeout=60)
        proc.join(timeout=60)
        assert proc.exitcode == 0
        _check_worker_result(result, name, small_expected, idx)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_torch_dataloader_workers(used_readers, small_expected, method) -> None:
    ids = small_expected.splits["val"][:48]
    dataset = ReaderTorchDataset(used_readers, "steering_residual", ids)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, num_workers=2, multiprocessing_context=method)
    batches = list(loader)
    want = small_expected.tensors["steering_residual"][ids]
    for name in used_readers:
        got = torch.cat([b[name] for b in batches]).numpy()
        assert_bits_equal(got, want, f"{method} {name}")
    pids = {int(p) for b in batches for p in b["pid"]}
    assert len(pids) == 2 and os.getpid() not in pids, "both workers read"
    counts = torch.cat([b["kw_count"] for b in batches])
    want_counts = [len(small_expected.keyword_ids[p]) for p in ids]
    for column in range(len(used_readers)):
        assert counts[:, column].tolist() == want_counts


def test_pickled_reader_does_not_carry_a_mapping(used_readers) -> None:
    """An np.memmap would pickle its whole payload; a reader must not."""
    reader = used_readers["h5_none"]
    assert mapping_of(reader.array("steering_centroid")) is not None
    state = pickle.loads(pickle.dumps(reader)).__dict__
    assert state["_arrays"] == {} and state["_file"] is None and state["_keywords"] is None


# --- opening: mmap decision and errors ----------------------------------------------------------------------


def test_decide_mmap_threshold_and_ram_share() -> None:
    huge_ram = 1 << 50
    assert decide_mmap(MMAP_THRESHOLD_BYTES, available=huge_ram) is False
    assert decide_mmap(MMAP_THRESHOLD_BYTES + 1, available=huge_ram) is True
    assert MMAP_THRESHOLD_BYTES == 10 * 2**30
    assert decide_mmap(1 << 20, available=huge_ram) is False
    # More than half the RAM available now: map, even far below 10 GiB.
    assert decide_mmap(3 << 30, available=4 << 30) is True
    assert decide_mmap(2 << 30, available=4 << 30) is False
    assert decide_mmap((2 << 30) + 1, available=4 << 30) is True
    assert decide_mmap(100 << 30, available=1 << 60) is True


def test_use_mmap_none_decides_from_bytes_on_disk(small_dir: Path, monkeypatch) -> None:
    on_disk = sum(p.stat().st_size for p in small_dir.glob("*.pt"))
    reader = open_dataset(small_dir, "pt")
    assert reader.nbytes_on_disk() == on_disk
    assert reader.use_mmap is False, "a 1 MB dataset on a machine with GBs free is loaded"
    monkeypatch.setattr(formats, "available_ram_bytes", lambda: on_disk)  # now it is more than half the RAM
    assert open_dataset(small_dir, "pt").use_mmap is True
    seen = []
    monkeypatch.setattr(formats, "decide_mmap", lambda nbytes, available=None: seen.append(nbytes) or False)
    assert open_dataset(small_dir, "pt").use_mmap is False
    # The real bytes on disk, or the size config.json declares (upstream's estimate) if that is larger.
    assert seen == [max(on_disk, formats.declared_bytes(reader.config))]


def test_use_mmap_none_honours_the_real_size_over_a_small_config(dataset_copy: Path, monkeypatch) -> None:
    edit_config(dataset_copy, n_pairs=1)  # config claims a tiny dataset; the files decide
    on_disk = sum(p.stat().st_size for p in dataset_copy.glob("*.pt"))
    monkeypatch.setattr(formats, "available_ram_bytes", lambda: on_disk)
    assert open_dataset(dataset_copy, "pt").use_mmap is True
    monkeypatch.setattr(formats, "available_ram_bytes", lambda: 4 * on_disk)
    assert open_dataset(dataset_copy, "pt").use_mmap is False


def test_explicit_use_mmap_wins(small_dir: Path, converted, monkeypatch) -> None:
    monkeypatch.setattr(formats, "decide_mmap", lambda *a, **k: pytest.fail("explicit use_mmap must not be decided"))
    for directory, fmt in ((small_dir, "pt"), (converted(None), "hdf5")):
        assert open_dataset(directory, fmt, use_mmap=True).use_mmap is True
        assert open_dataset(directory, fmt, use_mmap=False).use_mmap is False


def test_no_dataset_files_found(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(DatasetNotFoundError) as info:
        open_dataset(tmp_path)
    message = str(info.value)
    assert message.startswith(f"No dataset files found in {tmp_path}.")
    assert "dataset.h5" in message and "question_embs.pt" in message
    assert isinstance(info.value, FileNotFoundError)


def test_invalid_storage_format(small_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"Invalid storage_format: zarr\. Must be 'auto', 'pt', or 'hdf5'"):
        open_dataset(small_dir, storage_format="zarr")


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetNotFoundError, match=f"Dataset directory not found: {missing}"):
        open_dataset(missing)


def test_explicit_format_without_its_files(small_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"HDF5 file not found: .*dataset\.h5"):
        open_dataset(small_dir, storage_format="hdf5")
    with pytest.raises(DatasetNotFoundError, match=r"HDF5 file not found: .*dataset\.h5"):
        open_dataset(tmp_path, storage_format="hdf5")
    with pytest.raises(DatasetNotFoundError, match=f"PT files not found in {tmp_path}"):
        open_dataset(tmp_path, storage_format="pt")


def test_not_an_hdf5_file(dataset_copy: Path) -> None:
    (dataset_copy / "dataset.h5").write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(DatasetFormatError, match=r"dataset\.h5: not a readable HDF5 file"):
        open_dataset(dataset_copy, "hdf5").take("pair_index", [0])


def test_auto_prefers_a_fresh_hdf5(converted, small_dir: Path) -> None:
    assert open_dataset(converted("gzip")).storage_format == "hdf5"
    assert open_dataset(small_dir).storage_format == "pt"


def test_new_hdf5_files_are_written_without_a_file_lock(tmp_path: Path) -> None:
    """Piece tasks carry no HDF5_USE_FILE_LOCKING (NOTE [prestarted workers]): the files they write take no lock
    of their own, so a process with HDF5's default locking opens one while it is being written."""
    import subprocess
    import sys

    from jasper_ray.formats.hdf5_files import create_file

    path = tmp_path / "part.h5"
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    read = "import h5py, sys; print(h5py.File(sys.argv[1], 'r')['x'][:].tolist())"
    with create_file(path) as f:
        f["x"] = np.arange(3)
        f.flush()
        run = subprocess.run([sys.executable, "-c", read, str(path)], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "[0, 1, 2]", run.stderr[-500:]
