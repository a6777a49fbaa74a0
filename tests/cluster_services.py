"""Real services for the cluster suite, all on loopback, each a process of its own.

- ``S3``: moto's server (``moto_server``), a process so that a test can SIGSTOP it.
- ``Postgres``: initdb in a temp folder owned by the postgres user (it refuses to run as root),
  ``pg_ctl`` on a free port, fsync off.
- ``MlflowServer``: ``mlflow server`` with the PostgreSQL backend store and S3 artifacts.
- ``RayCluster``: the head in this mount namespace with 0 CPUs (so no training worker lands on the
  driver's node); each worker node in its own mount namespace (``unshare -m``) with tmpfs over its
  Ray temp folder and over the driver's work folder, at its own loopback address 127.0.0.N (Ray
  Train groups workers into nodes by IP). A node is killed through its own processes, found by
  their mount namespace; never with ``ray stop``, which stops every Ray process on the host.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not up after {timeout:.0f} s\n{tail}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def stop(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGCONT)  # a test may have stopped it
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class S3:
    # moto accepts any credentials; every process of the suite (and its children) gets these
    CREDENTIALS = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }

    def __init__(self, root: Path, bucket: str = "bireal"):
        os.environ.update(self.CREDENTIALS)
        self.port, self.bucket = free_port(), bucket
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "moto.log"
        self.proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: port_open(self.port), 30, "moto_server", self.log)
        self.client().create_bucket(Bucket=bucket)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def empty(self) -> int:
        """Delete every object (moto keeps them in its own memory); -> how many there were."""
        keys, client = self.keys(), self.client()
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
        return len(keys)

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None where there is none."""
        client = self.client()
        try:
            return client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None

    def close(self) -> None:
        stop(self.proc)


class Postgres:
    def __init__(self, root: Path):
        if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
            raise RuntimeError("PostgreSQL's initdb/pg_ctl are not on PATH")
        self.dir = Path(tempfile.mkdtemp(prefix="bireal-pg-"))  # short: its socket lives here
        self.port = free_port()
        run_as = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        if run_as:
            shutil.chown(self.dir, "postgres", "postgres")
        self.log = root / "postgres.log"
        data = self.dir / "data"
        subprocess.run(
            [*run_as, "initdb", "--auth=trust", "-U", "postgres", "-D", str(data)], check=True, capture_output=True
        )
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c fsync=off -k {self.dir}"
        subprocess.run(
            [*run_as, "pg_ctl", "-D", str(data), "-o", options, "-l", str(self.dir / "server.log"), "-w", "start"],
            check=True,
            capture_output=True,
        )
        self._run_as, self._data = run_as, data
        self.uri = f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def close(self) -> None:
        subprocess.run([*self._run_as, "pg_ctl", "-D", str(self._data), "-m", "immediate", "stop"], capture_output=True)
        log = self.dir / "server.log"
        if log.exists():
            shutil.copyfile(log, self.log)
        shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    def __init__(self, root: Path, backend: str, artifacts: str, s3_endpoint: str):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"
        # no server-side job runners (7 huey consumers, ~1.2 GB): the pipeline submits no server jobs
        env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--workers",
                "1",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                backend,
                "--artifacts-destination",
                artifacts,
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
            start_new_session=True,
        )
        wait_for(lambda: _http_ok(f"{self.uri}/health"), 120, "mlflow server", self.log)

    def close(self) -> None:
        stop(self.proc)


def _http_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def cluster_env() -> dict[str, str]:
    """The environment for cluster processes: without the single-machine loopback settings
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes `ray start --address` abort)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    env["GLOO_SOCKET_IFNAME"] = "lo"  # every node is on loopback here
    return env


class RayCluster:
    """A head (0 CPUs) and worker nodes, each worker node in its own mount namespace."""

    def __init__(self, root: Path, hidden: list[Path]):
        self.root, self.hidden = root, hidden
        self.base = Path(tempfile.mkdtemp(prefix="brc-", dir="/tmp"))  # short: AF_UNIX paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        self._next_ip = 2
        head = subprocess.run(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--num-cpus",
                "0",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--temp-dir",
                str(self.base / "head"),
                "--include-dashboard",
                "false",
                "--dashboard-agent-listen-port",
                "0",
                "--object-store-memory",
                "100000000",
                "--disable-usage-stats",
            ],
            env=cluster_env(),
            capture_output=True,
            text=True,
        )
        if head.returncode != 0:
            raise RuntimeError(f"ray start --head failed:\n{head.stdout[-2000:]}\n{head.stderr[-2000:]}")

    def add_node(self, cpus: int = 1, gpus: int = 0) -> str:
        """Start a worker node in a new mount namespace; -> its IP."""
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        temp = self.base / ip.rsplit(".", 1)[1]
        temp.mkdir()
        mounts = " && ".join(f"mount -t tmpfs tmpfs {p}" for p in [temp, *self.hidden])
        # No --block: the ray CLI (~80 MB) exits once the node runs, and `sleep` stays as the
        # namespace's process for Popen (killed with the node). No log monitor: Ray wants one per
        # physical host, and the head's is this host's.
        start = (
            f"{BIN / 'ray'} start --address {self.address} --node-ip-address {ip} --num-cpus {cpus} "
            f"--num-gpus {gpus} --temp-dir {temp} --dashboard-agent-listen-port 0 --include-log-monitor false "
            f"--object-store-memory 100000000 --disable-usage-stats && exec sleep infinity"
        )
        log = self.root / f"node-{ip}.log"
        self.nodes[ip] = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{mounts} && {start}"],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=cluster_env(),
            start_new_session=True,
        )
        wait_for(lambda: ip in self.alive_ips(), 90, f"ray node {ip}", log)
        return ip

    def alive_ips(self) -> set[str]:
        out = subprocess.run(
            [
                str(BIN / "python"),
                "-c",
                "import ray, json; ray.init(address='%s', log_to_driver=False);"
                "print(json.dumps([n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']]))" % self.address,
            ],
            env=cluster_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        import json

        return set(json.loads(out.stdout.strip().splitlines()[-1])) if out.returncode == 0 else set()

    def node_pids(self, ip: str) -> list[int]:
        """Every process in the node's mount namespace (its raylet, workers, their children)."""
        proc = self.nodes[ip]
        ns = os.readlink(f"/proc/{proc.pid}/ns/mnt")
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.readlink(entry / "ns" / "mnt") == ns:
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    def processes(self, comm_prefix: str) -> list[int]:
        """PIDs on the live worker nodes whose program name starts with ``comm_prefix``
        (Ray names its actors' processes ``ray::<Class>``, cut to 15 characters)."""
        found = []
        for ip, proc in self.nodes.items():
            if proc.poll() is None:
                for pid in self.node_pids(ip):
                    try:
                        if Path(f"/proc/{pid}/comm").read_text().startswith(comm_prefix):
                            found.append(pid)
                    except OSError:
                        pass
        return found

    def kill_node(self, ip: str) -> None:
        for pid in self.node_pids(ip):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.nodes[ip].wait(timeout=30)

    def close(self) -> None:
        for ip in list(self.nodes):
            if self.nodes[ip].poll() is None:
                self.kill_node(ip)
        # the head's processes name its temp folder; `ray stop` would stop every Ray on the host
        subprocess.run(["pkill", "-9", "-f", str(self.base / "head")], capture_output=True)
        shutil.rmtree(self.base, ignore_errors=True)
