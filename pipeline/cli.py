"""The ``bireal`` command line: one entry point, a subcommand per stage.

Every subcommand imports its implementation lazily so that ``bireal --help`` and the
torch-only commands work on machines without ray / mlflow / prefect / dvc.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from .env import apply_offline_defaults, quiet_framework_logs
from .params import bounded, registered_name_problem


def _cmd_cost(args: argparse.Namespace) -> int:
    import torch

    import bireal_core as bc

    # on the meta device: shapes without storage, so no size of model or input allocates anything
    # (--input-size 100000 asked a CPU forward for 120 GB)
    with torch.device("meta"):
        model = bc.create_model(args.arch, num_classes=args.num_classes, stem=args.stem, width=args.width)
    try:
        result = bc.summary(model, input_size=args.input_size)
    except RuntimeError as e:  # torch's "output size is too small" from a pooling layer
        if "too small" not in str(e):
            raise
        raise ValueError(
            f"--input-size {args.input_size}: too small for {args.arch} with the {args.stem} stem ({e})"
        ) from e
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


# ---------------------------------------------------------------------------- what a stage prints


def report_train(result: dict) -> str:
    from .stages import format_history

    return (
        f"{format_history(result['history'])}\n"
        f"checkpoint: {result['checkpoint']}  (mlflow run {result['mlflow_run_id']})"
    )


def report_tune(summary: dict) -> str:
    from .tune import format_table, pick_warning

    if not summary["enabled"]:
        return f"tuning disabled: wrote an empty pick to {summary['files']['best']}"
    warning = pick_warning(summary)
    return (
        f"{format_table(summary)}\n"
        f"best config: {summary['files']['best']}  ({len(summary['trials'])} trials, {summary['path']})"
        + (f"\n{warning}" if warning else "")
    )


def report_export(artifact: str, size: dict) -> str:
    return (
        f"wrote {artifact}: {size['bytes']:,} bytes = {size['mbit']:.2f} Mbit (tensors {size['payload_mbit']:.2f} Mbit)"
    )


def report_evaluate(artifact: str, result: dict) -> str:
    line = f"{artifact} on {result['split']}: top-1 {result['top1']:.4f} over {result['images']} images"
    if "float_agreement" in result:
        line += (
            f"; top-1 agreement with the training graph {result['float_agreement']:.4%} "
            f"({result['float_disagreements']} flips)"
        )
    return line


def report_register(result: dict) -> str:
    state = "already registered as" if result["duplicate"] else "registered"
    line = (
        f"{state} {result['name']} version {result['version']}"
        f"{' (champion)' if result['champion'] else ' (candidate; champion kept)'}"
    )
    reason = (result.get("gate") or {}).get("reason")
    return f"{line}: {reason}" if reason else line


def report_shard(manifest: dict, out: str) -> str:
    from .shard import summarize

    return (
        f"{summarize(manifest)}\nmanifest: {out.rstrip('/')}/manifest.json ({manifest.get('elapsed_seconds', 0):.1f} s)"
    )


def report_stage(stage: str, result: dict, params) -> str:
    """What ``bireal run STAGE`` prints: the same lines as the stage's own command."""
    if stage in ("pretrain", "binarize", "finetune"):
        return report_train(result)
    if stage == "tune":
        return report_tune(result)
    if stage == "export":
        return report_export(result["artifact"], result["size"])
    if stage == "evaluate":
        from .stages import ARTIFACT

        return report_evaluate(ARTIFACT, result)
    if stage == "register":
        return report_register(result)
    return report_shard(result, params.train("pretrain").shards)


# ---------------------------------------------------------------------------- commands


