"""
report.py: what probe.py found, written down: results.json and results.md of one run, and --compare's
table over several runs on one test set, each row with its bootstrap interval and the paired interval of
its gain over the row above (RECIPE.md 7).
"""
import json
import sys
from pathlib import Path

import numpy as np

import plots
import worldmodel
from common import LABELS, atomic_write_text
from metrics import METRICS, bootstrap_ci, bootstrap_samples, finite_or_none


# -----------------------------------------------------------------------------
# The report

def summarise(reports, scores, thresholds, y, cfg):
    """Over the probe seeds: each macro metric's mean, std and bootstrap 95% interval; each class's mean metrics."""
    summary, per_class = {}, {}
    for m in METRICS:
        vals = np.array([r["macro"][m] for r in reports], dtype=np.float64)
        lo, hi = bootstrap_ci(y, scores, m, thresholds, cfg.n_boot, cfg.seed)
        summary[m] = {"mean": finite_or_none(vals.mean()),
                      "std": finite_or_none(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                      "ci95": [finite_or_none(lo), finite_or_none(hi)], "per_seed": [finite_or_none(v) for v in vals]}
    for n in LABELS:
        seeds = [r["per_class"][n] for r in reports]
        per_class[n] = {m: finite_or_none(np.mean([np.nan if c[m] is None else c[m] for c in seeds])) for m in METRICS}
        per_class[n]["prevalence"] = seeds[0]["prevalence"]
    return summary, per_class


def write_results(res, out):
    """OUT/results.json and OUT/results.md; returns the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    s, names = res["summary"], {"auroc": "AUROC", "auprc": "AUPRC", "f1": "F1", "bacc": "balanced accuracy"}
    excluded = ", ".join(f"{k} ({v})" for k, v in res["excluded"].items())
    selected = "; ".join(f"seed {r['seed']}: {r['pooling']}, {r['lr']}, {r['step']} "
                         f"(val AUPRC {r['val_macro_auprc']:.3f})" for r in res["seeds"])
    lines = [f"# Frozen MIL linear probe: {res['backbone']['kind']} ViT-{res['backbone']['vit']}", "",
             f"{res['data']['root']}: test {res['data']['volumes']['test']} volumes; "
             f"{res['config']['seeds']} probe seeds; {res['device']}; {res['time_s']:.0f} s", "",
             "| macro (test) | mean | std | 95% CI |", "|---|---|---|---|"]
    lines += [f"| {names[m]} | {fmt(s[m]['mean'])} | {fmt(s[m]['std'])} | "
              f"{fmt(s[m]['ci95'][0])}-{fmt(s[m]['ci95'][1])} |" for m in METRICS]
    lines += ["", f"Macros cover {len(res['classes_in_macro'])} of {len(LABELS)} classes"
              + (f"; excluded: {excluded}" if excluded else ".")]
    lines += ["", "| class | AUROC | AUPRC | F1 | prevalence |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {fmt(c['auroc'])} | {fmt(c['auprc'])} | {fmt(c['f1'])} | {c['prevalence']:.3f} |"
              for n, c in res["per_class"].items()]
    lines += ["", f"Selected on val (pooling, lr, step): {selected}", "",
              f"Depth ridge R^2 (test slices): {fmt(res['depth']['test_r2'])} (alpha {res['depth']['alpha']:g})"]
    if res.get("worldmodel"):
        lines += [""] + worldmodel.report_lines(res["worldmodel"])
    md = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.json", json.dumps(res, indent=1))
    atomic_write_text(out / "results.md", md)
    return md


# -----------------------------------------------------------------------------
# --compare: earlier runs side by side

WM_COLUMNS = (("findings", "slice", "auroc", "findings: slice AUROC"), ("findings", "dice", None, "findings: 3D Dice"),
              ("findings", "dice", "hit10", "findings: Hit@10%"), ("organs", "slice", "auroc", "organs: slice AUROC"),
              ("organs", "dice", None, "organs: 3D Dice"))


def world_model_table(runs, rows):
    """The world-model probes of every run that has them (worldmodel.py), each value with its bootstrap 95%
    interval over test volumes; adds each row's numbers to rows[i]["worldmodel"]."""
    def cell(m):
        lo, hi = m["ci95"]
        return "n/a" if m["value"] is None else f"{m['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")

    lines = ["", "| model | " + " | ".join(c[-1] for c in WM_COLUMNS) + " | slice order ρ | effective rank |",
             "|---" * (len(WM_COLUMNS) + 3) + "|"]
    for (_, res, _), row in zip(runs, rows):
        wm = res.get("worldmodel")
        if not wm:
            continue
        vals = []
        for task, part, key, _ in WM_COLUMNS:
            r = wm[task]
            vals.append(None if "skipped" in r else (r[part][key] if key else r[part]))
        row["worldmodel"] = {"columns": [c[-1] for c in WM_COLUMNS], "values": vals, "order": wm["order"],
                             "effective_rank": wm["effective_rank"], "distance_vs_gap": wm["distance_vs_gap"]}
        cells = ["skipped" if v is None else cell(v) for v in vals]
        cells += [cell(wm["order"]), f"{wm['effective_rank']['value']:.1f} of {wm['effective_rank']['dim']}"]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return lines if len(lines) > 3 else []

