"""An in-memory Google Cloud Storage for tests: one store of objects, reached two ways.

- by `etils.epath` (everything the project writes itself, Grain's iterator files, Orbax's
  metadata) through an fsspec file system registered for `gs://`, with an object store's
  semantics: no directories (a "directory" is a name prefix), no append, no atomic rename;
- by TensorStore (Orbax's arrays) and google-cloud-storage (Orbax asks it about the bucket's
  layout) over HTTP, through a loopback server speaking the part of the GCS JSON API they use,
  pointed at with the environment variables both libraries honour for emulators.

    with fake_gcs() as bucket:   # gs://<any bucket>/... now lands in `bucket.objects`
        ...

Everything else about a real bucket (authentication, latency, eventual listing, quotas) is
not modelled.
"""
from __future__ import annotations

import contextlib
import http.server
import importlib
import io
import itertools
import json
import os
import re
import threading
import urllib.parse
from typing import Iterator

import fsspec
from etils.epath import backend as epath_backend, gpath as epath_gpath


class Store:
    """Objects by full name ('bucket/path/to/object') -> (bytes, generation)."""

    def __init__(self):
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.lock = threading.Lock()
        self._generations = itertools.count(1)

    def put(self, name: str, data: bytes) -> int:
        with self.lock:
            generation = next(self._generations)
            self.objects[name] = (bytes(data), generation)
            return generation

    def get(self, name: str) -> tuple[bytes, int] | None:
        with self.lock:
            return self.objects.get(name)

    def delete(self, name: str) -> bool:
        with self.lock:
            return self.objects.pop(name, None) is not None

    def names(self, prefix: str = "") -> list[str]:
        with self.lock:
            return sorted(n for n in self.objects if n.startswith(prefix))


class _Upload(io.BytesIO):
    """A file being written: the object appears, whole, when it is closed (as on GCS)."""

    def __init__(self, store: Store, name: str):
        super().__init__()
        self._store, self._name = store, name

    def close(self):
        if not self.closed:
            self._store.put(self._name, self.getvalue())
        super().close()


class ObjectStoreFileSystem(fsspec.AbstractFileSystem):
    """fsspec over `Store` with GCS's semantics (see the module doc)."""

    protocol = ("gs", "gcs")
    cachable = False
    store: Store  # set by `fake_gcs`

    def __init__(self, *args, **kwargs):  # epath passes GCS options (finalize_on_close)
        super().__init__()

    @classmethod
    def _strip_protocol(cls, path):
        path = os.fspath(path) if not isinstance(path, str) else path
        path = re.sub(r"^(gs|gcs)://", "", path)
        return path.strip("/")

    def _is_dir(self, path: str) -> bool:
        return "/" not in path or bool(self.store.names(path + "/"))  # a bucket, or a prefix

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        found = self.store.get(path)
        if found is not None:
            return {"name": path, "size": len(found[0]), "type": "file"}
        if path and self._is_dir(path):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        if self.store.get(path) is not None:
            entries = [self.info(path)]
        else:
            below = {}
            for name in self.store.names(path + "/"):
                child = name[len(path) + 1:].split("/")[0]
                full = f"{path}/{child}"
                below[full] = self.info(full)
            if not below and not self._is_dir(path):
                raise FileNotFoundError(path)
            entries = list(below.values())
        return entries if detail else [e["name"] for e in entries]

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if "a" in mode:
            raise NotImplementedError(f"gs://{path}: objects cannot be appended to")
        if "w" in mode or "x" in mode:
            return _Upload(self.store, path)
        found = self.store.get(path)
        if found is None:
            raise FileNotFoundError(path)
        return io.BytesIO(found[0])

    def cp_file(self, path1, path2, **kwargs):
        data = self.store.get(self._strip_protocol(path1))
        if data is None:
            if self._is_dir(self._strip_protocol(path1)):
                return  # a prefix: its objects are copied one by one
            raise FileNotFoundError(path1)
        self.store.put(self._strip_protocol(path2), data[0])

    def rm_file(self, path):
        path = self._strip_protocol(path)
        if not self.store.delete(path) and not self._is_dir(path):
            raise FileNotFoundError(path)

    def _rm(self, path):
        self.rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None):
        path = self._strip_protocol(path)
        if recursive:
            for name in self.store.names(path + "/"):
                self.store.delete(name)
        self.store.delete(path)

    def mkdir(self, path, create_parents=True, **kwargs):
        pass  # no directories in an object store

    def makedirs(self, path, exist_ok=False):
        pass

    def rmdir(self, path):
        pass


