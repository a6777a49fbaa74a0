"""``bireal submit``: a stage run as a Ray job on a remote cluster (Ray's job submission API), so
that ``dvc repro`` or a laptop drives a cluster run without holding a Ray connection for hours.

The submission id is ``<pipeline_run>-<stage>-<params digest>``: submitting again while the job
runs attaches to it (its log streams from where it is; so does a second submitter racing the
first), and after it succeeded fetches its outputs without running it again; edited params are a
new job. A FAILED or STOPPED job's id cannot be reused by Ray: ``--resubmit`` deletes it and submits
again, and the stage resumes from its checkpoints in storage (stable Ray run names).

Several stages may go as one job (``--stage export --stage evaluate --stage register``: the id joins
their names): stages that hand each other local files (the packed artifact) must share a job, as
each job has a working folder of its own.

What comes back, into ``--out`` (default ``submitted/``): ``<stage>.json``, the stage's summary,
which the job wrote to ``<storage.artifacts>/<pipeline run>/jobs/<submission id>/<stage>.json``
(``bireal run --summaries-to``; ``--summaries DIR`` puts these files elsewhere: deploy/dvc.yaml
reads them as DVC metrics), and for a training stage ``<stage>.pointer.json`` per published
checkpoint, ``{"uri", "sha256"}``: DVC 3 does not track outputs that live in S3, so the pointer
files are the stage's DVC outputs. The job's log is streamed, never parsed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from .. import storage
from ..params import Params
from ..summary import write_epoch_curve

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PYTHON_ENV = "BIREAL_JOB_PYTHON"  # the cluster's Python with the project installed (default: python)
TRAINING = ("pretrain", "binarize", "finetune")
# stages that hand each other local files (the packed artifact): they go as one job
PACKAGE = ("export", "evaluate", "register")


def job_groups(stages: list[str]) -> list[list[str]]:
    """The stages in order, as the jobs that run them: each alone, the package stages together."""
    groups: list[list[str]] = []
    for stage in stages:
        if stage in PACKAGE and groups and groups[-1][0] in PACKAGE:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def is_job_server(address: str) -> bool:
    """``ray.address`` as a cluster's job server (http://HEAD:8265): stages are submitted there."""
    return address.startswith(("http://", "https://"))


