"""The ``citylib`` command line: thin argparse wrappers over each stage's ``run``.

Reads its arguments; writes what the called stage writes. ``get_args_parser`` is kept
apart from ``main`` so that tests and wrappers call the same entry point.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from citylib.core.config import ConfigError


def _here(path: str) -> Path:
    """A path given on the command line, taken from the working directory (as a shell user
    expects); the Python API and the notebooks take relative paths from the repository root."""
    return Path(path).expanduser().absolute()


def _world(name: str) -> str:
    """--world: a built-in world's name, or a file (taken from the working directory)."""
    return str(_here(name)) if name.endswith((".yaml", ".yml")) or "/" in name else name


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="citylib", description="What makes a city look like itself?")
    sub = p.add_subparsers(dest="command", required=True)

    for add in (_synth_args, _run_args, _train_args, _predict_args, _report_args, _streetview_args):
        add(sub)
    return p


def _synth_args(sub) -> None:
    """``citylib synth``'s arguments."""
    s = sub.add_parser("synth", help="write a generated city world (images, label maps, manifest.csv)")
    s.add_argument("--out", required=True, type=_here, help="folder to write the world into")
    s.add_argument("--world", default="default", type=_world, help="built-in world name or path to a world YAML")
    s.add_argument("--spots", type=int, default=None, help="spots (places) per city")
    s.add_argument("--views", type=int, default=None, help="views (headings) per spot")
    s.add_argument("--size", type=int, default=None, help="image size in pixels (square)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a different world in --out")
    s.add_argument("--reset", action="append", default=None, metavar="CUE",
                   help="counterfactual world: this planted cue reset to the base style in every city "
                        "that plants it, everything else identical (repeatable)")
    s.add_argument("--cue-free", action="store_true", help="counterfactual world: every city in the base style")


def _run_args(sub) -> None:
    """``citylib run``'s arguments."""
    r = sub.add_parser("run", help="run the notebooks for every parameter file (papermill)")
    r.add_argument("--params", default=None, type=_here, help="a parameter file or folder (default: parameters/)")
    r.add_argument("--only", action="append", default=None, metavar="RUN", help="run only this run (repeatable)")
    r.add_argument("--force", action="store_true", help="retrain the runs and execute every notebook again, even where identical results "
                        "exist (the other stages' results are reused where their keys match)")
    r.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="runs analysed (notebooks 03-05) side by side, cores / N each (default: cores)")
    r.add_argument("--outputs", default=None, type=_here, help="outputs folder (default: outputs/ or $CITYLIB_OUTPUTS)")


def _train_args(sub) -> None:
    """``citylib train``'s arguments."""
    t = sub.add_parser("train", help="train one run's network; under torchrun --nproc_per_node N with DDP",
                       description="The data stage (made once, by the first process) and the training "
                                   "of one parameter file, as notebook 02 does them. Started by "
                                   "torchrun, every process trains its share of each batch and DDP "
                                   "averages the gradients; the first process writes the files.")
    t.add_argument("--params", required=True, type=_here, help="the run's parameter file")
    t.add_argument("--outputs", default=None, type=_here, help="outputs folder (default: outputs/ or $CITYLIB_OUTPUTS)")
    t.add_argument("--force", action="store_true", help="train again from the start, even where the result exists")
    t.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch (the same command without it resumes from there)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")


def _predict_args(sub) -> None:
    """``citylib predict``'s arguments."""
    pr = sub.add_parser("predict", help="predicted city and probabilities per image")
    pr.add_argument("--run", required=True, type=_here, help="a run folder, e.g. outputs/runs/vgg11_seed0")
    pr.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:K or mps")
    pr.add_argument("images", nargs="+", type=_here)


def _report_args(sub) -> None:
    """``citylib report``'s arguments."""
    rep = sub.add_parser("report", help="HTML of executed notebooks + outputs/report/index.html")
    rep.add_argument("--outputs", default=None, type=_here, help="outputs folder (default: outputs/ or $CITYLIB_OUTPUTS)")


