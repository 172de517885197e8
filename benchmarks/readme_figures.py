"""Every figure the README quotes from the default job, read from a finished job's outputs folder.

Plain script: ``python benchmarks/readme_figures.py OUTPUTS [--section NAME]``. Prints, as
markdown tables, after a header line (the CPU, its cores, the checkout's commit):

- ``accuracy``: test accuracy per run with its Wilson 95% interval (``runs/summary.csv``),
  architecture x seed, and which pairs of intervals do not overlap;
- ``reliance``: per cue (and cue-free) the range of each run's causal effect (``causal.csv``),
  the highest upper end of its interval, and how many intervals exclude 0;
- ``cue-free``: each run's cue-free check (``causal.json``) with the Holm-adjusted p;
- ``mrr``: planted-cue MRR per run with its interval and ceiling (``summary.csv``), and the
  pairs of runs whose intervals do not overlap;
- ``visibility``: per run (``methods.json``) Grad-CAM at the paper's layer, the methods and
  layers that put every city's causally strongest cue in the lift top k, and the verdict;
- ``table2``: Table 2 (``comparison/table2.csv``), the tests and the conclusion (``tests.json``);
- ``sanity``: the deletion and cascade checks per run (``metrics.json``, ``sanity_verdict``).

It recomputes nothing: it only reads the files the job wrote, and formats them with citylib's
own report helpers. A section whose files are missing says so and the others go on.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from citylib.core import artifacts  # noqa: E402
from citylib.data.counterfactual import CUE_FREE  # noqa: E402
from citylib.run import report
from citylib.stages import ar_tables, compare, methods
from citylib.stats import intervals

MISSING = "(not in this outputs folder)"


# ------------------------------------------------------------------ formatting
def markdown(frame: pd.DataFrame) -> str:
    """``frame`` as a markdown table (floats to 4 significant digits, missing values "—")."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "—"
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    rows = [list(map(str, frame.columns))] + [[cell(v) for v in r] for r in frame.itertuples(index=False)]
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, width)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in width) + "|", *map(line, rows[1:])])


def ci(v, lo, hi, f: str = ".3f") -> str:
    """ "v [lo, hi]" """
    return f"{v:{f}} [{lo:{f}}, {hi:{f}}]"


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return max(a[0], b[0]) <= min(a[1], b[1])


def separated(frame: pd.DataFrame, name: str) -> list[str]:
    """The pairs of runs of ``frame`` (summary.csv rows) whose ``name`` intervals do not overlap."""
    rows = frame.dropna(subset=[f"{name}_low", f"{name}_high"]).to_dict("records")
    return [f"{a['run']} {a[name]:.3f} [{a[f'{name}_low']:.3f}, {a[f'{name}_high']:.3f}] vs {b['run']} "
            f"{b[name]:.3f} [{b[f'{name}_low']:.3f}, {b[f'{name}_high']:.3f}]"
            + (" (same architecture)" if a["arch"] == b["arch"] else "")
            for i, a in enumerate(rows) for b in rows[i + 1:]
            if not overlaps((a[f"{name}_low"], a[f"{name}_high"]), (b[f"{name}_low"], b[f"{name}_high"]))]


# ------------------------------------------------------------------ inputs
def summary(out: Path) -> pd.DataFrame | None:
    path = out / "runs" / "summary.csv"
    if not path.is_file():
        return None
    frame = pd.read_csv(path)
    return frame.sort_values(["arch", "seed"], key=lambda c: c.map(_rank) if c.name == "arch" else c,
                             kind="stable").reset_index(drop=True)


def _rank(arch: str) -> int:
    return ar_tables.ORDER.index(arch) if arch in ar_tables.ORDER else len(ar_tables.ORDER)


def runs(out: Path, *files: str) -> list[Path]:
    """The run folders that have every one of ``files``, in the paper's order of architectures."""
    found = [d for d in (out / "runs").glob("*/") if all((d / f).is_file() for f in files)]

    def key(d: Path):
        try:
            info = compare.describe(d)
            return _rank(info["arch"]), info["seed"], d.name
        except (FileNotFoundError, ValueError):
            return len(ar_tables.ORDER) + 1, 0, d.name
    return sorted(found, key=key)


# ------------------------------------------------------------------ sections
def header(out: Path) -> str:
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("model name", "cpu family", "model") and k.strip() not in cpu:
                cpu[k.strip()] = v.strip()
    except OSError:
        pass

    def commit(where: Path) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
                               capture_output=True, text=True, timeout=10)
            return r.stdout.strip() or None if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None
    job, here = commit(out.resolve()), commit(Path(__file__).resolve().parent)
    commits = (f"outputs' checkout {job}" if job else "outputs not in a git checkout") + (
        f", this script's checkout {here}" if here and here != job else "")
    return (f"# README figures from {out}\n\nCPU: {cpu.get('model name', '?')} (family {cpu.get('cpu family', '?')}, "
            f"model {cpu.get('model', '?')}), {os.cpu_count()} cores; {commits}")


