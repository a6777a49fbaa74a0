"""The ``bireal`` command line: one entry point, a subcommand per stage.

Every subcommand imports its implementation lazily so that ``bireal --help`` and the
torch-only commands work on machines without ray / mlflow / prefect / dvc.
"""
from __future__ import annotations

import argparse
import json
import sys

from .env import apply_offline_defaults


def _cmd_cost(args: argparse.Namespace) -> int:
    import bireal_core as bc

    kwargs = {"stem": args.stem, "width": args.width} if args.width != 1.0 else {"stem": args.stem}
    model = bc.create_model(args.arch, num_classes=args.num_classes, **kwargs)
    result = bc.summary(model, input_size=args.input_size)
    if args.json:
        print(json.dumps(result.as_dict(layers=args.layers), indent=2))
    else:
        print(result.table(layers=args.layers))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    rows = run_demo()
    bad = [r for r in rows if not r["finite"] or r["params_without_grad"]]
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bireal", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cost = sub.add_parser("cost", help="binary/real MACs, OPs and memory of a model (the paper's table)")
    cost.add_argument("--arch", required=True, help="registered model name, e.g. bireal18")
    cost.add_argument("--num-classes", type=int, default=1000)
    cost.add_argument("--stem", choices=("imagenet", "small"), default="imagenet")
    cost.add_argument("--width", type=float, default=1.0)
    cost.add_argument("--input-size", type=int, default=None, help="default: 224 (imagenet stem), 32 (small)")
    cost.add_argument("--layers", action="store_true", help="also list every conv/FC layer")
    cost.add_argument("--json", action="store_true", help="print the same figures as JSON")
    cost.set_defaults(func=_cmd_cost)

    demo = sub.add_parser("demo", help="cost table + a forward/backward pass of every model")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"bireal {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
