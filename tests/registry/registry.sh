#!/bin/sh
# A real registry for the docker:// tests (issue 16): Debian's docker-registry
# (the CNCF distribution registry), three instances on 127.0.0.1 in one state dir:
#   tls  - https with a self-signed CA and one htpasswd (bcrypt) user
#   http - plain http, no auth
#   mtls - https that wants a client certificate signed by its client CA, no
#          other auth; DIR/mtls-client is a cert dir for it (ca.crt,
#          client.cert, client.key), as containers-certs.d(5) lays one out
# See tests/registry/README.md. Runs as root or as any user that owns DIR.
#
# usage: registry.sh start DIR          make DIR, certs, user; start both; write DIR/env
#        registry.sh stop DIR           stop both (DIR is left as it is)
#        registry.sh restart DIR tls|http|mtls   kill one instance and start it again on its port
#        registry.sh kill DIR tls|http|mtls  kill one instance (SIGKILL), leave it down
#        registry.sh push DIR LAYOUT:REF NAME:TAG [tls|http|mtls]
#                                       skopeo copy oci:LAYOUT:REF to the instance (digests kept)
#        registry.sh index DIR NAME:TAG [tls|http] LAYOUT:REF=OS/ARCH[/VARIANT]...
#                                       an image index of those images, made as an OCI layout
#                                       in DIR/layouts/NAME-TAG (ref TAG) and pushed with --all
#        registry.sh blob-gets DIR tls|http [NAME]   blob GETs answered 200/206 in the access log
#        registry.sh check              exit 0 if the tools are there, else say which and exit 77
set -eu

here=$(cd "$(dirname "$0")" && pwd)
registry_bin=${LAYERX_REGISTRY_BIN:-docker-registry}
start_timeout=${LAYERX_REGISTRY_TIMEOUT:-30}

die() { echo "registry.sh: $*" >&2; exit 1; }

need() {
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || die "$c not found (scripts/install-deps.sh installs it)"
  done
}

load_env() {
  [ -f "$1/env" ] || die "$1/env not found (registry.sh start $1 first)"
  # shellcheck disable=SC1091
  . "$1/env"
}

# A port in 20000-32767: below the kernel's ephemeral range (32768-60999 by
# default), so no outgoing connection holds it, and not listened on now. The
# registry itself binding is the real test: start_one retries on EADDRINUSE.
pick_port() {
  i=0
  while [ $i -lt 50 ]; do
    i=$((i + 1))
    p=$(( $(od -An -N2 -tu2 /dev/urandom | tr -d ' ') % 12768 + 20000 ))
    if ! ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}

write_config() { # KIND PORT
  kind=$1 port=$2
  {
    echo "version: 0.1"
    echo "log:"
    echo "  level: info"
    echo "  formatter: text"
    echo "  accesslog:"
    echo "    disabled: false"
    echo "  fields:"
    echo "    service: registry-$kind"
    echo "storage:"
    echo "  filesystem:"
    echo "    rootdirectory: $dir/$kind/storage"
    echo "  delete:"
    echo "    enabled: true"
    echo "  maintenance:"
    echo "    uploadpurging:"
    echo "      enabled: false"
    echo "http:"
    echo "  addr: 127.0.0.1:$port"
    echo "  secret: $(cat "$dir/http-secret")"
    echo "  headers:"
    echo "    X-Content-Type-Options: [nosniff]"
    if [ "$kind" = tls ] || [ "$kind" = mtls ]; then
      echo "  tls:"
      echo "    certificate: $dir/tls/server.crt"
      echo "    key: $dir/tls/server.key"
    fi
    if [ "$kind" = mtls ]; then
      # The registry then requires and verifies a client certificate.
      echo "    clientcas:"
      echo "      - $dir/tls/client-ca.crt"
    fi
    if [ "$kind" = tls ]; then
      echo "auth:"
      echo "  htpasswd:"
      echo "    realm: layerx-test"
      echo "    path: $dir/htpasswd"
    fi
  } >"$dir/$kind/config.yml"
}

# url KIND PORT -> base URL; status KIND PORT [CURL ARGS] -> HTTP code of /v2/
url() { if [ "$1" = http ]; then echo "http://127.0.0.1:$2"; else echo "https://127.0.0.1:$2"; fi; }
status() {
  k=$1 p=$2
  shift 2
  if [ "$k" = mtls ]; then
    set -- --cert "$dir/mtls-client/client.cert" --key "$dir/mtls-client/client.key" "$@"
  fi
  curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$dir/ca.crt" "$@" "$(url "$k" "$p")/v2/" || true
}

