"""The house reads from the top down: no import runs back up, and the core imports without Beam."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each package and what it may import from the project (lower layers only).
ALLOWED = {
    "schemas": {"schemas"},
    "embedding": {"schemas", "embedding"},
    "search": {"schemas", "embedding", "search"},
    "training": {"schemas", "embedding", "training"},
    "pipelines": {"schemas", "embedding", "search", "training", "pipelines"},
    "catalog_index": {"schemas", "embedding", "search", "training", "pipelines", "catalog_index"},
}
CORE = ["schemas.errors", "schemas.layout", "schemas.manifest", "schemas.verification", "schemas.catalog",
        "schemas.rejected", "schemas.embeddings", "embedding.encoders", "embedding.fusion", "embedding.images",
        "embedding.languages", "embedding.builtin", "embedding.fingerprints"]


def _project_imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in ALLOWED:
                yield node.lineno, top


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_import_runs_back_up(package):
    folder = os.path.join(ROOT, package)
    if not os.path.isdir(folder):
        pytest.skip(f"{package}/ does not exist yet")
    wrong = []
    for base, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(base, name)
                wrong += [f"{os.path.relpath(path, ROOT)}:{line} imports {top}"
                          for line, top in _project_imports(path) if top not in ALLOWED[package]]
    assert wrong == []


def test_the_core_imports_without_beam():
    code = ("import sys; import " + ", ".join(CORE) +
            "; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('apache_beam', 'tensorflow'));"
            " print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
