"""A generated sample catalog with real images, and the tiny encoders to index it.

``generate_catalog`` writes synthetic product pictures (a coloured shape on a
background; the shape and background follow the product kind, the fill follows
the colour, so items of one category look alike and their titles share words)
and parquet catalog files, plus (by default) deliberately bad and edge rows.
It returns what was written and what the index pipeline must make of it.

    python -m catalog_index.sample --output DIR [--items N] [--seed S] [--no-bad-rows]

also writes the tiny TF Hub style encoders to DIR/encoders/{text,image}.
"""

import argparse
import glob
import os
import struct
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from schemas import catalog as cat
from schemas import rejected as rej

PRICE = "price"  # an extra column the pipeline must ignore
SAMPLE_SCHEMA = cat.CATALOG_SCHEMA.append(pa.field(PRICE, pa.float64(), nullable=True))

# kind -> (shape, background RGB, sizes used in titles)
KINDS = {
    "apple juice": ("circle", (250, 245, 225), ("1l", "500ml", "2l")),
    "cotton t-shirt": ("square", (225, 235, 250), ("s", "m", "l", "xl")),
    "running shoes": ("triangle", (235, 250, 235), ("size 40", "size 42", "size 44")),
    "coffee mug": ("ring", (245, 230, 215), ("300ml", "450ml")),
    "wool scarf": ("stripes", (240, 240, 240), ("180cm", "200cm")),
    "ceramic vase": ("diamond", (250, 230, 240), ("small", "large")),
    "leather wallet": ("wide", (220, 215, 205), ("slim", "classic")),
    "yoga mat": ("bar", (215, 240, 240), ("4mm", "6mm")),
    "desk lamp": ("cross", (60, 60, 70), ("led", "40w")),
    "water bottle": ("tall", (235, 235, 255), ("750ml", "1l")),
}
COLOURS = {
    "red": (210, 30, 40),
    "green": (40, 160, 60),
    "blue": (30, 70, 200),
    "yellow": (240, 200, 20),
    "purple": (130, 50, 160),
    "orange": (245, 130, 20),
    "pink": (240, 120, 170),
    "black": (20, 20, 20),
}
ADJECTIVES = ("organic", "classic", "premium", "everyday", "eco", "deluxe")
BRANDS = ("Northwind", "Acme", "Globex", "Initech", "Umbrella")
IMAGE_SIZES = (48, 64, 80, 96)

NO_IMAGE_FRACTION = 0.25  # good items with image_uri null (indexed from the title)


