"""The built-in model cache: build once, safe under concurrent starts, exportable, loaded like any handle."""

import os

import numpy as np
import pytest

from catalog_index import cli
from catalog_index.errors import EncoderError
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
