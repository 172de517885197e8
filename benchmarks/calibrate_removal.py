"""Each removal operator against true deletion, on a finished job's generated world.

Plain script: ``python benchmarks/calibrate_removal.py OUTPUTS [--runs R ...] [--operators O ...]
[--split test|validation] [--out calibration.csv]``. For every image of the split and every object
kind the world can delete that it shows, the spot is re-rendered without that kind (the true
deletion, through the cache's own JPEG and resize), and each operator fills the pixels whose label
the deletion changed, in the original; a matched null (``reliance.null_mask``) too. Per run and
operator, ``calibration.agreement`` scores the operator's per-(city, object) effects, and the
null-adjusted ones, against the true effects. Prints a table and writes it to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from citylib.data import counterfactual  # noqa: E402
from citylib.data.imagecache import load_cache  # noqa: E402
from citylib.explain import removal  # noqa: E402
from citylib.nets import checkpoint, infer  # noqa: E402
from citylib.stages import calibration, reliance  # noqa: E402
from citylib.world import scene, street, synth, worldfile  # noqa: E402


def deletions(cache, rows: np.ndarray, world_cfg: synth.SynthConfig) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Every (image, deletable kind it shows): its row, city, group, object; the true deletion
    (M, S, S, 3) and the mask of the pixels it changed (M, S, S)."""
    world = worldfile.load_world(world_cfg.world)
    index, size = cache.index.iloc[rows].reset_index(drop=True), cache.images.shape[1]
    index["row"] = rows
    records, images, masks = [], [], []
    for (city, group), views in index.groupby(["city", "group"], sort=True):
        labels = np.asarray(cache.labels[views["row"].to_numpy()])                        # (V, S, S)
        for name in street.DELETABLE:
            if not (labels == scene.VOCAB[name]).any():
                continue
            gone = counterfactual.cached_views(world, world_cfg, size, city, counterfactual.spot_of(group),
                                               views["view"].astype(int).tolist(), delete=(name,), labels=True)
            for (row, label), (image, label_gone) in zip(zip(views["row"], labels), gone):
                changed = label != label_gone
                if changed.any():
                    records.append({"row": int(row), "city": city, "group": group, "object": name,
                                    "share": float(changed.mean())})
                    images.append(image); masks.append(changed)
    return pd.DataFrame(records), np.stack(images), np.stack(masks)


def log_p(model, images: np.ndarray, target: np.ndarray, batch: int = 64) -> np.ndarray:
    logits = torch.from_numpy(infer.logits(model, images, batch)).double()
    return torch.log_softmax(logits, 1).numpy()[np.arange(len(images)), target]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--runs", nargs="*", default=None)
    parser.add_argument("--operators", nargs="*", default=sorted(removal.OPERATORS))
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    parser.add_argument("--dilation", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("calibration.csv"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    runs = args.runs or sorted(p.name for p in (args.outputs / "runs").iterdir() if (p / "best.pt").is_file())
    caches = sorted(p for p in (args.outputs / "data" / "cache").iterdir() if p.is_dir())
    if len(caches) != 1:
        raise SystemExit(f"{args.outputs}: {len(caches)} image stores; calibrate an outputs folder of one snapshot")
    cache = load_cache(caches[0])
    rows = np.asarray(cache.split_indices("val" if args.split == "validation" else "test"), np.int64)
    config = json.loads((args.outputs / "runs" / runs[0] / "config.json").read_text())["config"]
    world_cfg = synth.SynthConfig(**config["data"]["world"])
    t0 = time.perf_counter()
    pairs, truth_images, masks = deletions(cache, rows, world_cfg)
    originals = np.asarray(cache.images[pairs["row"].to_numpy()])
    labels = np.asarray(cache.labels[pairs["row"].to_numpy()])
    print(f"{len(pairs)} deletions of {pairs['object'].nunique()} kinds in {len(rows)} images, "
          f"rendered in {time.perf_counter() - t0:.0f} s", flush=True)
    nulls = [reliance.null_mask(lab, m, 6, args.dilation) for lab, m in zip(labels, masks)]
    null_masks = np.stack([n for n, _ in nulls])
    filled = {}
    for op in args.operators:
        t = time.perf_counter()
        filled[op] = (np.concatenate([removal.remove(op, originals[s:s + 64], masks[s:s + 64], dilation=args.dilation,
                                                     seed=s) for s in range(0, len(pairs), 64)]),
                      np.concatenate([removal.remove(op, originals[s:s + 64], null_masks[s:s + 64],
                                                     dilation=args.dilation, seed=s + 1) for s in range(0, len(pairs), 64)]))
        print(f"{op}: {1000 * (time.perf_counter() - t) / (2 * len(pairs)):.2f} ms per fill", flush=True)
    out = []
    for run in runs:
        model, cities, _ = checkpoint.load_model(args.outputs / "runs" / run, device="cpu")
        target = np.array([list(cities).index(c) for c in pairs["city"]])
        base = log_p(model, originals, target)
        table = pairs.assign(true=log_p(model, truth_images, target) - base)
        for op, (removed, null) in filled.items():
            table[op] = log_p(model, removed, target) - base
            table[f"{op}_adjusted"] = table[op] - (log_p(model, null, target) - base)
            for measure in ("effect", "adjusted"):
                column = op if measure == "effect" else f"{op}_adjusted"
                out.append({"run": run, "operator": op, "measure": measure,
                            **calibration.agreement(table, column, n_boot=500)})
        print(run, "done", flush=True)
    result = pd.DataFrame(out)
    result.to_csv(args.out, index=False)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(result.round(3).to_string(index=False))
        print(result.groupby(["operator", "measure"])[["spearman_rho", "mae", "sign_agreement", "strongest_same",
                                                       "n_pairs"]].mean().round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())
