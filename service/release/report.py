"""The check's outputs: one self-contained HTML page (images inline as PNG data URIs) and a JSON summary.

The page has no scripts and loads nothing from the network, so it opens the same from a CI
artifact store, an e-mail attachment or a sandboxed viewer; every value that comes from a model
(tap names, labels) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from service.jobs.images import png_bytes
from service.release.check import CheckResult, LayerReport, Visual, summary

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-top: 1px solid #ccc; padding-top: 12px; }
.pass { color: #0a7d32; } .fail { color: #b3261e; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { padding: 2px 8px; border: 1px solid #ddd; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; text-align: center; font-size: 12px; }
figure img { width: 128px; height: 128px; image-rendering: pixelated; border: 1px solid #bbb; display: block; }
.pair { display: flex; gap: 2px; }
.ex { display: flex; gap: 2px; align-items: flex-end; margin: 4px 0; }
.ex img { width: 64px; height: 64px; }
.ex .lead img { width: 128px; height: 128px; }
"""


def _img(v: Visual, caption: str) -> str:
    data = base64.b64encode(png_bytes(v.image)).decode("ascii")
    alt = html.escape(f"{v.kind} {v.label} ({caption})")
    return f'<img alt="{alt}" title="{alt}" src="data:image/png;base64,{data}">'


def _png(image: Any, alt: str) -> str:
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    alt = html.escape(alt)
    return f'<img alt="{alt}" title="{alt}" src="data:image/png;base64,{data}">'


def _exemplars(layer: LayerReport) -> str:
    """Each sampled channel's Maximize image, then its top crops of the reference photographs
    (and the baseline's), then the drift notes."""
    if not layer.exemplars:
        return ""
    maxima = {v.label: v for v in layer.visuals if v.kind == "maximize"}
    olds = {e.channel: e for e in layer.baseline_exemplars or []}
    rows = []
    for ex in layer.exemplars:
        lead = maxima.get(f"channel {ex.channel}")
        cells = [f'<figure class="lead">{_img(lead, "release")}<figcaption>channel {ex.channel}</figcaption></figure>'
                 if lead is not None else ""]  # fmt: skip
        for label, es in (("release", ex), ("baseline", olds.get(ex.channel))):
            if es is None:
                continue
            for e in es.top:
                caption = html.escape(f"{label}: {e.image_id} {e.fraction_of_max:.2f}")
                cells.append(f"<figure>{_png(e.crop, f'{label} channel {ex.channel}: {e.image_id}')}"
                             f"<figcaption>{caption}</figcaption></figure>")  # fmt: skip
        rows.append(f'<div class="ex">{"".join(cells)}</div>')
    if layer.baseline_exemplars is None:
        notes = ""
    elif layer.exemplar_notes:
        notes = "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in layer.exemplar_notes) + "</ul>"
    else:
        notes = "<p>top exemplars unchanged in every sampled channel</p>"
    return ("<p>top crops of the reference photographs (and their mirrors and centre crops) per sampled "
            "channel, beside its Maximize image; fraction of the channel's maximum over the set</p>"
            + "".join(rows) + notes)  # fmt: skip


def _layer(layer: LayerReport, has_baseline: bool) -> str:
    t = layer.tap
    geometry = (f"stride {t.stride}, receptive field {t.receptive_field}" if t.geometry_known
                else "stride and receptive field unknown")
    parts = [f"<h2>{html.escape(t.alias)} <small>({html.escape(t.name)}, {html.escape(t.op_type)}, "
             f"shape {list(t.shape)} at the nominal size, {geometry})</small></h2>"]
    if layer.note:
        parts.append(f"<p>{html.escape(layer.note)}</p>")
    d = layer.drift
    if d is not None:
        parts.append(
            "<table><tr><th>feature drift (photos)</th><th>visual drift (max)</th><th>changed channels</th></tr>"
            f'<tr><td class="num">{d.feature_drift:.3g}</td><td class="num">{d.visual_drift_max:.3g}</td>'
            f'<td class="num">{d.changed_channels} / {d.n_channels}</td></tr></table>'
        )
    figures = []
    for i, v in enumerate(layer.visuals):
        old = layer.baseline_visuals[i] if layer.baseline_visuals else None
        imgs = _img(v, "release") + (_img(old, "baseline") if old is not None else "")
        measure = "objective" if v.kind == "maximize" else "feature error"
        lines = [f"{v.kind} {v.label}", f"{measure} {v.objective:.3g}"]
        if d is not None:
            lines.append(f"drift {d.visual_drift[i]:.3g}")
        caption = "<br>".join(html.escape(line) for line in lines)
        figures.append(f'<figure><div class="pair">{imgs}</div><figcaption>{caption}</figcaption></figure>')
    legend = "release (left) and baseline (right)" if has_baseline else "release"
    parts.append(f"<p>{legend}</p><div class=\"grid\">{''.join(figures)}</div>")
    parts.append(_exemplars(layer))
    return "\n".join(parts)


def _parity_table(result: CheckResult) -> str:
    rows = []
    for label, rep in (("release", result.parity), ("baseline", result.baseline_parity)):
        if rep is None:
            continue
        bad = [t for t in rep.taps if not t.ok]
        rows.append(f"<p>{label}: {len(rep.taps) - len(bad)} of {len(rep.taps)} taps within {rep.tolerance:g} "
                    f"(worst {rep.max_rel_error:.2e}, input {rep.input_shape})</p>")
        shown = bad or sorted(rep.taps, key=lambda t: -t.rel_error)[:5]
        rows.append("<table><tr><th>tap</th><th>shape</th><th>max|a−b| / (max|b| + |b|)</th><th></th></tr>" + "".join(
            f'<tr><td>{html.escape(t.alias)}</td><td>{t.shape}</td><td class="num">{t.rel_error:.2e}</td>'
            f"<td class=\"{'pass' if t.ok else 'fail'}\">{'ok' if t.ok else 'FAIL'}</td></tr>" for t in shown)
                    + "</table>")
    return "\n".join(rows)


def render_html(result: CheckResult) -> str:
    verdict = ('<p class="pass"><b>PASS</b></p>' if result.ok else '<p class="fail"><b>FAIL</b></p><ul>'
               + "".join(f"<li>{html.escape(r)}</li>" for r in result.reasons) + "</ul>")
    title = html.escape(f"preimage check: {result.model_name}"
                        + (f" vs {result.baseline_name}" if result.baseline_name else ""))
    body = [f"<h1>{title}</h1>", verdict,
            f"<p>preset {html.escape(result.preset)}, {result.size[0]}×{result.size[1]} px, "
            f"{html.escape(result.device)}</p>",
            "<h2>Parity against onnxruntime (photographs)</h2>", _parity_table(result)]
    body += [_layer(layer, result.baseline_name is not None) for layer in result.layers]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(result: CheckResult, out: Path) -> dict[str, Any]:
    """report.html and check.json in ``out``; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    data = summary(result)
    (out / "report.html").write_text(render_html(result), encoding="utf-8")
    (out / "check.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    return data
