#!/usr/bin/python3
"""A fake registry on 127.0.0.1 for what docker-registry cannot show without a
token server (tests/broker/registry_client_test.cc, RegistryClientFakeTest):
  /v2/ asks for a Bearer token from its own /token realm, which hands one out for
  Basic user:pass only (anonymous and wrong passwords get 401);
  /v2/app/manifests/v1 needs the token and serves MANIFEST;
  /v2/app/blobs/<digest> redirects to http://localhost:PORT/data/ (another host
  name): the data answers 400 if an Authorization header followed the redirect;
  /v2/loop/... redirects to itself forever; /v2/big/manifests/x is over 4 MiB;
  /v2/slow/blobs/* sends one byte and stalls.
usage: fake_bearer.py PORT_FILE  (writes the port there once listening)
stdlib only; plain http, so the realm may be http as the registry is.
"""
import base64, http.server, sys, time

TOKEN = "tok-123"
USER, PASS = "u", "p"
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}'
BLOB = b"hello\n"


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
        self.wfile.write(body)

    def authed(self):
        return self.headers.get("Authorization") == "Bearer " + TOKEN

    def challenge(self):
        port = self.server.server_address[1]
        self.send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token"}]}',
                  [("WWW-Authenticate",
                    'Bearer realm="http://127.0.0.1:%d/token",service="fake",scope="x"' % port)])

    def do_GET(self):
        p = self.path
        port = self.server.server_address[1]
        if p.startswith("/token?"):
            want = "Basic " + base64.b64encode(("%s:%s" % (USER, PASS)).encode()).decode()
            if "service=fake" in p and "scope=repository%3A" in p and p.endswith("%3Apull") and \
                    self.headers.get("Authorization") == want:
                return self.send(200, b'{"token":"%s"}' % TOKEN.encode())
            return self.send(401)
        if p == "/data/blob":
            if self.headers.get("Authorization"):
                return self.send(400, b"credentials leaked to another host")
            return self.send(200, BLOB)
        if p.startswith("/v2/loop/"):
            return self.send(302, headers=[("Location", p)])
        if not self.authed():
            return self.challenge()
        if p == "/v2/":
            return self.send(200, b"{}")
        if p == "/v2/app/manifests/v1":
            return self.send(200, MANIFEST,
                             [("Content-Type", "application/vnd.oci.image.manifest.v1+json")])
        if p == "/v2/old/manifests/v1":
            return self.send(200, b'{"schemaVersion":1}',
                             [("Content-Type", "application/vnd.docker.distribution.manifest.v1+prettyjws")])
        if p == "/v2/big/manifests/x":
            return self.send(200, b" " * (4 * 1024 * 1024 + 1),
                             [("Content-Type", "application/vnd.oci.image.manifest.v1+json")])
        if p.startswith("/v2/slow/blobs/"):  # one byte of a hundred, then nothing
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(30)
            return
        if p.startswith("/v2/app/blobs/"):
            return self.send(307, headers=[("Location", "http://localhost:%d/data/blob" % port)])
        self.send(404)


srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
import os
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
srv.serve_forever()
