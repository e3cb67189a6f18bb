"""The shared Grocery Store dataset as catalog rows (benchmarks only; see ../shared/data/README.md)."""

import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATASET = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data", "grocery-store", "dataset"))


def require_dataset():
    if not os.path.isdir(DATASET):
        sys.exit(f"skipped: the Grocery Store data is not at {DATASET} (see ../shared/data/README.md)")
    return DATASET


def classes():
    """{fine_id: (product name, description, coarse_id)}."""
    out = {}
    with open(os.path.join(DATASET, "classes.csv"), newline="") as f:
        for row in csv.DictReader(f):
            path = os.path.join(DATASET, row["Product Description Path (str)"].lstrip("/"))
            with open(path, encoding="utf-8", errors="replace") as d:
                description = " ".join(d.read().split())
            out[int(row["Class ID (int)"])] = (row["Class Name (str)"].replace("-", " "), description,
                                               int(row["Coarse Class ID (int)"]))
    return out


def split(name):
    """Rows of train or val: dicts with item_id, title, description, image_uri, fine, coarse."""
    names = classes()
    rows = []
    with open(os.path.join(DATASET, f"{name}.txt")) as f:
        for line in f:
            if not line.strip():
                continue
            photo, fine, coarse = [x.strip() for x in line.split(",")]
            title, description, _ = names[int(fine)]
            rows.append({"item_id": photo, "title": title, "description": description,
                         "image_uri": os.path.join(DATASET, photo), "fine": int(fine), "coarse": int(coarse)})
    return rows
