# Cloud Scheduler launching the index Flex Template nightly (issue 12).
#
# The job POSTs to Dataflow's flexTemplates:launch endpoint with an OAuth token of the launcher service
# account. The request body is fixed at apply time: the run's version and snapshot are the CLI's
# defaults (the launch's UTC time), and the catalog is one glob. For versions named by date, backfills
# and the weekly retrain use the Airflow DAG (deploy/airflow/) instead. Not applied against a real
# project from the machines this was written on (no cloud access); `terraform validate` needs the provider.

locals {
  template_path = coalesce(var.template_path, "gs://${var.bucket}/templates/index.json")
  output        = coalesce(var.output, "gs://${var.bucket}/index")

  # Index template parameters: the flags' underscore spellings, all strings.
  base_parameters = {
    catalog       = var.catalog
    output        = local.output
    shards        = tostring(var.shards)
  }
  # No encoder parameters by default: the built-in encoders the launcher and worker images carry.
  encoder_parameters = merge(
    var.text_encoder == null ? {} : { text_encoder = var.text_encoder },
    var.image_encoder == null ? {} : { image_encoder = var.image_encoder },
  )
  fusion_parameters = var.fusion_model == null ? {} : {
    fusion_model = var.fusion_model
  }
  gpu_parameters = var.gpu ? {
    large_model = "true"
    batch_size  = "128" # measured on an H200: both encoders near their plateau (benchmarks/README.md)
  } : {}
  parameters = merge(local.base_parameters, local.encoder_parameters, local.fusion_parameters, local.gpu_parameters,
  var.extra_parameters)

  environment = merge({
    serviceAccountEmail   = var.worker_service_account
    sdkContainerImage     = var.worker_image
    tempLocation          = "gs://${var.bucket}/tmp"
    stagingLocation       = "gs://${var.bucket}/staging"
    machineType           = var.machine_type
    maxWorkers            = var.max_workers
    additionalExperiments = ["use_runner_v2"]
    }, var.gpu ? {
    additionalPipelineOptions = ["dataflow_service_options=worker_accelerator=type:nvidia-tesla-t4;count:1;install-nvidia-driver"]
  } : {})

  launch_uri = "https://dataflow.googleapis.com/v1b3/projects/${var.project}/locations/${var.region}/flexTemplates:launch"
  launch_body = {
    launchParameter = {
      jobName              = var.job_name
      containerSpecGcsPath = local.template_path
      parameters           = local.parameters
      environment          = local.environment
    }
  }
}

resource "google_cloud_scheduler_job" "index_nightly" {
  project          = var.project
  region           = var.region
  name             = "${var.job_name}-launch"
  description      = "Launches the catalog-index index Flex Template (${local.template_path})"
  schedule         = var.schedule
  time_zone        = var.time_zone
  attempt_deadline = var.attempt_deadline

  retry_config {
    # A failed launch call is retried; a launched job that fails is not (see deploy/README.md, recover).
    retry_count          = 2
    min_backoff_duration = "300s"
  }

  http_target {
    http_method = "POST"
    uri         = local.launch_uri
    body        = base64encode(jsonencode(local.launch_body))
    headers = {
      "Content-Type" = "application/json"
    }
    oauth_token {
      service_account_email = var.service_account
      scope                 = "https://www.googleapis.com/auth/cloud-platform"
    }
  }
}
