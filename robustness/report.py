"""The terminal table and the self-contained ``report.html`` (plots inlined as base64 PNG)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ANCHORS", "terminal_table", "write_html"]

# Published anchors (ImageNet validation): the papers' own tables, quoted in each row.
ANCHORS: list[tuple[str, str, str, str]] = [
    ("pan.p_change", "P(top-1 change), crop protocol", "0.061-0.068", "Azulay & Weiss Table 1: ResNet50 0.061, VGG16 0.062, DenseNet121 0.068"),
    ("pan.mac", "MAC, crop protocol", "0.038-0.045", "Azulay & Weiss"),
    ("embed@0.5.p_change", "P(top-1 change), embedded protocol", "0.18-0.20", "Azulay & Weiss Table 1: VGG16 0.18, ResNet50 0.20, DenseNet121 0.19"),
    ("pan.flip_probability", "ImageNet-P translate FP", "~0.048 (FR 44)", "ImageNet-P ResNet-50; AlexNet FP 0.1101"),
    ("scale.flip_probability", "ImageNet-P scale FP", "~0.113 (FR 48)", "ImageNet-P ResNet-50; AlexNet FP 0.2353"),
    ("consistency", "Consistency (random 224 crops of 256)", "0.892 / 0.913", "Zhang 2019 ResNet-50 baseline / anti-aliased"),
]
_ALEXNET_FP = {"pan.flip_probability": 0.1101, "scale.flip_probability": 0.2353}


def _fmt(est: dict[str, Any] | None) -> str:
    if est is None:
        return "-"
    return f"{est['value']:.3f} [{est['ci95'][0]:.3f},{est['ci95'][1]:.3f}] n={est['n']}"


def _rows(doc: dict[str, Any]) -> list[tuple[str, dict[str, dict[str, Any] | None]]]:
    """(metric, {policy: estimate}) rows common to the table and the HTML."""
    pr = doc["protocols"]
    policies = doc["config"]["policies"]
    rows: list[tuple[str, dict[str, dict[str, Any] | None]]] = []
    if doc.get("accuracy"):
        rows.append(("accuracy.top1", {p: doc["accuracy"][p]["top1"] for p in policies}))
        rows.append(("accuracy.top5", {p: doc["accuracy"][p]["top5"] for p in policies}))
    if "pan" in pr:
        for k in ("p_change", "mac", "flip_probability"):
            rows.append((f"pan.{k}", {p: pr["pan"][p][k] for p in policies}))
    if "scale" in pr:
        for k in ("p_change", "flip_probability"):
            rows.append((f"scale.{k}", {p: pr["scale"][p][k] for p in policies}))
    if "embed" in pr:
        for i, size in enumerate(doc["config"]["embed_sizes"]):
            rows.append((f"embed@{size:g}.p_change", {p: pr["embed"][p]["sizes"][i]["p_change"] for p in policies}))
            if pr["embed"][policies[0]]["sizes"][i]["accuracy"] is not None:
                rows.append((f"embed@{size:g}.accuracy", {p: pr["embed"][p]["sizes"][i]["accuracy"] for p in policies}))
    if "consistency" in pr:
        rows.append(("consistency", {p: pr["consistency"][p]["consistency"] for p in policies}))
    if "resolution" in pr:
        for i, row in enumerate(pr["resolution"][policies[0]]["resolutions"]):
            r = row["resolution"]
            if row["accuracy"] is not None:
                rows.append((f"resolution@{r}.accuracy",
                             {p: pr["resolution"][p]["resolutions"][i]["accuracy"] for p in policies}))
            rows.append((f"resolution@{r}.p_change",
                         {p: pr["resolution"][p]["resolutions"][i]["p_change"] for p in policies}))
    return rows


def _verdict(name: str, center: dict[str, Any] | None, obj: dict[str, Any] | None) -> str:
    """Whether the object policy helps or hurts on a metric, judged by non-overlapping intervals."""
    if center is None or obj is None:
        return "-"
    higher_better = "accuracy" in name or name == "consistency" or name.endswith("top5")
    if obj["ci95"][0] > center["ci95"][1]:
        return "helps" if higher_better else "hurts"
    if obj["ci95"][1] < center["ci95"][0]:
        return "hurts" if higher_better else "helps"
    return "no clear difference"


def terminal_table(doc: dict[str, Any]) -> str:
    policies = doc["config"]["policies"]
    width = 34
    lines = [f"{doc['model']} v{doc['version']}  sha256={doc['model_sha256'][:12]}  "
             f"images={doc['data']['images']}  seed={doc['seed']}",
             f"{'metric':<24}" + "".join(f"{p:<{width}}" for p in policies)]
    for name, per in _rows(doc):
        lines.append(f"{name:<24}" + "".join(f"{_fmt(per[p]):<{width}}" for p in policies))
    ch = doc["chosen"]
    lines.append(f"chosen: policy={ch['policy']} resolution={ch['resolution']}")
    t = doc.get("timing", {})
    if t:
        lines.append(f"{t.get('evaluations', 0):.0f} evaluations in {t.get('seconds', 0):.1f} s "
                     f"({t.get('evaluations_per_s', 0):.1f}/s)")
    return "\n".join(lines)


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img_tag(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def plots(doc: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs of the report's figures, keyed by name (only for protocols that were run)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pr = doc["protocols"]
    policies = doc["config"]["policies"]
    out: dict[str, str] = {}

    def band(ax: Any, xs: list[float], ests: list[dict[str, Any] | None], label: str) -> None:
        pts = [(x, e) for x, e in zip(xs, ests) if e is not None]
        if not pts:
            return
        x = [p[0] for p in pts]
        ax.plot(x, [p[1]["value"] for p in pts], marker="o", label=label)
        ax.fill_between(x, [p[1]["ci95"][0] for p in pts], [p[1]["ci95"][1] for p in pts], alpha=0.2)

    def accuracy_and_flips(rows_of: Any, x_key: str) -> Any:
        """Two panels, top-1 and P(change) against ``x_key``, one band per policy."""
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for p in policies:
            rows = rows_of(p)
            xs = [r[x_key] for r in rows]
            band(axes[0], xs, [r["accuracy"] for r in rows], p)
            band(axes[1], xs, [r["p_change"] for r in rows], p)
        return fig, axes

    if "embed" in pr:
        fig, axes = accuracy_and_flips(lambda p: pr["embed"][p]["sizes"], "size")
        axes[0].set(title="accuracy vs object size", xlabel="object size (fraction of input side)", ylabel="top-1")
        axes[1].set(title="P(top-1 change), 1-px diagonal", xlabel="object size", ylabel="P(change)")
        axes[1].axhline(0.19, ls=":", c="grey", label="A&W embedded ~0.19")
        _legends(axes)
        out["embed"] = _png(fig)
    if "pan" in pr or "scale" in pr:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for p in policies:
            if "pan" in pr and pr["pan"][p]["translate_flip_curve"] is not None:
                offs = pr["pan"][p]["translate_offsets"]
                axes[0].plot(offs[1:], pr["pan"][p]["translate_flip_curve"], marker=".", label=p)
            if "scale" in pr and pr["scale"][p]["zoom_flip_curve"] is not None:
                axes[1].plot(pr["scale"][p]["zooms"][1:], pr["scale"][p]["zoom_flip_curve"], marker=".", label=p)
        axes[0].set(title="flip probability along the shift sequence", xlabel="horizontal offset (px)",
                    ylabel="P(f(x_j) != f(x_j-1))")
        axes[1].set(title="flip probability along the zoom sequence", xlabel="zoom", ylabel="P(flip)")
        _legends(axes)
        out["sequences"] = _png(fig)
    if "resolution" in pr:
        fig, axes = accuracy_and_flips(lambda p: pr["resolution"][p]["resolutions"], "resolution")
        axes[0].set(title="FixRes sweep: accuracy", xlabel="test resolution", ylabel="top-1")
        axes[1].set(title="FixRes sweep: P(top-1 change)", xlabel="test resolution", ylabel="P(change)")
        _legends(axes)
        out["resolution"] = _png(fig)
    return out


def _thumb_png(pixels: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_html(doc: dict[str, Any], path: str | Path, thumbs: dict[str, np.ndarray] | None = None,
               explanations: Any = None) -> Path:
    """Write the self-contained report (with :func:`explanations_html` when ``explanations`` are given)."""
    path = Path(path)
    policies = doc["config"]["policies"]
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>Steady robustness: {e(doc['model'])} v{doc['version']}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}th{background:#eee}"
        ".chosen{background:#e8ffe8}</style></head><body>",
        f"<h1>Robustness of {e(doc['model'])} v{doc['version']}</h1>",
        f"<p>model sha256 <code>{e(doc['model_sha256'])}</code><br>data <code>{e(doc['data']['path'])}</code>, "
        f"{doc['data']['images']} images, fingerprint <code>{e(doc['data']['fingerprint'][:16])}</code>, "
        f"labelled: {doc['data']['labelled']}; seed {doc['seed']}; created {e(doc['created'])}</p>",
        f"<h2>Chosen: policy <b>{e(doc['chosen']['policy'])}</b>, resolution <b>{doc['chosen']['resolution']}</b></h2>",
        f"<p><small>{e(doc['chosen']['rule'])}</small></p>",
        "<h2>All metrics (value [95% bootstrap interval over images] n)</h2><table><tr><th>metric</th>"
        + "".join(f"<th class='{'chosen' if p == doc['chosen']['policy'] else ''}'>{e(p)}</th>" for p in policies)
        + "</tr>",
    ]
    compare = "center" in policies and "object" in policies
    if compare:
        parts[-1] = parts[-1].replace("</tr>", "<th>object vs center</th></tr>")
    for name, per in _rows(doc):
        verdict = f"<td>{e(_verdict(name, per['center'], per['object']))}</td>" if compare else ""
        parts.append(f"<tr><td>{e(name)}</td>" + "".join(f"<td>{e(_fmt(per[p]))}</td>" for p in policies)
                     + verdict + "</tr>")
    parts.append("</table><p><small>'object vs center' says helps/hurts only when the 95% intervals do not "
                 "overlap; otherwise 'no clear difference'.</small></p>")
    parts.append("<h2>Comparison with published anchors (ImageNet validation)</h2><table><tr><th>metric</th>"
                 "<th>published</th><th>source</th>" + "".join(f"<th>{e(p)}</th>" for p in policies) + "</tr>")
    rows = dict(_rows(doc))
    for key, what, value, source in ANCHORS:
        per = rows.get(key)
        cells = []
        for p in policies:
            est = per.get(p) if per else None
            text = "-" if est is None else f"{est['value']:.3f}"
            if est is not None and key in _ALEXNET_FP:
                text += f" (FR {100 * est['value'] / _ALEXNET_FP[key]:.0f})"
            cells.append(f"<td>{e(text)}</td>")
        parts.append(f"<tr><td>{e(what)}</td><td>{e(value)}</td><td>{e(source)}</td>{''.join(cells)}</tr>")
    parts.append("</table><p><small>Anchors are ImageNet-validation numbers for other architectures and full "
                 "protocols; ours are measured on this data with the protocol sizes in <code>config</code> "
                 "(e.g. shorter translate sequences): compare orders of magnitude, not digits.</small></p>")
    figs = plots(doc)
    titles = {"embed": "Object size (Azulay & Weiss embedded protocol)", "sequences": "Shift and zoom sequences "
              "(ImageNet-P)", "resolution": "Test resolution (FixRes)"}
    for key, b64 in figs.items():
        parts.append(f"<h2>{e(titles[key])}</h2>{_img_tag(b64, key)}")
    if doc.get("most_flipping"):
        parts.append("<h2>Images that flip most</h2><table><tr><th>image</th><th>file</th><th>label</th>"
                     "<th>flips per policy</th><th>top-1 per policy</th></tr>")
        for row in doc["most_flipping"]:
            thumb = thumbs.get(row["file"]) if thumbs else None
            img = _img_tag(_thumb_png(thumb), row["file"]) if thumb is not None else ""
            parts.append(f"<tr><td>{img}</td><td>{e(row['file'])}</td><td>{row['label']}</td>"
                         f"<td>{e(str(row['flips']))}</td><td>{e(str(row['top1']))}</td></tr>")
        parts.append("</table>")
    if explanations is not None:
        parts.append(explanations_html(explanations))
    t = doc.get("timing", {})
    parts.append(f"<p><small>{t.get('evaluations', 0):.0f} model evaluations in {t.get('seconds', 0):.1f} s; "
                 f"config: <code>{e(str(doc['config']))}</code></small></p></body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


def _legends(axes: Any) -> None:
    """A legend on each axis that has labelled artists (unlabelled data, e.g. accuracy, draws none)."""
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


# ------------------------------------------------------------------ why answers flip (occlusion maps)
def explanation_summary(rep: Any) -> str:
    """One line: the share of flip-prone photos whose evidence lies outside the object region, and the cost."""
    est = rep.outside
    share = "-" if est is None else f"{est['value']:.2f} [{est['ci95'][0]:.2f}, {est['ci95'][1]:.2f}] of {est['n']}"
    g = rep.grid
    return (f"evidence outside the object box / central crop: {share} explained flip-prone photos "
            f"(a random position: {rep.chance:.2f}); {rep.flip_prone} of {rep.scanned} photos flip under a 1-px "
            f"diagonal move ({rep.policy} @ {rep.resolution}); {g.size} px square, stride {g.stride}, "
            f"{g.rows}x{g.cols} positions; {rep.evaluations} evaluations in {rep.seconds:.1f} s")


def _map_img(pixels: np.ndarray, alt: str) -> str:
    return (f'<img class="explain-map" alt="{html.escape(alt)}" height="150" '
            f'src="data:image/png;base64,{_thumb_png(pixels)}">')


def explanations_html(rep: Any) -> str:
    """The "Why answers flip" section: for each explained photo its two disagreeing views side by side, each with
    its answer, the occlusion maps of both competing classes (probability 0..1 with a colour scale) and the top-1
    class under occlusion; then the summary number. ``rep`` is a :class:`robustness.explain.FlipReport`."""
    from robustness.explain import overlay, scaled, top1_overlay

    e = html.escape
    est = rep.outside
    parts = [
        "<h2 id='why-flips'>Why answers flip: occlusion sensitivity (Zeiler &amp; Fergus 2014)</h2>",
        "<p>A square of the model's mean colour slides over the served view; each map shows, for every position "
        "of the square, the probability of a class (colour scale 0 to 1; dark where hiding that region lowers "
        "it). <i>Evidence</i> is the position that lowers the view's answer most. The last map is the top-1 "
        "class under occlusion (blue: the first view's answer, orange: the second's, grey: another class).</p>",
        "<p class='explain-summary'>Share of flip-prone photos whose evidence lies outside the located object "
        "box (or, where no object stands out, the central crop: the middle half of each side): "
        + ("<b>-</b>" if est is None else f"<b>{est['value']:.2f}</b> [{est['ci95'][0]:.2f}, {est['ci95'][1]:.2f}] "
                                          f"n={est['n']}")
        + f" (a random position would be outside {rep.chance:.2f}).</p>",
        f"<p><small>{e(explanation_summary(rep))}</small></p>",
    ]
    if not rep.explained:
        parts.append("<p>No photo flips under a 1-px diagonal move with the served policy: nothing to explain.</p>")
        return "\n".join(parts)
    parts.append("<table class='explain'><tr><th>photo</th><th>view</th><th>answer</th><th>input</th>"
                 "<th>p(first answer)</th><th>p(second answer)</th><th>top-1 under occlusion</th></tr>")
    scale = max(1, round(224 / rep.resolution))
    for ex in rep.explained:
        a, b = ex.classes
        names = (rep.label(a), rep.label(b))
        for k, (offset, pixels, omap) in enumerate(zip(ex.offsets, ex.views, ex.maps)):
            head = ""
            if k == 0:
                label = "" if ex.label is None else f"<br>label {ex.label} {e(rep.label(ex.label))}"
                where = "outside" if ex.outside else "inside"
                region = "object box" if ex.region_kind == "object" else "central crop"
                head = (f"<td rowspan='2' class='explain-photo'>{e(ex.file)}{label}<br>{ex.flipping_pairs} of the "
                        f"diagonal pairs flip<br>evidence {where} the {region}</td>")
            answer = omap.answer
            cells = [_map_img(scaled(pixels, scale), f"{ex.file} view {offset}")]
            for j in range(2):
                cells.append(_map_img(overlay(pixels, omap.probability[j], omap.grid, scale=scale),
                                      f"{ex.file} view {offset}: p({names[j]}) under occlusion"))
            cells.append(_map_img(top1_overlay(pixels, omap, (a, b), scale=scale),
                                  f"{ex.file} view {offset}: top-1 under occlusion"))
            parts.append(f"<tr class='explain-view'>{head}<td>shift {offset[0]:+d},{offset[1]:+d} px</td>"
                         f"<td class='explain-answer'>{answer} {e(rep.label(answer))} ({omap.base[answer]:.2f})</td>"
                         + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)

