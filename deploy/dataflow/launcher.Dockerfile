# Flex Template launcher image: runs deploy/dataflow/main.py, which builds the job graph and
# submits it; the job's workers run the worker image (deploy/dataflow/Dockerfile), named with
# --sdk_container_image. Beam and every other package are pinned by deploy/constraints.txt, so
# the launcher's Beam is the workers' Beam (2.77.0).
#
# Build and push, from the repository root (never built from here: no Docker on the dev machines).
# The base image is pinned by digest, given at build time: resolve it once and record it with the
# release (this repository cannot look up which dated tags Google publishes, and a guessed tag
# would fail just the same, only less clearly; a digest cannot move under a rebuild):
#
#   LAUNCHER_BASE_DIGEST=$(gcloud artifacts docker images describe \
#       gcr.io/dataflow-templates-base/python311-template-launcher-base:latest --format='value(image_summary.digest)')
#   docker build -f deploy/dataflow/launcher.Dockerfile --build-arg LAUNCHER_BASE_DIGEST=$LAUNCHER_BASE_DIGEST \
#       -t REGION-docker.pkg.dev/PROJECT/REPO/catalog-index-launcher:VERSION .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/catalog-index-launcher:VERSION
#   gcloud dataflow flex-template build gs://BUCKET/templates/index.json \
#       --image REGION-docker.pkg.dev/PROJECT/REPO/catalog-index-launcher:VERSION --sdk-language PYTHON \
#       --metadata-file deploy/dataflow/index/metadata.json
#
# Without --build-arg the FROM line is invalid and the build stops at once (no silent `latest`).
#
# The built-in encoders: copied from the worker image (built and pushed first), pinned by its digest, so the
# launcher inspects and fingerprints exactly the model files the workers load. Both images set
# CATALOG_INDEX_IMAGE_MODEL_CACHE to that cache, which tells the CLI's Dataflow preflight that `builtin:`
# handles (the defaults) and `auto` resolve on the workers too; a worker whose copy differs from the
# fingerprint in the job fails at load (pipelines/inference.py). Add, to the build above:
#
#   --build-arg WORKER_IMAGE=REGION-docker.pkg.dev/PROJECT/REPO/catalog-index-worker \
#   --build-arg WORKER_IMAGE_DIGEST=$(gcloud artifacts docker images describe \
#       REGION-docker.pkg.dev/PROJECT/REPO/catalog-index-worker:VERSION --format='value(image_summary.digest)')
#
# and launch jobs with --sdk_container_image=REGION-docker.pkg.dev/PROJECT/REPO/catalog-index-worker@DIGEST.

# sha256:... of python311-template-launcher-base; required, no default.
ARG LAUNCHER_BASE_DIGEST
# The worker image (repository path without tag) and its sha256 digest; required, no default.
ARG WORKER_IMAGE
ARG WORKER_IMAGE_DIGEST

# --- stage 0: the worker image, for its built-in encoders --------------------------------
FROM ${WORKER_IMAGE}@${WORKER_IMAGE_DIGEST} AS worker

# --- stage 1: the project's wheel (same recipe as the worker image) ---------------------
FROM apache/beam_python3.11_sdk:2.77.0 AS wheel
WORKDIR /src
COPY deploy/constraints.txt /tmp/constraints.txt
COPY pyproject.toml setup.py README.md ./
COPY catalog_index ./catalog_index
COPY pipelines ./pipelines
COPY embedding ./embedding
COPY schemas ./schemas
COPY search ./search
COPY training ./training
# annoy is an sdist only: compiled here (the SDK image has a C++ compiler), installed from /wheels.
RUN PIP_CONSTRAINT=/tmp/constraints.txt pip wheel --no-cache-dir --no-deps --constraint /tmp/constraints.txt \
        --wheel-dir /wheels . annoy

# --- stage 2: the launcher -------------------------------------------------------------
FROM gcr.io/dataflow-templates-base/python311-template-launcher-base@${LAUNCHER_BASE_DIGEST}
WORKDIR /template
COPY deploy/constraints.txt /tmp/constraints.txt
COPY --from=wheel /wheels /wheels
# CPU TensorFlow is enough here: the launcher builds the graph, it encodes nothing.
RUN pip install --no-cache-dir --constraint /tmp/constraints.txt --find-links /wheels /wheels/catalog_index-*.whl \
 && python -c "import apache_beam, catalog_index.cli; assert apache_beam.__version__ == '2.77.0', apache_beam.__version__" \
 && rm -rf /wheels
COPY --from=worker /opt/catalog-index/models /opt/catalog-index/models
ENV CATALOG_INDEX_MODEL_CACHE=/opt/catalog-index/models
ENV CATALOG_INDEX_IMAGE_MODEL_CACHE=/opt/catalog-index/models
ENV ARROW_DEFAULT_MEMORY_POOL=system
COPY deploy/dataflow/main.py /template/main.py
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/main.py
# No FLEX_TEMPLATE_PYTHON_SETUP_FILE / _REQUIREMENTS_FILE: the project is installed above, and the
# workers get it from the worker image, not from a setup file staged at launch.
