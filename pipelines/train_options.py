"""Options of ``catalog-index train``, a PipelineOptions subclass that validates itself before any work.

Beam flags (``--runner``, ``--direct_num_workers``, Dataflow flags) pass through to the
preprocessing pipeline; the training itself runs in the launching process.
"""

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import lease
from pipelines import preflight
from pipelines.options import positive  # one rule and message for every command's counts
from schemas import clicks
from schemas import layout
from schemas.errors import ConfigError

DEFAULTS = {"eval_days": 1, "epochs": 5, "batch_size": 256, "temperature": 0.05, "learning_rate": 0.001,
            "seed": 0, "max_rejected_fraction": 0.1}


class TrainOptions(PipelineOptions):
    """App options of ``catalog-index train``."""

    @classmethod
    def _add_argparse_args(cls, parser):
        from pipelines.flags import SharedFlags

        parser = SharedFlags(parser)
        d = DEFAULTS
        parser.add_argument("--clicks", help="[required] click log Parquet path or glob (schemas/clicks.py).")
        parser.add_argument("--index", help="[required] output root of `catalog-index index` (local or gs://): "
                                            "the items, their vectors and the encoders to train against.")
        parser.add_argument("--output", help="[required] models directory: the run writes OUTPUT/<version>/ "
                                             "and moves OUTPUT/LATEST.")
        parser.add_argument("--version", dest="index_version", default=None,
                            help="index version to train against (default: the one LATEST names).")
        parser.add_argument("--models-version", "--models_version", dest="models_version", default=None,
                            help="name of the new models version; never reused (default: m<UTC time>-<8 hex>).")
        parser.add_argument("--eval-days", "--eval_days", dest="eval_days", type=int, default=d["eval_days"],
                            help="the last N UTC days of clicks are held out for evaluation (default: %(default)s).")
        parser.add_argument("--dimension", type=int, default=None,
                            help="size of the learnt vectors (default: the index's dimension).")
        parser.add_argument("--epochs", type=int, default=d["epochs"],
                            help="passes over the training examples (default: %(default)s).")
        parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=d["batch_size"],
                            help="training batch = in-batch negatives per example + 1, at least 2 "
                                 "(default: %(default)s).")
        parser.add_argument("--temperature", type=float, default=d["temperature"],
                            help="softmax temperature (default: %(default)s).")
        parser.add_argument("--learning-rate", "--learning_rate", dest="learning_rate", type=float,
                            default=d["learning_rate"], help="Adam's learning rate (default: %(default)s).")
        parser.add_argument("--event-weights", "--event_weights", dest="event_weights", default=None,
                            help="weight of each positive event, as EVENT=W,... (default: "
                                 + ",".join(f"{e}={w:g}" for e, w in clicks.DEFAULT_EVENT_WEIGHTS.items()) + ").")
        parser.add_argument("--no-logq", "--no_logq", dest="no_logq", action="store_true",
                            help="train without the logQ correction of popular items.")
        parser.add_argument("--seed", type=int, default=d["seed"],
                            help="seed of initialisation and shuffling; same seed, same model on CPU "
                                 "(default: %(default)s).")
        parser.add_argument("--promote-if-better", "--promote_if_better", dest="promote_if_better",
                            action="store_true",
                            help="move OUTPUT/LATEST only when the new model beats the index's fusion on "
                                 "held-out recall@10 (default: LATEST moves to every finished version).")
        parser.add_argument("--max-rejected-fraction", "--max_rejected_fraction", dest="max_rejected_fraction",
                            type=float, default=d["max_rejected_fraction"],
                            help="stop before training when more click rows than this are rejected "
                                 "(default: %(default)s).")
        parser.add_argument("--image-root", "--image_root", dest="image_root", default=None,
                            help="only read query photos under this folder or bucket prefix (default: no limit).")
        parser.add_argument("--cache-dir", "--cache_dir", dest="cache_dir", default=None,
                            help="local copy of a gs:// index (default: ~/.cache/catalog-index/releases).")
        parser.add_argument("--lease-seconds", "--lease_seconds", dest="lease_seconds", type=int,
                            default=lease.DEFAULT_SECONDS,
                            help="expiry of the models directory's lease (default: %(default)s).")

    def check(self) -> str:
        """The checks that need no I/O; returns the models directory. ``file://`` path flags become plain
        local paths here (pipelines/preflight.py)."""
        preflight.normalise_paths(self, preflight.TRAIN_PATHS)
        for flag, value in (("clicks", self.clicks), ("index", self.index), ("output", self.output)):
            if not value:
                raise ConfigError(f"--{flag} is required (see `catalog-index train --help`)")
        positive("eval-days", self.eval_days)
        positive("epochs", self.epochs)
        positive("batch-size", self.batch_size, 2)
        positive("lease-seconds", self.lease_seconds, 10)
        if self.dimension is not None:
            positive("dimension", self.dimension)
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0, got {self.temperature}")
        if not self.learning_rate > 0:
            raise ConfigError(f"--learning-rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise ConfigError(f"--max-rejected-fraction must be within [0, 1], got {self.max_rejected_fraction}")
        if self.index_version is not None:
            layout.check_version_name(self.index_version)
        if self.models_version is not None:
            layout.check_version_name(self.models_version)
        return self.output.rstrip("/")

    def validate(self) -> str:
        """check(), then what can be checked before the index is read or a model loads (the runner, credentials,
        a probe write in the models directory, the image root); returns the models directory."""
        models_dir = self.check()
        preflight.check_train(self)
        return models_dir

    def training_options(self) -> dict:
        """What shapes the model, as recorded in training.json."""
        return {"eval_days": self.eval_days, "dimension": self.dimension, "epochs": self.epochs,
                "batch_size": self.batch_size, "temperature": self.temperature,
                "learning_rate": self.learning_rate, "event_weights": self.event_weights,
                "logq": not self.no_logq, "seed": self.seed, "promote_if_better": bool(self.promote_if_better),
                "max_rejected_fraction": self.max_rejected_fraction}

