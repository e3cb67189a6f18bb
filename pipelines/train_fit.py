"""The training job's fit step: items and examples in memory, the towers trained, evaluated, sealed, promoted.

``FitAndPublish`` is the last step of ``catalog-index train``'s job (pipelines/train_pipeline.py builds
it after the preprocessing, pipelines/train_preprocess.py): one element, so one worker. It settles the
preprocessing (accounting and refusal), loads every item's text and image vectors from the index release
and the examples from the work folder, trains the item and query towers (training/), evaluates them
against the index's own fusion on the held-out days, writes ``MODELS_DIR/<version>/`` with
training.json last, and moves LATEST by compare-and-swap under the models directory's lease (the
launching process's, or taken just for this: ``lease.Lease.held``).
"""

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import NamedTuple

import apache_beam as beam
import numpy as np

from pipelines import cas, files, lease
from schemas import embeddings as emb
from schemas import layout
from schemas.errors import DataError, PublicationError

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the item side


def load_items(release_dir: str, manifest: dict):
    """(item ids, training.model.Items) from a release's embeddings table: each item's text and image vectors."""
    from training.model import Items

    text_dim, image_dim = int(manifest["fusion"]["text_dim"]), int(manifest["fusion"]["image_dim"])
    ids, text_rows, image_rows = [], [], []
    for rel in manifest["tables"]["embeddings"]:
        table = files.read_parquet(files.join(release_dir, rel), columns=[emb.ITEM_ID, emb.TEXT_EMBEDDING,
                                                                           emb.IMAGE_EMBEDDING])
        ids.extend(table.column(emb.ITEM_ID).to_pylist())
        text_rows.extend(table.column(emb.TEXT_EMBEDDING).to_pylist())
        image_rows.extend(table.column(emb.IMAGE_EMBEDDING).to_pylist())
    n = len(ids)
    text, image = np.zeros((n, text_dim), np.float32), np.zeros((n, image_dim), np.float32)
    text_mask, image_mask = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for i, (t, v) in enumerate(zip(text_rows, image_rows)):
        if t is not None:
            text[i], text_mask[i] = t, 1.0
        if v is not None:
            image[i], image_mask[i] = v, 1.0
    return ids, Items(text, text_mask, image, image_mask)


def load_examples(paths: list, row_of: dict, text_dim: int, image_dim: int):
    """{"train": Examples, "eval": Examples} from the preprocessing's examples Parquet files."""
    import pyarrow as pa

    from schemas import clicks
    from training.model import Examples

    tables = [files.read_parquet(p) for p in sorted(paths)]
    table = pa.concat_tables(tables) if tables else None
    out = {}
    for split in (clicks.TRAIN, clicks.EVAL):
        if table is None:
            rows = []
        else:
            rows = [i for i, s in enumerate(table.column(clicks.SPLIT).to_pylist()) if s == split]
        n = len(rows)
        qt, qi = np.zeros((n, text_dim), np.float32), np.zeros((n, image_dim), np.float32)
        qtm, qim = np.zeros(n, np.float32), np.zeros(n, np.float32)
        item_index, weight, log_q = np.zeros(n, np.int64), np.zeros(n, np.float32), np.zeros(n, np.float32)
        if n:
            sub = table.take(rows)
            for j, (t, v, item, w, lq) in enumerate(zip(
                    sub.column(clicks.QUERY_TEXT_EMBEDDING).to_pylist(),
                    sub.column(clicks.QUERY_IMAGE_EMBEDDING).to_pylist(),
                    sub.column(clicks.ITEM_ID).to_pylist(), sub.column(clicks.WEIGHT).to_pylist(),
                    sub.column(clicks.LOG_Q).to_pylist())):
                if t is not None:
                    qt[j], qtm[j] = t, 1.0
                if v is not None:
                    qi[j], qim[j] = v, 1.0
                item_index[j], weight[j], log_q[j] = row_of[item], w, lq
        out[split] = Examples(qt, qtm, qi, qim, item_index, weight, log_q)
    return out


# --------------------------------------------------------------------------- publishing a models version