def _cmd_run(args: argparse.Namespace) -> int:
    from . import storage
    from .stages import check_stage_order, run_stage

    check_stage_order(args.stage)  # before the first stage runs
    for stage in args.stage:  # in the order given; a failing stage stops the rest
        result = run_stage(stage, args.loaded, use_ray=not args.no_ray)
        print(json.dumps(result, default=str) if args.json else report_stage(stage, result, args.loaded), flush=True)
        if args.summaries_to:  # a submitted job's summaries, where `bireal submit` reads them
            storage.write_text(storage.join(args.summaries_to, f"{stage}.json"), json.dumps(result, default=str))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .stages import train

    result = train(args.stage, args.loaded, use_ray=not args.no_ray, metrics_out=args.metrics)
    if args.history:  # per-epoch rows, e.g. for accuracy-vs-time curves
        write_json(args.history, result["history"])
    print(report_train(result))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from cuda_ext.memory import keep_freed_memory

    from .evaluate import evaluate_artifact, write_outputs

    keep_freed_memory()  # a CPU forward reuses freed activation memory (cuda_ext/memory.py)
    result = evaluate_artifact(args.artifact, args.shards, args.checkpoint, device=args.device, progress_bar=True)
    if args.metrics:
        write_outputs(result, args.metrics, args.confusion)
    print(report_evaluate(args.artifact, result))
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from .stages import read_evaluation, register

    evaluation = read_evaluation(args.evaluation)
    print(report_register(register(args.loaded, args.artifact, evaluation, args.shards, args.name, args.out)))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from .stages import tune

    print(report_tune(tune(args.loaded, use_ray=not args.no_ray)))
    return 0


def read_class_names(path: str) -> list[str]:
    """One class name per line (blank lines skipped); a ValueError naming the file otherwise."""
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not names:
        raise ValueError(f"{path}: no class names (one per line)")
    return names


def _cmd_export(args: argparse.Namespace) -> int:
    from cuda_ext.packed import artifact_size, export_checkpoint

    names = args.class_names.split(",") if args.class_names else None
    if args.class_names_file:
        names = read_class_names(args.class_names_file)
    path = export_checkpoint(args.checkpoint, args.out, class_names=names)
    print(report_export(str(path), artifact_size(path)))
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from .summary import pipeline_summary

    print(pipeline_summary(args.loaded))
    return 0