def accuracy(out: Path) -> str:
    frame = summary(out)
    if frame is None or "test_accuracy_low" not in frame:
        return MISSING
    frame = frame.dropna(subset=["test_accuracy"])
    cells = {(a, s): ci(v, lo, hi) for a, s, v, lo, hi in
             frame[["arch", "seed", "test_accuracy", "test_accuracy_low", "test_accuracy_high"]].itertuples(index=False)}
    archs, seeds = list(dict.fromkeys(frame["arch"])), sorted(set(frame["seed"]))
    table = pd.DataFrame([{"run": ar_tables.NAMES.get(a, a), **{f"seed {s}": cells.get((a, s), "—") for s in seeds}}
                          for a in archs])
    n = sorted(set(frame["n_test"].dropna().astype(int))) if "n_test" in frame else []
    apart = separated(frame, "test_accuracy")
    across = [p for p in apart if not p.endswith("(same architecture)")]
    return (f"Test images per run: {', '.join(map(str, n)) or '?'}\n\n{markdown(table)}\n\n"
            f"Intervals of different architectures: {'all overlap' if not across else 'not all overlap'}.\n"
            "Pairs that do not overlap: " + ("; ".join(apart) if apart else "none"))


def reliance(out: Path) -> str:
    found = runs(out, "causal.csv")
    if not found:
        return MISSING
    frame = pd.concat([pd.read_csv(d / "causal.csv").assign(run=d.name) for d in found], ignore_index=True)
    frame["excludes 0"] = (frame["ci_high"] < 0) | (frame["ci_low"] > 0)
    frame["_cue_free"] = frame["object"] == CUE_FREE
    rows = []
    for (city, obj), g in frame.sort_values("_cue_free", kind="stable").groupby(["city", "object"], sort=False):
        rows.append({"city": city, "object": obj, "runs": len(g), "effect min": f"{g['effect'].min():+.2f}",
                     "effect max": f"{g['effect'].max():+.2f}", "lowest ci_low": f"{g['ci_low'].min():+.2f}",
                     "highest ci_high": f"{g['ci_high'].max():+.2f}",
                     "intervals excluding 0": f"{int(g['excludes 0'].sum())}/{len(g)}",
                     "intervals below 0": f"{int((g['ci_high'] < 0).sum())}/{len(g)}"})
    per_run = frame.pivot_table(index=["city", "object"], columns="run", values="effect")
    per_run = per_run.loc[[(r["city"], r["object"]) for r in rows], [d.name for d in found]]
    per_run = per_run.map(lambda v: f"{v:+.2f}").reset_index()
    spots = sorted(set(frame["spots"].astype(int)))
    return (f"Δ log p of the true city, {len(found)} runs, test spots per city: {', '.join(map(str, spots))}\n\n"
            f"{markdown(pd.DataFrame(rows))}\n\nPer run (effect):\n\n{markdown(per_run)}")


def cue_free(out: Path) -> str:
    found = runs(out, "causal.json")
    if not found:
        return MISSING
    checks = {d.name: artifacts.read_json(d / "causal.json")["cue_free"] for d in found}
    holm = dict(zip(checks, intervals.holm([c["p"] for c in checks.values()])))
    table = pd.DataFrame([{"run": name, "accuracy": f"{c['accuracy']:.3f}", "images": c["n"], "spots": c["spots"],
                           "permuted 95% range": f"[{c['interval'][0]:.3f}, {c['interval'][1]:.3f}]",
                           "p": f"{c['p']:.3f}", "Holm p": f"{holm[name]:.3f}",
                           "at chance": "yes" if c["at_chance"] else "no",
                           **{f"{s} accuracy (images)": f"{v['accuracy']:.3f} ({v['n']})"
                              for s, v in c.get("samples", {}).items()}}
                          for name, c in checks.items()])
    inside = [c["accuracy"] for c in checks.values() if c["at_chance"]]
    chance = next(iter(checks.values()))["chance"]
    return (f"Chance {chance:.3f}\n\n{markdown(table)}\n\n{len(inside)} of {len(checks)} runs inside their range"
            + (f" (their accuracies {min(inside):.3f}–{max(inside):.3f})" if inside else "")
            + f"; smallest Holm-adjusted p {min(holm.values()):.3f}"
            + (" (no run differs from chance at a family-wise 5%)." if min(holm.values()) > 0.05 else
               " (a run differs from chance at a family-wise 5%)."))


def mrr(out: Path) -> str:
    frame = summary(out)
    if frame is None or "planted_mrr" not in frame or frame["planted_mrr"].isna().all():
        return MISSING
    frame = frame.dropna(subset=["planted_mrr"])
    maps = report._recovery(runs(out, "metrics.json"))
    maps = dict(zip(maps["run"], maps["map"])) if len(maps) else {}
    table = pd.DataFrame({"run": frame["run"], "map": [maps.get(r, "—") for r in frame["run"]],
                          "planted-cue MRR": [ci(v, lo, hi, ".2f") for v, lo, hi in
                                              zip(frame["planted_mrr"], frame["planted_mrr_low"],
                                                  frame["planted_mrr_high"])],
                          "ceiling": [f"{v:.2f}" for v in frame["planted_mrr_ceiling"]],
                          "below ceiling": ["yes" if v < c else "no" for v, c in
                                            zip(frame["planted_mrr"], frame["planted_mrr_ceiling"])]})
    apart = separated(frame, "planted_mrr")
    return f"{markdown(table)}\n\nPairs that do not overlap: " + ("; ".join(apart) if apart else "none")


