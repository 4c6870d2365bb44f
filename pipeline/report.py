"""The run report: ``report/index.html`` (self-contained, images embedded as data URIs) and ``report/report.md``.

Reads only what the stages wrote, so it can be rebuilt at any time (``qaft run --from report``):
``stages/run.yaml``, ``metrics.jsonl`` (training curves and every callback's metrics),
``mat_lambda.png`` (MAT's λmax heatmap), ``eval.json`` (the perplexity table), ``quantized/``
(per-layer errors; the scheme), ``tune/`` (tuning curves, per-block errors), ``final/`` (weights for the error spectra) and
``export/manifest.json`` (sizes and parity). Plots need matplotlib (``pip install 'qaft[plots]'``);
without it the report has the tables and says the plots were skipped.
"""

from __future__ import annotations

import base64
import html
import json
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from qaft.core.io import staged
from qaft.core.typed import parse
from qaft.quant.grid import quantize_weight
from qaft.quant.scheme import QuantScheme

IMAGES_CHECK = """<script>
// Lets a headless browser (and the tests) confirm that every image decoded (a data-decoded attribute on each).
window.addEventListener('load', () => {
  for (const img of document.images) img.dataset.decoded = (img.complete && img.naturalWidth > 0) ? '1' : '0';
  document.body.dataset.images = String(document.images.length);
});
</script>"""


def _metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict[str, Any]], event: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r.get("event") != event:
            continue
        for k, v in r.items():
            if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                series[k].append((r["step"], float(v)))
    return series


class Figures:
    """PNG files in the report folder; ``None`` for each figure when matplotlib is missing."""

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            self.plt = plt
        except ImportError:
            self.plt = None

    def lines(self, name: str, title: str, panels: list[tuple[str, dict[str, list[tuple[int, float]]]]], logy: bool = False) -> Path | None:
        panels = [(t, s) for t, s in panels if s]
        if self.plt is None or not panels:
            return None
        fig, axes = self.plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
        for ax, (t, series) in zip(axes[0], panels):
            for label, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 12 else None, ms=3, label=label)
            ax.set_title(t, fontsize=9)
            ax.set_xlabel("step")
            if logy:
                ax.set_yscale("log")
            if len(series) > 1:
                ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return self.save(fig, name)

    def save(self, fig: Any, name: str) -> Path:
        path = self.folder / f"{name}.png"
        fig.savefig(path, dpi=100)
        self.plt.close(fig)
        return path


def training_figure(fig: Figures, rows: list[dict[str, Any]]) -> Path | None:
    train, ev = _series(rows, "train"), _series(rows, "eval")
    return fig.lines(
        "training",
        "training curves",
        [
            ("train loss", {k: v for k, v in train.items() if k == "loss" or k.startswith("loss/")}),
            ("learning rate", {"lr": train.get("lr", [])} if train.get("lr") else {}),
            ("eval perplexity", {"eval_ppl": ev.get("eval_ppl", [])} if ev.get("eval_ppl") else {}),
        ],
    )


def tuning_figure(fig: Figures, rows: list[dict[str, Any]]) -> Path | None:
    """``qaft tune``'s curves: the distillation loss, and on the held-out blocks the KL to the teacher and the perplexity."""
    train, ev = _series(rows, "train"), _series(rows, "eval")
    return fig.lines(
        "tuning",
        "tuning the low-rank factors against the float model",
        [
            ("KD loss (train)", {"loss": train.get("loss", [])} if train.get("loss") else {}),
            ("KL to the teacher (held out)", {"eval_kl": ev.get("eval_kl", [])} if ev.get("eval_kl") else {}),
            ("perplexity (held out)", {"eval_ppl": ev.get("eval_ppl", [])} if ev.get("eval_ppl") else {}),
        ],
    )


def callback_figures(fig: Figures, rows: list[dict[str, Any]], names: list[str]) -> list[tuple[str, Path | None, dict[str, float]]]:
    """Per callback: a plot of its per-step metrics and a table of its one-off numbers (e.g. NPFT's Hessian trace)."""
    train = _series(rows, "train")
    out = []
    for name in names:
        mine = {k: v for k, v in train.items() if k.startswith(f"{name}/") or k.startswith(f"loss/{name}/")}
        curves = {k: v for k, v in mine.items() if len(v) > 1}
        once = {k: v[-1][1] for k, v in mine.items() if len(v) == 1}
        path = fig.lines(f"callback-{name}", f"callback {name}", [(k, {k: v}) for k, v in sorted(curves.items())][:4])
        out.append((name, path, once))
    return out


