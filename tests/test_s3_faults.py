"""An S3 store that answers 503/500 or stalls, through a fault-injecting proxy in front of moto's
server: every S3 client of the pipeline (s3fs for shards, publish, fetch and manifests; pyarrow
for Ray's storage) retries with backoff within ``storage.request_timeout_s`` and its retry budget,
and the operation succeeds; the proxy counts the faults it injected, so the test fails if none
landed. A scaled clock: a 2 s request timeout, 5 s stalls."""

from __future__ import annotations

import http.client
import http.server
import threading
import time

import pytest
from cluster_services import S3, stop

from pipeline import storage

pytestmark = pytest.mark.services


class FaultProxy:
    """Forwards HTTP to ``upstream``; answers the first ``fail_first`` attempts of every distinct
    request (method and URL) with ``status`` instead (an S3 error document), so each operation
    fails that often before it can succeed, and holds the first ``stalls`` responses for
    ``stall_s`` before forwarding them."""

    def __init__(self, upstream_port: int, fail_first: int = 0, status: int = 503, stalls: int = 0, stall_s: float = 0):
        self.fail_first, self.status, self.stalls, self.stall_s = fail_first, status, stalls, stall_s
        self.requests = self.injected = self.stalled = 0
        self.attempts: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                """The request body as sent: Content-Length bytes, or a chunked stream verbatim
                (pyarrow's S3 client streams uploads with aws-chunked encoding)."""
                if "chunked" not in (self.headers.get("Transfer-Encoding") or ""):
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, then the blank line
                            trailer = self.rfile.readline()
                            raw += trailer
                            if trailer in (b"\r\n", b"\n", b""):
                                return raw
                    raw += self.rfile.read(size + 2)  # the chunk and its CRLF

            def _forward(self):
                body = self._body()
                with proxy.lock:
                    proxy.requests += 1
                    key = (self.command, self.path)
                    proxy.attempts[key] = proxy.attempts.get(key, 0) + 1
                    fail = proxy.attempts[key] <= proxy.fail_first
                    stall = proxy.stalled < proxy.stalls
                    proxy.injected += bool(fail)
                    proxy.stalled += bool(stall and not fail)
                if fail:
                    error = f"<Error><Code>{'SlowDown' if proxy.status == 503 else 'InternalError'}</Code></Error>"
                    self.send_response(proxy.status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error.encode())
                    return
                if stall:
                    time.sleep(proxy.stall_s)  # longer than the client's timeout: it gives up, retries
                upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=30)
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() != "expect":  # the 100-continue was this proxy's to answer
                        upstream.putheader(key, value)
                upstream.endheaders(body)
                reply = upstream.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for key, value in reply.getheaders():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                # a HEAD's length is the object's, as upstream said; otherwise the body's
                length = reply.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    import os

    saved = dict(os.environ)
    s3 = S3(tmp_path_factory.mktemp("moto_faults"), bucket="faults")
    yield s3
    stop(s3.proc)
    os.environ.clear()
    os.environ.update(saved)


def _through(proxy: FaultProxy, monkeypatch, timeout_s: float = 2.0) -> None:
    monkeypatch.setenv(storage.ENDPOINT_ENV, proxy.url)
    monkeypatch.setenv(storage.TIMEOUT_ENV, str(timeout_s))
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # a client for this endpoint and timeout


@pytest.mark.parametrize("status", [503, 500])
def test_s3_errors_are_retried_and_every_operation_succeeds(moto, tmp_path, monkeypatch, status):
    proxy = FaultProxy(int(moto.url.rsplit(":", 1)[1]), fail_first=2, status=status)  # each fails twice first
    try:
        _through(proxy, monkeypatch)
        local = tmp_path / "model.safetensors"
        local.write_bytes(b"weights" * 5000)
        url = f"s3://faults/{status}/model.safetensors"
        digest = storage.publish(local, url)  # object, then its digest
        got = storage.fetch(url, tmp_path / "copy.safetensors")  # digest, object, checked
        assert got.read_bytes() == local.read_bytes() and storage.sha256_file(got) == digest
        assert storage.exists(url) and storage.read_text(f"{url}.sha256").strip() == digest
        fs, path = storage.pyarrow_filesystem(f"s3://faults/{status}/ray")  # Ray's storage client
        with fs.open_output_stream(f"{path}/checkpoint.bin") as out:
            out.write(b"ckpt" * 1000)
        with fs.open_input_stream(f"{path}/checkpoint.bin") as f:
            assert f.read() == b"ckpt" * 1000
    finally:
        proxy.close()
    assert proxy.injected >= 5, (proxy.injected, proxy.requests)  # the faults landed, and were retried


def test_a_stalled_answer_times_out_and_is_retried(moto, tmp_path, monkeypatch):
    proxy = FaultProxy(int(moto.url.rsplit(":", 1)[1]), stalls=2, stall_s=5.0)
    try:
        _through(proxy, monkeypatch, timeout_s=2.0)
        local = tmp_path / "shard.tar"
        local.write_bytes(b"tar" * 10000)
        start = time.monotonic()
        storage.publish(local, "s3://faults/stall/shard.tar")
        with storage.open_read("s3://faults/stall/shard.tar") as f:
            assert f.read() == local.read_bytes()
        took = time.monotonic() - start
    finally:
        proxy.close()
    assert proxy.stalled == 2 and took < 30, (proxy.stalled, took)  # stalled twice, waited out, done


def test_one_sharder_per_shard_folder_in_object_storage(moto, tmp_path, monkeypatch):
    """In object storage the shard folder's lease is an object beside it (a conditional write):
    a second sharder stops naming the first, and the lease is gone once the first is done."""
    import fsspec
    from imagegen import image_folder

    from pipeline.lease import LeaseHeld
    from pipeline.shard import ShardParams, shard_dataset, sharding_lease, verify_shards

    monkeypatch.setenv(storage.ENDPOINT_ENV, moto.url)
    fsspec.filesystem("s3").clear_instance_cache()
    src = image_folder(tmp_path / "src", per_class=(3, 1), classes=2)
    out = "s3://faults/one-sharder/shards"
    with sharding_lease(out, ""):
        with pytest.raises(LeaseHeld, match=r"run shards.sharding held by "):
            shard_dataset(str(src), out, ShardParams(processes=1), progress_bar=False)
    assert not storage.exists(f"{out}/manifest.json")
    shard_dataset(str(src), out, ShardParams(processes=1), progress_bar=False)
    assert verify_shards(out) == [] and not storage.exists("s3://faults/one-sharder/shards.sharding.lease.json")
