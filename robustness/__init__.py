"""Shift/scale robustness scoring, the promotion gate, and their reports. Imports no torch.

Modules: ``data`` (images, labels, fingerprint), ``measures`` (P(top-1 change), MAC, flip probability,
consistency, top-k hits), ``stats`` (bootstrap over images), ``protocols`` (views per image: pan, scale,
embed, consistency, resolution; policies center and object), ``scorer`` (batched ONNX Runtime, Ray
sharding, pooling, the choice rule), ``document`` (a version's robustness.json), ``schema``
(robustness.json keys), ``report`` (terminal table, report.html), ``gate`` (pure decision + gate.json),
``promote`` (promotion and rollback), ``cli`` (the sub-commands).

Typical use::

    steady score --repo models efficientnet-lite0 --data DIR --labels DIR/labels.csv --out reports/lite0
    steady gate --repo models efficientnet-lite0 1 --policy deploy/gate.yaml
    steady promote --repo models efficientnet-lite0 1
"""

__all__: list[str] = []
