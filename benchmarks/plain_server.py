"""The comparison Steady must beat: what a user writes in twenty lines (FastAPI + uvicorn + ONNX Runtime + Pillow).

No batching, no Ray, one process: Pillow decodes, resizes the short side to round(R / crop_pct),
centre-crops R x R and normalises with the card's mean/std; one ``InferenceSession.run`` per
request (FastAPI runs the plain ``def`` handler in its thread pool). It reads only the version's
``model.onnx`` and ``card.json``, as a user would copy the constants. ``steady bench serve --plain``
starts it next to ``steady serve`` and measures both in the same run.

    python -m benchmarks.plain_server models/efficientnet-lite0/1 --port 8100
    curl -s -H 'Content-Type: image/jpeg' --data-binary @photo.jpg \\
        'http://127.0.0.1:8100/v1/models/efficientnet-lite0:classify'
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

__all__ = ["build_app"]


def build_app(version_dir: str | Path, threads: int = 0) -> Any:
    """The FastAPI app serving ``version_dir`` (a Steady version folder: model.onnx + card.json)."""
    import numpy as np
    import onnxruntime as ort
    from fastapi import Body, FastAPI
    from PIL import Image

    card = json.loads((Path(version_dir) / "card.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(Path(version_dir) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    size = card.get("test_resolution") or card["train_resolution"]
    short = round(size / card["crop_pct"])
    mean = np.asarray(card["mean"], dtype=np.float32)
    std = np.asarray(card["std"], dtype=np.float32)
    labels = card["labels"]
    app = FastAPI()

    # --------------------------------------------------------------- the twenty lines
    @app.post("/v1/models/{model}:classify")
    def classify(model: str, body: bytes = Body(..., media_type="image/jpeg"), top_k: int = 5) -> dict[str, Any]:
        img = Image.open(io.BytesIO(body)).convert("RGB")
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BILINEAR)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        x = (np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) - mean) / std
        logits = session.run(None, {name: x.transpose(2, 0, 1)[None]})[0][0]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        best = np.argsort(-p)[:top_k]
        return {"model": model, "predictions": [{"index": int(i), "label": labels[i], "score": float(p[i])}
                                                for i in best]}
    # ---------------------------------------------------------------

    @app.get("/v2/health/ready")
    def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version_dir", help="a version folder of a Steady repository (model.onnx, card.json)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    args = parser.parse_args(argv)
    uvicorn.run(build_app(args.version_dir, args.threads), host=args.host, port=args.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
