"""A fake Google Cloud Storage bucket on a local folder, for running commands on gs:// workdirs.

Three clients reach a bucket in this project, and each is pointed at the same folder ROOT
(object `gs://BUCKET/NAME` is the file ROOT/BUCKET/NAME):
- tensorstore, which writes and reads Orbax's arrays, speaks the GCS JSON API over HTTP: it is
  sent to `FakeGcsServer`, a small implementation of the requests it makes (media reads with
  ranges and generation preconditions, media uploads, deletes, prefix listings), through its
  own test settings `TENSORSTORE_GCS_HTTP_URL` and `GOOGLE_AUTH_TOKEN_FOR_TESTING`;
- google-cloud-storage, through which Orbax asks whether the bucket has a hierarchical
  namespace before listing checkpoints, goes to the same server (`STORAGE_EMULATOR_HOST`);
- etils epath, which reads and writes every other file (config.json, metrics.jsonl, Orbax's
  metadata, evaluation records), takes gs:// paths to a filesystem backend: in the child
  process `install` makes it use its fsspec backend (not TensorFlow's) with `gs` bound to the
  folder.
TensorFlow's own GCS filesystem has its endpoint compiled in (https://www.googleapis.com/...):
it cannot be pointed anywhere else, so the one writer that uses it, TensorBoard's event files
(CLU's SummaryWriter over tf.summary), is replaced in the child by a recorder of the logdir it
is given.

    python -m sove_jax.rehearsal.fake_gcs ROOT MODULE [ARGS...]  # `python -m MODULE ARGS` on ROOT

The pod rehearsal (`python -m sove_jax.rehearsal`) and the tests run commands on gs:// workdirs
through it; nothing of it is used by training itself.
"""
import http.server
import json
import os
import pathlib
import runpy
import sys
import threading
import time
import urllib.parse

SUMMARY_LOG = "summary_writer_logdirs.txt"  # in ROOT: the logdirs TensorBoard writers were given


# --- the server (tensorstore's side) -------------------------------------------------------------


def _generation(path: pathlib.Path) -> int:
  return path.stat().st_mtime_ns


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  root: pathlib.Path
  lock: threading.Lock

  def log_message(self, fmt, *args):  # quiet, unless FAKE_GCS_LOG names a file
    if os.environ.get("FAKE_GCS_LOG"):
      with open(os.environ["FAKE_GCS_LOG"], "a") as f:
        f.write(f"{time.time():.3f} {fmt % args}\n")

  # -- helpers ---------------------------------------------------------------------------------

  def _send(self, code: int, body: bytes = b"", headers=None, content_type="application/json"):
    self.send_response(code)
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, code: int, obj):
    self._send(code, json.dumps(obj).encode())

  def _parse(self):
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
    return url.path, query

  def _object(self, bucket: str, name: str) -> pathlib.Path:
    return self.root / bucket / name

  def _resource(self, bucket: str, name: str, path: pathlib.Path) -> dict:
    generation = str(_generation(path))
    return {"kind": "storage#object", "bucket": bucket, "name": name, "generation": generation,
            "metageneration": "1", "size": str(path.stat().st_size)}

  def _precondition(self, path: pathlib.Path, query) -> int | None:
    """The HTTP status a failed precondition answers, or None."""
    exists = path.is_file()
    generation = _generation(path) if exists else 0
    if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
      return 412
    if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
      return 304
    return None

  # -- requests --------------------------------------------------------------------------------

  def do_GET(self):
    path, query = self._parse()
    parts = path.split("/")
    # /storage/v1/b/BUCKET/o            (list)
    # /storage/v1/b/BUCKET/o/NAME       (metadata, or media with alt=media)
    if len(parts) == 5 and parts[1:4] == ["storage", "v1", "b"]:  # bucket metadata (Orbax asks)
      return self._json(200, {"kind": "storage#bucket", "name": parts[4], "id": parts[4],
                              "hierarchicalNamespace": {"enabled": False}})
    if len(parts) >= 6 and parts[1:4] == ["storage", "v1", "b"] and parts[5] == "o":
      bucket = parts[4]
      if len(parts) == 6 or (len(parts) == 7 and parts[6] == ""):
        return self._list(bucket, query)
      name = urllib.parse.unquote("/".join(parts[6:]))
      return self._read(bucket, name, query)
    self._json(404, {"error": {"code": 404, "message": f"no route {path}"}})

  do_HEAD = do_GET

  def _read(self, bucket, name, query):
    with self.lock:
      path = self._object(bucket, name)
      if not path.is_file():
        return self._json(404, {"error": {"code": 404, "message": "Not Found"}})
      status = self._precondition(path, query)
      if status is not None:
        return self._send(status)
      if query.get("alt") != "media":
        return self._json(200, self._resource(bucket, name, path))
      data = path.read_bytes()
      headers = {"x-goog-generation": str(_generation(path))}
    code = 200
    ranged = self.headers.get("Range")
    if ranged and ranged.startswith("bytes="):
      start, _, stop = ranged[len("bytes="):].partition("-")
      if start == "":  # suffix range: the last N bytes
        first, last = max(len(data) - int(stop), 0), len(data) - 1
      else:
        first, last = int(start), (int(stop) if stop else len(data) - 1)
      if first >= len(data) and len(data) > 0:
        return self._send(416, headers={"Content-Range": f"bytes */{len(data)}"})
      last = min(last, len(data) - 1)
      headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
      data, code = data[first:last + 1], 206
    self._send(code, data, headers, content_type="application/octet-stream")

  def _list(self, bucket, query):
    prefix = query.get("prefix", "")
    start, end = query.get("startOffset", ""), query.get("endOffset", "")
    base = self.root / bucket
    items = []
    with self.lock:
      if base.exists():
        for dirpath, _, files in os.walk(base):
          for f in files:
            path = pathlib.Path(dirpath) / f
            name = path.relative_to(base).as_posix()
            if name.startswith(prefix) and name >= start and (not end or name < end):
              items.append(self._resource(bucket, name, path))
    items.sort(key=lambda item: item["name"])
    self._json(200, {"kind": "storage#objects", "items": items})

  def do_POST(self):
    path, query = self._parse()
    parts = path.split("/")
    # /upload/storage/v1/b/BUCKET/o?uploadType=media&name=NAME
    if not (len(parts) >= 7 and parts[1:5] == ["upload", "storage", "v1", "b"]):
      return self._json(404, {"error": {"code": 404, "message": f"no route {path}"}})
    bucket, name = parts[5], query.get("name", "")
    length = int(self.headers.get("Content-Length", 0))
    data = self.rfile.read(length)
    with self.lock:
      target = self._object(bucket, name)
      status = self._precondition(target, query)
      if status is not None:
        return self._send(412 if status == 304 else status)
      old = _generation(target) if target.is_file() else 0
      target.parent.mkdir(parents=True, exist_ok=True)
      tmp = target.with_name(target.name + ".upload")
      tmp.write_bytes(data)
      os.replace(tmp, target)
      now = max(time.time_ns(), old + 1)  # generations strictly increase
      os.utime(target, ns=(now, now))
      self._json(200, self._resource(bucket, name, target))

  def do_DELETE(self):
    path, query = self._parse()
    parts = path.split("/")
    if not (len(parts) >= 7 and parts[1:4] == ["storage", "v1", "b"] and parts[5] == "o"):
      return self._json(404, {"error": {"code": 404, "message": f"no route {path}"}})
    bucket, name = parts[4], urllib.parse.unquote("/".join(parts[6:]))
    with self.lock:
      target = self._object(bucket, name)
      if not target.is_file():
        return self._json(404, {"error": {"code": 404, "message": "Not Found"}})
      status = self._precondition(target, query)
      if status is not None:
        return self._send(412 if status == 304 else status)
      target.unlink()
    self._send(204)


