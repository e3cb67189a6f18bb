"""Throughput of the built-in encoders' networks on a GPU, by batch size.

The GPU machine lent to some sessions (see ../.library/device) has PyTorch and CUDA but no
TensorFlow, and nothing larger than 64 MiB can be carried to it, so TensorFlow cannot run
there. What this measures instead is the *same networks with the same weights* in PyTorch:

1. ``prepare`` (here, with TensorFlow): writes to DIR the folded EfficientNet-Lite0
   parameters exactly as ``embedding/builtin/efficientnet_lite.py`` converts them, the
   MiniLM weights and tokenizer, 64 real Grocery photos, the Grocery train texts, and
   reference outputs of the project's TensorFlow SavedModels for 16 photos and 32 texts.
   Weights travel as float16 (size limit) and are widened back to float32 there.
2. ``measure`` (on the GPU machine, with PyTorch): checks that the PyTorch networks give
   the TensorFlow references (cosine), then times, per batch size, images/s and texts/s
   with the inputs already on the GPU (model only) and from host memory (copy included,
   and for text the tokenizer too), in TF32 (TensorFlow's default on Ampere and later)
   and bf16 autocast; and the host side on the machine's CPUs: photo decode + crop +
   resize with ``embedding.images.load_image`` (1 process and one per core) and
   tokenization. Median of 5 timed runs after 3 warm-ups, CUDA synchronised.

    .venv/bin/python benchmarks/bench_gpu.py prepare --out .gpu      # here
    python3 benchmarks/bench_gpu.py measure --data .gpu --json $OUT/bench_gpu.json   # there

The pipeline's own items/s cannot be measured there (no TensorFlow, no Beam); the README
derives an estimate for a GPU worker from these stage rates and says so.
"""

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

BATCHES = (1, 8, 32, 64, 128, 256, 512)
N_PHOTOS = 64
N_REF_IMAGES = 16
N_REF_TEXTS = 32


# ------------------------------------------------------------------ prepare (TensorFlow side)

