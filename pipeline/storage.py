"""Locations: every place the pipeline reads or writes (shards, stage outputs, checkpoints, Ray and
Tune results, MLflow artifacts) is a local path or a URL that fsspec opens (``s3://`` first).

One setting reaches every process: ``storage.endpoint_url`` (an S3-compatible store such as MinIO
or moto). The driver puts it in ``$BIREAL_S3_ENDPOINT_URL`` (``configure``); Ray workers get it
through the job's ``runtime_env``, DataLoader workers inherit it, and every open here passes it
explicitly (pyarrow, which Ray's storage uses, ignores endpoint environment variables).
Credentials are the store's usual ones (``AWS_*`` variables, instance roles): never settings.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import urllib.parse
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

ENDPOINT_ENV = "BIREAL_S3_ENDPOINT_URL"
TIMEOUT_ENV = "BIREAL_S3_TIMEOUT_S"  # one S3 request's timeout; a slower answer is retried with backoff
RETRIES = 10  # attempts per S3 request (AWS's standard retry mode: exponential backoff with jitter)
CACHE_ENV = "BIREAL_SHARD_CACHE"  # a per-node cache folder for remote shards ("" = none): shard_read.py
STAGE_WAIT_ENV = "BIREAL_SHARD_STAGE_WAIT_S"  # storage.stage_wait_s
DEFAULT_STAGE_WAIT_S = 600.0


def is_url(location: str) -> bool:
    """A remote location (``s3://``, ``gs://``, ``http://``, ...); ``file://`` and paths are local."""
    return "://" in location and not location.startswith("file://")


def is_local(location: str) -> bool:
    return not is_url(location) and not location.startswith("pipe:")


def absolute(location: str) -> str:
    """A URL as it is; a path made absolute (Ray workers and trial processes have their own cwd)."""
    if "://" in location:
        return location
    p = Path(location)
    return str(p if p.is_absolute() else (Path.cwd() / p).resolve())


def without_credentials(url: str) -> str:
    """``url`` as it may be printed, logged or written to a file: any ``user:password@`` taken out.
    MLflow's client (``http://user:password@host``) and database URLs accept credentials in the
    address; a message, a link or a run summary must not repeat them."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def scrub_credentials(text: str, url: str) -> str:
    """``text`` (an error message that may quote ``url``, as MLflow's client does) without the
    ``user:password@`` of ``url``."""
    netloc = urllib.parse.urlsplit(url).netloc
    userinfo = netloc.rpartition("@")[0]
    return text.replace(f"{userinfo}@", "") if userinfo else text


def has_password(value: object) -> bool:
    """Whether ``value`` is a URL with a password in it (``scheme://user:password@host``)."""
    if not isinstance(value, str) or "://" not in value:
        return False
    try:
        return urllib.parse.urlsplit(value).password is not None
    except ValueError:  # not a URL after all (an unbalanced '[' in the host)
        return False


def configure(
    endpoint_url: str = "", shard_cache: str = "", request_timeout_s: float = 0.0, stage_wait_s: float = 0.0
) -> dict[str, str]:
    """This process's (and its children's) storage settings; -> the env vars for Ray workers."""
    env = {}
    if endpoint_url:
        env[ENDPOINT_ENV] = endpoint_url
    if shard_cache:
        env[CACHE_ENV] = shard_cache
    if request_timeout_s:
        env[TIMEOUT_ENV] = str(request_timeout_s)
    if stage_wait_s:
        env[STAGE_WAIT_ENV] = str(stage_wait_s)
    os.environ.update(env)
    return env


def stage_wait_s() -> float:
    """How long a process waits for another one of its node staging a shard into the cache."""
    return float(os.environ.get(STAGE_WAIT_ENV, "") or DEFAULT_STAGE_WAIT_S)


def endpoint_url() -> str:
    return os.environ.get(ENDPOINT_ENV, "")


def request_timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV, "") or 60.0)


def options(location: str) -> dict:
    """fsspec keyword arguments for ``location``'s protocol: for S3 the endpoint, the request
    timeout and retries with backoff (a stalled store is waited out, not a failed stage)."""
    if not location.startswith("s3://"):
        return {}
    timeout = request_timeout_s()
    config = {
        "connect_timeout": min(timeout, 10.0),
        "read_timeout": timeout,
        "retries": {"max_attempts": RETRIES, "mode": "standard"},
    }
    return {"config_kwargs": config, **({"endpoint_url": endpoint_url()} if endpoint_url() else {})}


def filesystem(location: str):
    """(fsspec filesystem, path within it) for a location."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(location, **options(location))
    return fs, path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def open_read(location: str) -> IO[bytes]:
    """A binary stream: a local file, a ``pipe:`` command's stdout (webdataset's), or a remote
    object. Shards are opened through ``pipeline.shard_read.open_shard``, which adds the checks
    against the manifest and the per-node cache (``$BIREAL_SHARD_CACHE``)."""
    if location.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(location, "rb")
    if is_local(location):
        return open(location.removeprefix("file://"), "rb")
    import fsspec

    return fsspec.open(location, "rb", **options(location)).open()


def read_text(location: str) -> str:
    with open_read(location) as f:
        return f.read().decode()


def write_text(location: str, text: str) -> str:
    """Write ``text`` to a local file (whole or not at all: written beside it, then renamed) or a
    remote object (one PUT); -> ``location``."""
    if is_local(location):
        dest = Path(location.removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        with replacing(dest) as tmp:
            tmp.write_text(text)
        return location
    fs, path = filesystem(location)
    with fs.open(path, "wb") as f:
        f.write(text.encode())
    return location


def exists(location: str) -> bool:
    if is_local(location):
        return Path(location.removeprefix("file://")).exists()
    fs, path = filesystem(location)
    return fs.exists(path)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def publish(local: str | Path, location: str) -> str:
    """Copy a local file to ``location`` with its sha256 beside it (``<location>.sha256``), the
    digest last, so a reader that finds the digest finds a complete file; -> the digest."""
    digest = sha256_file(local)
    if is_local(location):
        dest = Path(location.removeprefix("file://"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        if Path(local).resolve() != dest.resolve():
            with replacing(dest) as tmp:
                shutil.copyfile(local, tmp)
        Path(f"{dest}.sha256").write_text(digest + "\n")
        return digest
    fs, path = filesystem(location)
    fs.put_file(str(local), path)
    with fs.open(f"{path}.sha256", "wb") as f:
        f.write((digest + "\n").encode())
    return digest


def new_partial(dest: Path, prefix: str | None = None) -> Path:
    """A new temporary file beside ``dest`` (named ``prefix``, default ``.<dest name>.``, a random
    part, ``.partial``) to write and then rename over ``dest``: a reader sees the whole file or
    none, and concurrent writers never share one. It is created as ``open`` creates files (0666
    less the umask), so the renamed file can be read by whom any file this process writes can
    (tempfile's are 0600: a fetched artifact a model server of another uid could not open)."""
    prefix = prefix if prefix is not None else f".{dest.name}."
    while True:
        tmp = dest.with_name(f"{prefix}{secrets.token_hex(6)}.partial")
        try:
            open(tmp, "xb").close()
            return tmp
        except FileExistsError:  # 2^-48 per try
            continue


@contextmanager
def replacing(dest: Path, prefix: str | None = None) -> Iterator[Path]:
    """A new partial file beside ``dest`` (``new_partial``) to write in the block; renamed over
    ``dest`` when the block ends, removed if it raises: ``dest`` is the old file or the whole new one."""
    tmp = new_partial(dest, prefix)
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fetch(location: str, local: str | Path) -> Path:
    """Copy a published file to ``local`` and check it against its sha256 (a torn or stale copy
    fails here, not as a confusing load error later)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    expected = read_text(f"{location}.sha256").strip()
    with replacing(local) as tmp:
        with open(tmp, "wb") as out, open_read(location) as src:
            shutil.copyfileobj(src, out)
        got = sha256_file(tmp)
        if got != expected:
            raise OSError(f"{location}: sha256 {got} does not match its published {expected}")
    return local


def pyarrow_filesystem(location: str):
    """(pyarrow filesystem, path) for Ray's ``storage_filesystem``: S3 with the endpoint passed
    explicitly, a request timeout and retries (pyarrow's defaults gave up within ~10 s of a stalled
    store); None for local paths (Ray's default)."""
    if not location.startswith("s3://"):
        return None, location
    from pyarrow import fs as pafs

    timeout = request_timeout_s()
    s3 = pafs.S3FileSystem(
        endpoint_override=endpoint_url() or None,
        request_timeout=timeout,
        connect_timeout=min(timeout, 10.0),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=RETRIES),
    )
    return s3, location.removeprefix("s3://")
