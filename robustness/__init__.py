"""Shift/scale robustness scoring, the promotion gate, and their reports. Imports no torch.

Modules: ``data`` (images, labels, fingerprint), ``metrics`` (REFERENCE section 2 definitions),
``stats`` (bootstrap over images), ``protocols`` (views per image: pan, scale, embed, consistency,
resolution; policies center and object), ``scorer`` (batched ONNX Runtime, Ray sharding, pooling,
the choice rule), ``schema`` (robustness.json keys), ``report`` (terminal table, report.html),
``gate`` (pure decision + gate.json), ``promote`` (promotion and rollback), ``bench``
(``steady bench score``), ``cli`` (the sub-commands).

Typical use::

    steady score --repo models efficientnet-lite0 --data DIR --labels DIR/labels.csv --out reports/lite0
    steady gate --repo models efficientnet-lite0 1 --policy deploy/gate.yaml
    steady promote --repo models efficientnet-lite0 1
"""

__all__: list[str] = []