def prepare(out):
    import shutil

    import numpy as np

    import _grocery
    from embedding import builtin
    from embedding.builtin import efficientnet_lite, minilm
    from embedding.images import load_image
    from pipelines.transforms import CatalogRow, item_text

    _grocery.require_dataset()
    os.makedirs(os.path.join(out, "photos"), exist_ok=True)
    rows = _grocery.split("train")

    # EfficientNet-Lite0: the folded parameters of the project's conversion, float16.
    from embedding.builtin import torch_legacy

    params = efficientnet_lite.convert(torch_legacy.load_state_dict(efficientnet_lite.weights_path()))
    flat = {"stem_w": params["stem"][0], "stem_b": params["stem"][1],
            "head_w": params["head"][0], "head_b": params["head"][1]}
    for i, block in enumerate(params["blocks"]):
        for name, (w, b) in block.items():
            flat[f"b{i}_{name}_w"], flat[f"b{i}_{name}_b"] = w, b
    np.savez(os.path.join(out, "effnet.npz"), **{k: v.astype(np.float16) for k, v in flat.items()})
    with open(os.path.join(out, "effnet_blocks.json"), "w") as f:
        json.dump(efficientnet_lite.block_specs(), f)

    # MiniLM: config, tokenizer and float16 weights under their Hugging Face names.
    from safetensors.numpy import load_file

    src = minilm.model_dir()
    dst = os.path.join(out, "minilm")
    os.makedirs(dst, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt", "sentence_bert_config.json"):
        shutil.copy(os.path.join(src, name), dst)
    weights = load_file(os.path.join(src, "model.safetensors"))
    np.savez(os.path.join(dst, "weights.npz"),
             **{k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in weights.items()})

    # Photos (every 41st train photo: all classes represented) and texts.
    photos = [r["image_uri"] for r in rows[:: max(1, len(rows) // N_PHOTOS)]][:N_PHOTOS]
    for i, p in enumerate(photos):
        shutil.copy(p, os.path.join(out, "photos", f"{i:03d}.jpg"))
    texts = [item_text(CatalogRow(r["item_id"], r["title"], r["description"], None, "", 0)) for r in rows]
    with open(os.path.join(out, "texts.json"), "w") as f:
        json.dump(texts, f)

    # References from the project's TensorFlow SavedModels.
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the ops the MiniLM SavedModel uses)

    inputs = np.stack([load_image(os.path.join(out, "photos", f"{i:03d}.jpg"), (224, 224))
                       for i in range(N_REF_IMAGES)])
    image_model = tf.saved_model.load(builtin.ensure_built(builtin.DEFAULT_IMAGE_ENCODER))
    text_model = tf.saved_model.load(builtin.ensure_built(builtin.DEFAULT_TEXT_ENCODER))
    ref_texts = sorted(set(texts))[:N_REF_TEXTS]
    np.savez(os.path.join(out, "reference.npz"),
             images=np.rint(inputs * 255).astype(np.uint8),  # load_image gives 8-bit pixels / 255
             image_features=image_model(tf.constant(inputs, tf.float32)).numpy(),
             text_vectors=text_model(tf.constant(ref_texts)).numpy())
    with open(os.path.join(out, "reference_texts.json"), "w") as f:
        json.dump(ref_texts, f)
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(out) for n in names)
    print(f"prepared {out}: {total / 2**20:.1f} MiB")


# ------------------------------------------------------------------ measure (PyTorch side)

def _effnet(data, torch):
    """EfficientNet-Lite0 with folded BN, mirroring EfficientNetLite0.features of the TF build."""
    import numpy as np

    nn = torch.nn
    F = torch.nn.functional
    w = {k: torch.from_numpy(v.astype(np.float32)) for k, v in np.load(os.path.join(data, "effnet.npz")).items()}
    with open(os.path.join(data, "effnet_blocks.json")) as f:
        specs = json.load(f)

    def same_pad(x, k, s):
        # TensorFlow "SAME": total pad max(k - s, 0) or by remainder; pad // 2 before, rest after.
        h = x.shape[-2]
        pad = max(k - s, 0) if h % s == 0 else max(k - h % s, 0)
        return F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def dense(name):  # HWIO -> OIHW
        return nn.Parameter(w[name + "_w"].permute(3, 2, 0, 1).contiguous(), False), nn.Parameter(w[name + "_b"], False)

    def depthwise(name):  # [k, k, C, 1] -> [C, 1, k, k]
        return nn.Parameter(w[name + "_w"].permute(2, 3, 0, 1).contiguous(), False), nn.Parameter(w[name + "_b"], False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.ParameterList(dense("stem"))
            self.head = nn.ParameterList(dense("head"))
            self.blocks = nn.ModuleList()
            for i, spec in enumerate(specs):
                block = nn.ParameterDict()
                if spec["expand"] != 1:
                    block["ew"], block["eb"] = dense(f"b{i}_expand")
                block["dw"], block["db"] = depthwise(f"b{i}_depthwise")
                block["pw"], block["pb"] = dense(f"b{i}_project")
                self.blocks.append(block)

        def forward(self, images):  # NHWC float in [0, 1], as the SavedModel takes
            x = (images.permute(0, 3, 1, 2) * 255.0 - 127.0) / 128.0
            x = x.contiguous(memory_format=torch.channels_last)
            x = F.relu6(F.conv2d(same_pad(x, 3, 2), self.stem[0], self.stem[1], stride=2))
            for spec, b in zip(specs, self.blocks):
                inp = x
                if "ew" in b:
                    x = F.relu6(F.conv2d(x, b["ew"], b["eb"]))
                k, s = spec["kernel"], spec["stride"]
                x = F.relu6(F.conv2d(same_pad(x, k, s), b["dw"], b["db"], stride=s, groups=x.shape[1]))
                x = F.conv2d(x, b["pw"], b["pb"])
                if spec["skip"]:
                    x = x + inp
            x = F.relu6(F.conv2d(x, self.head[0], self.head[1]))
            return x.mean(dim=(2, 3))

    return Net().eval()


def _minilm(data, torch):
    import numpy as np
    import transformers

    folder = os.path.join(data, "minilm")
    config = transformers.BertConfig.from_json_file(os.path.join(folder, "config.json"))
    model = transformers.BertModel(config, add_pooling_layer=False)
    state = {k: torch.from_numpy(v.astype(np.float32) if v.dtype == np.float16 else v)
             for k, v in np.load(os.path.join(folder, "weights.npz")).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or [u for u in unexpected if "position_ids" not in u and not u.startswith("pooler.")]:
        raise SystemExit(f"MiniLM weights do not fit: missing {missing}, unexpected {unexpected}")
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(folder, "tokenizer.json"), model_max_length=256,
        pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    return model.eval(), tokenizer


def _encode_text(model, ids, mask, torch):
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _median_rate(fn, items, torch, repeats=5, warmups=3):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmups):
        fn()
    sync()
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        walls.append(time.perf_counter() - t0)
    return items / statistics.median(walls)


def _cosines(a, b):
    import numpy as np

    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def _decode_one(path):
    from embedding.images import load_image

    return load_image(path, (224, 224)).shape


def _host_side(data, texts, tokenizer):
    """Photo decode + crop + resize (embedding.images.load_image) and tokenization rates on the CPUs."""
    from concurrent.futures import ProcessPoolExecutor

    photos = sorted(os.path.join(data, "photos", n) for n in os.listdir(os.path.join(data, "photos")))
    work = photos * 8
    out = {"cpus": os.cpu_count()}
    t0 = time.perf_counter()
    for p in work:
        _decode_one(p)
    out["decode_images_per_s_1_process"] = len(work) / (time.perf_counter() - t0)
    workers = os.cpu_count()
    work = photos * 8 * workers
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_decode_one, photos, chunksize=4))  # start the workers before timing
        t0 = time.perf_counter()
        list(pool.map(_decode_one, work, chunksize=16))
        out[f"decode_images_per_s_{workers}_processes"] = len(work) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, len(texts), 64):
        tokenizer(texts[i:i + 64], padding=True, truncation=True, max_length=256)
    out["tokenize_texts_per_s_1_thread_batch_64"] = len(texts) / (time.perf_counter() - t0)
    return out


