#!/usr/bin/env bash
# chatguard model assets (see models/MODELS.md). Called by `make models`.
#
#   bash models/setup.sh               fetch + convert + verify everything (idempotent; fast when done)
#   bash models/setup.sh --force       rebuild every output from the downloaded archives, then verify
#   bash models/setup.sh --check       also run the numpy-reference checks of the two converted models
#   bash models/setup.sh --train       also retrain models/head/text_head.json (installs scikit-learn in
#                                      the venv) and regenerate tests/data/text_model_expected.json
#   bash models/setup.sh --fixture     also regenerate tests/data/text_model_expected.json only
#   bash models/setup.sh --write-manifest   maintainer: rebuild all, rewrite models/manifest.sha256
#
# Python env: target/models-venv (pinned: models/scripts/requirements.txt). Downloads: target/models-dl.
# Outputs (git-ignored, verified against models/manifest.sha256):
#   models/onnxruntime/libonnxruntime.so.1.31.1
#   models/minilm/{minilm-l6-v2.onnx,tokenizer.json}  models/toxblock/{toxblock.onnx,toxblock_tokenizer.json}
#   models/image/image-safety-classifier-s.onnx       models/testdata/*.png|jpg   models/data/insults/*.csv
set -euo pipefail
export PYTHONDONTWRITEBYTECODE=1   # keep models/scripts/ free of __pycache__ (it is not git-ignored)
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=target/models-venv
PY=$VENV/bin/python
MANIFEST=models/manifest.sha256
REQ=models/scripts/requirements.txt
REQ_TRAIN=models/scripts/requirements-train.txt
STAMP=$VENV/.chatguard-models.stamp
RERUN="bash models/setup.sh --force"

FORCE=0 CHECK=0 TRAIN=0 FIXTURE=0 WRITE=0
for a in "$@"; do
  case "$a" in
    --force) FORCE=1 ;;
    --check) CHECK=1 ;;
    --train) TRAIN=1 ;;
    --fixture) FIXTURE=1 ;;
    --write-manifest) WRITE=1 ;;
    -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "models/setup.sh: unknown option '$a' (see --help)" >&2; exit 2 ;;
  esac
done

err() { echo "models/setup.sh: ERROR: $*" >&2; echo "  re-run: $RERUN" >&2; exit 1; }

if [ "$WRITE" = 0 ] && [ ! -s "$MANIFEST" ]; then err "$MANIFEST is missing"; fi
want_stamp() { cat "$MANIFEST" "$REQ" | sha256sum | cut -c1-64; }

# ---- fast path: everything already built and stamped -> only re-hash the outputs
if [ "$FORCE$CHECK$TRAIN$FIXTURE$WRITE" = 00000 ] && [ -x "$PY" ] && [ -f "$STAMP" ] \
   && [ "$(cat "$STAMP")" = "$(want_stamp)" ]; then
  if sha256sum --check --quiet --strict "$MANIFEST" >/dev/null 2>&1; then
    echo "models: OK, $(grep -c . "$MANIFEST") files verified against $MANIFEST"
    exit 0
  fi
  echo "models: verification failed, repairing (see below)" >&2
fi

mkdir -p target
if command -v flock >/dev/null 2>&1; then exec 9>target/.models-setup.lock; flock 9; fi
rm -f "$STAMP"

# ---- venv (pinned closure, no resolver surprises)
req_sum=$(sha256sum "$REQ" | cut -c1-64)
if [ ! -x "$PY" ] || [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$req_sum" ]; then
  echo "models: creating venv $VENV"
  "${PYTHON:-python3}" -m venv "$VENV" || err "python3 -m venv $VENV failed (need python3 >= 3.11 with venv)"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -r "$REQ" || err "pip install -r $REQ failed"
  echo "$req_sum" > "$VENV/.requirements.sha256"
fi

# ---- fetch, extract, convert, verify
args=()
[ "$FORCE" = 1 ] && args+=(--force)
[ "$WRITE" = 1 ] && args+=(--write-manifest)
"$PY" models/scripts/build.py "${args[@]}" || exit 1
# independent second opinion with coreutils (same check as the fast path)
sha256sum --check --quiet --strict "$MANIFEST" || err "sha256sum --check $MANIFEST failed"
want_stamp > "$STAMP"

if [ "$CHECK" = 1 ]; then "$PY" models/scripts/check_models.py || err "model checks failed"; fi
if [ "$TRAIN" = 1 ]; then
  "$PY" -m pip install -q --disable-pip-version-check --no-deps -r "$REQ_TRAIN" || err "pip install -r $REQ_TRAIN failed"
  "$PY" models/scripts/train_head.py || err "head training failed"
  FIXTURE=1
fi
if [ "$FIXTURE" = 1 ]; then "$PY" models/scripts/make_fixture.py || err "fixture generation failed"; fi
echo "models: done"