# start_one KIND [PORT]: start one instance (on PORT, else a free one, retrying
# when another process took it first); waits for /v2/ to answer 401 (tls) or
# 200 (http). Sets started_port (the pid is in DIR/KIND/pid).
start_one() {
  kind=$1 fixed=${2:-}
  want=200
  [ "$kind" = tls ] && want=401
  tries=0
  while :; do
    tries=$((tries + 1))
    if [ -n "$fixed" ]; then port=$fixed; else port=$(pick_port); fi
    write_config "$kind" "$port"
    # stdout is the access log (combined format), stderr the registry's own log.
    "$registry_bin" serve "$dir/$kind/config.yml" </dev/null >>"$dir/$kind.access.log" 2>>"$dir/$kind.log" &
    pid=$!
    echo "$pid" >"$dir/$kind/pid"
    deadline=$(( $(date +%s) + start_timeout ))
    code=
    while kill -0 "$pid" 2>/dev/null; do
      code=$(status "$kind" "$port")
      [ "$code" = "$want" ] && break
      [ "$(date +%s)" -lt "$deadline" ] || { kill -9 "$pid" 2>/dev/null || true; die "$kind: /v2/ on port $port answered '$code', not $want, within ${start_timeout}s; see $dir/$kind.log"; }
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      started_port=$port
      return 0
    fi
    if [ -z "$fixed" ] && [ $tries -lt 5 ] && tail -n 5 "$dir/$kind.log" | grep -q 'address already in use'; then
      continue
    fi
    tail -n 20 "$dir/$kind.log" >&2
    die "$kind: the registry exited at start (port $port); see $dir/$kind.log"
  done
}

# The registry's pid file, if it is still that registry (pid not reused).
live_pid() { # KIND
  [ -f "$dir/$1/pid" ] || return 1
  p=$(cat "$dir/$1/pid")
  [ -r "/proc/$p/cmdline" ] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -qF "$dir/$1/config.yml" && echo "$p"
}

stop_one() { # KIND [SIGNAL]
  p=$(live_pid "$1") || { rm -f "$dir/$1/pid"; return 0; }
  kill "-${2:-TERM}" "$p" 2>/dev/null || true
  i=0
  while kill -0 "$p" 2>/dev/null && [ -d "/proc/$p" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -eq 100 ]; then kill -KILL "$p" 2>/dev/null || true; fi
    [ $i -lt 200 ] || die "$1: pid $p did not exit"
    sleep 0.05
  done
  rm -f "$dir/$1/pid"
}

write_env() {
  tls_pid=$(cat "$dir/tls/pid" 2>/dev/null || true)
  http_pid=$(cat "$dir/http/pid" 2>/dev/null || true)
  mtls_pid=$(cat "$dir/mtls/pid" 2>/dev/null || true)
  {
    echo "# written by tests/registry/registry.sh; . this file"
    echo "REGISTRY_DIR='$dir'"
    echo "TLS_PORT=$TLS_PORT"
    echo "HTTP_PORT=$HTTP_PORT"
    echo "TLS_HOST=127.0.0.1:$TLS_PORT"
    echo "HTTP_HOST=127.0.0.1:$HTTP_PORT"
    echo "MTLS_PORT=$MTLS_PORT"
    echo "MTLS_HOST=127.0.0.1:$MTLS_PORT"
    echo "MTLS_CERT_DIR='$dir/mtls-client'"
    echo "MTLS_PID=$mtls_pid"
    echo "MTLS_ACCESS_LOG='$dir/mtls.access.log'"
    echo "MTLS_STORAGE='$dir/mtls/storage/docker/registry/v2'"
    echo "REGISTRY_USER='$REGISTRY_USER'"
    echo "REGISTRY_PASS='$REGISTRY_PASS'"
    echo "CA_CERT='$dir/ca.crt'"
    echo "CERT_DIR='$dir'"
    echo "AUTH_FILE='$dir/auth.json'"
    echo "TLS_PID=$tls_pid"
    echo "HTTP_PID=$http_pid"
    echo "TLS_ACCESS_LOG='$dir/tls.access.log'"
    echo "HTTP_ACCESS_LOG='$dir/http.access.log'"
    echo "TLS_LOG='$dir/tls.log'"
    echo "HTTP_LOG='$dir/http.log'"
    echo "TLS_STORAGE='$dir/tls/storage/docker/registry/v2'"
    echo "HTTP_STORAGE='$dir/http/storage/docker/registry/v2'"
  } >"$dir/env.tmp"
  mv "$dir/env.tmp" "$dir/env"
}