def _streetview_args(sub) -> None:
    """``citylib streetview``'s arguments."""
    sv = sub.add_parser("streetview", help="collect Street View images for a city (key from env/file only)",
                        description="The API key is read from $CITYLIB_STREETVIEW_KEY or --key-file, "
                                    "never from the command line. Exit 0: complete; 1: some requests "
                                    "failed or the request budget was reached (run again to go on); "
                                    "2: bad arguments, no key or the key was refused.")
    sv.add_argument("--city", required=True, help="city name (its folder under --out)")
    area = sv.add_mutually_exclusive_group(required=True)
    area.add_argument("--bbox", nargs="+", metavar="S,W,N,E",
                      help="south,west,north,east in degrees (negative first value: --bbox=-33.9,...)")
    area.add_argument("--polygon", type=_here, help="GeoJSON file with a Polygon or MultiPolygon")
    sv.add_argument("--out", required=True, type=_here, help="collection folder (shared by all cities)")
    sv.add_argument("--points", type=int, default=None, help="points to sample (default 100)")
    sv.add_argument("--headings", nargs="+", type=float, default=None, help="compass headings (default 0 90 180 270)")
    sv.add_argument("--random-offset", action="store_true", help="turn each panorama's headings by a seeded offset")
    sv.add_argument("--size", default=None, help="WxH in pixels, at most 640x640 (default)")
    sv.add_argument("--fov", type=float, default=None, help="field of view in degrees (default 90)")
    sv.add_argument("--pitch", type=float, default=None, help="pitch in degrees (default 0)")
    sv.add_argument("--radius", type=int, default=None, help="metres to search around a point (default 50)")
    sv.add_argument("--min-spacing", type=float, default=None, help="metres between points (default 50)")
    sv.add_argument("--max-requests", type=int, default=None, help="stop after this many HTTP requests")
    sv.add_argument("--rps", type=float, default=None, help="requests per second at most (default 10)")
    sv.add_argument("--max-retries", type=int, default=None, help="retries per request (default 4)")
    sv.add_argument("--backoff", type=float, default=None, help="seconds before the first retry, doubling (default 1)")
    sv.add_argument("--key-file", default=None, type=_here, help="file holding the API key (else $CITYLIB_STREETVIEW_KEY)")
    sv.add_argument("--base-url", default=None, help="API base URL (default https://maps.googleapis.com/maps/api)")
    sv.add_argument("--seed", type=int, default=None, help="seed of the point sampler (default 0)")
    sv.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"citylib {args.command}: interrupted; finished results are kept, and the same command "
              "goes on from them", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
            PermissionError, ValueError) as e:   # the user's to fix: a setting, a path, a permission
        print(f"citylib {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                         # the machine's: a full disk, an I/O error
        print(f"citylib {args.command}: failed: {e}", file=sys.stderr)
        return 1


def _synth(args) -> int:
    from citylib.world import synth
    from citylib.core.config import from_dict

    reset = ["cue-free"] if args.cue_free else args.reset
    given = {"world": args.world, "spots_per_city": args.spots, "views": args.views,
             "size": args.size, "seed": args.seed, "reset": reset}
    cfg = from_dict(synth.SynthConfig, {k: v for k, v in given.items() if v is not None}, where="citylib synth")
    manifest = synth.run(cfg, args.out, overwrite=args.overwrite)
    print(manifest)
    return 0


def _run(args) -> int:
    from citylib.run import runner

    t0 = time.perf_counter()
    result = runner.run(params=args.params, only=args.only, force=args.force, outputs=args.outputs,
                        jobs=args.jobs)
    print(f"executed {len(result.executed)}, skipped {len(result.skipped)} (identical), "
          f"failed {len(result.failed)}; {(time.perf_counter() - t0) / 60:.1f} min")
    for label, why in result.failed.items():
        print(f"  FAILED {label}: {why}", file=sys.stderr)
    return 0 if result.ok else 1


def _train(args) -> int:
    from citylib.core import distributed
    from citylib.run import pipeline

    run = pipeline.open_run(args.params, args.outputs)
    distributed.start(run.cfg.train.device)
    try:
        main = distributed.main()
        if main:
            pipeline.result(run, "data", progress=not args.quiet)    # built once, by the first process
        distributed.barrier()
        result = pipeline.result(run, "training", progress=not args.quiet, force=args.force,
                                       stop_after=args.stop_after)
    finally:
        distributed.stop()
    if main and result.finished:
        print(f"{run.cfg.name}: test accuracy {result.metrics['test_accuracy']:.3f} "
              f"({'reused' if result.reused else result.metrics['device']}); {result.folder}")
    elif main:
        print(f"{run.cfg.name}: stopped after epoch {len(result.history)}; the same command goes on")
    return 0


def _predict(args) -> int:
    from citylib.run import predict

    frame = predict.run(args.run, args.images, device=args.device)
    print(frame.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 1 if frame["error"].astype(bool).any() else 0


def _report(args) -> int:
    from citylib.run import report

    index = report.run(outputs=args.outputs)
    print(index)
    return 0


def _streetview(args) -> int:
    from citylib.data.streetview import collect
    from citylib.core.config import from_dict

    bbox = None
    if args.bbox is not None:
        parts = [v for a in args.bbox for v in a.split(",") if v.strip()]
        try:
            bbox = [float(v) for v in parts]
        except ValueError:
            raise ConfigError(f"--bbox needs four numbers south,west,north,east, got {','.join(parts)}") from None
    size = None
    if args.size is not None:
        m = re.fullmatch(r"(\d+)x(\d+)", args.size.strip())
        if m is None:
            raise ConfigError(f"--size must be WxH (e.g. 640x640), got {args.size!r}")
        size = [int(m[1]), int(m[2])]
    given = {"city": args.city, "bbox": bbox, "polygon": args.polygon and str(args.polygon), "points": args.points,
             "headings": args.headings, "size": size, "fov": args.fov, "pitch": args.pitch,
             "radius": args.radius, "min_spacing": args.min_spacing, "max_requests": args.max_requests,
             "rps": args.rps, "max_retries": args.max_retries, "backoff": args.backoff, "key_file": args.key_file and str(args.key_file),
             "base_url": args.base_url, "seed": args.seed, "random_offset": args.random_offset or None}
    cfg = from_dict(collect.StreetViewConfig, {k: v for k, v in given.items() if v is not None},
                    where="citylib streetview")
    try:
        result = collect.run(cfg, args.out, progress=not args.quiet)
    except collect.StreetViewError as e:  # the key refused (nothing more can succeed)
        print(f"citylib streetview: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("citylib streetview: interrupted; what was fetched is kept, run again to go on", file=sys.stderr)
        return 130
    print(f"{result.city}: {result.points} points, {result.panoramas} panoramas, {result.downloaded} images "
          f"downloaded, {result.present} already present, {result.no_imagery} points without imagery, "
          f"{result.duplicates} duplicates, {len(result.failed)} failed, {result.requests} requests")
    print(result.manifest_path)
    if result.points < cfg.points:
        print(f"sampled only {result.points} of {cfg.points} points: the area is too small for "
              f"--min-spacing {cfg.min_spacing:g}", file=sys.stderr)
    for why in result.failed[:20]:
        print(f"  FAILED {why}", file=sys.stderr)
    if len(result.failed) > 20:
        print(f"  ... and {len(result.failed) - 20} more failed requests", file=sys.stderr)
    if result.stopped:
        print(f"citylib streetview: stopped: {result.stopped}", file=sys.stderr)
    return 0 if result.complete else 1


COMMANDS = {"synth": _synth, "run": _run, "train": _train, "predict": _predict, "report": _report, "streetview": _streetview}

if __name__ == "__main__":
    sys.exit(main())
