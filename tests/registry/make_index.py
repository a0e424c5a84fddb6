#!/usr/bin/env python3
"""Makes an OCI layout whose ref REF names an image index of existing images.

usage: make_index.py OUT_LAYOUT REF SRC_LAYOUT:SRC_REF=OS/ARCH[/VARIANT] ...

Each source image (an image manifest named SRC_REF in SRC_LAYOUT's index.json)
goes into the index under the platform given. Where the image's config says
another os/architecture/variant (the corpus images are all linux/amd64), a new
config with those three fields changed and a new manifest pointing at it are
written, so the index and the configs agree; otherwise the manifest's bytes are
kept. Blobs are copied (never linked: a test may tamper with this layout, and
the sources are shared, read-only). Prints one line per entry: platform and
manifest digest, then the index's digest. Python standard library only.
"""
import hashlib
import json
import os
import shutil
import sys


def die(msg):
    sys.exit("make_index.py: " + msg)


def blob_path(layout, digest):
    algo, hexpart = digest.split(":", 1)
    if algo != "sha256" or len(hexpart) != 64:
        die("unsupported digest " + digest)
    return os.path.join(layout, "blobs", algo, hexpart)


def read_blob(layout, digest):
    with open(blob_path(layout, digest), "rb") as f:
        data = f.read()
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        die("blob %s in %s does not match its digest" % (digest, layout))
    return data


def put_blob(out, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(out, digest)
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.rename(path + ".tmp", path)
    return digest


def copy_blob(src, out, digest):
    dst = blob_path(out, digest)
    if not os.path.exists(dst):
        shutil.copyfile(blob_path(src, digest), dst + ".tmp")
        os.rename(dst + ".tmp", dst)


def find_manifest(layout, ref):
    with open(os.path.join(layout, "index.json"), "rb") as f:
        index = json.load(f)
    for d in index.get("manifests", []):
        if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref:
            if d["mediaType"] != "application/vnd.oci.image.manifest.v1+json":
                die("%s:%s is a %s, not an OCI image manifest" % (layout, ref, d["mediaType"]))
            return d
    die("no ref %s in %s/index.json" % (ref, layout))


def main(argv):
    if len(argv) < 4:
        die("usage: make_index.py OUT_LAYOUT REF SRC_LAYOUT:SRC_REF=OS/ARCH[/VARIANT] ...")
    out, ref, specs = argv[1], argv[2], argv[3:]
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    entries = []
    for spec in specs:
        source, _, platform = spec.rpartition("=")
        src, _, src_ref = source.partition(":")  # as skopeo: the first colon
        parts = platform.split("/")
        if not src or not src_ref or len(parts) not in (2, 3):
            die("bad source " + spec + " (want LAYOUT:REF=OS/ARCH[/VARIANT])")
        plat = {"architecture": parts[1], "os": parts[0]}
        if len(parts) == 3:
            plat["variant"] = parts[2]
        desc = find_manifest(src, src_ref)
        manifest_bytes = read_blob(src, desc["digest"])
        manifest = json.loads(manifest_bytes)
        for layer in manifest["layers"]:
            copy_blob(src, out, layer["digest"])
        config_bytes = read_blob(src, manifest["config"]["digest"])
        config = json.loads(config_bytes)
        if (config.get("os"), config.get("architecture"), config.get("variant")) != (
                plat["os"], plat["architecture"], plat.get("variant")):
            config["os"] = plat["os"]
            config["architecture"] = plat["architecture"]
            config.pop("variant", None)
            if "variant" in plat:
                config["variant"] = plat["variant"]
            config_bytes = json.dumps(config, separators=(",", ":")).encode()
            manifest["config"]["digest"] = put_blob(out, config_bytes)
            manifest["config"]["size"] = len(config_bytes)
            manifest_bytes = json.dumps(manifest, separators=(",", ":")).encode()
        else:
            put_blob(out, config_bytes)
        digest = put_blob(out, manifest_bytes)
        entries.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": digest, "size": len(manifest_bytes), "platform": plat})
        print("%s %s" % (platform, digest))
    index_bytes = json.dumps({"schemaVersion": 2,
                              "mediaType": "application/vnd.oci.image.index.v1+json",
                              "manifests": entries}, separators=(",", ":")).encode()
    index_digest = put_blob(out, index_bytes)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": index_digest,
            "size": len(index_bytes),
            "annotations": {"org.opencontainers.image.ref.name": ref}}]}, f, separators=(",", ":"))
    print("index %s" % index_digest)


if __name__ == "__main__":
    main(sys.argv)
