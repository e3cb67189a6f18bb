"""The built-in model cache: build once, safe under concurrent starts, exportable, loaded like any handle."""

import os

import numpy as np
import pytest

from catalog_index import cli
from schemas.errors import EncoderError
from embedding import builtin
from embedding import encoders as enc
from embedding import tiny


def counting_build(export_dir):
    """A real (tiny) SavedModel build that also records each time it runs."""
    with open(os.path.join(os.environ["BUILD_LOG"], f"{os.getpid()}-{len(os.listdir(os.environ['BUILD_LOG']))}"),
              "w"):
        pass
    return tiny.build_text_encoder(export_dir, dim=16)


@pytest.fixture
def tiny_builtin(monkeypatch, tmp_path):
    log = tmp_path / "builds"
    log.mkdir()
    monkeypatch.setenv("BUILD_LOG", str(log))
    monkeypatch.setitem(builtin.MODELS, "tiny-text", builtin.BuiltinModel(
        "tiny-text", "text", f"{__name__}:counting_build", 16, "(tests)", "tiny test model"))
    return str(tmp_path / "cache"), log


_CHILD = """
import sys
from embedding import builtin
builtin.MODELS["tiny-text"] = builtin.BuiltinModel(
    "tiny-text", "text", "tests.embedding.builtin.test_registry:counting_build", 16, "(tests)", "tiny")
print(builtin.ensure_built("builtin:tiny-text", sys.argv[1]))
"""


def test_concurrent_first_use_builds_once(tiny_builtin):
    # Separate processes (not forks: TensorFlow does not survive fork), started together.
    import subprocess
    import sys

    cache, log = tiny_builtin
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, cache], cwd=root, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1000:] for _, err in outs]
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert paths == {builtin.model_path("builtin:tiny-text", cache)}
    assert len(os.listdir(log)) == 1  # one build, the other processes waited and reused it
    assert sorted(os.listdir(cache)) == ["tiny-text-v1", "tiny-text.lock"]  # no temp folders left
    builtin.ensure_built("builtin:tiny-text", cache)
    assert len(os.listdir(log)) == 1


def test_incomplete_leftover_is_rebuilt(tiny_builtin):
    cache, log = tiny_builtin
    path = builtin.model_path("builtin:tiny-text", cache)
    os.makedirs(path)
    open(os.path.join(path, "saved_model.pb"), "w").close()  # a killed build: no completion marker
    assert builtin.ensure_built("builtin:tiny-text", cache) == path
    assert os.path.exists(os.path.join(path, ".complete")) and len(os.listdir(log)) == 1


def test_builtin_loads_through_the_hub_path_and_exports(tiny_builtin, tmp_path, capsys):
    cache, _ = tiny_builtin
    spec = enc.inspect_encoder("builtin:tiny-text", enc.TEXT, model_cache=cache)
    assert spec.output_dim == 16 and spec.handle == "builtin:tiny-text"
    assert cli.main(["models", "--model-cache", cache, "export", "--to", str(tmp_path / "exported"),
                     "tiny-text"]) == 0
    exported = str(tmp_path / "exported" / "tiny-text")
    assert capsys.readouterr().out.strip() == f"builtin:tiny-text: {exported}"
    a = enc.Encoder(exported, enc.TEXT).encode(["red apple"])
    b = enc.Encoder("builtin:tiny-text", enc.TEXT, model_cache=cache).encode(["red apple"])
    np.testing.assert_array_equal(a, b)
    assert enc.fingerprint(exported) == spec.fingerprint  # the same files


def test_unknown_or_mismatched_builtin_fails_clearly(tmp_path):
    with pytest.raises(EncoderError, match="unknown built-in model 'builtin:nope'; available: builtin:minilm-l6-v2"):
        enc.inspect_encoder("builtin:nope", enc.TEXT, model_cache=str(tmp_path))
    with pytest.raises(EncoderError, match="is a built-in image encoder, not a text encoder"):
        enc.Encoder("builtin:efficientnet-lite0", enc.TEXT, model_cache=str(tmp_path))


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(builtin.CACHE_ENV, str(tmp_path / "env"))
    assert builtin.cache_dir() == str(tmp_path / "env")
    assert builtin.cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")
    monkeypatch.delenv(builtin.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert builtin.cache_dir() == str(tmp_path / "xdg" / "catalog-index" / "models")


# --- Verification of cache entries: a planted, tampered or mis-recorded entry is rebuilt, not trusted.

def copying_build(export_dir):
    """A deterministic build: copies one tiny SavedModel made per session (saving twice gives different bytes)."""
    import shutil

    with open(os.path.join(os.environ["BUILD_LOG"], f"copy-{len(os.listdir(os.environ['BUILD_LOG']))}"), "w"):
        pass
    shutil.copytree(os.environ["TINY_TEMPLATE"], export_dir)
    return export_dir


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory):
    return tiny.build_text_encoder(str(tmp_path_factory.mktemp("template") / "model"), dim=16)


@pytest.fixture
def copied_builtin(monkeypatch, tmp_path, tiny_template):
    log = tmp_path / "builds"
    log.mkdir()
    monkeypatch.setenv("BUILD_LOG", str(log))
    monkeypatch.setenv("TINY_TEMPLATE", tiny_template)
    monkeypatch.setitem(builtin.MODELS, "tiny-text", builtin.BuiltinModel(
        "tiny-text", "text", f"{__name__}:copying_build", 16, "(tests)", "tiny test model"))
    monkeypatch.setattr(builtin, "_verified", {})
    return str(tmp_path / "cache"), log


