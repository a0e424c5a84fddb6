#!/usr/bin/python3
"""A fake registry on 127.0.0.1 for what docker-registry cannot show without a
token server (tests/broker/source/registry_client_test.cc, RegistryClientFakeTest):
  /v2/ asks for a Bearer token from its own /token realm, which hands one out for
  Basic user:pass only (anonymous and wrong passwords get 401);
  /v2/app/manifests/v1 needs the token and serves MANIFEST;
  /v2/app/blobs/<digest> redirects to http://localhost:PORT/data/ (another host
  name): the data answers 400 if an Authorization header followed the redirect;
  /v2/loop/... redirects to itself forever; /v2/big/manifests/x is over 4 MiB;
  /v2/slow/blobs/* sends one byte and stalls.
Blob transfers that fail (RegistryClient's retries): a repository named
  [redir-]MODE-M-K[-anything]
serves BIG (random bytes, written to PORT_FILE.blob) as any blob digest; its
Nth request (counted per repository name, from 0) is answered as MODE says:
  drop      N < M: the headers and K bytes of the body, then the connection is
            closed (curl: "transfer closed with ... bytes remaining"); then the
            rest, honouring "Range: bytes=S-" (206 with Content-Range);
  norange   the same, but Range is ignored: always 200 and the whole blob;
  badrange  the same drops, then 206 answers with Content-Range "bytes 0-..."
            whatever the Range asked;
  e503      N < M: 503; then as drop.
Its manifests (any tag) are MANIFEST, cut after K bytes (drop) or 503 (e503) the
first M times.
With redir-, the registry answers 307 to http://localhost:PORT/data/REPO (another
host name), which serves as above and answers 400 if a credential followed.
Tokens: scope repository:expire*:pull gets a new token "tok-N" each time, good for
one request to that repository; repositories named deny* answer 401 whatever the
token (/v2/ aside). Every other repository takes "tok-123".
POST /token trades the identity token REFRESH (grant_type=refresh_token, no
Authorization) for TOKEN (expire* repositories: tok-N, as above) and a rotated
refresh token (ignored, as skopeo ignores it); "rt-redirect" is redirected to
localhost.
PORT_FILE.log gets one line per blob answer ("blob REPO RANGE STATUS [dropped]"),
per token handed out ("token REPO", "refresh REPO") and per identity token that
followed a redirect ("leaked token").
usage: fake_bearer.py PORT_FILE  (writes the port there once listening)
stdlib only; plain http, so the realm may be http as the registry is.
"""
import base64, http.server, os, re, sys, threading, time, urllib.parse

TOKEN = "tok-123"
USER, PASS = "u", "p"
REFRESH = "rt-good+/="  # an identity token; its characters need escaping in a form
MANIFEST = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}'
BLOB = b"hello\n"
BIG = os.urandom(768 * 1024 + 123)
MODE_REPO = re.compile(r"^(redir-)?(drop|norange|badrange|e503)-(\d+)-(\d+)(?:-[a-z0-9]+)?$")

lock = threading.Lock()
requests_seen = {}  # repository -> blob requests answered so far
expire_tokens = set()  # handed out, not used yet
token_count = [0]


def log(line):
    with lock, open(sys.argv[1] + ".log", "a") as f:
        f.write(line + "\n")


