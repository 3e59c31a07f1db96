"""A loopback S3 server for the tests: moto's S3 backend served on 127.0.0.1, counting requests.

Every request is recorded as ``(method, kind)`` where kind is ``list`` (a bucket listing),
``head``/``get``/``put``/``delete`` of an object, ``copy`` or ``multipart``; a test reads the
counts of a phase with :meth:`LoopbackS3.take`. Processes started by a test (the CLI, Ray
workers) reach it through the environment of :meth:`LoopbackS3.env`.
"""

from __future__ import annotations

import threading
from collections import Counter
from urllib.parse import parse_qs

REGION = "us-east-1"
ACCESS_KEY = "loopback"
SECRET_KEY = "loopback-secret"
#: user-agent mark of the test's own client (:meth:`LoopbackS3.filesystem`), whose requests are not counted
OBSERVER = "laionbuild-test-observer"


class _Counting:
    """WSGI middleware: counts each request by kind and object key before moto answers it."""

    def __init__(self, app):
        self.app = app
        self.lock = threading.Lock()
        self.kinds: Counter = Counter()
        self.keys: Counter = Counter()

    def __call__(self, environ, start_response):
        if OBSERVER in environ.get("HTTP_USER_AGENT", ""):  # the test looking: not counted
            return self.app(environ, start_response)
        method = environ.get("REQUEST_METHOD", "")
        parts = environ.get("PATH_INFO", "/").lstrip("/").split("/", 1)
        key = parts[1] if len(parts) > 1 else ""
        query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if "uploads" in query or "uploadId" in query:
            kind = "multipart"
        elif not key:
            kind = "list" if method == "GET" else f"bucket-{method.lower()}"
        elif method == "PUT" and environ.get("HTTP_X_AMZ_COPY_SOURCE"):
            kind = "copy"
        else:
            kind = method.lower()
        with self.lock:
            self.kinds[kind] += 1
            if key:
                self.keys[(kind, key)] += 1
        return self.app(environ, start_response)


class LoopbackS3:
    """``with LoopbackS3() as s3:`` a fresh S3 endpoint on 127.0.0.1 (a free port)."""

    def __init__(self):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import WSGIRequestHandler, make_server

        class _Quiet(WSGIRequestHandler):
            def log_request(self, *args, **kwargs) -> None:  # the counts are the log
                pass

        self.counter = _Counting(DomainDispatcherApplication(create_backend_app))
        self._server = make_server("127.0.0.1", 0, self.counter, threaded=True, request_handler=_Quiet)
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackS3":
        import urllib.request

        self._thread.start()
        # moto keeps its buckets in process-wide state: without a reset, a server started after
        # another one in the same process would hold that one's buckets
        reset = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST",
                                       headers={"User-Agent": OBSERVER})  # not counted
        urllib.request.urlopen(reset, timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._thread.join()

    def env(self) -> dict[str, str]:
        """Environment variables that point boto / s3fs (and so every child process) at this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ENDPOINT_URL_S3": self.endpoint}

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, config=Config(user_agent_extra=OBSERVER))

    def layout(self, url: str):
        """An :class:`~laionbuild.output.layout.OutputLayout` that reads through the uncounted client."""
        from laionbuild.output.layout import OutputLayout

        layout = OutputLayout(url)
        layout.fs = self.filesystem()
        return layout

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint,
                                 client_kwargs={"region_name": REGION}, skip_instance_cache=True,
                                 use_listings_cache=False, config_kwargs={"user_agent_extra": OBSERVER})

    def take(self) -> Counter:
        """The requests counted since the last call, by kind (and resets the count)."""
        with self.counter.lock:
            out = Counter(self.counter.kinds)
            self.counter.kinds.clear()
            self.counter.keys.clear()
        return out

    def keys(self) -> Counter:
        with self.counter.lock:
            return Counter(self.counter.keys)


def s3_environment(s3: LoopbackS3):
    """Point this process (and its children) at ``s3`` until the returned context ends."""
    import contextlib
    import os

    @contextlib.contextmanager
    def ctx():
        import s3fs

        saved = {k: os.environ.get(k) for k in s3.env()}
        os.environ.update(s3.env())
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made for another server
        try:
            yield s3
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return ctx()


def output_location(kind: str, tmp_path, bucket: str):
    """A context giving an output folder of ``kind``: ``local`` (under ``tmp_path``) or ``s3`` (a bucket
    of a fresh loopback server, this process pointed at it)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        if kind == "local":
            yield str(tmp_path / "out")
            return
        with LoopbackS3() as s3, s3_environment(s3):
            s3.client().create_bucket(Bucket=bucket)
            yield f"s3://{bucket}/out"

    return ctx()
