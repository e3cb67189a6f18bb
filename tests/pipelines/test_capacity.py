"""The local-runner memory estimate: worked figures, refusal before any work, distributed runners unchecked."""

import pytest

from pipelines import capacity
from schemas.errors import ConfigError

GIB = 1024 ** 3


def test_the_estimate_worked_by_hand():
    # 1M items of the built-in sizes, 16 shards: 2 GiB + 1e6 x (4,096 + 0.25 x 4 x (384 + 1280 + 256)) bytes
    # + one shard: 62,500 items x 3 x 4 x (384 + 1280 + 2 x 256)
    got = capacity.estimate(1_000_000, 384, 1280, 256, num_shards=16)
    assert got.bytes_needed == 2 * GIB + 1_000_000 * (4096 + 1920) + 62_500 * 12 * 2176
    assert got.bytes_needed == 2 * GIB + 6_016_000_000 + 1_632_000_000
    assert round(got.bytes_needed / GIB, 1) == 9.1
    # 100k items of the tiny encoders' sizes: 2 GiB + 1e5 x (4,096 + 368) + 6,250 x 12 x (64 + 48 + 512)
    assert capacity.estimate(100_000, 64, 48, 256, num_shards=16).bytes_needed == (
        2 * GIB + 100_000 * (4096 + 368) + 6_250 * 12 * 624)
    # Without a shard count, no shard build is counted.
    assert capacity.estimate(1_000_000, 384, 1280, 256).bytes_needed == 2 * GIB + 6_016_000_000


def test_a_catalog_too_big_for_the_machine_is_refused_with_the_figures():
    with pytest.raises(ConfigError, match=r"1000000 catalog rows .* need about 9.1 GiB .* more --shards .* but "
                                          r"8.0 GiB are available; run on Dataflow"):
        capacity.check_local_memory(1_000_000, 384, 1280, 256, None, available=8 * GIB, num_shards=16)
    fits = capacity.check_local_memory(1_000_000, 384, 1280, 256, "DirectRunner", available=20 * GIB,
                                       num_shards=16)
    assert fits is not None and fits.fits  # what the 1M benchmark ran (peak 5.6 GiB)


def test_one_big_shard_is_counted():
    """A shard is built in memory: 1M items of the built-in sizes in one shard need ~24 GiB for it alone,
    which this estimate refuses on a 20 GiB machine where 16 shards fit."""
    one = capacity.estimate(1_000_000, 384, 1280, 256, available=20 * GIB, num_shards=1)
    assert one.bytes_needed == 2 * GIB + 6_016_000_000 + 1_000_000 * 12 * 2176 and not one.fits
    assert capacity.estimate(1_000_000, 384, 1280, 256, available=20 * GIB, num_shards=16).fits


def test_distributed_runners_and_unknown_memory_are_not_refused():
    assert capacity.check_local_memory(10 ** 9, 384, 1280, 256, "DataflowRunner", available=GIB) is None
    assert capacity.estimate(10 ** 9, 1, 1, 1, available=None).fits


def test_the_index_command_stops_before_any_work(tmp_path, tiny_encoders, monkeypatch, capsys):
    from catalog_index import sample
    from catalog_index.cli import main

    catalog = sample.generate_catalog(str(tmp_path / "c"), n_items=20, seed=1, bad_rows=False)
    monkeypatch.setattr(capacity, "available_bytes", lambda: GIB)  # 1 GiB: less than the 2 GiB base
    out = tmp_path / "out"
    status = main(["index", "--catalog", catalog["catalog_glob"], "--output", str(out), "--text-encoder",
                   tiny_encoders[0], "--image-encoder", tiny_encoders[1]])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--no-memory-check" in err[0], err
    assert not (out / "LATEST").exists()


def test_shards_built_at_once_are_bounded_by_memory_on_a_local_runner():
    # 1M items, 16 shards, 384/1280/256-d: 62,500 items per shard x 3 x 4 x (384 + 1280 + 512) bytes
    per_shard = 62_500 * 3 * 4 * (384 + 1280 + 512)
    assert per_shard == 1_632_000_000
    # Half of 20 GiB holds 6 such shards: 6 of 16 CPUs; 2 CPUs stay 2; 2 GiB holds none, still 1.
    assert int(0.5 * 20 * GIB // per_shard) == 6
    assert capacity.shard_threads(1_000_000, 16, 384, 1280, 256, "DirectRunner", cpus=16, available=20 * GIB) == 6
    assert capacity.shard_threads(1_000_000, 16, 384, 1280, 256, "DirectRunner", cpus=2, available=20 * GIB) == 2
    assert capacity.shard_threads(1_000_000, 16, 384, 1280, 256, "DirectRunner", cpus=16, available=2 * GIB) == 1
    # Small catalogs: every CPU. Distributed runners: the CPU count, memory not consulted.
    assert capacity.shard_threads(10_000, 16, 384, 1280, 256, "DirectRunner", cpus=16, available=2 * GIB) == 16
    assert capacity.shard_threads(10 ** 9, 16, 384, 1280, 256, "DataflowRunner", cpus=4, available=GIB) == 4
