"""Airflow DAG: the nightly catalog index on Dataflow, a weekly fusion retrain, and retention (issue 12).

One DAG, ``catalog_index``, one run per catalog day (schedule ``0 3 * * *``, ``catchup=True``):

    wait_for_catalog ─┐
    retrain_due ─> retrain ─> index ─> gc

* ``wait_for_catalog``: the day's Parquet partition ``CATALOG_PREFIX/dt=<ds>/`` exists.
* ``retrain_due``: a ShortCircuitOperator, true only on the weekly retrain day (``RETRAIN_WEEKDAY``, by the
  run's logical date) and only for recent dates (catch-up runs of old days never retrain).
  On other days it skips ``retrain`` alone (``ignore_downstream_trigger_rules=False``); ``index`` then
  runs through its ``none_failed`` trigger rule.
* ``retrain``: the train Flex Template (``gs://BUCKET/templates/train.json``) on Dataflow with
  ``promote_if_better``: one job, the click preprocessing on the workers, then the fit step (training,
  evaluation, publication) on one worker, so the job's machine type (``CONFIG["train_machine_type"]``,
  high-memory) must hold every item's text and image vectors. It trains against the index's LATEST
  (yesterday's version) and moves ``MODELS_DIR/LATEST`` only when the new model beats the index's fusion.
* ``index``: the index Flex Template (``gs://BUCKET/templates/index.json``) on Dataflow for the day's
  catalog, version ``<ds>`` with the date's midnight as its snapshot: exactly what
  ``catalog-index backfill`` would name and date, so a backfill and this DAG agree and a rerun of a
  published day finishes at once ("already published with identical inputs"). It always passes
  ``--fusion-model MODELS_DIR`` (its LATEST), so on retrain days it is the reindex with the new model, and
  on other nights it keeps the promoted model (an index without it would fall back to the seeded
  projection). A promotion changes the fusion, so that night reuses no vectors (a full run).
* ``gc``: ``catalog-index gc --keep N --older-than DAYS`` in a pod (a CLI command, not a Dataflow job:
  it lists and deletes objects under the output root and takes its lease; a small pod is enough, and
  the lease keeps it from running beside a publisher). Runs every night, also when retrain is skipped.

``max_active_runs=1``: one publisher per output root (a second run would fail on the lease anyway).
Backfill by date: ``airflow dags backfill catalog_index -s 2026-11-01 -e 2026-11-28`` or the catch-up
runs after ``start_date``; each date is its own version, and LATEST only moves to a later snapshot.

Written for Airflow 2.4+ (``schedule=``, ``airflow.operators.python``) with
apache-airflow-providers-google and apache-airflow-providers-cncf-kubernetes; on Airflow 3 the
ShortCircuitOperator import moves to ``airflow.providers.standard.operators.python``.

Configuration comes from environment variables of the Airflow workers (read at parse time, no
Variable/DB access): see ``CONFIG`` below and deploy/README.md. Not run here: Airflow is not installed
on the machines this project is developed on; tests/deploy/test_dag.py checks the file's structure
with ``ast`` against the CLI's own option classes.
"""

import datetime
import os

from airflow import DAG
from airflow.operators.python import ShortCircuitOperator
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator
from airflow.providers.google.cloud.sensors.gcs import GCSObjectsWithPrefixExistenceSensor

CONFIG = {
    "project": os.environ.get("CATALOG_INDEX_PROJECT", "my-project"),
    "region": os.environ.get("CATALOG_INDEX_REGION", "europe-west4"),
    # Bucket of the catalog, index, models, templates and temp files (see deploy/README.md's layout).
    "bucket": os.environ.get("CATALOG_INDEX_BUCKET", "my-catalog-bucket"),
    # Best pinned by digest (...catalog-index-worker@sha256:...): the launcher image's built-in models are
    # copied from one worker image digest, and each worker checks its copy against them.
    "worker_image": os.environ.get("CATALOG_INDEX_WORKER_IMAGE",
                                   "europe-west4-docker.pkg.dev/my-project/catalog-index/catalog-index-worker:0.1.0"),
    "service_account": os.environ.get("CATALOG_INDEX_SERVICE_ACCOUNT",
                                      "catalog-index-runner@my-project.iam.gserviceaccount.com"),
    "namespace": os.environ.get("CATALOG_INDEX_K8S_NAMESPACE", "catalog-index"),
    "shards": os.environ.get("CATALOG_INDEX_SHARDS", "16"),
    "machine_type": os.environ.get("CATALOG_INDEX_MACHINE_TYPE", "n1-standard-4"),
    # The train job's fit step holds every item's vectors on one worker: ~6.7 KB per item at the built-in sizes.
    "train_machine_type": os.environ.get("CATALOG_INDEX_TRAIN_MACHINE_TYPE", "n1-highmem-8"),
    "max_workers": int(os.environ.get("CATALOG_INDEX_MAX_WORKERS", "100")),
    "keep_versions": os.environ.get("CATALOG_INDEX_KEEP", "14"),
    "older_than_days": os.environ.get("CATALOG_INDEX_OLDER_THAN_DAYS", "14"),
}
BUCKET = "gs://" + CONFIG["bucket"]
CATALOG_PREFIX = "catalog"  # partitions: gs://BUCKET/catalog/dt=YYYY-MM-DD/*.parquet
CLICKS_GLOB = BUCKET + "/clicks/*/*.parquet"  # click log: gs://BUCKET/clicks/dt=YYYY-MM-DD/*.parquet
INDEX_ROOT = BUCKET + "/index"
MODELS_DIR = BUCKET + "/fusion"
INDEX_TEMPLATE = BUCKET + "/templates/index.json"
TRAIN_TEMPLATE = BUCKET + "/templates/train.json"
RETRAIN_WEEKDAY = 6  # Sunday, by datetime.date.weekday() of the logical date
RETRAIN_MAX_AGE_DAYS = 3  # catch-up runs of older days never retrain

