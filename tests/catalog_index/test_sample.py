"""The generated sample catalog: files, rows, images and the expected outcome."""

import os
import struct

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalog_index import sample
from schemas import catalog as cat
from schemas import rejected as rej

N_ITEMS = 40


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample")
    return out, sample.generate_catalog(str(out), n_items=N_ITEMS, seed=0)


def _read(info):
    return pa.concat_tables([pq.read_table(f) for f in info["files"]])


def _pylist(table):
    """table.to_pylist(), except that a string that is not valid UTF-8 comes back as its bytes."""
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if column.type == pa.string():
            columns[name] = [_decode(v) for v in column.cast(pa.binary()).to_pylist()]
        else:
            columns[name] = column.to_pylist()
    return [{name: columns[name][i] for name in columns} for i in range(table.num_rows)]


def _decode(raw):
    try:
        return None if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _by_id(table):
    rows = {}
    for row in _pylist(table):
        rows.setdefault(row[cat.ITEM_ID], []).append(row)
    return rows


def test_files_and_schema(generated):
    out, info = generated
    assert len(info["files"]) == 2
    assert info["catalog_glob"] == os.path.join(str(out), "catalog", "part-*.parquet")
    for i, f in enumerate(info["files"]):
        assert os.path.basename(f) == f"part-{i:05d}.parquet"
        schema = pq.read_schema(f)
        assert cat.check_catalog_schema(schema, f) == list(cat.COLUMNS)
        assert "price" in schema.names


def test_row_counts_add_up(generated):
    _, info = generated
    table = _read(info)
    assert table.num_rows == info["rows"] == sum(info["rows_per_file"])
    expected = info["expected"]
    assert expected["indexed"] + sum(expected["rejected"].values()) == info["rows"]
    assert set(expected["rejected"]) <= set(rej.REJECT_REASONS)
    assert set(expected["degraded"]) <= set(rej.IMAGE_REASONS)
    assert expected["rejected"] == {
        rej.MISSING_ITEM_ID: 1,
        rej.EMPTY_ITEM_ID: 1,
        rej.DUPLICATE_ITEM_ID: 1,
        rej.NO_TITLE_OR_IMAGE: 3,
        rej.INVALID_VALUE: 1,
    }
    assert expected["degraded"] == {rej.IMAGE_DECODE_FAILED: 1, rej.IMAGE_FETCH_FAILED: 1, rej.IMAGE_TOO_LARGE: 1}
    # good items + 1 of the duplicate + 3 bad-image rows + 4 fine images + 2 non-Latin titles
    assert expected["indexed"] == N_ITEMS + 1 + 3 + 4 + 2


def test_expected_matches_rules(generated):
    """Recomputes the expected outcome from the parquet rows with the stated rules."""
    _, info = generated
    rows = _pylist(_read(info))
    rejected, degraded, seen = {}, {}, set()
    indexed = 0
    for row in rows:
        item_id, title, uri = row[cat.ITEM_ID], row[cat.TITLE], row[cat.IMAGE_URI]
        has_title = bool(title and title.strip())
        if any(isinstance(v, bytes) for v in row.values()):
            reason = rej.INVALID_VALUE  # decided first: the row never reaches the other rules
        elif item_id is None:
            reason = rej.MISSING_ITEM_ID
        elif item_id == "":
            reason = rej.EMPTY_ITEM_ID
        elif item_id in seen:
            reason = rej.DUPLICATE_ITEM_ID
        elif not has_title and uri is None:
            reason = rej.NO_TITLE_OR_IMAGE
        else:
            reason = None
        if item_id and reason != rej.INVALID_VALUE:
            seen.add(item_id)
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        indexed += 1
        if uri is not None:
            image_reason = _image_reason(uri)
            if image_reason:
                assert has_title, "every bad-image row has a title"
                degraded[image_reason] = degraded.get(image_reason, 0) + 1
    assert indexed == info["expected"]["indexed"]
    assert rejected == info["expected"]["rejected"]
    assert degraded == info["expected"]["degraded"]


def _image_reason(uri):
    if not os.path.exists(uri):
        return rej.IMAGE_FETCH_FAILED
    try:
        with Image.open(uri) as im:
            im.load()
    except Image.DecompressionBombError:
        return rej.IMAGE_TOO_LARGE
    except Exception:
        return rej.IMAGE_DECODE_FAILED
    return None


def test_duplicate_in_two_files_with_different_titles(generated):
    _, info = generated
    (dup_id,) = info["bad_ids"][rej.DUPLICATE_ITEM_ID]
    where = [
        (i, row[cat.TITLE])
        for i, f in enumerate(info["files"])
        for row in _pylist(pq.read_table(f))
        if row[cat.ITEM_ID] == dup_id
    ]
    assert len(where) == 2
    assert where[0][0] != where[1][0]
    assert where[0][1] != where[1][1]


