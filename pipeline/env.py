"""Offline, quiet defaults for Ray, MLflow, Prefect and DVC (loopback-only ones for a local Ray).

Applied by the ``bireal`` CLI and the test suite (users run the CLI directly, not through make).
``setdefault`` only: a user's own setting always wins. PREFECT_API_URL is deliberately NOT set
here: without a server a flow must still run directly (Prefect then starts an ephemeral API).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

OFFLINE_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage reporting
    "MLFLOW_DISABLE_TELEMETRY": "true",  # mlflow ignores DO_NOT_TRACK
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_API_HOST": "127.0.0.1",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "ITERATIVE_DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per downloaded file while registering
}


# Only for a Ray instance this process starts itself (one machine): bind loopback. On a cluster
# they would break it: `ray start --address` aborts under the first, gloo needs a real NIC.
# A cluster's clients (`bireal submit`, the flow, a job's driver) keep Ray's own token settings:
# RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (docs/cluster.md, security).
LOCAL_RAY_DEFAULTS = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # makes every Ray process bind 127.0.0.1
    "GLOO_SOCKET_IFNAME": "lo",  # gloo collectives over loopback
    "RAY_AUTH_MODE": "disabled",  # loopback only; else Ray 2.60 would write ~/.ray/auth_token
    # Ray renices its workers to 15 so that on a dedicated node they yield to its raylet; on a
    # shared machine that puts training behind every other busy process (the demo pipeline ran
    # ~5x slower beside two CPU-bound processes at nice 0). Training keeps the CLI's own priority.
    "RAY_worker_niceness": "0",
}


def apply_local_ray_defaults() -> None:
    for key, value in LOCAL_RAY_DEFAULTS.items():
        os.environ.setdefault(key, value)


def project_root() -> Path:
    """The checkout this package lives in (state such as PREFECT_HOME stays inside it)."""
    return Path(__file__).resolve().parent.parent


def apply_offline_defaults() -> None:
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(project_root() / ".prefect"))


def verbose() -> bool:
    """``bireal --verbose`` (``BIREAL_VERBOSE=1``): Ray's, Tune's and MLflow's own output on the
    terminal too. Without it the stages print the project's tables; the frameworks' logs stay in
    their log files (Ray's session folder, MLflow's runs)."""
    return os.environ.get("BIREAL_VERBOSE", "") not in ("", "0")


def quiet_framework_logs() -> None:
    """Unless verbose: MLflow's INFO lines (its database set-up, its system-metrics monitor starting
    and stopping) off the terminal, in this process and the ones it starts (Ray's local workers
    included): MLflow reads ``MLFLOW_LOGGING_LEVEL`` when it is imported. A user's own setting wins."""
    if not verbose():
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


@contextlib.contextmanager
def framework_output_quiet():
    """Hide what a framework prints (stdout and stderr: MLflow's registry messages go to stderr), its
    INFO logs and its UserWarnings, unless verbose. Our own errors are raised, not printed."""
    if verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in ("mlflow", "ray.tune", "ray.train")]
    levels = [lg.level for lg in loggers]
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore", UserWarning)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
