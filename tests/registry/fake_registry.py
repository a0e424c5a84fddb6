#!/usr/bin/python3
"""A hostile registry on 127.0.0.1 (plain http, anonymous) for the docker://
end-to-end tests (tests/broker/source/registry_pull_test.cc): it serves the images of
an OCI layout the test wrote, and the repository name says how it lies.

  /v2/                              200 {}
  /v2/MODE/manifests/REF            REF a tag of LAYOUT/index.json or a digest
  /v2/MODE/blobs/sha256:HEX         a blob of LAYOUT/blobs/sha256

MODE, for the manifest and config (any MODE not below serves them as stored):
  loop       manifests: 302 to themselves, forever
  schema1    manifests: a Docker schema 1 manifest (signed media type)
  big        manifests: 4 MiB + 1 byte, with its Content-Length
  endless    manifests: no Content-Length, bytes until the client hangs up
  badconfig  the config blob: one byte flipped (same size)
  configlast the config blob: answered only once a layer blob of the same MODE
             was asked for (within 10 s; else 404): a client that fetches the
             config before it starts the layers fails
  configgone the config blob: 404 once a layer blob of the same MODE was asked
             for (a config that fails while the layers download)
  ratelimit  manifests: 429 TOOMANYREQUESTS with Docker Hub's words and a
             Retry-After of 6 hours
  maintenance manifests: 503 with a Retry-After of 6 hours
MODE, for the last layer of each manifest (the others are served as stored):
  good       as stored
  drip       the right Content-Length, then the bytes at 4 bytes a second
  stall      the right Content-Length, 16 bytes, then nothing for 10 minutes
  long       no Content-Length (close-delimited): the bytes, then zeros forever
  short      a Content-Length of half the blob, and that half
  failahead  404, while the first layer drips at 4 bytes a second: the job
             must hear of it now, not when it reaches the last layer
  busy*      429 with "Retry-After: 1" the first two times it is asked for
             (counted per server and MODE: busy, busy-2, ...), then as stored

usage: fake_registry.py LAYOUT PORT_FILE   (writes the port once listening)
Python standard library only; run it with /usr/bin/python3 (uid 65534 too).
"""
import http.server
import json
import os
import sys
import threading
import time

LAYOUT = sys.argv[1]


def blob_path(digest):
    algo, _, hexpart = digest.partition(":")
    if algo != "sha256" or len(hexpart) != 64 or not all(c in "0123456789abcdef" for c in hexpart):
        return None
    return os.path.join(LAYOUT, "blobs", "sha256", hexpart)


def read_blob(digest):
    path = blob_path(digest)
    if path is None or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def tags_and_configs():
    """ref name -> descriptor; every config digest of every manifest; and the
    digests of each manifest's last and first layers."""
    with open(os.path.join(LAYOUT, "index.json"), "rb") as f:
        index = json.load(f)
    tags, configs, last, first, todo = {}, set(), set(), set(), list(index.get("manifests", []))
    for d in index.get("manifests", []):
        ref = d.get("annotations", {}).get("org.opencontainers.image.ref.name")
        if ref:
            tags[ref] = d
    while todo:
        d = todo.pop()
        doc = json.loads(read_blob(d["digest"]) or b"{}")
        if "config" in doc:
            configs.add(doc["config"]["digest"])
        if doc.get("layers"):
            last.add(doc["layers"][-1]["digest"])
            first.add(doc["layers"][0]["digest"])
        todo.extend(doc.get("manifests", []))
    return tags, configs, last, first


LAYER_ASKED_LOCK = threading.Lock()
LAYER_ASKED = {}  # mode -> threading.Event, set once a layer blob was asked for


def layer_asked(mode):
    with LAYER_ASKED_LOCK:
        return LAYER_ASKED.setdefault(mode, threading.Event())


