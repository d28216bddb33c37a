#!/usr/bin/env bash
# The main job on the bundled default model, on a fresh machine:
#   install -> export EfficientNet-Lite0 -> score robustness -> gate -> promote -> serve on localhost.
# Usage: bash deploy/quickstart.sh [REPO_DIR]        (default ./models; Ctrl-C stops the server)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=${1:-models}
MODEL=efficientnet-lite0
SAMPLE=../shared/data/imagenet-sample

export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q torch==2.14.1 torchvision==0.29.1
python3 -m pip install -q -e '.[export]'

echo "== export"
VERSION=$(steady export "$MODEL" --repo "$REPO" | tail -n 1 | cut -d/ -f2)
echo "exported $MODEL/$VERSION into $REPO"

echo "== score"
if [ -f "$SAMPLE/labels.csv" ]; then
    DATA=(--data "$SAMPLE" --labels "$SAMPLE/labels.csv")
    POLICY=deploy/gate.yaml
else
    # no labelled photos here: score flips on the photos scikit-image ships (no accuracy rules)
    mkdir -p "$REPO/.quickstart-photos"
    python3 - "$REPO/.quickstart-photos" <<'PY'
import sys
from pathlib import Path
from PIL import Image
from skimage import data
for name in ("coffee", "chelsea", "astronaut", "rocket", "cat"):
    try:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(Path(sys.argv[1]) / f"{name}.jpg", quality=92)
    except Exception as exc:  # an image that needs a download is skipped
        print(f"skipping {name}: {exc}")
PY
    DATA=(--data "$REPO/.quickstart-photos")
    POLICY=deploy/gate-unlabelled.yaml
fi
steady score --repo "$REPO" "$MODEL" --version "$VERSION" "${DATA[@]}" --out "reports/$MODEL-$VERSION"
echo "report: reports/$MODEL-$VERSION/report.html"

echo "== gate"
if [ "$POLICY" = deploy/gate.yaml ]; then
    steady gate --repo "$REPO" "$MODEL" "$VERSION" --policy "$POLICY"   # a failure stops here
    echo "== promote"
    steady promote --repo "$REPO" "$MODEL" "$VERSION" --reason "quickstart: gate passed"
else
    # a handful of unlabelled photos cannot judge a model (intervals of +-0.1): show the gate's
    # verdict, and if it fails promote anyway with --force, which stages.json records as forced
    if steady gate --repo "$REPO" "$MODEL" "$VERSION" --policy "$POLICY"; then
        echo "== promote"
        steady promote --repo "$REPO" "$MODEL" "$VERSION" --reason "quickstart: gate passed"
    else
        echo "== promote"
        echo "gate failed on $(ls "$REPO/.quickstart-photos" | wc -l) unlabelled photos: promoting with --force (recorded)"
        steady promote --repo "$REPO" "$MODEL" "$VERSION" --force \
            --reason "quickstart without ../shared/data: gate failed on a few unlabelled photos"
    fi
fi
steady models --repo "$REPO"

echo "== serve (Ctrl-C to stop)"
exec steady serve --repo "$REPO" --host 127.0.0.1 --port 8000 --metrics-port 8080