def _cmd_import_official(args: argparse.Namespace) -> int:
    import bireal_core as bc
    from bireal_core.official import import_official, read_official_state_dict

    model = import_official(args.arch, read_official_state_dict(args.checkpoint))
    config = {
        "class_names": [str(i) for i in range(1000)],
        "input": bc.default_input_config("imagenet"),
        "source": str(args.checkpoint),
    }
    path = bc.save_checkpoint(args.out, model.eval(), stage="binarize", config=config)
    print(f"wrote {path}: {args.arch} with the authors' weights from {args.checkpoint}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cuda_ext.memory import keep_freed_memory
    from cuda_ext.predict import BATCH_SIZE, format_prediction, image_files, iter_predictions

    keep_freed_memory()  # a CPU forward reuses freed activation memory (cuda_ext/memory.py)
    files, empty_folders = image_files(args.images)
    for error in empty_folders:
        print(f"bireal predict: error: {error}", file=sys.stderr)
    failed = len(empty_folders)
    # printed a batch at a time, so a long list of files shows progress and holds one batch in memory
    for r in iter_predictions(args.artifact, files, topk=args.topk, batch_size=args.batch_size or BATCH_SIZE):
        if "error" in r:  # one line each; the readable images are still classified
            failed += 1
            print(f"bireal predict: error: {r['error']}", file=sys.stderr)
        if args.json:
            print(json.dumps(r), flush=True)
        elif "top" in r:
            print(format_prediction(r), flush=True)
    return 1 if failed else 0  # 1: some images could not be read (2: nothing could run)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "train":
        from .params import load_params
        from .train_bench import record, train_options
        from .train_bench import run as run_train

        rows = run_train(
            load_params(args.profile),
            args.device,
            arch=args.arch,
            steps=args.steps,
            loader=not args.no_loader,
            **train_options(args),
        )
        if args.json:
            write_json(args.json, rows)
        if args.record:
            print(f"recorded in {record(rows)}")
        return 0
    if args.what == "data":
        from .data_bench import run as run_data

        rows = run_data(args.cifar, args.imagenet_like, device=args.device)
        if args.json:
            write_json(args.json, rows)
        return 0
    from cuda_ext.benchmarks import run

    run(args.what, args.device, json_path=args.json, threads=args.threads, jsonl_path=args.jsonl)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from .adapters.ray_jobs import check_shards, is_job_server, submit
    from .profile_rules import reproduction_problems
    from .stages import check_stage_order

    check_stage_order(args.stage)  # the job runs them in this order

    problems = reproduction_problems(args.loaded)
    if problems:  # before any job starts: the same rules as check-params
        raise ValueError("\n".join(problems))
    address = args.address or os.environ.get("RAY_ADDRESS", "")
    if not is_job_server(address):
        raise ValueError(
            f"bireal submit needs the cluster's dashboard address (--address http://HEAD:8265 or $RAY_ADDRESS), "
            f"got {address!r}"
        )
    check_shards(args.loaded, args.shards)
    result = submit(
        args.loaded,
        args.stage,
        address,
        args.out,
        args.resubmit,
        args.python,
        timeout_s=args.timeout,
        summaries_dir=args.summaries,
    )
    print(f"bireal submit: {result['id']} {result['status']}; wrote {', '.join(result['files'])}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .plan import format_plan, plan

    result = plan(
        args.loaded, args.gpus, args.gpu, args.upload_gb_s, args.efficiency, cores_per_node=args.cores_per_node
    )
    print(format_plan(result))
    if args.json:
        write_json(args.json, result)
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from .shard import verify_shards
    from .stages import shard

    if args.verify:
        making = shard_making_options_given(args)
        if making:  # `--source S --out O --verify O` would verify O and make nothing
            raise ValueError(f"--verify DIR only checks shards already made; it takes no {', '.join(making)}")
        problems = verify_shards(args.verify)
        for p in problems:
            print(f"FAIL {p}")
        verdict = "OK, every shard matches the manifest" if not problems else f"{len(problems)} problems"
        print(f"{args.verify}: {verdict}")
        return 1 if problems else 0
    manifest = shard(args.loaded, args.source, args.out, kind=args.kind, overwrite=args.overwrite)
    print(report_shard(manifest, args.out or args.loaded.train("pretrain").shards))
    return 0


def shard_making_options_given(args: argparse.Namespace) -> list[str]:
    """The options of ``bireal shard`` given away from their defaults, but for --verify and --params:
    every other one makes shards (read off the parser, so a new option is covered)."""
    return [
        action.option_strings[0]
        for action in args.command_parser._actions
        if action.option_strings and action.dest not in ("help", "verify", "params")
        and getattr(args, action.dest) != action.default
    ]  # fmt: skip


def _cmd_check_params(args: argparse.Namespace) -> int:
    from .profile_rules import reproduction_problems

    p = args.loaded
    problems = reproduction_problems(p)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"{p.where}: {len(problems)} problem{'s' * (len(problems) > 1)}")
        return 1
    stages = ", ".join(
        f"{s}: {p.train(s).arch} {p.train(s).stem} w{p.train(s).width:g}" for s in ("pretrain", "binarize", "finetune")
    )
    print(f"{p.where}: OK ({stages}; tune {'on' if p.tune.enabled else 'off'})")
    return 0


def _shard_overrides(args: argparse.Namespace) -> dict:
    keys = ("resize", "jpeg_quality", "samples_per_shard", "max_shard_bytes", "gzip", "seed", "processes")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def load_args_params(args: argparse.Namespace):
    """The params file named by ``--params`` (a path or a profile name), read and checked once,
    with this command's overrides; a bad file fails here, before any work starts."""
    from dataclasses import asdict

    from .params import build, load_params, parse_overrides

    params = load_params(args.params, parse_overrides(getattr(args, "set", None)))
    params.restart = getattr(args, "restart", False)
    if args.command == "shard":
        params.shard = build(type(params.shard), {**asdict(params.shard), **_shard_overrides(args)}, "--shard options")
    return params


def device(text: str) -> str:
    """An argparse ``type``: the devices the packed kernels have, cpu or cuda[:N]."""
    kind, _, index = text.partition(":")
    if text != "cpu" and not (kind == "cuda" and (not index or index.isdigit())):
        raise argparse.ArgumentTypeError(f"{text!r}: cpu or cuda[:N]")
    if kind == "cuda":  # refused here, before an artifact or a shard is read
        import torch

        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device visible to torch {torch.__version__} ({build})")
        if index and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return text


def write_json(path: str, data) -> None:
    from . import storage

    storage.write_text(str(path), json.dumps(data, indent=2))


def registered_name(text: str) -> str:
    """An argparse ``type`` for ``register --name``: a name MLflow's registry and its search
    filters take, refused before the artifact is read."""
    problem = registered_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def output_file(text: str) -> str:
    """An argparse ``type`` for a file a command writes: refused before any work when it names a
    folder, or a place under a file, or a folder this process may not write (the commands create
    missing folders)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder; name the file to write")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text}: the folder {ancestor} is not writable")
    return text


PARAMS_HELP = "params file or profile name from pipeline/configs (default: params.yaml)"
RESTART_HELP = (
    "a stage whose math settings or data changed since its run in ray.storage_path began: discard that "
    "run's checkpoints and start over (without it the stage refuses, naming what changed)"
)


def _add_cost(sub) -> None:

    cost = sub.add_parser("cost", help="binary/real MACs, OPs and memory of a model (the paper's table)")
    cost.add_argument("--arch", required=True, help="registered model name, e.g. bireal18")
    cost.add_argument("--num-classes", type=bounded(int, ">= 1"), default=1000)
    cost.add_argument("--stem", choices=("imagenet", "small"), default="imagenet")
    cost.add_argument("--width", type=bounded(float, "> 0"), default=1.0, help="channel multiplier")
    cost.add_argument(
        "--input-size", type=bounded(int, ">= 1"), default=None, help="default: 224 (imagenet stem), 32 (small)"
    )
    cost.add_argument("--layers", action="store_true", help="also list every conv/FC layer")
    cost.add_argument("--json", action="store_true", help="print the same figures as JSON")
    cost.set_defaults(func=_cmd_cost)


def _add_check_params(sub) -> None:
    check = sub.add_parser("check-params", help="validate params.yaml (every section, key, type and choice)")
    check.add_argument("--params", default=None, help=PARAMS_HELP)
    check.add_argument("--set", action="append", metavar="KEY=VALUE", help="a train setting to check too")
    check.set_defaults(func=_cmd_check_params)


def _add_run(sub) -> None:
    from .stages import STAGES_BY_NAME  # the table only: no torch, ray or mlflow

    run = sub.add_parser("run", help="stages of the pipeline's stage table, as dvc repro / the flow run them")
    run.add_argument("stage", nargs="+", choices=tuple(STAGES_BY_NAME), help="one or more, run in this order")
    run.add_argument("--params", default=None, help=PARAMS_HELP)
    run.add_argument("--no-ray", action="store_true", help="train in this process")
    run.add_argument("--restart", action="store_true", help=RESTART_HELP)
    run.add_argument("--json", action="store_true", help="print each stage's summary as one JSON line")
    run.add_argument(
        "--summaries-to", metavar="URI", default="", help="also write each stage's summary to URI/<stage>.json"
    )
    run.set_defaults(func=_cmd_run)


def _add_summary(sub) -> None:
    summary = sub.add_parser("summary", help="what the last pipeline run made: accuracy, size, speed, registry")
    summary.add_argument("--params", default=None, help=PARAMS_HELP)
    summary.set_defaults(func=_cmd_summary)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="cost table + a forward/backward pass of every model")
    demo.set_defaults(func=_cmd_demo)


def _add_shard(sub) -> None:
    shard = sub.add_parser("shard", help="images -> WebDataset shards + manifest (or --verify DIR)")
    shard.add_argument(
        "--source", help="image-folder tree, folder with the ILSVRC2012 tars, or 'demo' (default: data.source)"
    )
    shard.add_argument("--out", help="output folder or fsspec URL (default: train.shards)")
    shard.add_argument("--kind", default="auto", choices=("auto", "folder", "ilsvrc", "demo"))
    shard.add_argument("--verify", metavar="DIR", help="check every shard of DIR against its manifest")
    shard.add_argument("--overwrite", action="store_true", help="replace shards made with other settings")
    shard.add_argument("--resize", type=int, help="shorter side (0 keeps the size)")
    shard.add_argument("--jpeg-quality", dest="jpeg_quality", type=int)
    shard.add_argument("--samples-per-shard", dest="samples_per_shard", type=int)
    shard.add_argument("--max-shard-bytes", dest="max_shard_bytes", type=int)
    shard.add_argument("--gzip", action=argparse.BooleanOptionalAction, default=None)
    shard.add_argument("--seed", type=int)
    shard.add_argument("--processes", type=int)
    shard.add_argument("--params", default=None, help=PARAMS_HELP)
    shard.set_defaults(func=_cmd_shard)


def _add_train(sub) -> None:
    train = sub.add_parser("train", help="one training stage as a Ray Train job (pretrain|binarize|finetune)")
    train.add_argument("--stage", required=True, choices=("pretrain", "binarize", "finetune"))
    train.add_argument("--params", default=None, help=PARAMS_HELP)
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a train setting")
    train.add_argument("--no-ray", action="store_true", help="run the loop in this process")
    train.add_argument("--restart", action="store_true", help=RESTART_HELP)
    train.add_argument("--metrics", type=output_file, default=None, help="write the final metrics as JSON here")
    train.add_argument(
        "--history", type=output_file, default=None, help="write every epoch's metrics as a JSON list here"
    )
    train.set_defaults(func=_cmd_train)


def _add_tune(sub) -> None:
    tune_p = sub.add_parser("tune", help="Ray Tune search over estimator, gradient, init, two-step, lr, recipe")
    tune_p.add_argument("--params", default=None, help=PARAMS_HELP)
    tune_p.add_argument("--no-ray", action="store_true", help="run the grid as local processes (one lr, no tracking)")
    tune_p.set_defaults(func=_cmd_tune)


def _add_export(sub) -> None:
    export = sub.add_parser("export", help="checkpoint -> packed 1-bit artifact (safetensors + JSON header)")
    export.add_argument("--checkpoint", required=True, help="a stage checkpoint (.safetensors), e.g. finetune's")
    export.add_argument("--out", type=output_file, required=True, help="the packed artifact to write (.safetensors)")
    names = export.add_mutually_exclusive_group()
    names.add_argument("--class-names", default=None, help="comma-separated; default: the checkpoint's")
    names.add_argument(
        "--class-names-file",
        default=None,
        metavar="FILE",
        help="one name per line (for names with commas, such as ImageNet's 'tench, Tinca tinca')",
    )
    export.set_defaults(func=_cmd_export)


def _add_evaluate(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="accuracy of a packed artifact on the evaluation split")
    evaluate.add_argument("--artifact", required=True)
    evaluate.add_argument("--shards", required=True, help="shard folder or URL")
    evaluate.add_argument("--checkpoint", default=None, help="also report agreement with this checkpoint")
    evaluate.add_argument("--metrics", type=output_file, default=None, help="write metrics JSON here")
    evaluate.add_argument("--confusion", type=output_file, default=None, help="write the confusion matrix as CSV here")
    evaluate.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:N] (the packed model's kernels)")
    evaluate.set_defaults(func=_cmd_evaluate)


def _add_register(sub) -> None:
    register = sub.add_parser("register", help="log the packed artifact as an MLflow pyfunc and register it")
    register.add_argument("--artifact", required=True)
    register.add_argument("--evaluation", required=True, help="metrics JSON of bireal evaluate (top1)")
    register.add_argument("--shards", required=True, help="shards to take an example input from")
    register.add_argument(
        "--name", type=registered_name, default=None, help="registered model name (default: registry.model_name)"
    )
    register.add_argument("--params", default=None, help=PARAMS_HELP)
    register.add_argument("--out", type=output_file, default=None, help="write the registration summary JSON here")
    register.set_defaults(func=_cmd_register)


def _add_import_official(sub) -> None:
    official = sub.add_parser("import-official", help="an authors' PyTorch checkpoint -> a bireal checkpoint")
    official.add_argument("--arch", required=True, choices=("bireal18", "bireal34", "bireal50"))
    official.add_argument("--checkpoint", required=True, help="the authors' .pth.tar (liuzechun/Bi-Real-net)")
    official.add_argument(
        "--out", type=output_file, required=True, help="the bireal checkpoint (.safetensors) to write"
    )
    official.set_defaults(func=_cmd_import_official)


def _add_predict(sub) -> None:
    predict = sub.add_parser("predict", help="classify image files with a packed artifact")
    predict.add_argument("--artifact", required=True, help="a packed artifact (.safetensors) from bireal export")
    predict.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads), or folders of them (walked)"
    )
    predict.add_argument("--topk", type=bounded(int, ">= 1"), default=1, help="classes listed per image (default 1)")
    predict.add_argument(
        "--json", action="store_true", help="print one JSON object per image, a line each (errors included)"
    )
    predict.add_argument(
        "--batch-size",
        dest="batch_size",
        type=bounded(int, ">= 1"),
        default=None,
        help="images per forward (default 32, cuda_ext.predict.BATCH_SIZE): memory stays flat for any number of files",
    )
    predict.set_defaults(func=_cmd_predict)


def _add_bench(sub) -> None:
    """``bireal bench BENCHMARK``: a parser per benchmark, so an option another benchmark takes (``bench
    model --arch``) is refused, not silently ignored."""
    bench = sub.add_parser(
        "bench", help="benchmark tables: kernels, the packed model vs float, memory paths, data, training"
    )
    benchmarks = bench.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    for what, help in (
        ("kernels", "our 1-bit ops against F.conv2d (cuDNN on a GPU)"),
        ("model", "the packed model against float ResNet-18, as bireal predict runs them"),
        ("memory", "the packed model's memory paths, paired"),
    ):
        _add_kernel_bench(benchmarks.add_parser(what, help=help))
    _add_data_bench(benchmarks.add_parser("data", help="sharding and loader img/s, float against uint8"))
    _add_train_bench(benchmarks.add_parser("train", help="train-step and loader img/s, the planner's rows"))
    bench.set_defaults(func=_cmd_bench)


def _add_bench_output(parser) -> None:
    """What every benchmark takes: the device and a JSON copy of its rows."""
    parser.add_argument("--device", type=device, default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--json", type=output_file, default=None, metavar="FILE", help="also write the rows as JSON")


def _add_kernel_bench(parser) -> None:
    _add_bench_output(parser)
    parser.add_argument("--threads", type=bounded(int, ">= 1"), default=2, help="CPU threads (default 2)")
    parser.add_argument(
        "--jsonl", type=output_file, default=None, metavar="FILE", help="also one JSON line per row as measured"
    )


def _add_data_bench(parser) -> None:
    _add_bench_output(parser)
    parser.add_argument("--cifar", default=None, help="an image-folder tree to shard and load")
    parser.add_argument(
        "--imagenet-like",
        dest="imagenet_like",
        type=bounded(int, ">= 0"),
        default=2000,
        help="size of the generated ImageNet-size tree (0 skips it)",
    )


def _add_train_bench(parser) -> None:
    from . import train_bench  # its options; torch stays unimported

    _add_bench_output(parser)
    parser.add_argument(
        "--params", dest="profile", default=None, help="the profile whose stages, batch and input to time"
    )
    parser.add_argument("--arch", default=None, help="another arch than the profile's")
    parser.add_argument("--steps", type=bounded(int, ">= 1"), default=20, help="timed steps per run (3 runs, median)")
    parser.add_argument("--record", action="store_true", help="add the rows to bench/results/train_throughput.json")
    train_bench.add_train_options(parser)


def _add_submit(sub) -> None:
    from .stages import STAGES_BY_NAME  # the table only: no torch, ray or mlflow

    submit_p = sub.add_parser("submit", help="a stage as a Ray job on a remote cluster (attach / fetch on rerun)")
    submit_p.add_argument(
        "--stage",
        required=True,
        action="append",
        choices=tuple(STAGES_BY_NAME),
        help="repeat to run several stages in one job (those that hand each other local files)",
    )
    submit_p.add_argument("--params", default=None, help=PARAMS_HELP)
    submit_p.add_argument("--address", default=None, help="the cluster's dashboard, http://HEAD:8265 ($RAY_ADDRESS)")
    submit_p.add_argument("--out", default="submitted", help="where the summary and pointer files go")
    submit_p.add_argument("--summaries", metavar="DIR", default=None, help="the summaries go here instead of --out")
    submit_p.add_argument(
        "--shards", metavar="URI", default="", help="the shards DVC tracks: refused unless the params' train.shards"
    )
    submit_p.add_argument(
        "--resubmit", action="store_true", help="delete a FAILED/STOPPED job of this id, submit again"
    )
    submit_p.add_argument(
        "--python", default=None, help="the cluster's Python with the project ($BIREAL_JOB_PYTHON, else python)"
    )
    submit_p.add_argument(
        "--timeout", type=bounded(float, "> 0"), default=None, help="stop waiting after this many seconds"
    )
    submit_p.add_argument("--restart", action="store_true", help=f"the job's stages: {RESTART_HELP}")
    submit_p.set_defaults(func=_cmd_submit)


def _add_plan(sub) -> None:
    plan = sub.add_parser("plan", help="wall time, GPU-hours, batch, lr, shards and checkpoints of a profile on N GPUs")
    plan.add_argument("--params", default=None, help=PARAMS_HELP)
    plan.add_argument("--gpus", type=bounded(int, ">= 1"), required=True, help="GPUs in all (nodes of 8)")
    plan.add_argument("--gpu", default="h100", help="the GPU kind whose measured throughput to use (h100, h200, ...)")
    plan.add_argument(
        "--upload-gb-s", dest="upload_gb_s", type=bounded(float, "> 0"), default=1.0, help="checkpoint upload rate"
    )
    plan.add_argument(
        "--efficiency", type=bounded(float, "in (0, 1]"), default=0.9, help="data-parallel efficiency across GPUs"
    )
    plan.add_argument(
        "--cores-per-node",
        dest="cores_per_node",
        type=bounded(int, ">= 1"),
        default=96,
        help="CPU cores of a node of 8 GPUs",
    )
    plan.add_argument("--json", type=output_file, default=None, metavar="FILE", help="also write the plan as JSON")
    plan.set_defaults(func=_cmd_plan)


SUBCOMMANDS = (
    _add_cost,
    _add_check_params,
    _add_run,
    _add_summary,
    _add_demo,
    _add_shard,
    _add_train,
    _add_tune,
    _add_export,
    _add_evaluate,
    _add_register,
    _add_import_official,
    _add_predict,
    _add_bench,
    _add_submit,
    _add_plan,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``bireal`` parser: one small builder per subcommand (``_add_<command>``), in help order."""
    parser = argparse.ArgumentParser(prog="bireal", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own output too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    name_parsers(sub)
    return parser


def name_parsers(subcommands) -> None:
    """Each subcommand's parser (``bireal bench model``'s one level down) as ``args.command_parser``:
    an option it does not take is then named in its words, with its usage, not the top level's."""
    for parser in subcommands.choices.values():
        parser.set_defaults(command_parser=parser)
        for action in parser._actions:  # the benchmarks under `bench`
            if isinstance(action, argparse._SubParsersAction):
                name_parsers(action)


def resume_hint(args: argparse.Namespace) -> str:
    """What running the same command again does after an interruption ('' where it starts over)."""
    if args.command == "shard":
        return "the same command keeps the complete shards and goes on after the last"
    if args.command == "tune":
        return "the same command resumes the search (finished trials are kept)"
    if args.command == "train" and not args.no_ray:
        return "the same command resumes the stage from its last finished epoch (ray.storage_path)"
    if args.command == "run" and not args.no_ray:
        return (
            "the same command resumes a training stage from its last finished epoch, a search from its finished trials"
        )
    return ""


# what `pip install 'bireal[pipeline]'` adds to the core (pyproject.toml)
PIPELINE_EXTRA = ("ray", "mlflow", "prefect", "dvc", "webdataset", "sklearn", "fsspec", "tqdm")


def main(argv: list[str] | None = None) -> int:
    apply_offline_defaults()
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.verbose:
        os.environ["BIREAL_VERBOSE"] = "1"
    quiet_framework_logs()
    try:
        if hasattr(args, "params"):  # read once; a bad params file fails before any work starts
            args.loaded = load_args_params(args)
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever the work was
        hint = resume_hint(args)
        print(f"bireal {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports it
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in PIPELINE_EXTRA:
            raise
        print(
            f"bireal {args.command}: error: needs {e.name}, part of the pipeline extra: "
            "pip install 'bireal[pipeline]' (the core install has export, predict, cost and bench)",
            file=sys.stderr,
        )
        return 2
    except (KeyError, ValueError, OSError, RuntimeError) as e:  # OSError: a missing, damaged or unreadable file
        print(f"bireal {args.command}: error: {error_text(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if not type(e).__module__.startswith("botocore"):
            raise
        # S3 errors s3fs does not turn into OSError: no credentials, an endpoint that cannot be reached
        print(f"bireal {args.command}: error: S3: {e} ({S3_HINT})", file=sys.stderr)
        return 2


S3_HINT = (
    "credentials come from the store's usual places: $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY, "
    "~/.aws, an instance role; another endpoint than AWS's: $BIREAL_S3_ENDPOINT_URL"
)


def error_text(e: BaseException) -> str:
    """What went wrong, in the words of the code that raised it. torch re-raises a DataLoader
    worker's error as 'Caught X in DataLoader worker process N.' plus the worker's traceback: the
    error is the traceback's last entry."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)  # str(KeyError) adds quotes
    if not re.match(r"Caught \w+ in DataLoader worker process \d+", text):
        return text
    lines = text.rstrip().splitlines()
    last = max(i for i, line in enumerate(lines) if line and not line[0].isspace())  # the exception's line
    return "\n".join([lines[last].split(": ", 1)[-1], *lines[last + 1 :]])


if __name__ == "__main__":
    sys.exit(main())