cmd_start() {
  need "$registry_bin" openssl htpasswd curl ss od
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  case $dir in *"'"* | *' '*) die "DIR must not contain quotes or spaces: $dir" ;; esac
  if live_pid tls >/dev/null || live_pid http >/dev/null || live_pid mtls >/dev/null; then die "$dir: already running (registry.sh stop $dir)"; fi
  mkdir -p "$dir/tls/storage" "$dir/http/storage" "$dir/mtls/storage"
  chmod 755 "$dir"

  # CA and server certificate (EC P-256; SANs 127.0.0.1 and localhost). Only
  # ca.crt lies in DIR itself so DIR is a --cert-dir: containers/image reads
  # every *.crt there as a CA and refuses a *.key without its *.cert.
  cnf=$dir/tls/openssl.cnf
  cat >"$cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = layerx test registry CA
[ca_ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
  (
    umask 077
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/tls/ca.key" 2>/dev/null
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/tls/server.key" 2>/dev/null
  )
  openssl req -new -x509 -config "$cnf" -extensions ca_ext -key "$dir/tls/ca.key" \
    -days 3650 -out "$dir/ca.crt"
  openssl req -new -config "$cnf" -key "$dir/tls/server.key" -subj /CN=localhost -out "$dir/tls/server.csr"
  openssl x509 -req -in "$dir/tls/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/tls/ca.key" \
    -set_serial "0x$(openssl rand -hex 8)" -days 825 -extfile "$cnf" -extensions server_ext \
    -out "$dir/tls/server.crt" 2>/dev/null
  chmod 644 "$dir/ca.crt" "$dir/tls/server.crt"

  # One user; the registry accepts bcrypt entries only (htpasswd -B).
  REGISTRY_USER=layerx
  REGISTRY_PASS=$(openssl rand -hex 12)
  # The mtls instance's client CA and one client certificate signed by it.
  (
    umask 077
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/tls/client-ca.key" 2>/dev/null
    mkdir -p "$dir/mtls-client"
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/mtls-client/client.key" 2>/dev/null
  )
  openssl req -new -x509 -config "$cnf" -extensions ca_ext -key "$dir/tls/client-ca.key" \
    -subj "/CN=layerx test client CA" -days 3650 -out "$dir/tls/client-ca.crt"
  openssl req -new -config "$cnf" -key "$dir/mtls-client/client.key" -subj /CN=layerx-client \
    -out "$dir/tls/client.csr"
  openssl x509 -req -in "$dir/tls/client.csr" -CA "$dir/tls/client-ca.crt" -CAkey "$dir/tls/client-ca.key" \
    -set_serial "0x$(openssl rand -hex 8)" -days 825 -extfile "$cnf" -extensions client_ext \
    -out "$dir/mtls-client/client.cert" 2>/dev/null
  cp "$dir/ca.crt" "$dir/mtls-client/ca.crt"
  chmod 755 "$dir/mtls-client"
  chmod 644 "$dir/mtls-client/ca.crt" "$dir/mtls-client/client.cert" "$dir/tls/client-ca.crt"

  printf '%s\n' "$REGISTRY_PASS" | htpasswd -iBn -C 5 "$REGISTRY_USER" >"$dir/htpasswd" 2>/dev/null
  openssl rand -hex 16 >"$dir/http-secret"

  start_one tls
  TLS_PORT=$started_port
  start_one http
  HTTP_PORT=$started_port
  start_one mtls
  MTLS_PORT=$started_port
  # containers auth.json (for --authfile / $REGISTRY_AUTH_FILE tests)
  b64=$(printf '%s:%s' "$REGISTRY_USER" "$REGISTRY_PASS" | base64 -w0)
  (umask 077 && printf '{"auths":{"127.0.0.1:%s":{"auth":"%s"}}}\n' "$TLS_PORT" "$b64" >"$dir/auth.json")
  write_env
  echo "registry: tls 127.0.0.1:$TLS_PORT (pid $(cat "$dir/tls/pid")), http 127.0.0.1:$HTTP_PORT (pid $(cat "$dir/http/pid")), mtls 127.0.0.1:$MTLS_PORT (pid $(cat "$dir/mtls/pid")); env in $dir/env"
}

cmd_stop() {
  stop_one tls
  stop_one http
  stop_one mtls
}

cmd_kill() { # KIND
  load_env "$dir"
  stop_one "$1" KILL
  write_env
}

