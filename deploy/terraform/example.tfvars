# terraform -chdir=deploy/terraform apply -var-file=example.tfvars   (edit the values first)
project                = "my-project"
region                 = "europe-west4"
bucket                 = "my-catalog-bucket"
service_account        = "catalog-index-launcher@my-project.iam.gserviceaccount.com"
worker_service_account = "catalog-index-worker@my-project.iam.gserviceaccount.com"
worker_image           = "europe-west4-docker.pkg.dev/my-project/catalog-index/catalog-index-worker:0.1.0"
catalog                = "gs://my-catalog-bucket/catalog/current/*.parquet"
fusion_model           = "gs://my-catalog-bucket/fusion"
shards                 = 16
