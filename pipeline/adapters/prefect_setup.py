"""Prefect's shared result storage for the pipeline flow: the ``bireal-results`` block.

The flow's tasks persist their results (stage summaries, with the checkpoints' URIs and digests)
and find their cache records in Prefect's result storage; by default that is
``$PREFECT_HOME/storage`` on the machine that ran them, so another checkout, worker or pod starts
from nothing. A ``RemoteFileSystem`` block on S3 shares them: every process whose Prefect setting
``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK`` names it (prefect.yaml's deployments set it) reads and
writes the same records.

Usage (with PREFECT_API_URL set to the server):
  python -m pipeline.adapters.prefect_setup s3://BUCKET/prefect-results [--endpoint-url URL]
prints the setting to use: remote-file-system/bireal-results. The GPU concurrency limit and the
work pools are Prefect's own commands (docs/orchestration.md).
"""

from __future__ import annotations

import argparse

BLOCK_NAME = "bireal-results"
BLOCK_SLUG = f"remote-file-system/{BLOCK_NAME}"  # the value of PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK


def save_results_block(basepath: str, endpoint_url: str = "") -> str:
    """Create (or update) the shared result storage block; -> its slug. ``endpoint_url``: an
    S3-compatible store's (MinIO, a test's moto); credentials come from the environment (a pod's
    service-account role on AWS), never from the block."""
    from prefect.filesystems import RemoteFileSystem

    if not basepath.startswith("s3://"):
        raise ValueError(f"result storage must be shared (s3://BUCKET/PREFIX), got {basepath!r}")
    settings = {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {}
    RemoteFileSystem(basepath=basepath.rstrip("/"), settings=settings).save(BLOCK_NAME, overwrite=True)
    return BLOCK_SLUG


def main(argv: list[str] | None = None) -> None:
    from ..env import apply_offline_defaults

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.adapters.prefect_setup", description=__doc__.splitlines()[0]
    )
    parser.add_argument("basepath", help="where the results go: s3://BUCKET/PREFIX")
    parser.add_argument("--endpoint-url", default="", help="an S3-compatible store's endpoint (not for AWS)")
    args = parser.parse_args(argv)
    apply_offline_defaults()
    slug = save_results_block(args.basepath, args.endpoint_url)
    print(f"saved block {slug} -> {args.basepath}")
    print(f"use it: PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK={slug} (prefect.yaml's deployments set it)")


if __name__ == "__main__":
    main()
