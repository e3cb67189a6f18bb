output "scheduler_job_id" {
  description = "Id of the Cloud Scheduler job (projects/P/locations/R/jobs/NAME)."
  value       = google_cloud_scheduler_job.index_nightly.id
}

output "scheduler_job_name" {
  description = "Name of the Cloud Scheduler job, for `gcloud scheduler jobs run NAME --location REGION`."
  value       = google_cloud_scheduler_job.index_nightly.name
}

output "launch_uri" {
  description = "The flexTemplates:launch endpoint the job calls."
  value       = local.launch_uri
}

output "launch_body" {
  description = "The request body (JSON) the job sends: template path, parameters, environment."
  value       = jsonencode(local.launch_body)
}

output "template_path" {
  description = "The Flex Template spec the job launches."
  value       = local.template_path
}
