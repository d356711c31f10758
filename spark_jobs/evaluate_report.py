"""evaluate's report: the CSV files, the PNG plots (matplotlib, no display) and one self-contained
report.html (images embedded, nothing fetched), all from the aggregates spark_jobs/evaluate_steps.py made.
"""
from __future__ import annotations

import base64
import csv
import html
import os
from typing import List

from schemas import layout
from spark_jobs.evaluate_steps import SMALL_SLICE, group_names


def write_files(folder: str, metrics: dict, density, curves) -> List[str]:
    """slices.csv, confusion.csv and the PNG plots into `folder`; the plots' names."""
    import numpy as np

    matrix = np.asarray(metrics["confusion"]["counts"], dtype=float)
    normalized = np.asarray(metrics["confusion"]["row_normalized"], dtype=float)
    plots = write_plots(folder, matrix, normalized, metrics["slices"], density, metrics["uncertainty"], curves)
    write_csv(os.path.join(folder, layout.EVAL_SLICES), metrics["slices"])
    with open(os.path.join(folder, layout.EVAL_CONFUSION), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted"] + metrics["confusion"]["labels"])
        for name, row in zip(metrics["confusion"]["labels"], matrix):
            w.writerow([name] + [int(v) for v in row])
    return plots

def write_csv(path: str, rows: List[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["slice", "value", "count", "mae", "mae_low", "mae_high", "rmse", "cs5",
                                          "bias", "small"])
        w.writeheader()
        w.writerows(rows)


def write_plots(folder: str, matrix, normalized, slices, density, uncertainty, curves) -> List[str]:
    """The report's PNGs; uncertainty and training curves only when there is something to show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = [(layout.PLOT_CONFUSION, plot_confusion(plt, matrix, normalized)),
               (layout.PLOT_MAE_BY_AGE, plot_mae_by_age(plt, slices)),
               (layout.PLOT_PRED_VS_TRUE, plot_pred_vs_true(plt, density))]
    if uncertainty:
        figures += [(layout.PLOT_UNCERTAINTY, plot_uncertainty(plt, uncertainty)),
                    (layout.PLOT_RELIABILITY, plot_reliability(plt, uncertainty["reliability"])),
                    (layout.PLOT_RISK_COVERAGE, plot_risk_coverage(plt, uncertainty["risk_coverage"]))]
    if curves:
        figures.append((layout.PLOT_TRAINING_CURVES, plot_training_curves(plt, curves)))
    for name, fig in figures:
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=90)
        plt.close(fig)
    return [name for name, _ in figures]


def plot_confusion(plt, matrix, normalized):
    names = group_names()
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(normalized, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45)
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if matrix[i][j]:
                ax.text(j, i, f"{int(matrix[i][j])}", ha="center", va="center", fontsize=7,
                        color="white" if normalized[i][j] > 0.5 else "black")
    ax.set(xlabel="predicted age group", ylabel="true age group",
           title="Age-group confusion (row-normalised colour, counts)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def plot_mae_by_age(plt, slices):
    import numpy as np

    groups = [s for s in slices if s["slice"] == "age_group"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(groups))
    maes = [g["mae"] for g in groups]
    low = [g["mae"] - g["mae_low"] if g["mae_low"] is not None else 0 for g in groups]
    high = [g["mae_high"] - g["mae"] if g["mae_high"] is not None else 0 for g in groups]
    colours = ["#bbbbbb" if g["small"] else "#2e86c1" for g in groups]
    ax.bar(x, maes, color=colours, yerr=[low, high], capsize=4, ecolor="#333333")
    for i, g in enumerate(groups):
        ax.text(i, 0, f"n={g['count']}", ha="center", va="bottom", fontsize=7,
                color="white" if not g["small"] else "black")
    ax.set_xticks(x, [g["value"] for g in groups], rotation=30)
    ax.set(xlabel="true age group", ylabel="MAE (years)",
           title=f"MAE by age group, 95 % interval (grey: fewer than {SMALL_SLICE} faces)")
    return fig


def plot_pred_vs_true(plt, density):
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 5))
    if density:
        a, p, c = (np.array(v, dtype=float) for v in zip(*density))
        order = np.argsort(c)  # the densest cells drawn last, on top
        points = ax.scatter(a[order] + 0.5, p[order] + 0.5, c=np.log10(c[order]), s=8 + 10 * np.log10(c[order] + 1),
                            cmap="viridis", vmin=0, vmax=max(1.0, float(np.log10(c.max()))), edgecolors="none")
        fig.colorbar(points, ax=ax, fraction=0.046, label="log10 faces per 1-year cell")
        top = max(a.max(), p.max()) + 2
        ax.plot([0, top], [0, top], color="#c0392b", lw=0.8, ls="--")
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
    ax.set(xlabel="true age", ylabel="predicted age", title="Predicted vs true (every 1-year cell with a face)")
    return fig


def plot_uncertainty(plt, uncertainty):
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = uncertainty["bins"]
    ax.plot([b["mean_std"] for b in bins], [b["mae"] for b in bins], marker="o", label="mean |error|")
    for b in bins:
        ax.annotate(f"n={b['count']}", (b["mean_std"], b["mae"]), fontsize=7, textcoords="offset points",
                    xytext=(3, 3))
    top = max(max(b["mean_std"] for b in bins), max(b["mae"] for b in bins)) * 1.1
    ax.plot([0, top], [0, top * 0.798], color="#999999", ls="--", label="Gaussian: E|e| = 0.8 std")
    ax.set(xlabel="predicted std (years)", ylabel="mean |error| (years)",
           title=f"Uncertainty: {uncertainty['within_1sd']:.0%} within 1 std, {uncertainty['within_2sd']:.0%} within 2")
    ax.legend(fontsize=8)
    return fig


def plot_reliability(plt, levels):
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0, 1], [0, 1], color="#999999", ls="--", label="calibrated")
    ax.plot([r["nominal"] for r in levels], [r["observed"] for r in levels], marker="o", label="this model")
    ax.set(xlabel="nominal coverage of the central z x std interval", ylabel="share of true ages inside it",
           xlim=(0, 1), ylim=(0, 1), title="Reliability of the predicted std")
    ax.legend(fontsize=8)
    return fig


def plot_risk_coverage(plt, curve):
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([100 * r["coverage"] for r in curve], [r["mae"] for r in curve], marker="o")
    ax.set(xlabel="% of faces kept, most confident (smallest std) first", ylabel="MAE of the faces kept (years)",
           xlim=(0, 102), title="Risk-coverage: MAE of the most confident faces")
    return fig


def plot_training_curves(plt, curves):
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [r["epoch"] for r in curves]
    ax.plot(epochs, [r["val_mae"] for r in curves], marker="o", label="val MAE")
    ax.set(xlabel="epoch", ylabel="val MAE (years)", title="Training curve of the scored model")
    ax2 = ax.twinx()
    ax2.plot(epochs, [r["train_loss"] for r in curves], color="#999999", ls="--", label="train loss")
    ax2.set_ylabel("train loss")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def describe_uri(uri) -> str:
    """A URI as a person reads it: local paths without file:, others as they are."""
    text = str(uri or "")
    return layout.local_path(text) if text.startswith("file:") else text


def _img(folder: str, name: str, alt: str) -> str:
    """An <img> of `folder`/`name` with the PNG embedded ('' when the plot was not drawn)."""
    if not os.path.exists(os.path.join(folder, name)):
        return ""
    with open(os.path.join(folder, name), "rb") as f:
        data = base64.b64encode(f.read()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _num(v, digits=2) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else html.escape(str(v)))


def _plural(n, word) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def html_parts(metrics: dict, folder: str) -> dict:
    """The report's sentences and tables as HTML snippets (write_html puts them in the page)."""
    num, plural, label = _num, _plural, metrics["labels"]
    excluded = metrics.get("excluded", {})
    version = label.get("version")
    u = metrics.get("uncertainty") or {}
    return {
        "models": "; ".join(f"<code>{html.escape(str(m['model_id']))}</code> trained on data version "
                            f"{'(Parquet, unversioned)' if m['data_version'] is None else m['data_version']}, "
                            f"{plural(m['faces'], 'face')} scored" for m in metrics["models"]) or "none",
        "label_text": (f"{html.escape(describe_uri(label.get('uri')))} ({html.escape(label.get('kind', ''))}"
                       + (f", split <b>{html.escape(str(label['split']))}</b>" if label.get("split") else "")
                       + (f", Delta version {version}" if version is not None else "") + ")"),
        "reasons": ", ".join(f"{html.escape(k.replace('_', ' '))}: {v:,}"
                             for k, v in metrics["no_prediction_by_reason"].items()),
        "left_out": ", ".join(f"{html.escape(k.replace('_', ' '))}: {v:,}" for k, v in excluded.items() if v),
        "slice_rows": "".join(
            f"<tr{' class=small' if s['small'] else ''}><td>{html.escape(s['slice'])}</td>"
            f"<td>{html.escape(str(s['value']))}</td><td>{s['count']:,}{' ⚠' if s['small'] else ''}</td>"
            f"<td>{num(s['mae'])}</td><td>{num(s['mae_low'])} – {num(s['mae_high'])}</td><td>{num(s['rmse'])}</td>"
            f"<td>{num(s['cs5'], 3)}</td><td>{num(s['bias'])}</td></tr>" for s in metrics["slices"]),
        "uncertainty": (f"<p>{u['rows']:,} predictions carry a std. {u['within_1sd']:.1%} of errors lie within 1 std "
                        f"and {u['within_2sd']:.1%} within 2 (a calibrated Gaussian: 68 % and 95 %); the correlation "
                        f"of |error| with the std is {num(u['corr_abs_error_std'])}. The most confident tenth of the "
                        f"faces has MAE {num(u['risk_coverage'][0]['mae'])}, all of them "
                        f"{num(u['risk_coverage'][-1]['mae'])}.{_calibration_text(metrics)}</p>"
                        f"{_img(folder, layout.PLOT_UNCERTAINTY, 'mean error by predicted std')}"
                        f"{_img(folder, layout.PLOT_RELIABILITY, 'reliability diagram')}"
                        f"{_img(folder, layout.PLOT_RISK_COVERAGE, 'risk-coverage curve')}"
                        if u else "<p>This model gives no uncertainty (regression head).</p>"),
        "curves": (_img(folder, layout.PLOT_TRAINING_CURVES, "training curve") if metrics.get("training_curve")
                   else "<p>The model's training metrics (metrics.jsonl beside its bundle) were not found.</p>"),
        "mae_by_age": _img(folder, layout.PLOT_MAE_BY_AGE, "MAE by age group"),
        "pred_vs_true": _img(folder, layout.PLOT_PRED_VS_TRUE, "predicted vs true age"),
        "confusion": _img(folder, layout.PLOT_CONFUSION, "age-group confusion matrix"),
    }


def _calibration_text(metrics: dict) -> str:
    c = metrics.get("model_calibration") or {}
    if c.get("std_scale") is None:
        return " The model's std is uncalibrated (no scale was fitted on its val split)."
    return (f" The std carries the model's calibration: x {c['std_scale']:.3f}, fitted on its {c['fitted_on']} split "
            f"({c['rows']:,} faces: within 1 std {c['within_1sd_before']:.1%} before, {c['within_1sd_after']:.1%} after).")


def write_html(path: str, metrics: dict, folder: str) -> None:
    """One self-contained page: the images are embedded, nothing else is fetched."""
    num, plural = _num, _plural
    o, rows, h = metrics["overall"], metrics["rows"], html_parts(metrics, folder)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>faceage evaluation</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto;line-height:1.4}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}img{{max-width:100%}}tr.small td{{color:#888}}
code{{background:#f4f4f4;padding:0 3px}}</style></head><body>
<h1>Age estimation: evaluation report</h1>
<p><b>Model</b> {h['models']}.<br><b>Labels</b> {h['label_text']}, joined on <code>{html.escape(metrics['join_key'])}</code>.<br>
<b>Predictions</b> {html.escape(describe_uri(metrics['predictions']))}.</p>
<p><b>{plural(rows['matched'], 'face')}</b> have both a prediction and a label: every number below is computed
from them. {plural(rows['predictions_without_label'], 'prediction')} had no label here (e.g. faces of other splits),
{plural(rows['labels_without_prediction'], 'label')} had no prediction.
{('Photos without a prediction — ' + h['reasons'] + '.') if h['reasons'] else 'Every photo got a prediction.'}
{('Left out of every metric — ' + h['left_out'] + '.') if h['left_out'] else 'No row was left out as invalid or duplicate.'}
Created {html.escape(metrics['created_at'][:19].replace('T', ' '))} UTC.</p>
<h2>Overall</h2><table><tr><th>faces</th><th>MAE</th><th>95 % interval</th><th>RMSE</th><th>CS@5</th><th>bias (mean signed error)</th></tr>
<tr><td>{o['count']:,}</td><td>{num(o['mae'])}</td><td>{num(o['mae_low'])} – {num(o['mae_high'])}</td><td>{num(o['rmse'])}</td>
<td>{num(o['cs5'], 3)}</td><td>{num(o['bias'])}</td></tr></table>
<h2>MAE by age group</h2>{h['mae_by_age']}
<h2>Slices</h2><p>Grey rows and ⚠: fewer than {SMALL_SLICE} faces, read their numbers with care. Interval: 95 % t-interval of the MAE.</p>
<table><tr><th>slice</th><th>value</th><th>faces</th><th>MAE</th><th>95 % interval</th><th>RMSE</th><th>CS@5</th><th>bias</th></tr>
{h['slice_rows']}</table>
<h2>Predicted vs true</h2>{h['pred_vs_true']}
<h2>Age-group confusion matrix</h2>{h['confusion']}
<h2>Uncertainty</h2>{h['uncertainty']}
<h2>Training</h2>{h['curves']}
</body></html>"""
    with open(path, "w") as f:
        f.write(page)