def layer_error_figure(fig: Figures, meta: dict[str, Any]) -> Path | None:
    layers = meta.get("layers") or []
    if fig.plt is None or not layers:
        return None
    f, ax = fig.plt.subplots(figsize=(9, 3.2))
    xs = range(len(layers))
    nearest = [r.get("rel_output_error_nearest") for r in layers]
    if None not in nearest and nearest != [r["rel_output_error_rtn"] for r in layers]:  # a learned quantizer: show what it gained
        ax.plot(xs, nearest, lw=1, color="0.6", label="round to nearest")
    ax.plot(xs, [r["rel_output_error_rtn"] for r in layers], lw=1, label=f"quantized only ({meta.get('method', '?').split('+')[0]})")
    if any(r["rank"] for r in layers):
        ax.plot(xs, [r["rel_output_error"] for r in layers], lw=1, label=f"with the rank-{meta.get('rank')} correction")
    return _save_error_plot(fig, f, ax, "Linear (model order)", "‖XEᵀ‖ / ‖XWᵀ‖ (calibration)", f"per-layer output error, {meta.get('method')}", "layer-error")


def budget_figure(fig: Figures, meta: dict[str, Any]) -> Path | None:
    """Under ``postpass.budget_bpw``: what the allocator gave each Linear, its rank and its stored bits per weight."""
    layers = [r for r in meta.get("layers") or [] if r.get("stored_bpw") is not None]
    if fig.plt is None or not layers:
        return None
    f, ax = fig.plt.subplots(figsize=(9, 3.2))
    xs = range(len(layers))
    ax.bar(xs, [r["rank"] for r in layers], width=1.0, color="0.7", label="rank")
    ax.set_xlabel("Linear (model order)")
    ax.set_ylabel("rank")
    bits = ax.twinx()
    bits.plot(xs, [r["stored_bpw"] for r in layers], lw=1, color="C3", marker=".", ms=3)
    bits.set_ylabel("bits per weight (stored)", color="C3")
    formats = sorted({r["weight_format"] for r in layers if r.get("weight_format")})
    ax.set_title(f"bits budget: rank and bits per Linear{' (formats: ' + ', '.join(formats) + ')' if formats else ''}", fontsize=10)
    f.tight_layout()
    return fig.save(f, "budget")


def block_error_figure(fig: Figures, tuned: dict[str, Any]) -> Path | None:
    """Per decoder block, the relative output error against the float model, as solved and as tuned (``qaft tune``)."""
    errors = (tuned.get("tune") or {}).get("block_errors")
    if fig.plt is None or not errors:
        return None
    f, ax = fig.plt.subplots(figsize=(9, 3.2))
    for label, values in errors.items():
        ax.plot(range(len(values)), values, marker="o", ms=3, lw=1, label=label.replace("_", " "))
    return _save_error_plot(
        fig, f, ax, "decoder block", "‖y − y_float‖ / ‖y_float‖ (calibration)", f"per-block output error, {tuned.get('method')}", "block-error"
    )


def _save_error_plot(fig: Figures, f: Any, ax: Any, xlabel: str, ylabel: str, title: str, name: str) -> Path:
    """The finish both error plots share: relative errors span decades, so a log axis."""
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    f.tight_layout()
    return fig.save(f, name)


