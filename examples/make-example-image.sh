#!/bin/sh
# Builds the example image: three layers that exercise what real images do.
#   layer1.tar.gz   a base: usrmerge (bin -> usr/bin), a setuid binary, an
#                   alternatives symlink, a dangling resolv.conf link, a user's
#                   home owned by 1000:1000, a cache dir and a stale file
#   layer2.tar.zst  an update: a file written through bin/ (lands in usr/bin/),
#                   a hardlink, a whiteout (.wh.stale), an opaque dir
#                   (.wh..wh..opq) with a new file beside the marker
#   layer3.tar      a fifo, and a file that replaces a directory
# Usage: make-example-image.sh OUTDIR   (as root, so the owners can be set)
set -eu
out=${1:?usage: make-example-image.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
maketar() {  # maketar DIR OUTPUT [tar compression flag]
  (cd "$1" && tar --sort=name --mtime=@"$SOURCE_DATE_EPOCH" --numeric-owner $3 -cf "$2" .)
}
owner() { [ "$(id -u)" = 0 ] && chown "$@" || true; }

l1=$stage/l1
mkdir -p "$l1/usr/bin" "$l1/etc/alternatives" "$l1/home/user" "$l1/var/cache/app/old" "$l1/var/lib"
ln -s usr/bin "$l1/bin"
printf '#!/bin/sh\necho tool\n' > "$l1/usr/bin/tool"; chmod 0755 "$l1/usr/bin/tool"
printf 'pretend sudo\n' > "$l1/usr/bin/sudo"; chmod 04755 "$l1/usr/bin/sudo"
printf 'pretend awk\n' > "$l1/usr/bin/mawk"; chmod 0755 "$l1/usr/bin/mawk"
ln -s /usr/bin/mawk "$l1/etc/alternatives/awk"
ln -s ../run/systemd/resolve/stub-resolv.conf "$l1/etc/resolv.conf"
printf 'root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n' > "$l1/etc/passwd"
printf 'hello\n' > "$l1/home/user/notes.txt"
owner -R 1000:1000 "$l1/home/user"; chmod 0750 "$l1/home/user"
printf 'old cache\n' > "$l1/var/cache/app/old/a"; printf 'old cache\n' > "$l1/var/cache/app/old/b"
printf 'stale\n' > "$l1/var/lib/stale"
maketar "$l1" "$out/layer1.tar.gz" -z

l2=$stage/l2
mkdir -p "$l2/bin" "$l2/usr/bin" "$l2/var/lib" "$l2/var/cache/app/old"
printf '#!/bin/sh\necho hello\n' > "$l2/bin/hello"; chmod 0755 "$l2/bin/hello"
printf '#!/bin/sh\necho tool v2\n' > "$l2/usr/bin/tool"; chmod 0755 "$l2/usr/bin/tool"
ln "$l2/usr/bin/tool" "$l2/usr/bin/tool-again"
: > "$l2/var/lib/.wh.stale"
: > "$l2/var/cache/app/old/.wh..wh..opq"
printf 'new cache\n' > "$l2/var/cache/app/old/c"
# bin/ is a symlink in layer 1: this layer names bin/hello, which must land in usr/bin/.
(cd "$l2" && tar --sort=name --mtime=@"$SOURCE_DATE_EPOCH" --numeric-owner --zstd -cf "$out/layer2.tar.zst" \
  --no-recursion bin/hello usr usr/bin usr/bin/tool usr/bin/tool-again var var/lib var/lib/.wh.stale \
  var/cache var/cache/app var/cache/app/old var/cache/app/old/.wh..wh..opq var/cache/app/old/c)

l3=$stage/l3
mkdir -p "$l3/run" "$l3/var/cache/app"
mkfifo "$l3/run/initctl"
printf 'a file where a directory was\n' > "$l3/var/cache/app/old"
maketar "$l3" "$out/layer3.tar" ""
echo "example image: $out/layer1.tar.gz $out/layer2.tar.zst $out/layer3.tar"