class FakeGcsServer:
  """The GCS JSON API over ROOT, on a local port, in a thread; `env` points tensorstore at it."""

  def __init__(self, root):
    handler = type("Handler", (_Handler,), {"root": pathlib.Path(root),
                                            "lock": threading.Lock()})
    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.server.daemon_threads = True
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

  @property
  def env(self) -> dict:
    host, port = self.server.server_address[:2]
    return {"TENSORSTORE_GCS_HTTP_URL": f"http://{host}:{port}",
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
            "STORAGE_EMULATOR_HOST": f"http://{host}:{port}"}

  def __enter__(self):
    self.thread.start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()


# --- the child process (epath's side) ------------------------------------------------------------


def install(root: str):
  """Binds gs:// in this process to ROOT for etils epath (fsspec backend) and records the
  logdirs TensorBoard writers are given."""
  import fsspec
  from fsspec.implementations.dirfs import DirFileSystem
  from fsspec.implementations.local import LocalFileSystem

  class FolderBucket(DirFileSystem):
    protocol = ("gs", "gcs")

    def __init__(self, *args, **kwargs):
      del args, kwargs
      super().__init__(path=str(root), fs=LocalFileSystem())

  fsspec.register_implementation("gs", FolderBucket, clobber=True)
  fsspec.register_implementation("gcs", FolderBucket, clobber=True)
  from etils.epath import gpath
  gpath._is_tf_installed = lambda: False  # epath would take gs:// to TensorFlow's filesystem

  from clu import metric_writers

  class RecordedSummaryWriter(metric_writers.MultiWriter):
    """Writes nothing; records the logdir (TensorFlow's GCS client cannot be redirected)."""

    def __init__(self, logdir, *args, **kwargs):
      del args, kwargs
      with open(os.path.join(root, SUMMARY_LOG), "a") as f:
        f.write(f"{logdir}\n")
      super().__init__([])

  metric_writers.SummaryWriter = RecordedSummaryWriter


if __name__ == "__main__":
  root, module, *args = sys.argv[1:]
  install(root)
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
