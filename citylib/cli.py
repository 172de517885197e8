"""The ``citylib`` command line: thin argparse wrappers over each stage's ``run``.

Reads its arguments; writes what the called stage writes. ``get_args_parser`` is kept
apart from ``main`` so that tests and wrappers call the same entry point.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from citylib.config import ConfigError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="citylib", description="What makes a city look like itself?")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a generated city world (images, label maps, manifest.csv)")
    s.add_argument("--out", required=True, type=Path, help="folder to write the world into")
    s.add_argument("--world", default="default", help="built-in world name or path to a world YAML")
    s.add_argument("--spots", type=int, default=None, help="spots (places) per city")
    s.add_argument("--views", type=int, default=None, help="views (headings) per spot")
    s.add_argument("--size", type=int, default=None, help="image size in pixels (square)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace a different world in --out")

    r = sub.add_parser("run", help="run the notebooks for every parameter file (papermill)")
    r.add_argument("--params", default=None, help="a parameter file or folder (default: parameters/)")
    r.add_argument("--only", action="append", default=None, metavar="RUN", help="run only this run (repeatable)")
    r.add_argument("--force", action="store_true", help="redo runs even if identical results exist")
    r.add_argument("--outputs", default=None, help="outputs folder (default: outputs/ or $CITYLIB_OUTPUTS)")

    pr = sub.add_parser("predict", help="predicted city and probabilities per image")
    pr.add_argument("--run", required=True, type=Path, help="a run folder, e.g. outputs/runs/vgg11_seed0")
    pr.add_argument("images", nargs="+", type=Path)

    rep = sub.add_parser("report", help="HTML of executed notebooks + outputs/report/index.html")
    rep.add_argument("--outputs", default=None, help="outputs folder (default: outputs/ or $CITYLIB_OUTPUTS)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"citylib {args.command}: error: {e}", file=sys.stderr)
        return 2


def _synth(args) -> int:
    from citylib import synth
    from citylib.config import from_dict

    given = {"world": args.world, "spots_per_city": args.spots, "views": args.views,
             "size": args.size, "seed": args.seed}
    cfg = from_dict(synth.SynthConfig, {k: v for k, v in given.items() if v is not None}, where="citylib synth")
    manifest = synth.run(cfg, args.out, overwrite=args.overwrite)
    print(manifest)
    return 0


def _run(args) -> int:
    from citylib import runner

    result = runner.run(params=args.params, only=args.only, force=args.force, outputs=args.outputs)
    total = sum(result.seconds.values())
    print(f"executed {len(result.executed)}, skipped {len(result.skipped)} (identical), "
          f"failed {len(result.failed)}; notebooks ran for {total / 60:.1f} min")
    for label, why in result.failed.items():
        print(f"  FAILED {label}: {why}", file=sys.stderr)
    return 0 if result.ok else 1


def _predict(args) -> int:
    from citylib import predict

    frame = predict.run(args.run, args.images)
    print(frame.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 1 if frame["error"].astype(bool).any() else 0


def _report(args) -> int:
    from citylib import report

    index = report.run(outputs=args.outputs)
    print(index)
    return 0


COMMANDS = {"synth": _synth, "run": _run, "predict": _predict, "report": _report}

if __name__ == "__main__":
    sys.exit(main())
