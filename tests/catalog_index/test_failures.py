"""Every failure the project can name ends in one line on stderr and a documented exit status (issue 11).

In-process cases go through ``cli.main`` (the exit status and the last stderr line); one real process
checks what a user sees: no traceback and no Beam ERROR on stderr, the traceback in the run's log file.
"""

import os
import subprocess
import sys

import pytest

from catalog_index import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fail(capsys, argv):
    status = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return status, err


def _index(catalog, output, encoders, *extra):
    return ["index", "--catalog", catalog, "--output", str(output), "--text-encoder", encoders[0],
            "--image-encoder", encoders[1], *extra]


CASES = [
    # (id, argv builder, exit status, words the one line must contain)
    ("unknown-command", lambda c, e, t: ["indx"], 2, ["unknown command 'indx'", "index"]),
    ("unknown-flag", lambda c, e, t: _index(c, t / "o", e, "--shrads", "2"), 2, ["--shrads", "--shards"]),
    ("missing-catalog", lambda c, e, t: ["index", "--output", str(t / "o")], 2, ["--catalog is required"]),
    ("bad-count", lambda c, e, t: _index(c, t / "o", e, "--shards", "0"), 2, ["--shards"]),
    ("bad-fraction", lambda c, e, t: _index(c, t / "o", e, "--max-rejected-fraction", "2"), 2,
     ["--max-rejected-fraction", "[0, 1]"]),
    ("no-catalog-match", lambda c, e, t: _index(str(t / "nothing-*.parquet"), t / "o", e), 2,
     ["--catalog", "nothing-*.parquet"]),
    ("bad-encoder", lambda c, e, t: _index(c, t / "o", (str(t / "no-model"), e[1])), 2, ["no-model"]),
    ("too-many-rejected", lambda c, e, t: _index(c, t / "o", e, "--max-rejected-fraction", "0"), 1,
     ["rows rejected", "--max-rejected-fraction", "LATEST was not touched"]),
    ("verify-nothing", lambda c, e, t: ["verify", "--index", str(t / "empty")], 1, ["empty"]),
    ("query-no-question", lambda c, e, t: ["query", "--index", str(t / "o")], 2, ["--text"]),
    ("train-no-output", lambda c, e, t: ["train", "--clicks", str(t / "none-*.parquet"), "--index", str(t / "o")],
     2, ["--output"]),
    ("train-no-index", lambda c, e, t: ["train", "--clicks", str(t / "none-*.parquet"), "--index", str(t / "o"),
                                        "--output", str(t / "m")], 1, ["LATEST", "nothing is published"]),
    ("output-is-a-file", lambda c, e, t: _index(c, "/etc/hostname", e), 2, ["--output", "is a file"]),
    ("output-cannot-be-made", lambda c, e, t: _index(c, "/proc/x/y", e), 2, ["--output", "/proc/x/y"]),
    ("sample-output", lambda c, e, t: ["sample", "--output", "/proc/x/y"], 2, ["--output", "/proc/x/y"]),
    ("export-to", lambda c, e, t: ["models", "export", "--to", "/etc/hostname"], 2, ["--to", "is a file"]),
    ("file-uri-catalog-no-match", lambda c, e, t: _index("file://" + str(t / "none-*.parquet"), t / "o", e), 2,
     ["--catalog", "none-*.parquet"]),
    ("backfill-dates", lambda c, e, t: ["backfill", "--catalog-pattern", "x/{date}/*.parquet", "--from",
                                        "2026-01-05", "--to", "2026-01-01", "--output", str(t / "o")], 2,
     ["--from", "--to"]),
]


@pytest.mark.parametrize("name, build, status, words", CASES, ids=[c[0] for c in CASES])
def test_a_known_failure_ends_in_one_line(name, build, status, words, sample_catalog, tiny_encoders, tmp_path,
                                          capsys):
    os.makedirs(tmp_path / "empty", exist_ok=True)
    got, err = _fail(capsys, build(sample_catalog["catalog_glob"], tiny_encoders, tmp_path))
    assert got == status, err
    assert err, "nothing on stderr"
    last = err[-1]
    command = build(sample_catalog["catalog_glob"], tiny_encoders, tmp_path)[0]
    prefix = "catalog-index: error:" if name == "unknown-command" else f"catalog-index {command}: error:"
    assert last.startswith(prefix), last
    assert sum("error:" in line for line in err) == 1, err
    assert not any("Traceback" in line for line in err), err
    for word in words:
        assert word in last, (word, last)


def test_the_real_program_prints_one_line_and_keeps_the_traceback_in_its_log(sample_catalog, tiny_encoders,
                                                                             tmp_path):
    # A failure found inside the pipeline (publication refuses: too many rejected rows), as a user runs it.
    env = dict(os.environ, CATALOG_INDEX_LOG_DIR=str(tmp_path / "logs"), PYTHONPATH=ROOT)
    argv = _index(sample_catalog["catalog_glob"], tmp_path / "o", tiny_encoders, "--max-rejected-fraction", "0")
    done = subprocess.run([sys.executable, "-m", "catalog_index.cli", *argv], env=env, capture_output=True,
                          text=True, timeout=600, cwd=str(tmp_path))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, done.stderr[-3000:]
    assert lines[-1].startswith("catalog-index index: error: ") and "rows rejected" in lines[-1]
    assert "Traceback" not in done.stderr and " ERROR " not in done.stderr, done.stderr[-3000:]
    assert sum("error:" in line for line in lines) == 1
    logs = os.listdir(tmp_path / "logs")
    assert len(logs) == 1 and logs[0].startswith("catalog-index-index-")
    with open(tmp_path / "logs" / logs[0], encoding="utf-8") as f:
        text = f.read()
    assert "Traceback (most recent call last)" in text and "PublicationError" in text
    assert "INFO pipelines.index_pipeline: indexing" in text  # the whole run's log, not only the failure


def test_an_unexpected_error_is_one_line_naming_its_log(tmp_path, monkeypatch, capsys):
    def broken(argv):
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(cli.COMMANDS, "verify", broken)
    status, err = _fail(capsys, ["verify", "--index", str(tmp_path)])
    assert status == 1
    assert err[-1] == ("catalog-index verify: error: unexpected OSError: [Errno 28] No space left on device "
                       "(rerun with --verbose for the traceback)")


def test_log_files_are_kept_for_the_last_runs_only(tmp_path, monkeypatch):
    monkeypatch.setenv(cli.LOG_DIR_ENV, str(tmp_path))
    for i in range(cli.LOG_FILES_KEPT + 5):
        path = tmp_path / f"catalog-index-index-2026010{i:02d}.log"
        path.write_text("x")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    path = cli._log_file("index")  # pylint: disable=protected-access
    names = sorted(os.listdir(tmp_path))
    assert len(names) == cli.LOG_FILES_KEPT and os.path.basename(path) in names
    assert "catalog-index-index-202601000.log" not in names  # the oldest went first
