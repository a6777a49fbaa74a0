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


def _cmd_export(args: argparse.Namespace) -> int:
    from cuda_ext.packed import artifact_size, export_checkpoint

    names = args.class_names.split(",") if args.class_names else None
    path = export_checkpoint(args.checkpoint, args.out, class_names=names)
    size = artifact_size(path)
    print(f"wrote {path}: {size['bytes']:,} bytes = {size['mbit']:.2f} Mbit "
          f"(tensors {size['payload_mbit']:.2f} Mbit)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cuda_ext.predict import format_predictions, predict_files

    results = predict_files(args.artifact, args.images, topk=args.topk)
    print(json.dumps(results, indent=2) if args.json else format_predictions(results))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from cuda_ext.benchmarks import run

    run(args.what, args.device, json_path=args.json, threads=args.threads)
    return 0


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

    export = sub.add_parser("export", help="checkpoint -> packed 1-bit artifact (safetensors + JSON header)")
    export.add_argument("--checkpoint", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--class-names", default=None, help="comma-separated; default: the checkpoint's")
    export.set_defaults(func=_cmd_export)

    predict = sub.add_parser("predict", help="classify image files with a packed artifact")
    predict.add_argument("--artifact", required=True)
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--topk", type=int, default=1)
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=_cmd_predict)

    bench = sub.add_parser("bench", help="benchmark tables: kernels or the packed model vs float")
    bench.add_argument("what", choices=("kernels", "model"))
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    bench.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"bireal {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