cmd_restart() { # KIND
  load_env "$dir"
  stop_one "$1"
  case $1 in
    tls) start_one tls "$TLS_PORT" ;;
    mtls) start_one mtls "$MTLS_PORT" ;;
    *) start_one http "$HTTP_PORT" ;;
  esac
  write_env
}

dest_args() { # KIND -> sets host and args for skopeo
  case $1 in
    tls) host=127.0.0.1:$TLS_PORT
         set -- --dest-cert-dir "$CERT_DIR" --dest-creds "$REGISTRY_USER:$REGISTRY_PASS" ;;
    http) host=127.0.0.1:$HTTP_PORT
          set -- --dest-tls-verify=false --dest-no-creds ;;
    mtls) host=127.0.0.1:$MTLS_PORT
          set -- --dest-cert-dir "$MTLS_CERT_DIR" --dest-no-creds ;;
    *) die "instance must be tls, http or mtls, not $1" ;;
  esac
  skopeo_dest="$*"
}

# skopeo with a HOME of its own: nothing read from the caller's ~/.config or
# $XDG_RUNTIME_DIR (as uid 65534 under setpriv HOME is still /root, and skopeo
# fails on "lstat /root/.config/containers/registries.conf.d: permission denied").
skopeo_run() {
  mkdir -p "$dir/home"
  env -u XDG_RUNTIME_DIR -u XDG_CONFIG_HOME -u REGISTRY_AUTH_FILE HOME="$dir/home" \
    skopeo --policy "$here/policy.json" "$@"
}

cmd_push() { # LAYOUT:REF NAME:TAG [KIND]
  need skopeo
  [ $# -ge 2 ] || die "usage: push DIR LAYOUT:REF NAME:TAG [tls|http|mtls]"
  load_env "$dir"
  dest_args "${3:-tls}"
  mkdir -p "$dir/digests"
  df=$dir/digests/$(echo "$2" | tr '/:' '__')
  # --preserve-digests: the registry then holds the layout's manifest byte for
  # byte (skopeo fails rather than convert it). Creds are in argv: test only.
  # shellcheck disable=SC2086
  skopeo_run copy -q --preserve-digests --digestfile "$df" $skopeo_dest \
    "oci:$1" "docker://$host/$2" >&2
  cat "$df"
  echo
}

cmd_index() { # NAME:TAG KIND LAYOUT:REF=PLATFORM...
  need skopeo python3
  [ $# -ge 3 ] || die "usage: index DIR NAME:TAG tls|http LAYOUT:REF=OS/ARCH[/VARIANT]..."
  load_env "$dir"
  target=$1 kind=$2
  shift 2
  dest_args "$kind"
  tag=${target##*:}
  layout=$dir/layouts/$(echo "$target" | tr '/:' '__')
  rm -rf "$layout"
  python3 "$here/make_index.py" "$layout" "$tag" "$@" >&2
  mkdir -p "$dir/digests"
  df=$dir/digests/$(echo "$target" | tr '/:' '__')
  # shellcheck disable=SC2086
  skopeo_run copy -q --all --preserve-digests --digestfile "$df" $skopeo_dest \
    "oci:$layout:$tag" "docker://$host/$target" >&2
  cat "$df"
  echo
}

cmd_blob_gets() { # KIND [NAME]
  load_env "$dir"
  grep -cE "\"GET /v2/${2:-[^ ]+}/blobs/sha256:[0-9a-f]{64} HTTP/[0-9.]+\" (200|206) " "$dir/$1.access.log" || true
}

if [ "${1:-}" = check ]; then
  for c in "$registry_bin" skopeo openssl htpasswd curl ss python3; do
    command -v "$c" >/dev/null 2>&1 || { echo "SKIP: $c not installed (scripts/install-deps.sh)"; exit 77; }
  done
  exit 0
fi
[ $# -ge 2 ] || { sed -n '2,21p' "$0" >&2; exit 2; }
sub=$1 dir=$2
shift 2
if [ "$sub" != start ]; then
  [ -d "$dir" ] || die "$dir: no such dir"
  dir=$(cd "$dir" && pwd)
fi
case $sub in
  start) cmd_start ;;
  stop) cmd_stop ;;
  kill) cmd_kill "$@" ;;
  restart) cmd_restart "$@" ;;
  push) cmd_push "$@" ;;
  index) cmd_index "$@" ;;
  blob-gets) cmd_blob_gets "$@" ;;
  *) die "unknown command $sub" ;;
esac
