#!/usr/bin/env bash
# Cloud Scheduler job that launches the index Flex Template nightly: the gcloud equivalent of
# deploy/terraform/ (same request body). Set the variables below, then run this script once.
# DRY_RUN=1 prints the request body and the gcloud command instead of running it.
#
#   PROJECT=my-project REGION=europe-west4 BUCKET=my-catalog-bucket \
#   LAUNCHER_SA=catalog-index-launcher@my-project.iam.gserviceaccount.com \
#   WORKER_SA=catalog-index-worker@my-project.iam.gserviceaccount.com \
#   CATALOG='gs://my-catalog-bucket/catalog/current/*.parquet' \
#   WORKER_IMAGE=europe-west4-docker.pkg.dev/my-project/catalog-index/catalog-index-worker:0.1.0 \
#   deploy/scheduler/create_nightly_job.sh
#
# The body is fixed: each run gets the CLI's default version and snapshot (the launch's UTC time) and
# reads one catalog glob; versions named by date and backfills belong to the Airflow DAG
# (deploy/airflow/) or `catalog-index backfill`. Not run against a real project from here.
set -euo pipefail

: "${PROJECT:?}" "${REGION:?}" "${BUCKET:?}" "${LAUNCHER_SA:?}" "${WORKER_SA:?}" "${CATALOG:?}" "${WORKER_IMAGE:?}"
SCHEDULE="${SCHEDULE:-0 3 * * *}"
TIME_ZONE="${TIME_ZONE:-Etc/UTC}"
JOB_NAME="${JOB_NAME:-catalog-index-nightly}"
TEMPLATE="${TEMPLATE:-gs://${BUCKET}/templates/index.json}"
OUTPUT="${OUTPUT:-gs://${BUCKET}/index}"
TEXT_ENCODER="${TEXT_ENCODER:-}"    # empty: the built-in encoders the launcher and worker images carry
IMAGE_ENCODER="${IMAGE_ENCODER:-}"  # (or gs:// paths, e.g. from `catalog-index models export`)
FUSION_MODEL="${FUSION_MODEL:-gs://${BUCKET}/fusion}"  # set FUSION_MODEL= (empty) before the first promoted model
SHARDS="${SHARDS:-16}"
MACHINE_TYPE="${MACHINE_TYPE:-n1-standard-4}"
MAX_WORKERS="${MAX_WORKERS:-100}"

optional=""
if [[ -n "${TEXT_ENCODER}" ]]; then
  optional+=", \"text_encoder\": \"${TEXT_ENCODER}\""
fi
if [[ -n "${IMAGE_ENCODER}" ]]; then
  optional+=", \"image_encoder\": \"${IMAGE_ENCODER}\""
fi
if [[ -n "${FUSION_MODEL}" ]]; then
  optional+=", \"fusion_model\": \"${FUSION_MODEL}\""
fi

body="$(mktemp)"
trap 'rm -f "${body}"' EXIT
cat > "${body}" <<JSON
{
  "launchParameter": {
    "jobName": "${JOB_NAME}",
    "containerSpecGcsPath": "${TEMPLATE}",
    "parameters": {
      "catalog": "${CATALOG}",
      "output": "${OUTPUT}",
      "shards": "${SHARDS}"${optional}
    },
    "environment": {
      "serviceAccountEmail": "${WORKER_SA}",
      "sdkContainerImage": "${WORKER_IMAGE}",
      "tempLocation": "gs://${BUCKET}/tmp",
      "stagingLocation": "gs://${BUCKET}/staging",
      "machineType": "${MACHINE_TYPE}",
      "maxWorkers": ${MAX_WORKERS},
      "additionalExperiments": ["use_runner_v2"]
    }
  }
}
JSON

cmd=(gcloud scheduler jobs create http "${JOB_NAME}-launch"
  --project="${PROJECT}" --location="${REGION}"
  --schedule="${SCHEDULE}" --time-zone="${TIME_ZONE}"
  --uri="https://dataflow.googleapis.com/v1b3/projects/${PROJECT}/locations/${REGION}/flexTemplates:launch"
  --http-method=POST --headers=Content-Type=application/json
  --message-body-from-file="${body}"
  --oauth-service-account-email="${LAUNCHER_SA}"
  --oauth-token-scope=https://www.googleapis.com/auth/cloud-platform
  --attempt-deadline=320s --max-retry-attempts=2 --min-backoff=300s)

if [[ -n "${DRY_RUN:-}" ]]; then
  cat "${body}"
  printf '%q ' "${cmd[@]}"
  echo
else
  "${cmd[@]}"
fi