NIGHTLY_SCHEDULE = "0 3 * * *"  # 03:00 UTC; the run for logical date D indexes D's partition

# Template parameters: the index flags' underscore spellings (catalog-index index --help). No encoder: the
# built-in defaults, which the launcher and worker images carry (deploy/README.md "Models"); to use other
# models, add text_encoder / image_encoder with gs:// paths.
INDEX_PARAMETERS = {
    "catalog": BUCKET + "/" + CATALOG_PREFIX + "/dt={{ ds }}/*.parquet",
    "output": INDEX_ROOT,
    "version": "{{ ds }}",
    "snapshot_time": "{{ ds }}T00:00:00Z",
    "fusion_model": MODELS_DIR,
    "shards": CONFIG["shards"],
}

# The train flags' underscore spellings (catalog-index train --help); switches take "true"/"false".
TRAIN_PARAMETERS = {
    "clicks": CLICKS_GLOB,
    "index": INDEX_ROOT,
    "output": MODELS_DIR,
    "promote_if_better": "true",
}


def _launch(job_name, template, parameters, machine_type):
    """A flexTemplates:launch body: the worker image, runner v2, the bucket's temp and staging."""
    return {
        "launchParameter": {
            "jobName": job_name,
            "containerSpecGcsPath": template,
            "parameters": parameters,
            "environment": {
                "serviceAccountEmail": CONFIG["service_account"],
                "sdkContainerImage": CONFIG["worker_image"],  # deploy/dataflow/Dockerfile
                "tempLocation": BUCKET + "/tmp",
                "stagingLocation": BUCKET + "/staging",
                "machineType": machine_type,
                "maxWorkers": CONFIG["max_workers"],
                "additionalExperiments": ["use_runner_v2"],
            },
        }
    }


GC_ARGUMENTS = [
    "gc",
    "--output", INDEX_ROOT,
    "--keep", CONFIG["keep_versions"],
    "--older-than", CONFIG["older_than_days"],
]


def retrain_due(logical_date=None, now=None, **_):
    """True on the weekly retrain day, for a recent date only (not for catch-up runs of old days)."""
    age = (now or datetime.datetime.now(datetime.timezone.utc)) - logical_date
    return logical_date.weekday() == RETRAIN_WEEKDAY and age <= datetime.timedelta(days=RETRAIN_MAX_AGE_DAYS)


default_args = {
    "owner": "catalog-index",
    "retries": 1,  # an index rerun is idempotent (see deploy/README.md "Recover from a failed night")
    "retry_delay": datetime.timedelta(minutes=20),  # > --lease-seconds, so a dead run's lease has expired
}

with DAG(
    dag_id="catalog_index",
    description="Nightly catalog index on Dataflow, weekly fusion retrain, retention",
    schedule=NIGHTLY_SCHEDULE,
    start_date=datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc),
    catchup=True,
    max_active_runs=1,
    default_args=default_args,
    tags=["catalog-index"],
) as dag:
    wait_for_catalog = GCSObjectsWithPrefixExistenceSensor(
        task_id="wait_for_catalog",
        bucket=CONFIG["bucket"],
        prefix=CATALOG_PREFIX + "/dt={{ ds }}/",
        mode="reschedule",
        poke_interval=600,
        timeout=6 * 3600,
    )

    check_retrain_due = ShortCircuitOperator(
        task_id="retrain_due",
        python_callable=retrain_due,
        ignore_downstream_trigger_rules=False,
    )

    retrain = DataflowStartFlexTemplateOperator(
        task_id="retrain",
        project_id=CONFIG["project"],
        location=CONFIG["region"],
        body=_launch("catalog-index-train-{{ ds_nodash }}", TRAIN_TEMPLATE, TRAIN_PARAMETERS,
                     CONFIG["train_machine_type"]),
        wait_until_finished=True,  # the night's index reads MODELS_DIR/LATEST after it
        execution_timeout=datetime.timedelta(hours=6),
    )

    index = DataflowStartFlexTemplateOperator(
        task_id="index",
        project_id=CONFIG["project"],
        location=CONFIG["region"],
        body=_launch("catalog-index-{{ ds_nodash }}", INDEX_TEMPLATE, INDEX_PARAMETERS, CONFIG["machine_type"]),
        wait_until_finished=True,
        trigger_rule="none_failed",
        execution_timeout=datetime.timedelta(hours=8),
    )

    gc = KubernetesPodOperator(
        task_id="gc",
        name="catalog-index-gc",
        namespace=CONFIG["namespace"],
        image=CONFIG["worker_image"],
        cmds=["catalog-index"],
        arguments=GC_ARGUMENTS,
        service_account_name="catalog-index-runner",  # Workload Identity -> the runner service account
        get_logs=True,
        execution_timeout=datetime.timedelta(hours=1),
    )

    check_retrain_due >> retrain >> index
    wait_for_catalog >> index
    index >> gc