def measure(data, json_out, device_name="cuda", batches=BATCHES):
    import numpy as np
    import torch

    # TensorFlow's default on Ampere and later GPUs: TF32 in convolutions and matmuls.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    device = torch.device(device_name)
    result = {"gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none (smoke test)", "torch": torch.__version__,
              "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
              "note": "PyTorch mirror of the built-in TF networks, same weights (float16 in transit)"}

    ref = np.load(os.path.join(data, "reference.npz"))
    with open(os.path.join(data, "reference_texts.json")) as f:
        ref_texts = json.load(f)
    with open(os.path.join(data, "texts.json")) as f:
        texts = json.load(f)

    effnet = _effnet(data, torch).to(device)
    model, tokenizer = _minilm(data, torch)
    model = model.to(device)

    with torch.no_grad():
        got = effnet(torch.from_numpy(ref["images"].astype(np.float32) / 255).to(device)).cpu().numpy()
        batch = tokenizer(ref_texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        vec = _encode_text(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), torch)
    result["check"] = {
        "image_min_cosine_vs_tf": float(_cosines(got, ref["image_features"]).min()),
        "text_min_cosine_vs_tf": float(_cosines(vec.cpu().numpy(), ref["text_vectors"]).min()),
    }
    print("check", result["check"], flush=True)

    photos = torch.from_numpy(np.concatenate([ref["images"].astype(np.float32) / 255] * 32))  # 512 real inputs
    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    result["text_tokens"] = {"median": statistics.median(lengths), "max": max(lengths), "n_texts": len(texts)}

    images, text = {}, {}
    with torch.no_grad():
        for b in batches:
            host = photos[:b].contiguous()
            on_gpu = host.to(device)
            row = {"model_tf32": _median_rate(lambda: effnet(on_gpu), b, torch),
                   "with_copy_tf32": _median_rate(lambda: effnet(host.to(device)), b, torch)}
            with torch.autocast(device.type, dtype=torch.bfloat16):
                row["model_bf16"] = _median_rate(lambda: effnet(on_gpu), b, torch)
            images[b] = row
            print("images", b, {k: round(v) for k, v in row.items()}, flush=True)

            chunk = [texts[(i * 37) % len(texts)] for i in range(b)]  # spread over the products
            tok = tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
            ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)

            def with_tokenizer():
                t = tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
                _encode_text(model, t["input_ids"].to(device), t["attention_mask"].to(device), torch)

            row = {"padded_len": int(ids.shape[1]),
                   "model_tf32": _median_rate(lambda: _encode_text(model, ids, mask, torch), b, torch),
                   "with_tokenizer_tf32": _median_rate(with_tokenizer, b, torch)}
            with torch.autocast(device.type, dtype=torch.bfloat16):
                row["model_bf16"] = _median_rate(lambda: _encode_text(model, ids, mask, torch), b, torch)
            text[b] = row
            print("texts", b, {k: round(v) for k, v in row.items()}, flush=True)
    result["images_per_s"] = images
    result["texts_per_s"] = text
    if device.type == "cuda":
        result["gpu_memory_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["host"] = _host_side(data, texts, tokenizer)
    print("host", result["host"], flush=True)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="write the weights, photos, texts and TF references (needs TensorFlow)")
    p.add_argument("--out", required=True)
    m = sub.add_parser("measure", help="time the networks on the GPU (needs PyTorch and CUDA)")
    m.add_argument("--data", required=True)
    m.add_argument("--json", default=None)
    m.add_argument("--device", default="cuda", help="cpu: a smoke test of this script without a GPU")
    m.add_argument("--batches", default=",".join(map(str, BATCHES)))
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out)
    else:
        measure(args.data, args.json, args.device, [int(b) for b in args.batches.split(",")])


if __name__ == "__main__":
    main()
