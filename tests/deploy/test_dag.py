"""Structure of deploy/airflow/catalog_index_dag.py, checked without Airflow (not installed here).

The DAG file is parsed with ``ast``. Its module-level configuration (everything but the Airflow
imports and the ``with DAG(...)`` block) is executed for real, so the values checked are the values
Airflow would see; the operators' keyword arguments are evaluated in that namespace. Task arguments
are checked against the CLI's own parsers (IndexOptions, TrainOptions, gc's parser), not a copy of
their flag lists. What this cannot check: that the Airflow providers accept these keywords at the
versions deployed, and that the DAG runs (no Airflow, no cloud here).
"""

import argparse
import ast
import datetime
import json
import os
import pathlib
import re

import pytest

from pipelines import gc as gc_module
from pipelines.options import IndexOptions
from pipelines.train_options import TrainOptions
from schemas import layout

ROOT = pathlib.Path(__file__).resolve().parents[2]
DAG_FILE = ROOT / "deploy" / "airflow" / "catalog_index_dag.py"
INDEX_METADATA = ROOT / "deploy" / "dataflow" / "index" / "metadata.json"
TRAIN_METADATA = ROOT / "deploy" / "dataflow" / "train" / "metadata.json"


def _tree():
    return ast.parse(DAG_FILE.read_text(), filename=str(DAG_FILE))


def _is_airflow_import(node) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] == "airflow"
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "airflow" for a in node.names)
    return False


def _dag_block(tree) -> ast.With:
    blocks = [n for n in tree.body if isinstance(n, ast.With)
              and isinstance(n.items[0].context_expr, ast.Call)
              and getattr(n.items[0].context_expr.func, "id", None) == "DAG"]
    assert len(blocks) == 1, "exactly one `with DAG(...)` block"
    return blocks[0]


@pytest.fixture(scope="module")
def dag():
    tree = _tree()
    block = _dag_block(tree)
    body = [n for n in tree.body if not _is_airflow_import(n) and n is not block]
    namespace = {"__name__": "catalog_index_dag_config"}
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("CATALOG_INDEX_")}
    try:  # the defaults, as a fresh Airflow worker without the variables would see them
        exec(compile(ast.Module(body=body, type_ignores=[]), str(DAG_FILE), "exec"), namespace)
    finally:
        os.environ.update(saved)

    def value(node):
        return eval(compile(ast.Expression(node), str(DAG_FILE), "eval"), namespace)

    dag_call = block.items[0].context_expr
    tasks = {}  # variable name -> (operator class, kwargs)
    edges = set()
    for stmt in block.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call):
            name = stmt.targets[0].id
            call = stmt.value
            tasks[name] = (call.func.id, {k.arg: value(k.value) for k in call.keywords})
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.BinOp):
            chain = []

            def walk(node):
                if isinstance(node, ast.BinOp):
                    assert isinstance(node.op, ast.RShift), "dependencies are written with >>"
                    walk(node.left)
                    walk(node.right)
                else:
                    chain.append(node.id)
            walk(stmt.value)
            edges.update(zip(chain, chain[1:]))
        else:
            raise AssertionError(f"unexpected statement in the DAG block, line {stmt.lineno}")
    by_id = {kw["task_id"]: (cls, kw) for cls, kw in tasks.values()}
    id_of = {var: kw["task_id"] for var, (cls, kw) in tasks.items()}
    return {
        "config": namespace,
        "dag": {k.arg: value(k.value) for k in dag_call.keywords},
        "tasks": by_id,
        "edges": {(id_of[a], id_of[b]) for a, b in edges},
    }


def _option_strings(add_args) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    add_args(parser)
    return {s: a for a in parser._actions for s in a.option_strings}  # pylint: disable=protected-access


class _Parsed(Exception):
    pass


class _CaptureParser(argparse.ArgumentParser):
    """gc.main builds its parser and parses at once: parse for real, then stop before any work."""

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(super().parse_args(args, namespace))


def _rendered(text: str, ds: str = "2026-11-28") -> str:
    return text.replace("{{ ds }}", ds).replace("{{ ds_nodash }}", ds.replace("-", ""))


def test_task_ids_and_operators(dag):
    kinds = {task_id: cls for task_id, (cls, _) in dag["tasks"].items()}
    assert kinds == {
        "wait_for_catalog": "GCSObjectsWithPrefixExistenceSensor",
        "retrain_due": "ShortCircuitOperator",
        "retrain": "DataflowStartFlexTemplateOperator",  # one job: preprocessing, then the fit step
        "index": "DataflowStartFlexTemplateOperator",
        "gc": "KubernetesPodOperator",  # a CLI command, not a pipeline
    }


def test_dependency_chain(dag):
    assert dag["edges"] == {
        ("retrain_due", "retrain"),
        ("retrain", "index"),
        ("wait_for_catalog", "index"),
        ("index", "gc"),
    }
    tasks = dag["tasks"]
    # On other days retrain_due skips retrain only; index must still run, and a failure must still stop it.
    assert tasks["retrain_due"][1]["ignore_downstream_trigger_rules"] is False
    assert tasks["index"][1]["trigger_rule"] == "none_failed"
    assert tasks["gc"][1].get("trigger_rule", "all_success") == "all_success"  # never gc after a failed index


def test_schedule(dag):
    d = dag["dag"]
    assert d["dag_id"] == "catalog_index"
    assert d["schedule"] == "0 3 * * *"
    fields = d["schedule"].split()
    assert len(fields) == 5 and fields[2:] == ["*", "*", "*"], "nightly"
    assert d["catchup"] is True, "backfill by date through catch-up"
    assert d["max_active_runs"] == 1, "one publisher per output root"
    assert d["start_date"].tzinfo is not None
    # The retry waits out a dead run's lease (--lease-seconds default 300).
    assert d["default_args"]["retry_delay"] > datetime.timedelta(seconds=300)