def submission_id(params: Params, stages: list[str]) -> str:
    """``<pipeline_run>-<stages>-<digest>``: the digest is the params file's content (as parsed, so
    comments and layout do not count), so an edited params file under a fixed pipeline run id is a
    new job, never the old job's outputs fetched as if they were the new ones."""
    digest = hashlib.sha256(json.dumps(params.raw, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{params.group}-{'-'.join(stages)}-{digest}"


def summaries_location(params: Params, stages: list[str]) -> str:
    """Where the job writes its stages' summaries and the submitter reads them: shared storage,
    under the job's id (an edited params file is another job, so never a stale summary)."""
    if not params.storage.artifacts:
        raise ValueError(
            f"{params.where}: storage.artifacts is empty: a submitted job writes its stage summaries there "
            "(s3://BUCKET/runs/RUN/artifacts)"
        )
    return storage.join(params.storage.artifacts, params.group, "jobs", submission_id(params, stages))


def check_shards(params: Params, shards: str) -> None:
    """``--shards``, the shard folder DVC tracks (deploy/dvc-run.yaml), must be the one the params
    train on: otherwise a re-shard would not rerun the stages that read it."""
    own = params.train("pretrain").shards
    if shards and shards.rstrip("/") != own.rstrip("/"):
        raise ValueError(f"--shards {shards} is not {params.where}'s train.shards {own}: make them agree")


def connect(address: str):
    """A job client of the cluster at ``address``; a cluster with token authentication that refuses
    this client is a clear error, naming the settings that carry its token."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        reason = str(e).splitlines()[0]
        raise RuntimeError(
            f"the job server at {address} refused this client ({reason}): the cluster runs Ray's token "
            "authentication; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to its token"
        ) from e


def job_status(client, sid: str) -> str | None:
    """The job's status, or None when no job has this id."""
    try:
        return str(client.get_job_status(sid)).split(".")[-1]
    except RuntimeError as e:  # the SDK raises RuntimeError("... does not exist") for an unknown id
        if "does not exist" in str(e) or "not found" in str(e).lower():
            return None
        raise


def staging_dir(params_file: Path) -> Path:
    """The job's working_dir: the params file alone (the cluster's image holds the project)."""
    folder = Path(tempfile.mkdtemp(prefix="bireal-submit-"))
    shutil.copyfile(params_file, folder / "params.yaml")
    return folder


def job_env(params: Params) -> dict[str, str]:
    """The job's environment: the pipeline run's name, the same on every retry, and the tracking
    server where it came from this machine's ``$MLFLOW_TRACKING_URI`` (the copied params file
    leaves it empty, and the job's own load would not find it)."""
    env = {"BIREAL_PIPELINE_RUN": params.group}
    if params.mlflow.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = params.mlflow.tracking_uri
    return env


def submit_job(client, params: Params, stages: list[str], python: str) -> str:
    sid = submission_id(params, stages)
    restart = " --restart" if params.restart else ""  # the job may replace a run whose inputs changed
    folder = staging_dir(Path(params.path))
    try:  # Ray uploads the working_dir during the call
        client.submit_job(
            entrypoint=(
                f"{python} -m pipeline.cli run {' '.join(stages)} --params params.yaml "
                f"--summaries-to {summaries_location(params, stages)}{restart}"
            ),
            submission_id=sid,
            runtime_env={
                "working_dir": str(folder),
                "env_vars": job_env(params),
            },
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return sid


def submitted(client, params: Params, stages: list[str], python: str) -> bool:
    """Submit the stages' job; -> False when a job of its id already exists (two submitters raced)."""
    try:
        submit_job(client, params, stages, python)
    except RuntimeError as e:  # the job server refuses a second job of one submission id
        if "already exists" not in str(e):
            raise
        return False
    return True


def follow(client, sid: str, timeout_s: float | None, echo=print, poll_s: float = 1.0) -> str:
    """Stream the job's log as it grows (the SDK's ``tail_job_logs``: each chunk once, where polling
    the whole log would be quadratic over a days-long job), echoing whole lines, until the job
    ends; -> its final status."""
    import asyncio

    async def stream():
        partial = ""
        async for chunk in client.tail_job_logs(sid):
            *lines, partial = (partial + chunk).split("\n")
            for line in lines:
                echo(f"[{sid}] {line}")
        if partial:
            echo(f"[{sid}] {partial}")

    failure: list[BaseException] = []

    def run():  # a loop of its own, in a thread of its own: callers may be inside one (Prefect)
        try:
            asyncio.run(asyncio.wait_for(stream(), timeout_s))
        except BaseException as e:
            failure.append(e)

    streamer = threading.Thread(target=run, name=f"tail-{sid}")
    streamer.start()
    streamer.join()
    if failure and isinstance(failure[0], (asyncio.TimeoutError, TimeoutError)):
        raise TimeoutError(
            f"job {sid} still running after {timeout_s:.0f} s (it keeps running; submit again to attach)"
        ) from None
    if failure:
        raise failure[0]
    status = job_status(client, sid)
    while status not in TERMINAL:  # the stream closes as the job ends; its status may lag a moment
        time.sleep(poll_s)
        status = job_status(client, sid)
    return status


def dashboard_link(address: str, sid: str) -> str:
    """The job's page in the Ray dashboard (the address is the job server's, the dashboard's own)."""
    return f"{address.rstrip('/')}/#/jobs/{sid}"


def stage_summaries(params: Params, stages: list[str]) -> dict[str, dict]:
    """Each stage's summary, as the job wrote it to shared storage (``summaries_location``)."""
    location = summaries_location(params, stages)
    summaries = {}
    for stage in stages:
        uri = storage.join(location, f"{stage}.json")
        if not storage.exists(uri):
            raise FileNotFoundError(f"the job succeeded but wrote no summary of {stage} at {uri}")
        summaries[stage] = json.loads(storage.read_text(uri))
    return summaries


def pointers(params: Params, stage: str) -> dict[str, dict]:
    """Each checkpoint the stage published -> {uri, sha256} (read from the store's .sha256)."""
    from ..segments import published_names

    if stage not in TRAINING:
        return {}
    config = params.train(stage, tuned=False)
    if not config.artifacts:
        return {}
    out = {}
    for name in published_names(config):
        uri = storage.join(config.artifacts, f"{name}.safetensors")
        out[name] = {"uri": uri, "sha256": storage.read_text(f"{uri}.sha256").strip()}
    return out


def write_outputs(out: Path, summaries: dict[str, dict], refs: dict[str, dict], summaries_dir: Path | None = None):
    """The summaries into ``summaries_dir`` (default ``out``), with a training stage's epochs
    beside its summary as ``<stage>.csv`` (the curves deploy/dvc.yaml plots), the pointers into
    ``out``."""
    summaries_dir = summaries_dir or out
    for folder in (out, summaries_dir):
        folder.mkdir(parents=True, exist_ok=True)
    written = []
    for stage, summary in summaries.items():
        written.append(summaries_dir / f"{stage}.json")
        storage.write_text(str(written[-1]), json.dumps(summary, indent=2, default=str) + "\n")
        if stage in TRAINING:  # a skipped pretrain's curve has no rows
            written.append(summaries_dir / f"{stage}.csv")
            write_epoch_curve(summary.get("history", []), str(written[-1]))
    for name, ref in refs.items():
        written.append(out / f"{name}.pointer.json")
        storage.write_text(str(written[-1]), json.dumps(ref, indent=2) + "\n")
    return written


def skipped_pretrain(sid: str, out: str | Path, summaries_dir: Path | None, echo) -> dict:
    """A from-scratch recipe's pretrain: no job, a summary (and an empty curve) saying so."""
    summaries = {"pretrain": {"skipped": "the recipe trains no real-valued twin"}}
    files = write_outputs(Path(out), summaries, {}, summaries_dir)
    echo(f"bireal submit: {sid} skipped: the recipe has no pretrain stage")
    return {
        "id": sid,
        "action": "skipped",
        "status": "SKIPPED",
        "files": [str(f) for f in files],
        "summaries": summaries,
        "published": {},
    }


def start_or_attach(
    client, params: Params, stages: list[str], sid: str, resubmit: bool, python: str
) -> tuple[str | None, str]:
    """-> (the job's status before this call, what this call does: "submitted", "attached" to a
    running job (or one another submitter started first), or "fetched" a finished one)."""
    status = job_status(client, sid)
    if status in ("FAILED", "STOPPED"):
        if not resubmit:
            raise RuntimeError(
                f"job {sid} is {status} and Ray does not reuse its id: run again with --resubmit (it deletes the "
                f"job; the stage resumes from its checkpoints in storage), or `ray job delete {sid}`"
            )
        client.delete_job(sid)
        status = None
    action = {None: "submitted", "SUCCEEDED": "fetched"}.get(status, "attached")
    if status is None and not submitted(client, params, stages, python):
        action = "attached"  # another submitter's job of this id went in first: follow that one
    return status, action


def submit(
    params: Params,
    stages: list[str] | str,
    address: str,
    out: str | Path = "submitted",
    resubmit: bool = False,
    python: str | None = None,
    poll_s: float = 2.0,
    timeout_s: float | None = None,
    echo=print,
    summaries_dir: str | Path | None = None,
) -> dict:
    """Submit (or attach to, or fetch) the stages' job; -> {"id", "action", "status", "files",
    "summaries": {stage: its summary}, "published": {stage: its checkpoints' pointers}}."""
    from ..profile_rules import trained_stages

    stages = [stages] if isinstance(stages, str) else list(stages)
    summaries_dir = Path(summaries_dir) if summaries_dir else None
    python = python or os.environ.get(PYTHON_ENV, "python")
    sid = submission_id(params, stages)
    if stages == ["pretrain"] and "pretrain" not in trained_stages(params):  # a from-scratch recipe
        return skipped_pretrain(sid, out, summaries_dir, echo)
    summaries_location(params, stages)  # no shared storage for the summaries: refused before any job
    client = connect(address)
    status, action = start_or_attach(client, params, stages, sid, resubmit, python)
    echo(f"bireal submit: {action} {sid} at {address} ({dashboard_link(address, sid)})")
    final = status if action == "fetched" else follow(client, sid, timeout_s, echo=echo, poll_s=poll_s)
    if final != "SUCCEEDED":
        tail = "\n".join(client.get_job_logs(sid).splitlines()[-20:])
        raise RuntimeError(f"job {sid} ended {final}; the end of its log:\n{tail}")
    published = {stage: pointers(params, stage) for stage in stages}
    refs = {name: ref for stage_refs in published.values() for name, ref in stage_refs.items()}
    summaries = stage_summaries(params, stages)
    files = write_outputs(Path(out), summaries, refs, summaries_dir)
    return {
        "id": sid,
        "action": action,
        "status": final,
        "files": [str(f) for f in files],
        "summaries": summaries,
        "published": published,  # {stage: {checkpoint name: {uri, sha256}}}
    }