def issue(kind, repo):
    """A token for repo (logged as "KIND REPO"): TOKEN, or for expire* a new
    tok-N good for one request."""
    log(kind + " " + repo)
    if not repo.startswith("expire"):
        return TOKEN
    with lock:
        token_count[0] += 1
        token = "tok-%d" % token_count[0]
        expire_tokens.add(token)
    return token


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
        got = self.headers.get("Authorization") or ""
        repo = self.path.split("/")[2] if self.path.count("/") >= 3 else ""
        if repo.startswith("expire"):
            with lock:
                tok = got[len("Bearer "):] if got.startswith("Bearer ") else ""
                if tok in expire_tokens:
                    expire_tokens.discard(tok)
                    return True
                return False
        if repo.startswith("deny"):
            return False
        return got == "Bearer " + TOKEN

    def serve_mode(self, repo, manifest=False):
        redir, mode, m, k = MODE_REPO.match(repo).groups()
        m, k = int(m), int(k)
        with lock:
            n = requests_seen.get(repo, 0)
            requests_seen[repo] = n + 1
        want = self.headers.get("Range") or "-"
        if mode == "e503" and n < m:
            log("blob %s %s 503" % (repo, want))
            return self.send(503, b'{"errors":[{"code":"UNAVAILABLE","message":"busy"}]}')
        start = None
        if manifest:  # whole, as drop or e503 says
            drop = mode == "drop" and n < m
            log("manifest %s %s 200%s" % (repo, want, " dropped" if drop else ""))
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.send_header("Content-Length", str(len(MANIFEST)))
            self.end_headers()
            self.wfile.write(MANIFEST[:k] if drop else MANIFEST)
            self.close_connection = drop
            return
        if want.startswith("bytes=") and want.endswith("-") and mode != "norange":
            start = int(want[len("bytes="):-1])
        body, headers, code = BIG, [], 200
        if start is not None:
            body, code = BIG[start:], 206
            first = 0 if mode == "badrange" else start
            headers = [("Content-Range", "bytes %d-%d/%d" % (first, len(BIG) - 1, len(BIG)))]
        drop = mode in ("drop", "norange", "badrange") and n < m
        log("blob %s %s %d%s" % (repo, want, code, " dropped" if drop else ""))
        self.send_response(code)
        for h in headers:
            self.send_header(*h)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if drop:
            self.wfile.write(body[:k])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

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
                scope = urllib.parse.parse_qs(urllib.parse.urlsplit(p).query)["scope"][0]
                token = issue("token", scope.split(":")[1])
                return self.send(200, b'{"token":"%s"}' % token.encode())
            return self.send(401)
        if p.startswith("/data/") and MODE_REPO.match(p[len("/data/"):]):
            if self.headers.get("Authorization"):
                return self.send(400, b"credentials leaked to another host")
            return self.serve_mode(p[len("/data/"):])
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
        parts = p.split("/")
        if len(parts) == 5 and parts[3] == "blobs" and MODE_REPO.match(parts[2]):
            if parts[2].startswith("redir-"):
                return self.send(307, headers=[("Location",
                                                 "http://localhost:%d/data/%s" % (port, parts[2]))])
            return self.serve_mode(parts[2])
        if len(parts) == 5 and parts[3] == "manifests" and MODE_REPO.match(parts[2]):
            return self.serve_mode(parts[2], manifest=True)
        if len(parts) == 5 and parts[2].startswith("expire") and parts[3] == "manifests":
            return self.send(200, MANIFEST,
                             [("Content-Type", "application/vnd.oci.image.manifest.v1+json")])
        if len(parts) == 5 and parts[2].startswith("expire") and parts[3] == "blobs":
            return self.send(200, BIG)
        if p.startswith("/v2/app/blobs/"):
            return self.send(307, headers=[("Location", "http://localhost:%d/data/blob" % port)])
        self.send(404)

    def do_POST(self):
        # The identity token's exchange (OAuth2 refresh-token grant) at /token:
        # REFRESH gets TOKEN; "rt-redirect" is sent on to another host name,
        # which logs "leaked token" if the body followed.
        port = self.server.server_address[1]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        if self.path != "/token":
            return self.send(404)
        form = urllib.parse.parse_qs(body)
        one = lambda k: form.get(k, [""])[0]
        if self.headers.get("Host", "").startswith("localhost"):
            if one("refresh_token"):
                log("leaked token")
            return self.send(400)
        if one("refresh_token") == "rt-redirect":
            return self.send(307, headers=[("Location", "http://localhost:%d/token" % port)])
        scope = one("scope")
        if one("grant_type") == "refresh_token" and one("refresh_token") == REFRESH and \
                one("service") == "fake" and one("client_id") and \
                scope.startswith("repository:") and scope.endswith(":pull") and \
                not self.headers.get("Authorization") and \
                self.headers.get("Content-Type") == "application/x-www-form-urlencoded":
            token = issue("refresh", scope.split(":")[1])
            return self.send(200, b'{"access_token":"%s","expires_in":300,'
                             b'"refresh_token":"rotated-s3cret"}' % token.encode())
        self.send(400, b'{"error":"invalid_grant"}')


srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.daemon_threads = True
with open(sys.argv[1] + ".blob", "wb") as f:
    f.write(BIG)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
srv.serve_forever()