def _file_facts(root: str) -> dict:
    """{relative path: {size, sha256}} of every file under a local folder."""
    out = {}
    for base, _, names in os.walk(root):
        for name in names:
            path = os.path.join(base, name)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            out[os.path.relpath(path, root).replace(os.sep, "/")] = {"size": os.path.getsize(path),
                                                                       "sha256": digest.hexdigest()}
    return dict(sorted(out.items()))


def _copy_up(local_dir: str, dest_dir: str, last: str) -> None:
    """Copies a local folder to ``dest_dir`` (local or any Beam filesystem), the file ``last`` last."""
    names = sorted(_file_facts(local_dir))
    for rel in [n for n in names if n != last] + [last]:
        files.copy_local_file(os.path.join(local_dir, *rel.split("/")), files.join(dest_dir, rel))


def _evidence(work_dir: str) -> list:
    """The preprocessing's rejected-row files in ``work_dir`` (local or any Beam filesystem)."""
    from pipelines.train_preprocess import REJECTED_PREFIX

    return sorted(p for p in (files.list_files(work_dir) if files.exists(work_dir) else [])
                  if p.rsplit("/", 1)[-1].startswith(REJECTED_PREFIX + "-") and p.endswith(".parquet"))


def _keep_evidence(work_dir: str, version_dir: str) -> bool:
    """Copies the preprocessing's rejected rows and summary of a refused run to ``version_dir/rejected/``."""
    from pipelines.train_preprocess import SUMMARY_FILE

    found = _evidence(work_dir) + [p for p in [files.join(work_dir, SUMMARY_FILE)] if files.exists(p)]
    for path in found:
        files.write_bytes(files.join(version_dir, "rejected", path.rsplit("/", 1)[-1]), files.read_bytes(path))
    return bool(found)


def promote(models_dir: str, version: str, training_sha256: str, owner: lease.Lease) -> bool:
    """Moves MODELS_DIR/LATEST to ``version`` by compare-and-swap (only forward in version name time order
    is not required: the newest promoted run wins; the lease makes runs one at a time)."""
    path = files.join(models_dir, layout.LATEST_FILE)
    store = cas.store_for(path)
    pointer = layout.ModelsPointer(version, training_sha256)
    for _ in range(10):
        owner.ensure()
        _, token = store.read(path)
        if store.write_if(path, pointer.dumps(), token):
            return True
    raise PublicationError(f"{path} kept changing under this run; LATEST was not moved")


def _towers(manifest: dict, dim: int, seed: int):
    from embedding import fusion as fus
    from training.model import Tower

    spec = fus.FusionSpec.from_json(manifest["fusion"])
    # Start from the index's own projection when sizes allow: training refines what already works.
    init = spec if spec.kind == fus.PROJECTION and spec.dim == dim else None
    if init is None:
        _log.info("towers start from a random initialisation (the index's fusion is %s, %d-d)", spec.kind, spec.dim)
    return (Tower(spec.text_dim, spec.image_dim, dim, seed=seed, init=init, name="item_tower"),
            Tower(spec.text_dim, spec.image_dim, dim, seed=seed + 1, init=init, name="query_tower"), spec)


class TrainPlan(NamedTuple):
    """Everything the job needs, checked and resolved in the launching process before anything runs."""
    preprocess: "object"  # pipelines.train_preprocess.PreprocessPlan; its out_dir is the work folder
    models_dir: str
    version: str
    release_dir: str  # the index release as the workers read it (a local verified copy on local runners)
    manifest: dict
    index: dict  # root, version, release, manifest_sha256: for training.json and evaluation.json
    dim: int
    fit: dict  # epochs, batch_size, learning_rate, temperature, use_logq, seed
    promote_if_better: bool
    lease_seconds: int
    options: dict  # TrainOptions.training_options(), recorded in training.json

    @property
    def version_dir(self) -> str:
        return files.join(self.models_dir, self.version)

    @property
    def work_dir(self) -> str:
        return self.preprocess.out_dir

    @property
    def remove_work_dir(self) -> bool:
        """A remote work folder (remote runners) is removed by the fit step; a local one by the launcher."""
        return not files.is_local(self.work_dir)

    def owner(self) -> lease.Lease:
        return lease.Lease(self.models_dir, self.version, self.version, command="train", seconds=self.lease_seconds)


