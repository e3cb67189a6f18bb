"""A reader of PyTorch's legacy (non-zip) ``torch.save`` format that never imports torch.

``torch.save(obj, f, _use_new_zipfile_serialization=False)`` writes, back to back:

1. a pickled magic number (``0x1950a86a20f9469cfc6c``),
2. a pickled protocol version (``1001``),
3. a pickled ``sys_info`` dict (``little_endian``, ``type_sizes``),
4. the pickled object itself; every storage in it is a *persistent id*
   ``('storage', storage_type, key, location, numel, view_metadata)`` and every
   tensor is rebuilt by ``torch._utils._rebuild_tensor_v2(storage, offset,
   size, stride, requires_grad, backward_hooks[, metadata])``,
5. the pickled, sorted list of storage keys,
6. for each of those keys in that order: an int64 element count followed by
   the storage's raw bytes (``count * element_size``) in the writer's byte order.

This module reads that back into numpy: ``load_state_dict(path)`` returns
``{name: np.ndarray}``. Unpickling is restricted to a whitelist
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and the
``torch.*Storage`` types); any other global in the file raises
``UnsafePickleError`` instead of importing and calling it, so a hostile file
cannot run code through this reader (pickle's usual danger). Every returned
array owns its memory (C-contiguous), even when tensors shared a storage.

Not supported (clear errors): the zip format of ``torch.save`` since 1.6
(use ``torch.load`` or re-save with ``_use_new_zipfile_serialization=False``),
the pre-1.0 tar format, pickled ``nn.Module`` objects and sparse or quantized
tensors. ``bfloat16`` storages, which numpy lacks, come back as float32
(exactly: bfloat16 is the top half of a float32).
"""

import collections
import os
import pickle
import struct
from typing import Any, Dict

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> numpy dtype of its elements ("bfloat16" is special-cased).
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexFloatStorage": np.complex64,
    "ComplexDoubleStorage": np.complex128,
    "UntypedStorage": np.uint8,
}


class TorchLegacyError(ValueError):
    """The file is not a readable legacy torch.save file."""


class UnsafePickleError(TorchLegacyError):
    """The pickle asks for a global outside the whitelist; nothing was imported."""


class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. while unpickling."""

    def __init__(self, name: str):
        self.name = name
        spec = _STORAGE_DTYPES[name]
        self.bfloat16 = spec == "bfloat16"
        # bfloat16 is read as raw uint16 and widened to float32 afterwards.
        self.dtype = np.dtype(np.uint16 if self.bfloat16 else spec)

    def __repr__(self):
        return f"torch.{self.name}"


class _Storage:
    """One storage: its element type and, once the data section is read, a flat array."""

    def __init__(self, storage_type: _StorageType, key: str, numel: int):
        self.type = storage_type
        self.key = key
        self.numel = int(numel)
        self.data = None  # np.ndarray [numel], filled by _read_storages


class _TensorRef:
    """A tensor whose storage bytes are not read yet (they follow the pickle)."""

    def __init__(self, storage, offset, size, stride):
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)

    def materialize(self) -> np.ndarray:
        storage = self.storage
        flat = storage.data
        itemsize = flat.dtype.itemsize
        if self.size and min(self.size) == 0:
            out = np.zeros(self.size, flat.dtype)
        else:
            # The last element a (non-negative) stride pattern touches must lie in the storage.
            if any(s < 0 for s in self.stride) or self.offset < 0:
                raise TorchLegacyError(f"tensor on storage {storage.key!r} has a negative stride or offset")
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
            if last >= flat.size:
                raise TorchLegacyError(
                    f"tensor of size {self.size}, stride {self.stride}, offset {self.offset} "
                    f"reaches past the end of storage {storage.key!r} ({flat.size} elements)"
                )
            view = np.lib.stride_tricks.as_strided(
                flat[self.offset:],
                shape=self.size,
                strides=tuple(s * itemsize for s in self.stride),
                writeable=False,
            )
            out = np.array(view, order="C")  # owns its memory, independent of the storage
        if storage.type.bfloat16:
            widened = np.empty(out.shape, np.float32)
            widened.view(np.uint32)[...] = out.astype(np.uint32) << 16
            out = widened
        return out


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise TorchLegacyError(f"_rebuild_tensor_v2 got {type(storage).__name__}, not a storage")
    return _TensorRef(storage, storage_offset, size, stride)


class _Unpickler(pickle.Unpickler):
    """Resolves only whitelisted globals and turns persistent ids into _Storage objects."""

    def __init__(self, file, storages: Dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(
            f"refusing to unpickle global {module}.{name}: only collections.OrderedDict, "
            f"torch._utils._rebuild_tensor_v2 and torch.*Storage are allowed (plain tensor "
            f"state dicts); load this file with torch.load if you trust it"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise TorchLegacyError(f"unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module":
            raise UnsafePickleError("the file holds a pickled nn.Module, not a state dict; refusing to load it")
        if kind != "storage" or len(pid) != 6:
            raise TorchLegacyError(f"unknown persistent id {pid[:1]!r} (length {len(pid)})")
        _, storage_type, key, _location, numel, view_metadata = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchLegacyError(f"storage type {storage_type!r} is not a torch.*Storage")
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        root = self._storages.get(key)
        if root is None:
            root = self._storages[key] = _Storage(storage_type, key, numel)
        elif root.type.dtype != storage_type.dtype:
            raise TorchLegacyError(f"storage {key!r} is used with two element types")
        if view_metadata is None:
            return root
        # Pre-1.0 files could pickle views of a storage: (view_key, offset, size).
        view_key, offset, view_size = view_metadata
        return _StorageView(root, str(view_key), int(offset), int(view_size))


class _StorageView(_Storage):
    """A slice of a root storage (old files only); its data appears once the root's does."""

    def __init__(self, root: _Storage, key: str, offset: int, numel: int):
        super().__init__(root.type, key, numel)
        self._root, self._offset = root, offset

    @property
    def data(self):
        if self._root.data is None:
            return None
        return self._root.data[self._offset:self._offset + self.numel]

    @data.setter
    def data(self, value):
        pass  # a view never owns data


