"""``catalog-index train``: refit the fusion on logged clicks and publish it as a models version.

    clicks Parquet --(Beam: validate, keep positives, encode each distinct query once,
                      split by time, logQ)--> examples
    index release  --(its embeddings table)--> every item's text and image vectors
    examples + items --(TensorFlow: item tower = the fusion, query tower; in-batch
                        softmax with logQ and accidental-hit masking)--> two towers
    held-out days --(exact ranking over the whole catalog)--> evaluation.json, report.html
    MODELS_DIR/<version>/{fusion,query}/, training.json (last) --> LATEST by compare-and-swap

One Beam job, as the index: ``build_preprocess`` (pipelines/train_preprocess.py)
then ``FitAndPublish`` (pipelines/train_fit.py), one step on one worker that
trains, evaluates, writes and promotes, so the whole run works on the local runners and on Dataflow,
from a workstation, a pod or a Flex Template launch (which only writes the job
graph and exits). The examples go to a local temp folder on local runners, to
``MODELS_DIR/_work/<version>/`` on remote ones (removed by the fit step after success).
Nothing is overwritten: every run writes a new version folder, seals it with
training.json (size and sha256 of every file), and moves LATEST only after
that, under the models directory's lease, by compare-and-swap; with
``--promote-if-better`` only when the candidate beats the index's own fusion on
held-out recall@10.
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import NamedTuple, Optional

import apache_beam as beam

from pipelines import files, preflight
from pipelines.train_fit import FitAndPublish, TrainPlan, not_promoted_why
from pipelines.train_options import TrainOptions
from schemas import layout
from schemas.errors import ConfigError

_log = logging.getLogger(__name__)


RAN, DRY_RUN, LAUNCHED = "ran", "dry run", "launched"


class TrainResult(NamedTuple):
    version: str
    version_dir: str
    promoted: bool
    decision: dict
    evaluation: dict
    training: dict
    seconds: float
    mode: str = RAN  # or DRY_RUN (nothing submitted), LAUNCHED (a Flex Template launch: the job runs later)

    def summary(self) -> str:
        if self.mode == DRY_RUN:
            return (f"dry run: nothing submitted (the job for models version {self.version} was built and checked; "
                    f"nothing was written to {self.version_dir.rsplit('/', 1)[0]})")
        if self.mode == LAUNCHED:
            return (f"job graph written for models version {self.version} (a template launch: Dataflow starts "
                    f"the job); it trains, writes {self.version_dir} and moves LATEST when it finishes")
        data = self.training["data"]
        cand = self.evaluation["candidate"]["all"]
        base = self.evaluation["baseline"]["all"]
        lines = [
            f"trained {self.version} against index {self.training['index']['version']}/"
            f"{self.training['index']['release']} in {self.seconds:.1f}s",
            f"  clicks: {data['read']} read, {data['kept']} kept ({data['train']} train, {data['eval']} held out "
            f"from {data['eval_start']}), {data['impressions']} impressions, {data['rejected']} rejected",
            f"  held-out recall@10: candidate {cand.get('recall_at_10', 0):.4f} vs baseline "
            f"{base.get('recall_at_10', 0):.4f}; MRR {cand.get('mrr', 0):.4f} vs {base.get('mrr', 0):.4f}",
        ]
        for kind in ("text", "photo"):
            c, b = self.evaluation["candidate"].get(kind), self.evaluation["baseline"].get(kind)
            if c and b:
                lines.append(f"  {kind} queries ({c['queries']}): recall@10 {c['recall_at_10']:.4f} vs "
                             f"{b['recall_at_10']:.4f}")
        if self.promoted:
            lines.append(f"  LATEST -> {self.version}")
        else:
            stays = self.decision.get("latest")
            where = f"stays at {stays}" if stays else "names no version yet"
            lines.append(f"  LATEST not moved ({where}): {self.decision.get('why', '')}")
        lines.append(f"  report: {files.join(self.version_dir, layout.REPORT_FILE)}")
        return "\n".join(lines)


def read_models_latest(models_dir: str) -> Optional[layout.ModelsPointer]:
    path = files.join(models_dir, layout.LATEST_FILE)
    if not files.exists(path):
        return None
    return layout.ModelsPointer.loads(files.read_bytes(path), where=path)


# --------------------------------------------------------------------------- the run


def _open_index(opts: TrainOptions):
    from search.release import read_pointer, verified_release

    pointer = read_pointer(opts.index, opts.index_version)
    release_dir, manifest = verified_release(opts.index, pointer, opts.cache_dir)
    if "fusion" not in manifest or "tables" not in manifest:
        raise ConfigError(f"--index {opts.index!r}: release {pointer.path} has no fusion or embeddings table "
                          f"to train against; republish it with this version of catalog-index")
    return pointer, release_dir, manifest


def build_train(p: beam.Pipeline, plan: TrainPlan):
    """The whole job: the preprocessing, then the fit step once its summary is written."""
    from pipelines.train_preprocess import build_preprocess

    return build_preprocess(p, plan.preprocess) | "FitAndPublish" >> beam.ParDo(FitAndPublish(plan))


def _plan(opts: TrainOptions, options, models_dir: str, work_dir: str) -> TrainPlan:
    """Opens and verifies the index, checks what the workers will load, plans the preprocessing."""
    from pipelines.train_preprocess import plan_preprocess

    version = opts.models_version or layout.new_models_version()
    version_dir = files.join(models_dir, version)
    if files.exists(files.join(version_dir, layout.TRAINING_FILE)) or files.list_files(version_dir):
        raise ConfigError(f"--models-version {version!r}: {version_dir} exists; models versions are never "
                          f"rewritten, pick another name")
    pointer, local_release, manifest = _open_index(opts)
    shared = preflight.workers_share_disk(options)
    # The encoders the query side is encoded with are the index's; remote workers must be able to load them.
    preflight.check_worker_paths(options, [(f"the index's {kind} encoder", manifest["encoders"][kind]["handle"],
                                            preflight.MODEL) for kind in ("text", "image")])
    release_dir = local_release if shared else files.join(opts.index, pointer.path)
    if not shared:
        work_dir = files.join(models_dir, layout.MODELS_WORK_DIR, version)
    preprocess = plan_preprocess(
        opts.clicks, release_dir, manifest, work_dir, eval_days=opts.eval_days, event_weights=opts.event_weights,
        max_rejected_fraction=opts.max_rejected_fraction, image_root=opts.image_root)
    return TrainPlan(
        preprocess=preprocess, models_dir=models_dir, version=version, release_dir=release_dir, manifest=manifest,
        index={"root": opts.index, "version": pointer.version, "release": pointer.release,
               "manifest_sha256": pointer.manifest_sha256},
        dim=opts.dimension or int(manifest["dimension"]),
        fit={"epochs": opts.epochs, "batch_size": opts.batch_size, "learning_rate": opts.learning_rate,
             "temperature": opts.temperature, "use_logq": not opts.no_logq, "seed": opts.seed},
        promote_if_better=bool(opts.promote_if_better), lease_seconds=opts.lease_seconds,
        options=opts.training_options())


def _result(plan: TrainPlan, seconds: float) -> TrainResult:
    """What the finished job wrote, read back: training.json, evaluation.json and where LATEST is."""
    training = json.loads(files.read_bytes(files.join(plan.version_dir, layout.TRAINING_FILE)))
    evaluation = json.loads(files.read_bytes(files.join(plan.version_dir, layout.EVALUATION_FILE)))
    decision = evaluation["decision"]
    latest = read_models_latest(plan.models_dir)
    promoted = latest is not None and latest.version == plan.version
    if not promoted:
        decision["why"] = (not_promoted_why(decision) if plan.promote_if_better and not decision["candidate_is_better"]
                           else "another run moved LATEST")
        decision["latest"] = latest.version if latest is not None else None
    return TrainResult(plan.version, plan.version_dir, promoted, decision, evaluation, training, seconds)


def run(argv=None, test_pipeline=None) -> TrainResult:
    """Validates, then runs the job (preprocessing, fit, evaluation, publication) and reads back what it wrote.

    On a Flex Template launch (``--template_location``) the job graph is written and nothing waits: the
    result says so. Raises ConfigError before any work when an option or input is unusable, DataError when the
    clicks are refused (too many bad rows, nothing left to train on)."""
    from apache_beam.options.pipeline_options import PipelineOptions, SetupOptions

    start = time.perf_counter()
    files.use_system_memory_pool()  # as the index pipeline (issue 9)
    options = PipelineOptions(argv if argv is not None else sys.argv[1:])
    opts = options.view_as(TrainOptions)
    models_dir = opts.validate()  # nothing heavy before this: pipelines/preflight.py
    local_work = tempfile.mkdtemp(prefix="catalog-index-train-")
    try:
        plan = _plan(opts, options, models_dir, os.path.join(local_work, "data"))
        options.view_as(SetupOptions).save_main_session = False
        p = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
        mode = DRY_RUN if preflight.check_dry_run(options) else (
            LAUNCHED if preflight.is_template_launch(options) else RAN)
        if mode != RAN:
            if mode == LAUNCHED:  # the job takes the lease itself, for its publication (lease.Lease.held)
                plan.owner().check_free()
            build_train(p, plan)
            p.run()
            return TrainResult(plan.version, plan.version_dir, False, {}, {}, {}, time.perf_counter() - start,
                               mode=mode)
        preflight.create_output(models_dir)  # a missing local folder (checked writable by opts.validate)
        owner = plan.owner().acquire()
        try:
            owner.start_heartbeat()
            files.mkdirs(plan.work_dir)
            _log.info("preprocessing %d click file(s), %d rows, into %s; then training %s",
                      len(plan.preprocess.click_files), plan.preprocess.rows, plan.work_dir, plan.version)
            build_train(p, plan)
            p.run().wait_until_finish()
            return _result(plan, time.perf_counter() - start)
        finally:
            owner.release()
    finally:
        shutil.rmtree(local_work, ignore_errors=True)