def test_retrain_is_weekly_and_never_for_old_catch_up_dates(dag):
    due = dag["config"]["retrain_due"]
    first = datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc)
    days = [first + datetime.timedelta(days=n) for n in range(28)]
    # Each run as scheduled: a day after its logical date (plus the schedule's 03:00).
    due_days = [d for d in days if due(logical_date=d, now=d + datetime.timedelta(days=1, hours=3))]
    assert len(due_days) == 4 and all(d.weekday() == 6 for d in due_days), "Sundays, once a week"
    # Catch-up (or a backfill) of old dates never retrains: the model trains on today's index.
    assert not any(due(logical_date=d, now=first + datetime.timedelta(days=60)) for d in days)
    assert "now" not in dag["dag"]["default_args"]


def test_index_parameters_are_index_flags(dag):
    cls, kw = dag["tasks"]["index"]
    launch = kw["body"]["launchParameter"]
    params = launch["parameters"]
    options = _option_strings(IndexOptions._add_argparse_args)  # pylint: disable=protected-access
    argv = []
    for name, value in params.items():
        assert "--" + name in options, f"template parameter {name!r} is no `catalog-index index` flag"
        argv += ["--" + name, _rendered(str(value))]
    for required in ("catalog", "output"):
        assert required in params
    parser = argparse.ArgumentParser()
    IndexOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    args, unknown = parser.parse_known_args(argv)
    assert unknown == []
    # Named and dated exactly as `catalog-index backfill` names a date (reruns agree with backfills).
    assert layout.check_version_name(args.index_version) == "2026-11-28"
    assert layout.format_time(layout.parse_time(args.snapshot_time)) == layout.date_snapshot("2026-11-28")
    assert args.catalog.startswith("gs://") and "dt=2026-11-28/" in args.catalog
    assert args.fusion_model == dag["config"]["MODELS_DIR"], "the nightly keeps the promoted fusion"
    assert launch["containerSpecGcsPath"] == "gs://" + dag["config"]["CONFIG"]["bucket"] + "/templates/index.json"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", _rendered(launch["jobName"])), "Dataflow job name"
    env = launch["environment"]
    assert env["sdkContainerImage"] == dag["config"]["CONFIG"]["worker_image"], "workers run the pinned image"
    assert env["tempLocation"].startswith("gs://") and "use_runner_v2" in env["additionalExperiments"]
    assert kw["wait_until_finished"] is True, "gc must not start while the index still publishes"


@pytest.mark.parametrize("task, metadata", [("index", INDEX_METADATA), ("retrain", TRAIN_METADATA)])
def test_template_parameters_are_declared_by_the_template(dag, task, metadata):
    params = dag["tasks"][task][1]["body"]["launchParameter"]["parameters"]
    parameters = json.loads(metadata.read_text())["parameters"]
    declared = {p["name"] for p in parameters}
    assert set(params) <= declared, sorted(set(params) - declared)
    regexes = {p["name"]: p.get("regexes", []) for p in parameters}  # values, rendered for a date, pass them
    for name, value in params.items():
        for regex in regexes[name]:
            assert re.search(regex, _rendered(str(value))), f"{name}={value!r} does not match {regex}"


def test_train_parameters_are_train_flags(dag):
    """What the train template's launcher turns them into (deploy/dataflow/main.py) is a valid train argv."""
    from pipelines import templates

    cls, kw = dag["tasks"]["retrain"]
    launch = kw["body"]["launchParameter"]
    argv = templates.cli_argv("train", [f"--{k}={_rendered(str(v))}" for k, v in launch["parameters"].items()])
    parser = argparse.ArgumentParser()
    TrainOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    args, unknown = parser.parse_known_args(argv)
    assert unknown == [], unknown
    assert args.promote_if_better is True
    config = dag["config"]
    assert args.index == config["INDEX_ROOT"] and args.output == config["MODELS_DIR"]
    assert args.clicks.startswith("gs://")
    assert launch["containerSpecGcsPath"] == "gs://" + config["CONFIG"]["bucket"] + "/templates/train.json"
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", _rendered(launch["jobName"])), "Dataflow job name"
    env = launch["environment"]
    assert env["sdkContainerImage"] == config["CONFIG"]["worker_image"], "workers run the pinned image"
    assert env["machineType"] == config["CONFIG"]["train_machine_type"]
    assert "use_runner_v2" in env["additionalExperiments"]
    assert kw["wait_until_finished"] is True, "the index after it must see the promoted model"


def test_gc_arguments(dag):
    cls, kw = dag["tasks"]["gc"]
    assert kw["cmds"] == ["catalog-index"] and kw["arguments"][0] == "gc"
    with pytest.raises(_Parsed) as parsed:
        gc_module.main(kw["arguments"][1:], _CaptureParser(prog="catalog-index gc"))
    args = parsed.value.args[0]
    assert args.output == dag["config"]["INDEX_ROOT"]
    assert args.keep >= 1 and args.older_than > 0, "retention keeps some versions and removes old ones"
    assert args.dry_run is False
    assert kw["image"] == dag["config"]["CONFIG"]["worker_image"]


def test_the_dag_file_has_no_parse_time_airflow_state():
    """Variables/connections read at parse time hit the metadata DB on every scheduler loop."""
    text = DAG_FILE.read_text()
    assert "Variable.get" not in text and "BaseHook" not in text