def _plain_load(f):
    try:
        return pickle.load(f)
    except Exception as e:
        raise TorchLegacyError(f"cannot read the legacy torch header: {type(e).__name__}: {e}") from e


def _read_storages(f, keys, storages: Dict[str, _Storage], little_endian: bool):
    for key in keys:
        key = key.decode("ascii") if isinstance(key, bytes) else str(key)
        storage = storages.get(key)
        if storage is None:
            raise TorchLegacyError(f"storage {key!r} is listed in the data section but never used")
        header = f.read(8)
        if len(header) != 8:
            raise TorchLegacyError(f"file ends before the data of storage {key!r}")
        count = struct.unpack("<q" if little_endian else ">q", header)[0]
        if count != storage.numel:
            raise TorchLegacyError(
                f"storage {key!r}: the data section holds {count} elements, the pickle says {storage.numel}"
            )
        dtype = storage.type.dtype.newbyteorder("<" if little_endian else ">")
        nbytes = count * dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise TorchLegacyError(f"file is truncated in the data of storage {key!r}")
        data = np.frombuffer(raw, dtype=dtype)
        storage.data = data.astype(data.dtype.newbyteorder("="), copy=False) if not dtype.isnative else data


def _materialize(obj):
    if isinstance(obj, _TensorRef):
        return obj.materialize()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _materialize(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialize(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialize(v) for v in obj)
    if isinstance(obj, _Storage):
        return obj.data.copy()
    return obj


def load(path: str) -> Any:
    """Reads a legacy torch.save file; tensors come back as numpy arrays, containers as saved."""
    with open(os.fspath(path), "rb") as f:
        head = f.read(6)
        if head[:4] == b"PK\x03\x04":
            raise TorchLegacyError(
                f"{path} is in torch's zip format (torch.save default since 1.6), not the legacy format; "
                f"load it with torch.load or re-save it with _use_new_zipfile_serialization=False"
            )
        f.seek(257)
        if f.read(5) == b"ustar":
            raise TorchLegacyError(f"{path} is in torch's pre-1.0 tar format, which this reader does not support")
        f.seek(0)
        if _plain_load(f) != MAGIC_NUMBER:
            raise TorchLegacyError(f"{path} is not a legacy torch.save file (bad magic number)")
        version = _plain_load(f)
        if version != PROTOCOL_VERSION:
            raise TorchLegacyError(f"{path}: unsupported legacy protocol version {version!r}")
        sys_info = _plain_load(f)
        little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        storages: Dict[str, _Storage] = {}
        try:
            obj = _Unpickler(f, storages).load()
            keys = pickle.load(f)
        except TorchLegacyError:
            raise
        except Exception as e:
            raise TorchLegacyError(f"cannot unpickle {path}: {type(e).__name__}: {e}") from e
        _read_storages(f, keys, storages, little_endian)
    return _materialize(obj)


def load_state_dict(path: str) -> Dict[str, np.ndarray]:
    """Reads a legacy torch.save'd state dict as ``{name: np.ndarray}`` (in the file's order)."""
    obj = load(path)
    if not isinstance(obj, dict):
        raise TorchLegacyError(f"{path} holds a {type(obj).__name__}, not a state dict")
    out = collections.OrderedDict()
    for name, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise TorchLegacyError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
        out[str(name)] = value
    return out


__all__ = ["load", "load_state_dict", "TorchLegacyError", "UnsafePickleError", "MAGIC_NUMBER"]