BUSY_LOCK = threading.Lock()
BUSY_ANSWERS = {}  # (mode, digest) -> 429s given so far (modes busy*)


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send(self, code, body=b"", headers=()):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def head(self, code, headers):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()

    def drip(self, body, octet):
        self.head(200, [octet, ("Content-Length", str(len(body)))])
        for i in range(len(body)):
            self.wfile.write(body[i:i + 1])
            self.wfile.flush()
            time.sleep(0.25)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        try:
            self.route()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def route(self):
        p = self.path
        if p == "/v2/":
            return self.send(200, b"{}", [("Content-Type", "application/json")])
        parts = p.split("/")
        if len(parts) != 5 or parts[0] != "" or parts[1] != "v2":
            return self.send(404)
        mode, kind, ref = parts[2], parts[3], parts[4]
        if kind == "manifests":
            return self.manifest(mode, ref)
        if kind == "blobs":
            return self.blob(mode, ref)
        self.send(404)

    def manifest(self, mode, ref):
        if mode == "loop":
            return self.send(302, headers=[("Location", self.path)])
        mt = "application/vnd.oci.image.manifest.v1+json"
        if mode == "schema1":
            body = json.dumps({"schemaVersion": 1, "name": "schema1", "tag": ref,
                               "architecture": "amd64", "fsLayers": [], "history": [],
                               "signatures": []}).encode()
            return self.send(200, body,
                             [("Content-Type",
                               "application/vnd.docker.distribution.manifest.v1+prettyjws")])
        if mode == "ratelimit":
            body = json.dumps({"errors": [{
                "code": "TOOMANYREQUESTS",
                "message": "You have reached your pull rate limit. You may increase the "
                           "limit by authenticating and upgrading"}]}).encode()
            return self.send(429, body, [("Content-Type", "application/json"),
                                         ("Retry-After", "21600")])
        if mode == "maintenance":
            return self.send(503, b'{"errors":[{"code":"UNAVAILABLE","message":"maintenance"}]}',
                             [("Content-Type", "application/json"), ("Retry-After", "21600")])
        if mode == "big":
            return self.send(200, b" " * (4 * 1024 * 1024 + 1), [("Content-Type", mt)])
        if mode == "endless":
            self.head(200, [("Content-Type", mt), ("Connection", "close")])
            self.close_connection = True
            chunk = b" " * 65536
            while True:
                self.wfile.write(chunk)
        tags = tags_and_configs()[0]
        if ref.startswith("sha256:"):
            body = read_blob(ref)
            digest = ref
            if body is None:
                return self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
            mt = json.loads(body).get("mediaType", mt)
        elif ref in tags:
            digest = tags[ref]["digest"]
            body = read_blob(digest)
            mt = tags[ref]["mediaType"]
        else:
            return self.send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}')
        self.send(200, body, [("Content-Type", mt), ("Docker-Content-Digest", digest)])

    def blob(self, mode, digest):
        body = read_blob(digest)
        if body is None:
            return self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
        _, configs, last, first = tags_and_configs()
        octet = ("Content-Type", "application/octet-stream")
        if digest not in configs:
            layer_asked(mode).set()
        if digest in configs:
            if mode in ("configlast", "configgone") and not layer_asked(mode).wait(10):
                return self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
            if mode == "configgone":
                return self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"config gone"}]}')
            if mode == "badconfig":
                body = bytearray(body)
                body[len(body) // 2] ^= 0x20
                body = bytes(body)
            return self.send(200, body, [octet])
        if mode == "failahead" and digest in first and digest not in last:
            return self.drip(body, octet)
        if digest not in last:
            return self.send(200, body, [octet])
        if mode == "failahead":
            return self.send(404, b'{"errors":[{"code":"BLOB_UNKNOWN","message":"gone"}]}')
        if mode == "drip":
            return self.drip(body, octet)
        if mode == "stall":
            self.head(200, [octet, ("Content-Length", str(len(body)))])
            self.wfile.write(body[:16])
            self.wfile.flush()
            time.sleep(600)
            return
        if mode == "long":
            self.head(200, [octet, ("Connection", "close")])
            self.close_connection = True
            self.wfile.write(body)
            chunk = b"\0" * 65536
            while True:
                self.wfile.write(chunk)
        if mode.startswith("busy"):
            with BUSY_LOCK:
                n = BUSY_ANSWERS.get((mode, digest), 0)
                BUSY_ANSWERS[(mode, digest)] = n + 1
            if n < 2:
                return self.send(429, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}',
                                 [("Content-Type", "application/json"), ("Retry-After", "1")])
        if mode == "short":
            return self.send(200, body[:len(body) // 2], [octet])
        self.send(200, body, [octet])


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


srv = Server(("127.0.0.1", 0), H)
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
srv.serve_forever()
