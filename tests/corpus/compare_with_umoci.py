#!/usr/bin/env python3
"""Compare layerx's rootfs with umoci's, entry by entry, on a real image.

usage: compare_with_umoci.py UMOCI_ROOTFS LAYERX_ROOTFS LAYERX_MANIFEST --mode root|rootless|ext4

Compared for every path: kind, symlink target, file content (sha256), mode
(incl. setuid/setgid/sticky), and ownership: on disk as root, from the
user.rootlesscontainers xattr rootless. Directory mtimes are not compared.
As root, device nodes and security.capability must be on disk as umoci made
them (the broker creates them after the jailed layers). Rootless, by design:
  - device nodes are not created on disk (a user namespace cannot mknod): the
    manifest must hold them with umoci's kind, major, minor, owner and mode;
  - security.capability is not written on disk (no CAP_SETFCAP): the manifest
    must hold the same value.
Exit 0 when equal, 1 with the differences listed.
"""
import argparse
import base64
import hashlib
import json
import os
import stat
import sys


def kind_of(mode):
    for test, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char"), (stat.S_ISBLK, "block"), (stat.S_ISFIFO, "fifo")):
        if test(mode):
            return name
    return "other"


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rootless_owner(value):
    # protobuf Resource { uint32 uid = 1; uint32 gid = 2; }
    uid = gid = 0
    i = 0
    while i < len(value):
        key = value[i]; i += 1
        v = shift = 0
        while True:
            b = value[i]; i += 1
            v |= (b & 0x7f) << shift; shift += 7
            if not b & 0x80:
                break
        if key == 0x08:
            uid = v
        elif key == 0x10:
            gid = v
    return uid, gid


def walk(root, rootless):
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            rel = os.fsencode(os.path.relpath(p, root))
            st = os.lstat(p)
            k = kind_of(st.st_mode)
            e = {"kind": k, "mode": stat.S_IMODE(st.st_mode)}
            if rootless:
                try:
                    e["owner"] = rootless_owner(os.getxattr(p, "user.rootlesscontainers",
                                                            follow_symlinks=False))
                except OSError:
                    e["owner"] = (0, 0)
            else:
                e["owner"] = (st.st_uid, st.st_gid)
            if k == "symlink":
                e["target"] = os.readlink(os.fsencode(p))
                del e["mode"]  # Linux ignores symlink modes
            elif k == "file":
                e["sha256"] = digest(p)
            elif k in ("char", "block"):
                e["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            try:
                e["cap"] = os.getxattr(p, "security.capability", follow_symlinks=False)
            except OSError:
                pass
            out[rel] = e
    return out


def load_dump(path):
    """An ext4 image as tests/testcases/ext4_dump printed it."""
    out = {}
    with open(path) as f:
        for line in f:
            m = json.loads(line)
            p = m["path"].encode() if "path" in m else base64.b64decode(m["path_b64"])
            if p == b".":
                continue
            e = {"kind": m["kind"], "mode": m["mode"], "owner": (m["uid"], m["gid"])}
            if m["kind"] == "symlink":
                e["target"] = m["target"].encode() if "target" in m else base64.b64decode(m["target_b64"])
                del e["mode"]
            elif m["kind"] == "file":
                e["sha256"] = m["sha256"]
            elif m["kind"] in ("char", "block"):
                e["rdev"] = (m["rdev_major"], m["rdev_minor"])
            cap = m.get("xattrs", {}).get("security.capability")
            if cap is not None:
                e["cap"] = base64.b64decode(cap)
            out[p] = e
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("umoci")
    ap.add_argument("layerx")
    ap.add_argument("manifest")
    ap.add_argument("--mode", choices=("root", "rootless", "ext4"), required=True,
                    help="ext4: LAYERX_ROOTFS is an ext4_dump listing; everything must match, "
                         "devices and capabilities included")
    a = ap.parse_args()
    ref = walk(a.umoci, rootless=False)
    got = load_dump(a.layerx) if a.mode == "ext4" else walk(a.layerx, rootless=a.mode == "rootless")
    manifest = {}
    with open(a.manifest) as f:
        for line in f:
            m = json.loads(line)
            path = m["path"].encode() if "path" in m else base64.b64decode(m["path_b64"])
            manifest[path] = m
    problems = []
    for path in sorted(set(ref) | set(got)):
        r, g = ref.get(path), got.get(path)
        m = manifest.get(path)
        if r is not None and r["kind"] in ("char", "block") and a.mode == "rootless":
            # Not on disk by design; the manifest must carry it exactly.
            if g is not None:
                problems.append(f"{path!r}: device node present on disk")
            if m is None or m["kind"] != r["kind"] or (m.get("rdev_major"), m.get("rdev_minor")) != r["rdev"] \
                    or m["mode"] != r["mode"] or (m["uid"], m["gid"]) != r["owner"]:
                problems.append(f"{path!r}: device missing or wrong in the manifest: {m}")
            continue
        if r is None or g is None:
            problems.append(f"{path!r}: only in {'layerx' if r is None else 'umoci'}")
            continue
        if m is None:
            problems.append(f"{path!r}: not in the manifest")
        rc = r.pop("cap", None) if a.mode == "rootless" else r.get("cap")
        if a.mode == "rootless":
            g.pop("cap", None)
        if rc is not None:
            mc = base64.b64decode(m.get("xattrs", {}).get("security.capability", "")) if m else b""
            if mc != rc:
                problems.append(f"{path!r}: security.capability missing from the manifest")
        if a.mode == "rootless" and r["kind"] == "fifo" and m is not None:
            # The kernel allows user.* xattrs on files and dirs only: a fifo's
            # owner lives in the manifest.
            g["owner"] = (m["uid"], m["gid"])
        if r != g:
            problems.append(f"{path!r}: umoci {r} layerx {g}")
    print(f"compared {len(ref)} umoci entries with {len(got)} layerx entries "
          f"({len(manifest)} manifest lines), mode {a.mode}: {len(problems)} differences")
    for p in problems[:50]:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