def _new_process(monkeypatch):
    """Forgets what this process verified, as a fresh worker would."""
    monkeypatch.setattr(builtin, "_verified", {})


def _builds(log):
    return len(os.listdir(log))


@pytest.mark.parametrize("marker", [
    "tiny-text conversion v1 from (tests)\n",  # the old plain-text marker
    '{"name": "tiny-text", "conversion_version": 1, "source": "(tests)", "output_dim": 16, '
    '"fingerprint": "sha256:0000"}',  # well-formed, but the files do not match it
    '{"name": "other", "conversion_version": 1, "source": "(tests)", "output_dim": 16, "fingerprint": "sha256:0"}',
    "",
])
def test_planted_folder_with_forged_marker_is_rebuilt(copied_builtin, tmp_path, caplog, marker):
    cache, log = copied_builtin
    path = builtin.model_path("builtin:tiny-text", cache)
    os.makedirs(os.path.join(path, "variables"))
    with open(os.path.join(path, "saved_model.pb"), "w") as f:
        f.write("planted")
    with open(os.path.join(path, ".complete"), "w") as f:
        f.write(marker)
    assert not builtin.is_built("builtin:tiny-text", cache)
    with caplog.at_level("WARNING", logger=builtin.__name__):
        assert builtin.ensure_built("builtin:tiny-text", cache) == path
    assert _builds(log) == 1
    assert [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()] != []
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        assert b"planted" not in f.read()
    fresh = builtin.ensure_built("builtin:tiny-text", str(tmp_path / "fresh"))
    assert enc.fingerprint(path) == enc.fingerprint(fresh)
    assert sorted(os.listdir(cache)) == ["tiny-text-v1", "tiny-text.lock"]  # the planted folder is gone
    assert builtin.is_built("builtin:tiny-text", cache)


def test_tampered_file_triggers_rebuild(copied_builtin, monkeypatch, caplog):
    cache, log = copied_builtin
    path = builtin.ensure_built("builtin:tiny-text", cache)
    before = enc.fingerprint(path)
    variables = os.path.join(path, "variables", "variables.data-00000-of-00001")
    with open(variables, "r+b") as f:
        byte = f.read(1)
        f.seek(0)
        f.write(bytes([byte[0] ^ 0xFF]))
    _new_process(monkeypatch)
    assert not builtin.is_built("builtin:tiny-text", cache)
    with caplog.at_level("WARNING", logger=builtin.__name__):
        builtin.ensure_built("builtin:tiny-text", cache)
    assert _builds(log) == 2
    assert any("do not match the recorded fingerprint" in r.getMessage() for r in caplog.records)
    assert enc.fingerprint(path) == before


def test_wrong_output_size_in_marker_triggers_rebuild(copied_builtin, monkeypatch, caplog):
    import json

    cache, log = copied_builtin
    path = builtin.ensure_built("builtin:tiny-text", cache)
    marker = os.path.join(path, ".complete")
    with open(marker) as f:
        record = json.load(f)
    assert record["output_dim"] == 16 and record["name"] == "tiny-text"
    record["output_dim"] = 17  # the fingerprint does not cover the marker, so only this check can catch it
    with open(marker, "w") as f:
        json.dump(record, f)
    _new_process(monkeypatch)
    with caplog.at_level("WARNING", logger=builtin.__name__):
        builtin.ensure_built("builtin:tiny-text", cache)
    assert _builds(log) == 2
    assert any("output size 17, expected 16" in r.getMessage() for r in caplog.records)
    with open(marker) as f:
        assert json.load(f)["output_dim"] == 16


def test_build_with_wrong_output_size_fails_and_leaves_nothing(copied_builtin, monkeypatch):
    cache, _ = copied_builtin
    monkeypatch.setitem(builtin.MODELS, "tiny-text", builtin.BuiltinModel(
        "tiny-text", "text", f"{__name__}:copying_build", 32, "(tests)", "tiny test model"))
    with pytest.raises(EncoderError, match="16-d outputs, expected 32"):
        builtin.ensure_built("builtin:tiny-text", cache)
    assert os.listdir(cache) == ["tiny-text.lock"]


def test_symlinked_lock_is_refused_and_its_target_untouched(copied_builtin, tmp_path):
    cache, log = copied_builtin
    os.makedirs(cache)
    victim = tmp_path / "victim.txt"
    victim.write_text("do not truncate me\n")
    lock = os.path.join(cache, "tiny-text.lock")
    os.symlink(victim, lock)
    with pytest.raises(EncoderError, match=f"refusing to use the model cache lock {lock}: it is a symbolic link"):
        builtin.ensure_built("builtin:tiny-text", cache)
    assert victim.read_text() == "do not truncate me\n"
    assert _builds(log) == 0


def test_second_call_neither_rebuilds_nor_rehashes(copied_builtin, monkeypatch):
    cache, log = copied_builtin
    hashed = []
    real = builtin.fingerprint
    monkeypatch.setattr(builtin, "fingerprint", lambda *a, **k: hashed.append(a) or real(*a, **k))
    path = builtin.ensure_built("builtin:tiny-text", cache)
    assert _builds(log) == 1 and len(hashed) == 1  # hashed once, at build time
    assert builtin.ensure_built("builtin:tiny-text", cache) == path and builtin.is_built("builtin:tiny-text", cache)
    assert _builds(log) == 1 and len(hashed) == 1
    _new_process(monkeypatch)  # a new process verifies once, without rebuilding
    assert builtin.ensure_built("builtin:tiny-text", cache) == path
    builtin.ensure_built("builtin:tiny-text", cache)
    assert _builds(log) == 1 and len(hashed) == 2
