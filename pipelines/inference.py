"""RunInference's model handler for the encoders: loads an ``Encoder`` once per worker.

The encoder itself (embedding/encoders.py) knows nothing of Beam; this handler
adds what RunInference needs: loading under ``shared.Shared`` (one copy per
process, or per machine with ``--large-model``), batching and metrics.
"""

import logging
import time
from typing import Any, Iterable, NamedTuple, Optional, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from embedding import builtin
from embedding.encoders import TEXT, Encoder, fingerprint, resolve_handle
from schemas.errors import EncoderError
from pipelines.progress import NAMESPACE as METRICS_NAMESPACE

_log = logging.getLogger(__name__)


class EncoderModelHandler(ModelHandler[Any, np.ndarray, Encoder]):
    """RunInference handler for a Hub encoder; yields one float32 vector per example.

    Wrap it in ``KeyedModelHandler`` to carry item ids through the batch.
    """

    def __init__(self, handle: str, kind: str, image_size=None, min_batch_size=1, max_batch_size=32,
                 large_model=False, model_cache=None, fingerprint: Optional[str] = None):
        super().__init__()
        self._handle = handle
        self._fingerprint = fingerprint  # what the launcher inspected (EncoderSpec.fingerprint), checked on load
        self._model_cache = model_cache
        self._kind = kind
        self._image_size = tuple(image_size) if image_size else None
        self._batch_kwargs = {"min_batch_size": min_batch_size, "max_batch_size": max_batch_size}
        self._large_model = large_model
        self._batch_size = Metrics.distribution(METRICS_NAMESPACE, f"{kind}_encoder_batch_size")
        self._latency = Metrics.distribution(METRICS_NAMESPACE, f"{kind}_encoder_latency_ms")

    @property
    def kind(self) -> str:
        return self._kind

    def load_model(self) -> Encoder:
        start = time.perf_counter()
        encoder = Encoder(self._handle, self._kind, self._image_size, self._model_cache)
        if self._fingerprint and builtin.is_builtin(self._handle):
            # A built-in handle names a folder in each machine's own cache: on remote workers, the one baked into
            # the worker image. Hashed as the launcher hashed its copy (once per worker process: ~0.1 GB).
            found = fingerprint(resolve_handle(self._handle, self._model_cache))
            if found != self._fingerprint:
                raise EncoderError(
                    f"{self._handle} on this worker ({builtin.model_path(self._handle, self._model_cache)}) is not the "
                    f"model the launcher inspected (fingerprint {found} != {self._fingerprint}): the worker image and "
                    f"the launcher were built from different releases; rebuild and push both from one release")
        _log.info("loaded %s encoder %s in %.1fs", self._kind, self._handle, time.perf_counter() - start)
        return encoder

    def run_inference(self, batch: Sequence[Any], model: Encoder, inference_args=None,
                      members: Optional[int] = None) -> Iterable[np.ndarray]:
        """``members``: how many of ``batch`` are real inputs, the rest filler (the batch size metric)."""
        start = time.perf_counter()
        vectors = model.encode(batch if self._kind == TEXT else np.stack(batch))
        self._latency.update(int((time.perf_counter() - start) * 1000))
        self._batch_size.update(len(batch) if members is None else members)
        return list(vectors)

    def get_num_bytes(self, batch) -> int:
        if self._kind == TEXT:
            return sum(len(s.encode("utf-8")) for s in batch)
        return sum(np.asarray(x).nbytes for x in batch)

    def batch_elements_kwargs(self):
        return dict(self._batch_kwargs)

    def share_model_across_processes(self) -> bool:
        return self._large_model

    def get_metrics_namespace(self) -> str:
        return f"{METRICS_NAMESPACE}.{self._kind}_encoder"


class BatchFailure(NamedTuple):
    """What WholeBatches gives back, in place of a vector, for an input whose model batch failed."""

    error: BaseException
    inputs: int  # how many inputs that model batch held


class WholeBatches(ModelHandler[Sequence[Any], list, Encoder]):
    """A handler whose example is a whole list of inputs: one list in, one list of vectors out.

    Wrapped in ``KeyedModelHandler(...).with_no_batching()``, RunInference then takes one element
    ``[(key, inputs)]`` per list and gives back ``(key, vectors)``: the key (the list's own record)
    travels with its vectors through the encoder, so what follows needs no join by item id. Each list
    is encoded in model batches of exactly ``batch_size`` rows (``Encoder.fixed_batches``), so an
    input's vector does not depend on what else it was encoded with. An empty list gives ``[]``. An
    input whose model batch the encoder raised on gets ``BatchFailure`` in place of its vector, on the
    main output: RunInference's dead letter is a second output, and merging it back (a Flatten) makes
    Beam's local runner hold every vector in memory until all are encoded. Anything else (the model
    failing to load) still fails the run.
    """

    def __init__(self, handler: EncoderModelHandler, batch_size: int):
        super().__init__()
        self._handler = handler
        self._fixed = batch_size

    def load_model(self) -> Encoder:
        return self._handler.load_model()

    def _encode(self, inputs, model, inference_args):
        out = [None] * len(inputs)
        for indices, batch in model.fixed_batches(inputs, self._fixed):
            try:
                vectors = self._handler.run_inference(batch, model, inference_args, members=len(indices))
            except Exception as e:  # one model batch's failure rejects its items, not the run
                _log.warning("%s encoder failed on a batch of %d: %s", self._handler.kind, len(indices), e)
                vectors = [BatchFailure(e, len(indices))] * len(batch)
            for k, i in enumerate(indices):
                out[i] = vectors[k]
        return out

    def run_inference(self, batch: Sequence[Sequence[Any]], model: Encoder, inference_args=None) -> Iterable[list]:
        return [self._encode(inputs, model, inference_args) for inputs in batch]

    def get_num_bytes(self, batch) -> int:
        return sum(self._handler.get_num_bytes(inputs) for inputs in batch)

    def batch_elements_kwargs(self):
        return self._handler.batch_elements_kwargs()

    def share_model_across_processes(self) -> bool:
        return self._handler.share_model_across_processes()

    def get_metrics_namespace(self) -> str:
        return self._handler.get_metrics_namespace()