def training_time(backbone):
    """Seconds of the train.py run that wrote a checkpoint (its log.jsonl), or None."""
    log = Path(backbone.get("path", "")).parent / "log.jsonl"
    if backbone.get("kind") != "checkpoint" or not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return rows[-1].get("elapsed_s") if rows else None


def compare(dirs, cfg):
    """One table over earlier probe runs on the same test set, each row with its bootstrap 95% interval
    and, against the row above it, the paired bootstrap interval of the AUROC difference."""
    runs = []
    for d in dirs:
        try:
            runs.append((d, json.loads((Path(d) / "results.json").read_text()), np.load(Path(d) / "test_scores.npz")))
        except FileNotFoundError as e:
            sys.exit(f"probe.py --compare: {d} has no results ({e.filename}); run probe.py --out={d} first")
    if len({tuple(sc["names"]) for _, _, sc in runs}) != 1:
        sys.exit("probe.py --compare: the runs were scored on different test volumes; compare runs on one dataset")
    y = runs[0][2]["labels"]
    samples = [bootstrap_samples(y, sc["scores"], "auroc", None, cfg.n_boot, cfg.seed) for _, _, sc in runs]
    fmt = lambda m: f"{m['mean']:.3f} ± {m['std']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"  # noqa: E731
    ci = lambda m: f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"  # noqa: E731
    lines = ["| model | macro AUROC ± seed std [95% CI] | Δ AUROC vs row above [paired 95% CI] | "
             "macro AUPRC [95% CI] | macro F1 [95% CI] | depth R² | pretraining |", "|---|---|---|---|---|---|---|"]
    rows = []
    for i, (d, res, _) in enumerate(runs):
        s, b = res["summary"], res["backbone"]
        label = "random init" if b["kind"] == "random_init" else Path(b["path"]).parent.name
        diff = None
        if i:
            diff = [float(s["auroc"]["mean"] - runs[i - 1][1]["summary"]["auroc"]["mean"]),
                    *(float(q) for q in np.nanquantile(samples[i] - samples[i - 1], [0.025, 0.975]))]
        t = training_time(b)
        rows.append({"run": d, "model": label, "summary": s, "depth_r2": res["depth"]["test_r2"],
                     "delta_auroc": diff, "train_s": t})
        cells = [label, fmt(s["auroc"]), f"{diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else "",
                 ci(s["auprc"]), ci(s["f1"]), f"{res['depth']['test_r2']:.3f}",
                 f"{t / 60:.1f} min" if t is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Test: {len(y)} volumes, {runs[0][1]['config']['seeds']} probe seeds, {cfg.n_boot} bootstrap "
              f"resamples; probed on {runs[0][1]['device']}."]
    lines += world_model_table(runs, rows)
    md = "\n".join(lines) + "\n"
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.md", md)
    atomic_write_text(out / "comparison.json", json.dumps(rows, indent=1))
    plots.plot_comparison(rows, out / "comparison.png")
    curves = {r["model"]: r["worldmodel"]["distance_vs_gap"] for r in rows if r.get("worldmodel")}
    if curves:
        plots.plot_distance_vs_gap(curves, out / "distance_vs_gap.png")
    print(md)
    return rows