def test_good_items(generated):
    _, info = generated
    rows = _by_id(_read(info))
    good = [f"item-{i:06d}" for i in range(N_ITEMS)]
    assert all(len(rows[i]) == 1 for i in good)
    no_image = [i for i in good if rows[i][0][cat.IMAGE_URI] is None]
    assert no_image == info["bad_ids"]["no_image"]
    assert len(no_image) == N_ITEMS // 4
    assert all(rows[i][0][cat.TITLE] for i in no_image)
    no_title = info["bad_ids"]["image_no_title"]
    assert no_title and all(not rows[i][0][cat.TITLE] and rows[i][0][cat.IMAGE_URI] for i in no_title)
    for i in good:
        uri = rows[i][0][cat.IMAGE_URI]
        if uri is not None:
            assert os.path.isabs(uri)
            with Image.open(uri) as im:
                im.load()
                assert im.mode == "RGB" and 48 <= im.size[0] <= 96


def test_same_category_titles_share_words(generated):
    _, info = generated
    titles = [r[cat.TITLE] for r in _pylist(_read(info)) if (r[cat.ITEM_ID] or "").startswith("item-") and r[cat.TITLE]]
    kinds = {k for k in sample.KINDS if any(k in t for t in titles)}
    assert len(kinds) >= 5


def test_edge_images(generated):
    _, info = generated
    rows = {k: v[0] for k, v in _by_id(_read(info)).items() if k}
    uri = lambda item_id: rows[item_id][cat.IMAGE_URI]  # noqa: E731
    with Image.open(uri("edge-cmyk-jpeg")) as im:
        assert im.format == "JPEG" and im.mode == "CMYK"
    with Image.open(uri("edge-grayscale-jpeg")) as im:
        assert im.format == "JPEG" and im.mode == "L"
    with Image.open(uri("edge-rgba-png")) as im:
        assert im.mode == "RGBA"
        assert im.getextrema()[3][0] < 255  # some transparency
    with Image.open(uri("edge-1x1-png")) as im:
        assert im.size == (1, 1)
    assert not os.path.exists(uri("edge-missing-image"))
    with pytest.raises(Exception):
        with Image.open(uri("edge-corrupt-image")) as im:
            im.load()
    for item_id in ("edge-chinese-title", "edge-greek-title"):
        with Image.open(uri(item_id)) as im:
            im.load()
    assert rows["edge-chinese-title"][cat.TITLE] == "有机绿茶 500克"
    assert rows["edge-greek-title"][cat.TITLE].startswith("Ελαιόλαδο")


def test_huge_png_is_tiny_but_declares_60000(generated):
    _, info = generated
    rows = {k: v[0] for k, v in _by_id(_read(info)).items() if k}
    path = rows["edge-huge-image"][cat.IMAGE_URI]
    assert os.path.getsize(path) < 1024
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (60000, 60000)
    import zlib
    (crc,) = struct.unpack(">I", data[29:33])
    assert crc == zlib.crc32(data[12:29]) & 0xFFFFFFFF
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)


def test_bad_rows_present(generated):
    _, info = generated
    table = _read(info)
    ids = table.column(cat.ITEM_ID).to_pylist()
    assert ids.count(None) == 1
    assert ids.count("") == 1
    titles = {r[cat.ITEM_ID]: r[cat.TITLE] for r in _pylist(table) if r[cat.ITEM_ID]}
    assert titles["edge-null-title-no-image"] is None
    assert titles["edge-empty-title-no-image"] == ""
    # Not valid UTF-8, yet a string column that pyarrow reads back (and fails to decode).
    assert info["bad_ids"][rej.INVALID_VALUE] == ["edge-invalid-utf8-title"]
    assert titles["edge-invalid-utf8-title"] == b"red coffee mug \xff 450ml"
    for f in info["files"]:
        assert pq.read_schema(f).field(cat.TITLE).type == pa.string()
    with pytest.raises(UnicodeDecodeError):
        table.column(cat.TITLE).to_pylist()


def test_no_bad_rows_and_deterministic(tmp_path):
    a = sample.generate_catalog(str(tmp_path / "a"), n_items=12, seed=5, bad_rows=False, n_files=3)
    b = sample.generate_catalog(str(tmp_path / "b"), n_items=12, seed=5, bad_rows=False, n_files=3)
    assert a["rows"] == 12 and a["expected"] == {"indexed": 12, "rejected": {}, "degraded": {}}
    assert len(a["files"]) == 3
    ta, tb = _read(a), _read(b)
    assert ta.drop_columns([cat.IMAGE_URI]).equals(tb.drop_columns([cat.IMAGE_URI]))
    for ua, ub in zip(ta.column(cat.IMAGE_URI).to_pylist(), tb.column(cat.IMAGE_URI).to_pylist()):
        if ua is not None:
            assert open(ua, "rb").read() == open(ub, "rb").read()


def test_single_file_and_stale_parts_removed(tmp_path):
    sample.generate_catalog(str(tmp_path), n_items=8, n_files=3)
    info = sample.generate_catalog(str(tmp_path), n_items=8, n_files=1)
    assert len(info["files"]) == 1
    assert len(list((tmp_path / "catalog").glob("part-*.parquet"))) == 1
    assert _read(info).num_rows == info["rows"]


def test_main_writes_catalog_and_encoders(tmp_path, capsys):
    assert sample.main(["--output", str(tmp_path), "--items", "10", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "encoders" / "text") in out
    assert str(tmp_path / "encoders" / "image") in out
    assert "part-*.parquet" in out
    for name in ("text", "image"):
        assert (tmp_path / "encoders" / name / "saved_model.pb").exists()
    assert len(list((tmp_path / "catalog").glob("part-*.parquet"))) == 2
