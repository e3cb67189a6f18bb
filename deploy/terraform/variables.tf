variable "project" {
  description = "Google Cloud project id (not its number) that runs the Dataflow jobs and the scheduler job."
  type        = string
}

variable "region" {
  description = "Region of the Dataflow jobs and of the Cloud Scheduler job, e.g. europe-west4."
  type        = string
}

variable "bucket" {
  description = "Bucket name (no gs://) holding templates/, tmp/, staging/, models/ and, by default, index/."
  type        = string
}

variable "template_path" {
  description = "gs:// path of the index Flex Template spec; default gs://BUCKET/templates/index.json."
  type        = string
  default     = null
}

variable "schedule" {
  description = "Cron schedule of the nightly launch."
  type        = string
  default     = "0 3 * * *"
}

variable "time_zone" {
  description = "Time zone the schedule is read in."
  type        = string
  default     = "Etc/UTC"
}

variable "service_account" {
  description = "Email of the launcher service account: Cloud Scheduler mints its OAuth token to call flexTemplates:launch (needs roles/dataflow.developer and roles/iam.serviceAccountUser on the worker account)."
  type        = string
}

variable "worker_service_account" {
  description = "Email of the Dataflow worker service account (roles/dataflow.worker, object access on the buckets)."
  type        = string
}

variable "worker_image" {
  description = "Worker image built from deploy/dataflow/Dockerfile (REGION-docker.pkg.dev/PROJECT/REPO/catalog-index-worker:VERSION): the project, its pinned packages and the built-in encoders."
  type        = string
}

variable "job_name" {
  description = "Dataflow job name (also the scheduler job's name prefix): lowercase letters, digits and hyphens."
  type        = string
  default     = "catalog-index-nightly"
  validation {
    condition     = can(regex("^[a-z]([-a-z0-9]*[a-z0-9])?$", var.job_name))
    error_message = "job_name: lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "catalog" {
  description = "Catalog Parquet glob the nightly run reads. The request body is fixed, so this is a path the catalog export overwrites each day (e.g. gs://B/catalog/current/*.parquet); date-partitioned catalogs and backfills belong to the Airflow DAG or `catalog-index backfill`."
  type        = string
}

variable "output" {
  description = "Index output root; default gs://BUCKET/index."
  type        = string
  default     = null
}

variable "text_encoder" {
  description = "Text encoder path (gs://, e.g. exported with `catalog-index models export`); default null: the built-in encoder the launcher and worker images carry."
  type        = string
  default     = null
}

variable "image_encoder" {
  description = "Image encoder path (gs://); default null: the built-in encoder the images carry."
  type        = string
  default     = null
}

variable "fusion_model" {
  description = "Models directory of `catalog-index train` (its LATEST is used), or null for the seeded projection."
  type        = string
  default     = null
}

variable "shards" {
  description = "Annoy shards (about 1M items per shard at most)."
  type        = number
  default     = 16
}

variable "extra_parameters" {
  description = "More index template parameters (underscore spellings of `catalog-index index` flags), as strings."
  type        = map(string)
  default     = {}
  validation {
    # The names the index template declares (deploy/dataflow/index/metadata.json; the test keeps this list equal).
    condition = alltrue([for name in keys(var.extra_parameters) : contains([
      "catalog", "output", "version", "shards", "dimension", "text_encoder", "languages", "image_encoder",
      "model_cache", "image_size", "fusion_model", "text_weight", "image_weight", "trees", "seed", "batch_size",
      "max_rejected_fraction", "reject_on_image_error", "max_image_pixels", "large_model", "max_degraded_fraction",
      "min_recall", "snapshot_time", "image_timeout", "allow_private_image_hosts", "image_root", "lease_seconds",
      "reuse_from", "shard_build_threads", "no_memory_check", "no_reuse", "force",
    ], name)])
    error_message = "extra_parameters: every key must be a parameter of the index template (catalog-index index --help, underscores)."
  }
}

variable "machine_type" {
  description = "Worker machine type (n1-standard-4 on CPU; n1-standard-8 with a T4 for GPU workers)."
  type        = string
  default     = "n1-standard-4"
}

variable "max_workers" {
  description = "Autoscaling ceiling of the Dataflow job."
  type        = number
  default     = 100
}

variable "gpu" {
  description = "Attach one NVIDIA T4 per worker with the driver installed (Runner v2 is always on)."
  type        = bool
  default     = false
}

variable "attempt_deadline" {
  description = "How long Cloud Scheduler waits for the launch call to answer (the launch, not the job)."
  type        = string
  default     = "320s"
}