def not_promoted_why(decision: dict) -> str:
    return (f"--promote-if-better: candidate {decision['metric']} {decision['candidate']} does not beat the "
            f"baseline's {decision['baseline']}")


def _promote_if_due(plan: TrainPlan, raw_training: bytes, decision: dict, owner: lease.Lease) -> None:
    if plan.promote_if_better and not decision["candidate_is_better"]:
        _log.info("LATEST not moved: %s", not_promoted_why(decision))
    else:
        promote(plan.models_dir, plan.version, hashlib.sha256(raw_training).hexdigest(), owner)


def fit_and_publish(plan: TrainPlan, summary) -> None:
    """Trains, evaluates, writes and (maybe) promotes the models version; runs in the job's fit step."""
    from embedding import fusion as fus
    from schemas import clicks
    from training import evaluate as ev
    from training import model as tm
    from training import report

    sealed = files.join(plan.version_dir, layout.TRAINING_FILE)
    if files.exists(sealed):
        # A retried fit step (Dataflow retries failed work): an earlier attempt sealed this version, which is
        # never rewritten (a promoted training.json is what LATEST's checksum names); only the promotion is
        # finished, as that attempt decided it.
        _log.warning("%s was sealed by an earlier attempt of this step; not training again", plan.version_dir)
        decision = json.loads(files.read_bytes(files.join(plan.version_dir, layout.EVALUATION_FILE)))["decision"]
        with plan.owner().held() as owner:
            _promote_if_due(plan, files.read_bytes(sealed), decision, owner)
        return
    # 1. Items and examples in memory (vectors of each item once; examples point at them).
    ids, items = load_items(plan.release_dir, plan.manifest)
    row_of = {item_id: i for i, item_id in enumerate(ids)}
    spec = fus.FusionSpec.from_json(plan.manifest["fusion"])
    data = load_examples(summary.paths["examples"], row_of, spec.text_dim, spec.image_dim)
    if len(data[clicks.TRAIN].weight) < 2:
        raise DataError(f"only {len(data[clicks.TRAIN].weight)} training example(s) after preprocessing; "
                        f"need at least 2 (see {plan.version_dir}/rejected/)")
    # 2. Train.
    item_tower, query_tower, spec = _towers(plan.manifest, plan.dim, plan.fit["seed"])
    epochs = plan.fit["epochs"]

    def progress(entry):
        line = (f"epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4f}, "
                f"{entry['examples_per_s']:.0f} examples/s ({entry['seconds']:.1f}s)")
        _log.info("%s", line)  # the terminal on local runners (the CLI logs INFO to stderr), the worker log on Dataflow

    history = tm.train(item_tower, query_tower, data[clicks.TRAIN], items, epochs=epochs,
                       batch_size=plan.fit["batch_size"], learning_rate=plan.fit["learning_rate"],
                       temperature=plan.fit["temperature"], use_logq=plan.fit["use_logq"], seed=plan.fit["seed"],
                       on_epoch=progress)
    # 3. Evaluate on the held-out days over the whole catalog, against the index's own fusion.
    held = data[clicks.EVAL]
    queries = ev.Vectors(held.query_text, held.query_text_mask, held.query_image, held.query_image_mask)
    item_vectors = ev.Vectors(items.text, items.text_mask, items.image, items.image_mask)

    def tower_fn(tower):
        return lambda t, tm_, i, im: tower(t, tm_, i, im).numpy()

    baseline_fusion = fus.make_fusion(spec)
    evaluation = {
        "index": {"version": plan.index["version"], "release": plan.index["release"]},
        "held_out_clicks": int(len(held.weight)),
        "candidate": ev.evaluate(tower_fn(item_tower), tower_fn(query_tower), item_vectors, queries,
                                 held.item_index),
        "baseline": ev.evaluate(baseline_fusion, baseline_fusion, item_vectors, queries, held.item_index),
    }
    weights = np.concatenate([item_tower.attention(*[part[s:s + 4096] for part in item_vectors]).numpy()
                              for s in range(0, len(ids), 4096)]) if ids else np.zeros((0, 2))
    evaluation["attention"] = ev.mean_attention(weights, item_vectors)
    decision = ev.compare(evaluation["candidate"], evaluation["baseline"]) if len(held.weight) else {
        "metric": ev.PRIMARY_METRIC, "candidate": None, "baseline": None, "candidate_is_better": False}
    evaluation["decision"] = decision
    # 4. The version folder, built in local temp space, copied up with training.json last.
    local = tempfile.mkdtemp(prefix="catalog-index-version-")
    try:
        tm.export_tower(item_tower, os.path.join(local, layout.MODELS_FUSION_DIR))
        tm.export_tower(query_tower, os.path.join(local, layout.MODELS_QUERY_DIR))
        rejected_dir = os.path.join(local, "rejected")
        os.makedirs(rejected_dir)
        for path in _evidence(plan.work_dir):
            with open(os.path.join(rejected_dir, path.rsplit("/", 1)[-1]), "wb") as f:
                f.write(files.read_bytes(path))
        enc = plan.manifest["encoders"]
        training = {
            "format": 1,
            "version": plan.version,
            "created_at": layout.format_time(datetime.datetime.now(datetime.timezone.utc)),
            "index": dict(plan.index),
            "encoders": {kind: enc[kind] for kind in ("text", "image")},
            "towers": {"text_dim": spec.text_dim, "image_dim": spec.image_dim, "dim": plan.dim,
                       "initialised_from": "index projection" if spec.kind == fus.PROJECTION
                       and spec.dim == plan.dim else "random"},
            "options": plan.options,
            "data": {"read": summary.read, "kept": summary.kept, "impressions": summary.impressions,
                     "rejected": sum(summary.rejected_by_reason.values()),
                     "rejected_by_reason": dict(summary.rejected_by_reason), "train": summary.train,
                     "eval": summary.eval, "eval_start": summary.eval_start,
                     "distinct_texts": summary.distinct_texts, "distinct_images": summary.distinct_images,
                     "items": len(ids)},
            "history": history,
        }
        with open(os.path.join(local, layout.EVALUATION_FILE), "w") as f:
            json.dump(evaluation, f, indent=1, sort_keys=True)
        with open(os.path.join(local, layout.REPORT_FILE), "w") as f:
            f.write(report.render(evaluation, training))
        training["files"] = _file_facts(local)
        raw = (json.dumps(training, indent=1, sort_keys=True) + "\n").encode()
        with open(os.path.join(local, layout.TRAINING_FILE), "wb") as f:
            f.write(raw)
        # 5. Sealed, then promoted, under the models directory's lease (the launcher's, or taken just for this).
        with plan.owner().held() as owner:
            _copy_up(local, plan.version_dir, layout.TRAINING_FILE)
            _promote_if_due(plan, raw, decision, owner)
    finally:
        shutil.rmtree(local, ignore_errors=True)


class FitAndPublish(beam.DoFn):
    """The job's last step (one element, one worker): settles the preprocessing (accounting, refusal), then
    fit_and_publish. A refusal keeps the rejected rows and summary in ``<version>/rejected/`` (no
    training.json: nothing ever loads that folder as a model). A remote work folder is removed after
    success only: a retried attempt needs the examples (a failed job leaves them for the operator)."""

    def __init__(self, plan: TrainPlan):
        self._plan = plan

    def process(self, _summary):
        from pipelines.train_preprocess import settle

        plan = self._plan
        try:
            summary = settle(plan.preprocess)
        except DataError as e:
            kept = _keep_evidence(plan.work_dir, plan.version_dir)
            raise type(e)(f"{e}{'; rejected rows and summary in ' + plan.version_dir if kept else ''}") from None
        fit_and_publish(plan, summary)
        if plan.remove_work_dir:
            files.delete_tree(plan.work_dir)
        yield plan.version
