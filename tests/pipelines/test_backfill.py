"""`catalog-index backfill`: one version per date, skipping published dates, failures isolated."""

import os

import pytest

from catalog_index import cli
from catalog_index import sample
from schemas.errors import ConfigError
from pipelines import backfill
from pipelines import publication as pub
from schemas import layout


@pytest.fixture(scope="module")
def dated_catalogs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dated")
    for date, seed in (("2026-11-01", 1), ("2026-11-03", 3)):  # 2026-11-02 is missing on purpose
        sample.generate_catalog(str(root / f"dt={date}"), n_items=30, seed=seed, bad_rows=False, n_files=1)
    return str(root / "dt={date}" / "catalog" / "*.parquet")


def test_backfill_publishes_each_date_and_isolates_failures(dated_catalogs, tiny_encoders, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["backfill", "--catalog-pattern", dated_catalogs, "--from", "2026-11-01", "--to", "2026-11-03",
            "--output", str(out), "--text-encoder", tiny_encoders[0], "--image-encoder", tiny_encoders[1],
            "--shards", "2"]
    assert cli.main(args) == 1  # one date has no catalog
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2026-11-01  published") and "indexed 30" in lines[0]
    assert lines[0].endswith("; LATEST names it")
    assert lines[1].startswith("2026-11-02  failed") and "matches no file" in lines[1]
    assert lines[2].startswith("2026-11-03  published")
    assert lines[3] == "backfill: 2 of 3 date(s) ok, 1 failed"
    assert latest(out).version == "2026-11-03" and latest(out).snapshot == "2026-11-03T00:00:00Z"
    assert sorted(p for p in os.listdir(out) if not p.startswith(".")) == ["2026-11-01", "2026-11-03", "LATEST"]

    first = pub.resolve(str(out), "2026-11-01")
    first_manifest = (out / first.path / "manifest.json").read_bytes()
    assert cli.main(args) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2026-11-01  skipped") and lines[2].startswith("2026-11-03  skipped")
    assert pub.resolve(str(out), "2026-11-01") == first
    assert (out / first.path / "manifest.json").read_bytes() == first_manifest  # untouched

    assert cli.main(args[:5] + ["--to", "2026-11-01"] + args[7:] + ["--force"]) == 0
    out_text = capsys.readouterr().out
    assert "2026-11-01  published" in out_text
    # An earlier date leaves LATEST where it is, and says so and why.
    assert "LATEST stays at 2026-11-03 (snapshot 2026-11-03T00:00:00Z is not earlier than 2026-11-01" in out_text
    rebuilt = pub.resolve(str(out), "2026-11-01")
    assert rebuilt.release != first.release  # a new release; the replaced one stays until gc
    assert (out / first.path / "manifest.json").read_bytes() == first_manifest
    assert latest(out).version == "2026-11-03"  # LATEST never moves back


def latest(out):
    return layout.Pointer.loads((out / "LATEST").read_bytes())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--catalog-pattern", "c/*.parquet", "--from", "2026-11-01", "--to", "2026-11-02", "--output", "o"],
         "must contain {date}"),
        (["--catalog-pattern", "c/{date}/*", "--from", "2026-11-02", "--to", "2026-11-01", "--output", "o"],
         "is before --from"),
        (["--catalog-pattern", "c/{date}/*", "--from", "2026-11-01", "--to", "2026-11-01", "--output", "o",
          "--version", "x"], "sets --version itself"),
        (["--catalog-pattern", "c/{date}/*", "--from", "2026-11-01", "--to", "2026-11-01", "--output", "o",
          "--snapshot-time", "2026-11-01"], "sets --snapshot-time itself"),
    ],
)
def test_backfill_argument_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        backfill.run(argv)