def spectra_figure(fig: Figures, out: Path, meta: dict[str, Any]) -> Path | None:
    """Singular values of the RTN error ``W − Q(W)`` of the fine-tuned weights (first, middle, last block), rank cut marked."""
    files = sorted((out / "final").glob("*.safetensors"))
    names = meta.get("quantized") or []
    if fig.plt is None or not files or not names:
        return None
    scheme = parse(QuantScheme, meta["scheme"], "scheme")
    blocks = sorted({n.split(".layers.")[1].split(".")[0] for n in names if ".layers." in n}, key=int)
    pick = {blocks[0], blocks[len(blocks) // 2], blocks[-1]}
    chosen = [
        n
        for n in names
        if ".layers." in n and n.split(".layers.")[1].split(".")[0] in pick and n.rsplit(".", 1)[-1] in ("q_proj", "down_proj", "fc2", "out_proj")
    ]
    weights = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            for n in chosen:
                if f"{n}.weight" in st.keys():
                    weights[n] = st.get_tensor(f"{n}.weight").float()
    if not weights:
        return None
    f, ax = fig.plt.subplots(figsize=(6, 3.4))
    for n, w in weights.items():
        s = torch.linalg.svdvals(w - quantize_weight(w, scheme.weight).dequant)
        ax.plot((s / s[0]).numpy(), lw=1, label=n.split("layers.")[1])
    if meta.get("rank"):
        ax.axvline(meta["rank"], color="k", ls=":", lw=1, label=f"rank {meta['rank']}")
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("σᵢ / σ₁ of W − Q(W)")
    ax.set_title(f"quantization error spectra ({scheme.label})", fontsize=10)
    ax.legend(fontsize=6)
    f.tight_layout()
    return fig.save(f, "spectra")


# -- tables


def ppl_table(ev: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "method", "scheme", "ppl"]
    return head, [[r["model"], r["method"], r["scheme"] or "float", f"{r['ppl']:.2f}"] for r in ev.get("rows", [])]


def export_table(manifest: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    s = manifest["sizes"]
    rows = [
        ["base (packed)", f"{s['base_bytes'] / 2**20:.1f} MiB"],
        ["adapter", f"{s['adapter_bytes'] / 2**20:.1f} MiB"],
        ["float32 model", f"{s['float32_bytes'] / 2**20:.1f} MiB"],
        ["bits / weight (base, with adapter)", f"{s['bits_per_weight_base']:.2f}, {s['bits_per_weight_with_adapter']:.2f}"],
    ]
    for loader, p in manifest["parity"].items():
        rows.append([f"parity ({loader})", f"max |Δlogit| {p['max_abs_diff']:.2e} (tolerance {p['tolerance']:g}), top-1 agreement {p['top1_agreement']:.1%}"])
    return ["", ""], rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)])


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return f"<p><em>{html.escape(alt)}: no plot (nothing logged, or matplotlib is not installed)</em></p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_report(out: str | Path) -> Path:
    """Build the report from a run folder; written to a temp folder and renamed, so it is whole or absent."""
    out = Path(out)
    folder = out / "report"
    with staged(folder) as tmp:
        run_yaml = out / "stages" / "run.yaml"
        config = run_yaml.read_text() if run_yaml.is_file() else "(no stages/run.yaml)\n"
        callbacks = [c["name"] for c in (yaml.safe_load(config) if run_yaml.is_file() else {}).get("callbacks") or []]
        rows = _metrics(out)
        figs = Figures(tmp)
        ev, meta, manifest = _read_json(out / "eval.json"), _read_json(out / "quantized" / "qaft_quant.json"), _read_json(out / "export" / "manifest.json")
        sections: list[tuple[str, str, str]] = []  # (title, html, markdown)

        def add(title: str, body_html: str, body_md: str) -> None:
            sections.append((title, body_html, body_md))

        def figure(title: str, path: Path | None) -> None:
            add(title, _img(path, title), f"![{title}]({path.name})" if path else f"_{title}: no plot_")

        if ev:
            p = ev["protocol"]
            proto = (
                f"{p['eval_path']}: {p['windows']} windows × {p['seq_len']} tokens{', each starting with BOS' if p.get('bos') else ''}; "
                f"calibration {p['calibration']['samples']} × "
                f"{p['calibration']['seq_len']} from {p['calibration']['path']}; rank {p['rank']}"
            )
            head, body = ppl_table(ev)
            add("Perplexity", f"<p>{html.escape(proto)}</p>" + _html_table(head, body), f"{proto}\n\n" + _md_table(head, body))
        figure("Training curves", training_figure(figs, rows))
        if (out / "tune" / "metrics.jsonl").is_file():
            figure("Tuning curves", tuning_figure(figs, _metrics(out / "tune")))
        for name, path, once in callback_figures(figs, rows, callbacks):
            extra = [[k, f"{v:.4g}"] for k, v in sorted(once.items())]
            figure(f"Callback {name}", path)
            if extra:
                add(f"Callback {name}: one-off numbers", _html_table(["metric", "value"], extra), _md_table(["metric", "value"], extra))
            if name == "mat" and (out / "mat_lambda.png").is_file():
                figure("MAT λmax per head (layers × heads, per recomputation)", Path(shutil.copy(out / "mat_lambda.png", tmp / "mat_lambda.png")))
        if meta:
            figure("Per-layer quantization error", layer_error_figure(figs, meta))
            if any(r.get("stored_bpw") is not None for r in meta.get("layers") or []):
                figure("Ranks and bits per Linear under the bits budget", budget_figure(figs, meta))
        tuned = _read_json(out / "tune" / "final" / "qaft_quant.json")
        if tuned:
            figure("Per-block output error: closed form vs tuned", block_error_figure(figs, tuned))
            figure("Singular-value spectra of the quantization error", spectra_figure(figs, out, meta))
        if manifest:
            head, body = export_table(manifest)
            add("Export: size and reload parity", _html_table(head, body), _md_table(head, body))
        add("Config", f"<pre>{html.escape(config)}</pre>", f"```yaml\n{config}```")

        title = f"qaft run report: {out.name}"
        page = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow:auto}</style>",
            IMAGES_CHECK,
            "</head><body>",
            f"<h1>{html.escape(title)}</h1>",
        ]
        page += [f"<h2>{html.escape(t)}</h2>{h}" for t, h, _ in sections]
        page.append("</body></html>")
        (tmp / "index.html").write_text("\n".join(page), encoding="utf-8")
        (tmp / "report.md").write_text(f"# {title}\n\n" + "\n\n".join(f"## {t}\n\n{m}" for t, _, m in sections) + "\n", encoding="utf-8")
    return folder
