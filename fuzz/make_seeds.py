"""Writes the seed files under fuzz/seeds/ that come from Python: torch checkpoints (zip and
legacy formats), pickles, and JPEG/PNG crops of the real photos. Run from the repository root:

    .thaw/bench-venv/bin/python fuzz/make_seeds.py

Every seed stays under 64 KiB. The shard, IDX, spec and gRPC seeds come from
`cargo run -p thaw-fuzz-targets --example make-seeds` (it packs real files with thaw itself).
"""
import collections
import io
import os
import pickle
import zipfile

import torch
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
MAX = 64 * 1024
SPLIT = b"\n--THAW-FUZZ-SPLIT--\n"


def put(target, name, data):
    assert len(data) < MAX, (target, name, len(data))
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def saved(obj, zip_format):
    b = io.BytesIO()
    torch.save(obj, b, _use_new_zipfile_serialization=zip_format)
    return b.getvalue()


torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 3)
)
tiny = net.state_dict()
# torchvision's MobileNetV2, the real file: a few of its tensors, cut small, in its own names.
mnv2 = torch.load(".thaw/weights/mobilenet_v2-b0353104.pth", map_location="cpu")
few = collections.OrderedDict()
for k in list(mnv2)[:7]:
    t = mnv2[k]
    few[k] = t[:2].clone() if t.dim() > 0 else t.clone()
mixed = collections.OrderedDict(
    [
        ("transposed", torch.arange(12, dtype=torch.float32).reshape(3, 4).t()),
        ("sliced", torch.arange(20, dtype=torch.float32)[5:9]),
        ("half", torch.ones(3, dtype=torch.float16)),
        ("bf16", torch.ones(2, dtype=torch.bfloat16)),
        ("long", torch.tensor([1, 2, 3])),
        ("expanded", torch.ones(1, 3).expand(2, 3)),
        ("scalar", torch.tensor(2.5)),
        ("empty", torch.zeros(0, 4)),
        ("bool", torch.tensor([True, False])),
        ("double", torch.ones(2, dtype=torch.float64)),
    ]
)
for name, obj in [
    ("tiny", tiny),
    ("mobilenet_v2_few", few),
    ("mixed", mixed),
    ("wrapped", {"state_dict": tiny, "epoch": 3, "best": 0.5}),
    ("params", {"w": torch.nn.Parameter(torch.ones(2, 2))}),
]:
    for zip_format in (True, False):
        data = saved(obj, zip_format)
        put("torch_checkpoint", f"{name}.{'zip' if zip_format else 'legacy'}.pth", data)
        if zip_format:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                pkl = next(n for n in z.namelist() if n.endswith("/data.pkl"))
                put("pickle", f"{name}.data.pkl", z.read(pkl))
        else:
            put("pickle", f"{name}.legacy-stream.pkl", data)

# The real file's head: its legacy pickles (magic, protocol, sys_info, the whole state dict's
# object graph, the storage keys) and the start of its first storage.
with open(".thaw/weights/mobilenet_v2-b0353104.pth", "rb") as f:
    head = f.read(MAX - 1)
put("torch_checkpoint", "mobilenet_v2-b0353104.head.pth", head)
put("pickle", "mobilenet_v2-b0353104.head.pkl", head)

# Plain pickles of each protocol: containers, sharing, a list that holds itself, big ints.
shared = [1, 2]
cyclic = []
cyclic.append(cyclic)
values = {
    "containers": {"a": [1, 2.5, None, True], "b": (1, (2, (3,))), "c": {1, 2}, "d": frozenset([3]), "e": b"\x00\xff"},
    "shared": [shared, shared, {"x": shared}],
    "ordered": collections.OrderedDict([("k", 1), ("j", "v" * 300)]),
    "bigints": [2**63, -(2**63) - 1, 2**200, -1, 255, 65535, 2**31],
    "cyclic": cyclic,
    "strings": ["", "é", "y" * 1000, b"bytes" * 60],
}
for proto in (2, 3, 4, 5):
    for name, v in values.items():
        put("pickle", f"{name}.p{proto}.pkl", pickle.dumps(v, protocol=proto))

# JPEG and PNG: crops of the real photos, in the encodings a dataset holds.
photos = ".thaw/data/photos"
hubble = Image.open(f"{photos}/hubble_deep_field.jpg").convert("RGB")
rocket = Image.open(f"{photos}/rocket.jpg").convert("RGB")
crop = hubble.crop((100, 100, 196, 164))
big = rocket.resize((200, 150))


def jpeg(img, **kw):
    b = io.BytesIO()
    img.save(b, "JPEG", **kw)
    return b.getvalue()


def png(img, **kw):
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


put("image_decode", "hubble.baseline.jpg", jpeg(crop, quality=85))
put("image_decode", "hubble.progressive.jpg", jpeg(crop, quality=80, progressive=True))
put("image_decode", "hubble.gray.jpg", jpeg(crop.convert("L"), quality=80))
put("image_decode", "hubble.444.jpg", jpeg(crop, quality=90, subsampling=0))
put("image_decode", "hubble.cmyk.jpg", jpeg(crop.convert("CMYK"), quality=80))
put("image_decode", "rocket.200x150.jpg", jpeg(big, quality=70))
put("image_decode", "rocket.optimized.jpg", jpeg(big, quality=60, optimize=True))
put("image_decode", "hubble.rgb.png", png(crop))
put("image_decode", "hubble.gray.png", png(crop.convert("L")))
put("image_decode", "hubble.rgba.png", png(crop.convert("RGBA")))
put("image_decode", "hubble.palette.png", png(crop.convert("P")))
put("image_decode", "hubble.48x32.png", png(crop.resize((48, 32)), optimize=True))
for name in ("chessboard_GRAY.png", "chessboard_RGB.png", "horse.png", "phantom.png"):
    with open(f"{photos}/{name}", "rb") as f:
        put("image_decode", name, f.read())
print("seeds written under", ROOT)
