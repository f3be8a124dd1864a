"""16-bit storage (NOTE [16-bit storage] in formats.precision): the writers at each precision, through every
conversion path, layout and codec; reads within the documented error; the plain-h5py recipe of the docs;
checksums, verify and first-touch checks over the stored 16-bit values; the CLI and inspect.

Expected values come from torch's own float32 -> float16 / bfloat16 casts of the PT source (round to nearest
even), not from jasper_ray's encoder."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _support import REPO, Expected, assert_bits_equal, flip_byte, save_pt, write_sharded

from jasper_ray import ValidationError, convert, convert_pt_to_hdf5, open_dataset
from jasper_ray.cli import main
from jasper_ray.conversion.up_to_date import why_convert
from jasper_ray.fingerprint import fingerprint
from jasper_ray.formats.hdf5_writer import HDF5Writer
from jasper_ray.formats.precision import RELATIVE_ERROR, decode, encode
from jasper_ray.formats.verified import check_finite
from jasper_ray.schema import (
    ATTR_FINITE,
    ATTR_PRECISION,
    HDF5_FILE,
    LAYOUT_SINGLE,
    MANIFEST,
    PRECISION_DTYPES,
    SHARDS_DIR,
    TENSOR,
    TENSORS,
)

SIXTEEN = ("float16", "bfloat16")
TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def reference(values: np.ndarray, precision: str) -> tuple[np.ndarray, np.ndarray]:
    """(the stored bits, their float32 values) as torch casts them."""
    half = torch.from_numpy(np.ascontiguousarray(values)).to(TORCH[precision])
    stored = half.view(torch.uint16) if precision == "bfloat16" else half
    return stored.numpy(), half.float().numpy()


@pytest.fixture(scope="module")
def sixteen(tmp_path_factory: pytest.TempPathFactory, small_dir: Path) -> Callable[[str, str | None], Path]:
    """``sixteen(precision, compression)``: a copy of the small dataset converted in this process."""
    cache: dict[tuple[str, str | None], Path] = {}

    def get(precision: str, compression: str | None) -> Path:
        if (precision, compression) not in cache:
            out = tmp_path_factory.mktemp(f"p-{precision}-{compression}") / "ds"
            shutil.copytree(small_dir, out)
            convert_pt_to_hdf5(out, compression, progress=False, precision=precision)
            cache[precision, compression] = out
        return cache[precision, compression]

    return get


def check_values(directory: Path, expected: Expected, precision: str) -> None:
    """Every tensor: 16-bit ones stored as torch casts them and read as float32 within the documented error;
    the others bit for bit as in the PT files."""
    reader = open_dataset(directory)
    assert reader.precision == precision
    for spec in TENSORS:
        want = expected.tensors[spec.name]
        if not spec.reducible:
            assert_bits_equal(reader.read(spec.name), want, spec.name)
            continue
        bits, values = reference(want, precision)
        assert_bits_equal(reader.read(spec.name), bits, spec.name)
        idx = np.arange(len(want))[::-3]
        got = reader.take(spec.name, idx)
        assert_bits_equal(got, values[idx], spec.name)
        stored = np.empty((len(idx), *want.shape[1:]), PRECISION_DTYPES[precision])
        assert_bits_equal(reader.take(spec.name, idx, stored), bits[idx], f"{spec.name} as stored")
        bound = RELATIVE_ERROR[precision] * np.abs(want[idx]) + np.finfo(np.float16).smallest_subnormal
        assert (np.abs(got - want[idx]) <= bound).all(), spec.name
    assert reader.verify_checksums() == []
    reader.check_all()


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
@pytest.mark.parametrize("precision", SIXTEEN)
def test_round_trip_within_documented_error(sixteen, small_expected: Expected, precision: str, compression) -> None:
    path = sixteen(precision, compression) / HDF5_FILE
    with h5py.File(path, "r") as f:
        assert f.attrs[ATTR_PRECISION] == precision
        assert f["embeddings/sources"].attrs[ATTR_PRECISION] == precision
        assert ATTR_PRECISION not in f["pair_data/relevance"].attrs
        assert f["steering/residual"].dtype == PRECISION_DTYPES[precision]
        assert f["steering/distances"].dtype == np.float32 and f["negatives/tiers"].dtype == np.int64
    check_values(path.parent, small_expected, precision)


@pytest.mark.parametrize("precision", SIXTEEN)
def test_sharded_layout_gathers_across_shards(dataset_copy: Path, small_expected: Expected, precision: str) -> None:
    """Shards of a few chunks each: gathers spanning shard files decode part by part."""
    shards = write_sharded(dataset_copy, "gzip", precision=precision)
    assert json.loads((shards / MANIFEST).read_text())["precision"] == precision
    reader = open_dataset(dataset_copy)
    assert len(reader.layout.tensors[0].shards) > 1 or any(len(t.shards) > 1 for t in reader.layout.tensors)
    check_values(dataset_copy, small_expected, precision)


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(
    ("layout", "precision", "compression"),
    [  # single, none: pieces write in place (NOTE [in-place assembly] in conversion.pieces)
        ("single", "bfloat16", "gzip"),
        ("single", "float16", None),
        ("single", "bfloat16", None),
        ("sharded", "float16", None),
        ("sharded", "bfloat16", "lzf"),
    ],
)
def test_ray_conversion_stores_what_one_process_stores(
    dataset_copy: Path, sixteen, layout: str, precision: str, compression
) -> None:
    """Ray pieces, both layouts: the same stored bytes as the single-process writer; a rerun at another
    precision is not up to date."""
    report = convert(dataset_copy, compression=compression, layout=layout, precision=precision, progress=False)
    assert not report.up_to_date
    ours, single = open_dataset(dataset_copy), open_dataset(sixteen(precision, compression))
    for spec in TENSORS:
        assert_bits_equal(ours.read(spec.name), np.asarray(single.read(spec.name)), spec.name)
    assert ours.verify_checksums() == []
    ours.close()  # the up-to-date check opens the file with HDF5's default locking
    again = dict(compression=compression, layout=layout, progress=False)
    assert convert(dataset_copy, precision=precision, **again).up_to_date
    other = "float16" if precision == "bfloat16" else "bfloat16"
    assert not convert(dataset_copy, precision=other, **again).up_to_date
    assert open_dataset(dataset_copy).precision == other


def test_up_to_date_needs_the_same_precision(dataset_copy: Path) -> None:
    convert_pt_to_hdf5(dataset_copy, None, progress=False, precision="bfloat16")
    out = dataset_copy / HDF5_FILE
    check = (dataset_copy, out, LAYOUT_SINGLE, None, None, True, 1 << 30)
    assert why_convert(*check, "bfloat16") is None
    for other in ("float32", "float16"):
        assert "another precision" in (why_convert(*check, other) or "")
    assert not convert_pt_to_hdf5(dataset_copy, None, progress=False).up_to_date  # float32 now
    assert open_dataset(dataset_copy).precision == "float32"
    with h5py.File(out, "r") as f:  # float32 files carry no precision attribute, as before
        assert ATTR_PRECISION not in f.attrs and ATTR_PRECISION not in f["embeddings/questions"].attrs


def test_pt_sources_are_float32_and_precision_applies_at_conversion(small_dir: Path, sixteen) -> None:
    assert open_dataset(small_dir, "pt").precision == "float32"
    converted = open_dataset(sixteen("bfloat16", None))
    assert converted.precision == "bfloat16" and converted.config == open_dataset(small_dir, "pt").config


def docs_recipe() -> str:
    """The plain-h5py bfloat16 reader of docs/formats.md (the python block after its marker)."""
    text = (REPO / "docs" / "formats.md").read_text()
    found = re.search(r"<!-- bf16-recipe -->\s*```python\n(.*?)```", text, re.S)
    assert found, "docs/formats.md lost its bf16 recipe block"
    return found.group(1)


@pytest.mark.parametrize("precision", [*SIXTEEN, "float32"])
def test_plain_h5py_reads_with_the_documented_recipe(
    sixteen, converted, small_expected: Expected, precision: str, monkeypatch
) -> None:
    recipe = docs_recipe()
    assert len(recipe.strip().splitlines()) <= 3 and "jasper_ray" not in recipe
    directory = converted("gzip") if precision == "float32" else sixteen(precision, "gzip")
    monkeypatch.chdir(directory)
    scope: dict = {}
    exec(compile(recipe, "docs/formats.md", "exec"), scope)  # noqa: S102 - the documented recipe, run as written
    want = small_expected.tensors["question_embs"]
    if precision != "float32":
        want = reference(want, precision)[1]
    assert_bits_equal(scope["x"], want, "the recipe's x")


def test_float16_refuses_values_beyond_its_range(dataset_copy: Path, small_expected: Expected) -> None:
    sources = small_expected.tensors["source_embs"].copy()
    sources[7, 3] = 1e6
    save_pt(dataset_copy, TENSOR["source_embs"].pt_file, sources)
    message = r"^embeddings/sources at position \(7, 3\): found value 1000000.0.*bfloat16"
    with pytest.raises(ValidationError, match=message):
        convert_pt_to_hdf5(dataset_copy, None, progress=False, precision="float16")
    assert not (dataset_copy / HDF5_FILE).exists()
    convert_pt_to_hdf5(dataset_copy, None, progress=False, precision="bfloat16")  # float32's range
    assert open_dataset(dataset_copy).take("source_embs", [7])[0, 3] == 999424.0  # 1e6 to bfloat16's 8 bits


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
@pytest.mark.parametrize("precision", SIXTEEN)
def test_first_touch_finds_nan_and_inf_in_16bit_values(
    dataset_copy: Path, small_expected: Expected, precision: str, bad: float
) -> None:
    sources = small_expected.tensors["source_embs"].copy()
    sources[1500, 2] = bad
    save_pt(dataset_copy, TENSOR["source_embs"].pt_file, sources)
    out = dataset_copy / "unchecked.h5"
    pt = open_dataset(dataset_copy, "pt")
    with HDF5Writer(out, None, precision=precision) as writer:  # the writer checks no values: a bad file
        writer.write_from(pt, fingerprint(pt.files()))
    reader = open_dataset(out, verify="off")
    assert np.isnan(bad) == np.isnan(reader.take("source_embs", [1500])[0, 2])  # stored as it was
    with pytest.raises(ValidationError, match=rf"embeddings/sources at position \(1500, 2\): found value {bad}"):
        open_dataset(out).take("source_embs", [3])  # first touch of the block that holds it


def test_check_finite_reads_bfloat16_bits() -> None:
    values = np.array([[1.0, -2.5], [np.inf, 0.0]], dtype=np.float32)
    check_finite("t", encode(values[:1], "bfloat16"))
    with pytest.raises(ValidationError, match=r"t at position \(1, 0\): found value inf"):
        check_finite("t", encode(values, "bfloat16"))


def test_encode_rounds_as_torch_and_keeps_nan_inf() -> None:
    rng = np.random.default_rng(3)
    values = (rng.standard_normal((257, 33)) * 10.0 ** rng.integers(-6, 4, (257, 1))).astype(np.float32)
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11], np.float32)  # halfway: to even
    values[0, : len(ties)] = ties
    for precision in SIXTEEN:
        assert_bits_equal(encode(values, precision), reference(values, precision)[0], precision)
        assert_bits_equal(decode(encode(values, precision)), reference(values, precision)[1], precision)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 3.4e38], np.float32)
    back = decode(encode(special, "bfloat16"))
    assert np.isnan(back[0]) and back[1] == np.inf and back[2] == -np.inf and np.signbit(back[3])
    assert back[4] == np.inf  # beyond bfloat16's largest finite value: rounds to inf, as torch


@pytest.mark.parametrize("precision", SIXTEEN)
def test_checksums_cover_the_stored_bytes_and_verify_finds_a_change(sixteen, tmp_path: Path, precision, capsys) -> None:
    directory = Path(shutil.copytree(sixteen(precision, None), tmp_path / "ds"))
    assert main(["verify", str(directory), "-q"]) == 0
    capsys.readouterr()
    with h5py.File(directory / HDF5_FILE, "r") as f:
        offset = f["embeddings/sources"].id.get_offset() + 2 * 32 * 5  # row 5 of a 16-bit [S, 32] table
    flip_byte(directory / HDF5_FILE, offset)
    assert open_dataset(directory).verify_checksums()
    assert main(["verify", str(directory), "-q"]) != 0
    assert "embeddings/sources" in capsys.readouterr().err


def test_cli_convert_precision_and_inspect(dataset_copy: Path, capsys) -> None:
    args = ["convert", str(dataset_copy), "--single-process", "--compression", "none", "--precision", "bfloat16"]
    assert main([*args, "-q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bfloat16"
    assert main(["inspect", str(dataset_copy)]) == 0
    text = capsys.readouterr().out
    line = r"^precision bfloat16 \(embedding and steering tensors; bfloat16 bits stored as uint16\)$"
    assert re.search(line, text, re.M)
    assert re.search(r"^source_embs\s+\(\d+, 32\)\s+uint16\s", text, re.M)
    assert main(["inspect", str(dataset_copy), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["precision"] == "bfloat16"
    dtypes = {t["name"]: t["dtype"] for t in doc["tensors"]}
    assert dtypes["steering_centroid"] == "uint16" and dtypes["pair_relevance"] == "float32"
    assert main(["inspect", str(dataset_copy), "--format", "pt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "float32"
    assert main([*args, "-q"]) == 0
    assert capsys.readouterr().out.startswith("Up to date")
    assert main([*args[:-1], "half"]) == 2
    assert "invalid choice: 'half'" in capsys.readouterr().err


def test_sharded_inspect_and_verify(dataset_copy: Path, capsys) -> None:
    write_sharded(dataset_copy, None, precision="float16")
    assert (dataset_copy / SHARDS_DIR).is_dir()
    assert main(["inspect", str(dataset_copy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "float16"
    assert main(["verify", str(dataset_copy), "-q"]) == 0


@pytest.mark.parametrize("precision", SIXTEEN)
def test_writers_record_16bit_blocks_finite(sixteen, precision: str) -> None:
    """First touch skips the value scan of blocks whose writer found them finite: bfloat16 bits count as floats."""
    from jasper_ray.formats.checksum import all_finite

    with h5py.File(sixteen(precision, None) / HDF5_FILE, "r") as f:
        assert f["embeddings/sources"].attrs[ATTR_FINITE]
    bits = encode(np.array([1.0, -np.inf, 2.0], np.float32), "bfloat16")
    assert all_finite(bits[[0, 2]]) and not all_finite(bits)
    assert not all_finite(encode(np.array([np.nan], np.float32), "bfloat16"))