def _draw_product(rng, kind, colour, size):
    """A colourful synthetic product picture as an RGB Pillow image."""
    shape, background, _ = KINDS[kind]
    bg = tuple(int(np.clip(c + rng.integers(-8, 9), 0, 255)) for c in background)
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    cx = size / 2 + rng.uniform(-0.08, 0.08) * size
    cy = size / 2 + rng.uniform(-0.08, 0.08) * size
    r = size * rng.uniform(0.28, 0.36)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(3, int(r / 2.5)))
    elif shape == "stripes":
        band = max(2, size // 10)
        for y in range(band, size - band, 2 * band):
            d.rectangle([size * 0.1, y, size * 0.9, y + band - 1], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill)
    elif shape == "wide":
        d.rounded_rectangle([cx - r * 1.3, cy - r * 0.6, cx + r * 1.3, cy + r * 0.6], radius=r / 4, fill=fill)
    elif shape == "bar":
        d.rectangle([size * 0.08, cy - r * 0.25, size * 0.92, cy + r * 0.25], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif shape == "tall":
        d.ellipse([cx - r * 0.5, cy - r * 1.2, cx + r * 0.5, cy + r * 1.2], fill=fill)
    return img


def _save(img, path, **kwargs):
    img.save(path, **kwargs)
    return os.path.abspath(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_huge_png_header(path: str, width: int = 60000, height: int = 60000) -> str:
    """A tiny PNG file whose header declares width x height RGB pixels.

    Signature + IHDR (correct CRC) + a tiny IDAT + IEND; the pixels are never
    allocated. Decoding it for real would need width*height*3 bytes.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 16)  # far too short for the declared size
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(data)
    return os.path.abspath(path)


def _row(item_id, title, description=None, image_uri=None, price=None):
    return {
        cat.ITEM_ID: item_id,
        cat.TITLE: title,
        cat.DESCRIPTION: description,
        cat.IMAGE_URI: image_uri,
        PRICE: price,
    }


def _table(rows):
    """The rows as a SAMPLE_SCHEMA table; a bytes value in a string column is stored as is.

    Arrow validates UTF-8 when building a string array from Python values, so a
    column holding bytes is built as binary and reinterpreted as string without
    validation: that is how a value that is not valid UTF-8 gets into a catalog.
    """
    if not any(isinstance(v, bytes) for r in rows for v in r.values()):
        return pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
    arrays = []
    for field in SAMPLE_SCHEMA:
        values = [r[field.name] for r in rows]
        if field.type == pa.string() and any(isinstance(v, bytes) for v in values):
            raw = pa.array([v.encode("utf-8") if isinstance(v, str) else v for v in values], pa.binary())
            arrays.append(pa.Array.from_buffers(pa.string(), len(raw), raw.buffers(), raw.null_count))
        else:
            arrays.append(pa.array(values, field.type))
    return pa.Table.from_arrays(arrays, schema=SAMPLE_SCHEMA)


def _good_items(rng, n_items, images_dir):
    """n_items good rows: ~1/4 without an image, a few with an image but no title."""
    kinds = list(KINDS)
    colours = list(COLOURS)
    n_no_image = int(round(n_items * NO_IMAGE_FRACTION))
    n_empty_title = min(max(1, n_items // 40), max(0, n_items - n_no_image)) if n_items else 0
    order = rng.permutation(n_items)
    no_image = set(order[:n_no_image].tolist())
    empty_title = set(order[n_no_image : n_no_image + n_empty_title].tolist())

    rows, ids = [], {"no_image": [], "image_no_title": []}
    for i in range(n_items):
        item_id = f"item-{i:06d}"
        kind = kinds[int(rng.integers(len(kinds)))]
        colour = colours[int(rng.integers(len(colours)))]
        size_word = KINDS[kind][2][int(rng.integers(len(KINDS[kind][2])))]
        title = f"{colour} {kind} {size_word}"
        adjective = ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]
        brand = BRANDS[int(rng.integers(len(BRANDS)))]
        description = None if rng.random() < 0.2 else f"{adjective.capitalize()} {colour} {kind} by {brand}."
        price = None if rng.random() < 0.05 else round(float(rng.uniform(1, 200)), 2)
        image_uri = None
        if i in no_image:
            ids["no_image"].append(item_id)
        else:
            size = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
            img = _draw_product(rng, kind, colour, size)
            if i % 2:
                image_uri = _save(img, os.path.join(images_dir, f"{item_id}.png"))
            else:
                image_uri = _save(img, os.path.join(images_dir, f"{item_id}.jpg"), quality=90)
        if i in empty_title:
            # An image but no title: indexed from the image ("" and null both occur).
            title = "" if len(ids["image_no_title"]) % 2 == 0 else None
            ids["image_no_title"].append(item_id)
        rows.append(_row(item_id, title, description, image_uri, price))
    return rows, ids


def _bad_rows(rng, images_dir):
    """The deliberately bad and edge rows; returns (rows, dup_pair, bad_ids, expected)."""
    img = lambda kind, colour, size=64: _draw_product(rng, kind, colour, size)  # noqa: E731
    path = lambda name: os.path.join(images_dir, name)  # noqa: E731
    rows = []
    rejected, degraded, bad_ids = {}, {}, {}

    def add(reason_table, reason, row):
        rows.append(row)
        reason_table[reason] = reason_table.get(reason, 0) + 1
        bad_ids.setdefault(reason, []).append(row[cat.ITEM_ID])

    # Rejected: item_id is null (otherwise a perfectly good row).
    add(rejected, rej.MISSING_ITEM_ID,
        _row(None, "red apple juice 1l", image_uri=_save(img("apple juice", "red"), path("edge-null-id.png"))))
    # Rejected: item_id is the empty string.
    add(rejected, rej.EMPTY_ITEM_ID, _row("", "blue cotton t-shirt m"))
    # Rejected: no title ("", null or whitespace only) and no image.
    add(rejected, rej.NO_TITLE_OR_IMAGE, _row("edge-empty-title-no-image", ""))
    add(rejected, rej.NO_TITLE_OR_IMAGE, _row("edge-null-title-no-image", None))
    add(rejected, rej.NO_TITLE_OR_IMAGE, _row("edge-blank-title-no-image", " \t "))
    # Rejected: a title that is not valid UTF-8 (bytes, written unvalidated by _table).
    add(rejected, rej.INVALID_VALUE, _row("edge-invalid-utf8-title", b"red coffee mug \xff 450ml"))

    # Duplicated item_id: the same id twice with different titles, placed in two
    # different files by the caller. All occurrences but one are rejected.
    dup_id = "edge-duplicate-id"
    dup_pair = [
        _row(dup_id, "green wool scarf 180cm", image_uri=_save(img("wool scarf", "green"), path("edge-dup-a.jpg"))),
        _row(dup_id, "purple wool scarf 200cm (relisted)"),
    ]
    rejected[rej.DUPLICATE_ITEM_ID] = 1
    bad_ids[rej.DUPLICATE_ITEM_ID] = [dup_id]

    # Degraded (indexed from the title): image bytes that are no image at all.
    corrupt = path("edge-corrupt.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"not an image: " + rng.bytes(200))
    add(degraded, rej.IMAGE_DECODE_FAILED, _row("edge-corrupt-image", "orange coffee mug 300ml",
                                                 image_uri=os.path.abspath(corrupt)))
    # Degraded: image_uri points to a file that does not exist.
    add(degraded, rej.IMAGE_FETCH_FAILED, _row("edge-missing-image", "pink ceramic vase small",
                                                image_uri=os.path.abspath(path("edge-missing-file.jpg"))))
    # Degraded: a PNG whose header declares 60000x60000 pixels (a decompression bomb).
    add(degraded, rej.IMAGE_TOO_LARGE, _row("edge-huge-image", "black leather wallet slim",
                                             image_uri=write_huge_png_header(path("edge-huge.png"))))

    # Fine (indexed normally): unusual but valid images.
    fine = []
    one = _save(Image.new("RGB", (1, 1), (200, 30, 40)), path("edge-1x1.png"))
    fine.append(_row("edge-1x1-png", "red yoga mat 4mm", image_uri=one))
    gray = _save(img("desk lamp", "black").convert("L"), path("edge-gray.jpg"), quality=90)
    fine.append(_row("edge-grayscale-jpeg", "black desk lamp led", image_uri=gray))
    rgba = img("water bottle", "blue").convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    ImageDraw.Draw(alpha).ellipse([8, 8, rgba.size[0] - 8, rgba.size[1] - 8], fill=255)
    rgba.putalpha(alpha)
    fine.append(_row("edge-rgba-png", "blue water bottle 750ml", image_uri=_save(rgba, path("edge-rgba.png"))))
    cmyk = _save(img("running shoes", "yellow").convert("CMYK"), path("edge-cmyk.jpg"), quality=90)
    fine.append(_row("edge-cmyk-jpeg", "yellow running shoes size 42", image_uri=cmyk))
    # Fine: non-Latin titles without spaces between words (Chinese) and Greek.
    fine.append(_row("edge-chinese-title", "有机绿茶 500克", "来自云南的有机绿茶。",
                     _save(img("apple juice", "green"), path("edge-chinese.jpg"), quality=90)))
    fine.append(_row("edge-greek-title", "Ελαιόλαδο εξαιρετικά παρθένο 1 λίτρο", None,
                     _save(img("water bottle", "green"), path("edge-greek.png"))))
    rows.extend(fine)
    bad_ids["fine_edge"] = [r[cat.ITEM_ID] for r in fine]
    return rows, dup_pair, bad_ids, rejected, degraded


def generate_catalog(out_dir: str, n_items: int = 300, seed: int = 0, bad_rows: bool = True,
                     n_files: int = 2) -> dict:
    """Writes out_dir/images/* and out_dir/catalog/part-{i:05d}.parquet.

    Stale part files in out_dir/catalog are removed first. Returns::

        {"catalog_glob": ".../catalog/part-*.parquet",
         "files": [abs paths, one per file, in order],
         "rows": total rows written (all files),
         "rows_per_file": [...],
         "images_dir": ...,
         "expected": {"indexed": int,
                      "rejected": {reason: count},   # only reasons with count > 0
                      "degraded": {reason: count}},  # indexed without their image
         "bad_ids": {reason or group: [item_id, ...]}}

    bad_ids groups: every rejected/degraded reason present, plus "fine_edge"
    (unusual but valid rows, indexed normally), "no_image" (good items indexed
    from the title only) and "image_no_title" (good items indexed from the image).
    """
    if n_items < 0 or n_files < 1:
        raise ValueError("n_items must be >= 0 and n_files >= 1")
    rng = np.random.default_rng(seed)
    out_dir = os.path.abspath(out_dir)
    images_dir = os.path.join(out_dir, "images")
    catalog_dir = os.path.join(out_dir, "catalog")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(catalog_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(catalog_dir, "part-*.parquet")):
        os.remove(stale)

    rows, ids = _good_items(rng, n_items, images_dir)
    rejected, degraded, bad_ids, dup_pair = {}, {}, {}, []
    if bad_rows:
        edge, dup_pair, bad_ids, rejected, degraded = _bad_rows(rng, images_dir)
        rows.extend(edge)
    bad_ids.update(ids)

    # Shuffle, split into n_files, then put the duplicate pair into two different files.
    rows = [rows[i] for i in rng.permutation(len(rows))]
    parts = [list(chunk) for chunk in np.array_split(np.array(rows, dtype=object), n_files)]
    for k, row in enumerate(dup_pair):
        part = parts[k % n_files]
        part.insert(int(rng.integers(len(part) + 1)), row)

    files = []
    for i, part in enumerate(parts):
        file_path = os.path.join(catalog_dir, f"part-{i:05d}.parquet")
        pq.write_table(_table(part), file_path)
        files.append(file_path)

    total = sum(len(p) for p in parts)
    indexed = total - sum(rejected.values())
    return {
        "catalog_glob": os.path.join(catalog_dir, "part-*.parquet"),
        "files": files,
        "rows": total,
        "rows_per_file": [len(p) for p in parts],
        "images_dir": images_dir,
        "expected": {"indexed": indexed, "rejected": rejected, "degraded": degraded},
        "bad_ids": bad_ids,
    }


def main(argv=None) -> int:
    from pipelines import flags

    parser = flags.ArgumentParser(
        prog="catalog-index sample",
        description="Write a sample catalog with real images and tiny TF Hub style encoders.",
    )
    parser.add_argument("--output", required=True, help="[required] directory to write into")
    parser.add_argument("--items", type=int, default=300, help="number of good items (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the generated items, pictures and tiny encoders (default: %(default)s)")
    parser.add_argument("--files", type=int, default=2, help="number of parquet files (default: %(default)s)")
    parser.add_argument("--no-bad-rows", action="store_true",
                        help="write only good items (by default, deliberately bad rows are added)")
    args = parser.parse_args(argv)
    if args.items < 0 or args.files < 1:
        parser.error("--items must be >= 0 and --files >= 1")

    from pipelines import preflight

    preflight.check_output(args.output)  # a folder it can write: one clear line, before anything is written
    from embedding import tiny  # imports TensorFlow: only when writing encoders

    info = generate_catalog(args.output, n_items=args.items, seed=args.seed,
                            bad_rows=not args.no_bad_rows, n_files=args.files)
    encoders = os.path.join(os.path.abspath(args.output), "encoders")
    text = tiny.build_text_encoder(os.path.join(encoders, "text"), seed=args.seed)
    image = tiny.build_image_encoder(os.path.join(encoders, "image"), seed=args.seed)
    expected = info["expected"]
    print(f"catalog: {info['catalog_glob']} ({info['rows']} rows in {len(info['files'])} files)")
    print(f"expected: indexed={expected['indexed']} rejected={expected['rejected']} degraded={expected['degraded']}")
    print(f"tiny text encoder: {text}")
    print(f"tiny image encoder: {image}")
    print(f"index it:  catalog-index index --catalog '{info['catalog_glob']}' --output "
          f"{os.path.join(os.path.abspath(args.output), 'index')}   (built-in encoders; add "
          f"--text-encoder {text} --image-encoder {image} for the tiny ones)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