def visibility(out: Path) -> str:
    found = runs(out, "methods.json", "causal.csv")
    if not found:
        return MISSING
    rows, lines = [], []
    for d in found:
        s = artifacts.read_json(d / "methods.json")
        paper = [n for n in s["layers"] if n != methods.FUSION][-1]
        grad = s["scores"].get("gradcam", {}).get(paper)

        def rho(v: dict) -> str:
            lo, hi = v.get("spearman_ci", [float("nan")] * 2)
            return f"{v['spearman']:.2f}" + (f" [{lo:.2f}, {hi:.2f}]" if lo == lo else "")
        rows.append({"run": d.name, "paper layer": paper,
                     "map": "x".join(map(str, grad["map_size"])) if grad else "—",
                     f"Grad-CAM: cities, strongest cue in top {s['top']}":
                         f"{sum(grad['strongest_in_top'].values())}/{len(grad['strongest_in_top'])}" if grad else "—",
                     "Grad-CAM ρ": rho(grad) if grad else "—"})
        good = [f"{m} at {layer} ({methods.position(layer, s['layers'])}, "
                f"{'x'.join(map(str, v['map_size']))}; ρ {rho(v)})"
                for m, by in s["scores"].items() for layer, v in by.items() if v["all_strongest_in_top"]]
        lines.append(f"- {d.name}: every city's strongest cue in the top {s['top']} by "
                     + ("; ".join(good) if good else "no method at any layer"))
        lines.append(f"  verdict: {methods.verdict(d.name, pd.read_csv(d / 'causal.csv'), s)}")
    return markdown(pd.DataFrame(rows)) + "\n\n" + "\n".join(lines)


def table2(out: Path) -> str:
    folder = out / "comparison"
    if not (folder / "table2.csv").is_file():
        return MISSING
    parts = [markdown(ar_tables.table2_display(pd.read_csv(folder / "table2.csv")))]
    if (folder / "tests.json").is_file():
        tests = artifacts.read_json(folder / "tests.json")
        text = tests["conclusion"]["text"] if "conclusion" in tests else ar_tables.conclusion(tests)["text"]
        parts += [markdown(ar_tables.tests_table(tests)), f"Conclusion: {text}"]
    else:
        parts.append(f"tests.json {MISSING}")
    return "\n\n".join(parts)


def sanity(out: Path) -> str:
    found = runs(out, "metrics.json")
    checks = report._sanity(found)
    if checks.empty:
        return MISSING
    verdicts = {d.name: artifacts.read_json(d / "metrics.json").get("sanity_verdict") or {} for d in found}
    pixels = "against random pixels (reference)"
    if pixels not in checks:                          # a report.py that does not show it yet
        checks.insert(3, pixels, [
            ci(d["auc_difference_pixels"], d["auc_difference_pixels_low"], d["auc_difference_pixels_high"])
            if "auc_difference_pixels" in d else "—" for d in (verdicts[r].get("deletion") or {} for r in checks["run"])])
    checks["cascade: images with a defined ρ"] = [(verdicts[r].get("cascade") or {}).get("n_defined")
                                                  for r in checks["run"]]
    passed = {k: checks.loc[checks[k] == "passed", "run"].tolist() for k in ("deletion", "cascade")}
    return (markdown(checks) + "\n\n" + "\n".join(
        f"{k}: passed by {len(v)} of {len(checks)} runs" + (f" ({', '.join(v)})" if v else "")
        for k, v in passed.items()))


SECTIONS = {"accuracy": accuracy, "reliance": reliance, "cue-free": cue_free, "mrr": mrr,
            "visibility": visibility, "table2": table2, "sanity": sanity}
TITLES = {"accuracy": "Test accuracy (Wilson 95%)", "reliance": "Reliance: causal effect of each cue",
          "cue-free": "Cue-free check", "mrr": "Planted-cue MRR (Grad-CAM, paper's layer)",
          "visibility": "Visibility: which method shows the strongest cue",
          "table2": "Table 2: architectures versus initialisations", "sanity": "Sanity checks"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--section", choices=list(SECTIONS), help="print this section only")
    args = parser.parse_args(argv)
    if not args.outputs.is_dir():
        parser.error(f"{args.outputs}: not a folder")
    print(header(args.outputs))
    for name, section in SECTIONS.items():
        if args.section in (None, name):
            try:
                text = section(args.outputs)
            except (OSError, KeyError, ValueError) as e:        # a file missing, partial or of an older job
                text = f"{MISSING}: {type(e).__name__}: {e}"
            print(f"\n## {TITLES[name]} (`--section {name}`)\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