class _Handler(http.server.BaseHTTPRequestHandler):
    """The GCS JSON API calls of TensorStore's `gcs` driver and google-cloud-storage's
    `get_bucket`: object upload (media), read (whole or a byte range, with generation
    preconditions), delete, list; bucket metadata."""

    protocol_version = "HTTP/1.1"
    store: Store

    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, value) -> None:
        self._reply(code, json.dumps(value).encode(), {"Content-Type": "application/json"})

    def _route(self):
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        return urllib.parse.unquote(url.path), query

    @staticmethod
    def _metadata(bucket: str, name: str, data: bytes, generation: int) -> dict:
        return {"kind": "storage#object", "bucket": bucket, "name": name,
                "size": str(len(data)), "generation": str(generation), "metageneration": "1"}

    def _precondition_fails(self, query: dict, generation: int) -> bool:
        match, not_match = query.get("ifGenerationMatch"), query.get("ifGenerationNotMatch")
        return ((match is not None and int(match) != generation)
                or (not_match is not None and int(not_match) == generation))

    def do_POST(self):
        path, query = self._route()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        found = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path)
        if not found or query.get("uploadType") != "media":
            return self._json(501, {"error": f"not modelled: POST {self.path}"})
        bucket, name = found.group(1), query["name"]
        current = self.store.get(f"{bucket}/{name}")
        if self._precondition_fails(query, current[1] if current else 0):
            return self._json(412, {"error": "precondition failed"})
        generation = self.store.put(f"{bucket}/{name}", body)
        self._json(200, self._metadata(bucket, name, body, generation))

    def do_GET(self):
        path, query = self._route()
        if found := re.fullmatch(r"/storage/v1/b/([^/]+)", path):
            return self._json(200, {"kind": "storage#bucket", "name": found.group(1),
                                    "hierarchicalNamespace": {"enabled": False}})
        if found := re.fullmatch(r"/storage/v1/b/([^/]+)/o", path):
            return self._list(found.group(1), query)
        if not (found := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)):
            return self._json(501, {"error": f"not modelled: GET {self.path}"})
        bucket, name = found.groups()
        current = self.store.get(f"{bucket}/{name}")
        if current is None:
            return self._json(404, {"error": "no such object"})
        data, generation = current
        if query.get("ifGenerationNotMatch") is not None and \
                int(query["ifGenerationNotMatch"]) == generation:
            return self._reply(304, headers={"x-goog-generation": str(generation)})
        if self._precondition_fails(query, generation):
            return self._json(412, {"error": "precondition failed"})
        if query.get("alt") != "media":
            return self._json(200, self._metadata(bucket, name, data, generation))
        headers = {"x-goog-generation": str(generation),
                   "Content-Type": "application/octet-stream"}
        if byte_range := re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "")):
            start, end = byte_range.groups()
            start = int(start) if start else max(len(data) - int(end), 0)
            end = min(int(end), len(data) - 1) if byte_range.group(1) and end else len(data) - 1
            if start >= len(data):  # as GCS answers a range past the object's end
                return self._json(416, {"error": "requested range not satisfiable"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._reply(206, data[start:end + 1], headers)
        self._reply(200, data, headers)

    def _list(self, bucket: str, query: dict) -> None:
        prefix = query.get("prefix", "")
        start, end = query.get("startOffset", ""), query.get("endOffset")
        items = []
        for full in self.store.names(f"{bucket}/{prefix}"):
            name = full[len(bucket) + 1:]
            if name >= start and (end is None or name < end):
                data, generation = self.store.get(full) or (b"", 0)
                items.append(self._metadata(bucket, name, data, generation))
        self._json(200, {"kind": "storage#objects", "items": items})

    def do_DELETE(self):
        path, query = self._route()
        if not (found := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path)):
            return self._json(501, {"error": f"not modelled: DELETE {self.path}"})
        full = "/".join(found.groups())
        current = self.store.get(full)
        if current is None:
            return self._json(404, {"error": "no such object"})
        if self._precondition_fails(query, current[1]):
            return self._json(412, {"error": "precondition failed"})
        self.store.delete(full)
        self._reply(204)


@contextlib.contextmanager
def fake_gcs() -> Iterator[Store]:
    """gs:// paths served from memory for epath, TensorStore and google-cloud-storage; the
    environment and registrations it changes are restored on exit."""
    store = Store()
    handler = type("Handler", (_Handler,), {"store": store})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_port}"
    environment = {
        "EPATH_USE_TF": "false",  # gs:// through fsspec (below), not TensorFlow's GCS client
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",  # TensorStore skips looking for credentials
        "STORAGE_EMULATOR_HOST": url,  # google-cloud-storage: this server, anonymous
    }
    saved_env = {key: os.environ.get(key) for key in environment}
    filesystem = type("Filesystem", (ObjectStoreFileSystem,), {"store": store})
    saved_fs = {p: fsspec.registry.get(p) for p in ObjectStoreFileSystem.protocol}
    os.environ.update(environment)
    for protocol in ObjectStoreFileSystem.protocol:
        fsspec.register_implementation(protocol, filesystem, clobber=True)
    _forget_backend_choices()
    try:
        yield store
    finally:
        server.shutdown()
        server.server_close()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        registered = importlib.import_module("fsspec.registry")._registry
        for protocol, previous in saved_fs.items():
            if previous is None:
                registered.pop(protocol, None)
            else:
                registered[protocol] = previous
        _forget_backend_choices()


def _forget_backend_choices() -> None:
    """epath caches whether it may use TensorFlow and the fsspec file systems it opened."""
    epath_gpath._is_tf_installed.cache_clear()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
