#!/usr/bin/env python3
"""Extracts layers into a rootfs directory through layerx's C ABI, from Python (ctypes).

    extract.py ROOTFS SOURCE...        SOURCE: oci:DIR[:REF], docker-archive:FILE, layer files

The library is $LAYERX_LIBRARY, else liblayerx.so.0 wherever the dynamic loader
finds it. Prints "ok: N entries" and the JSON summary, or the one-line error and
its parts, and exits 0 or 1. The layerx-extractor helper is found relative to
the library (see include/layerx/layerx.hpp), not to python3.
"""
import ctypes
import json
import os
import sys

lib = ctypes.CDLL(os.environ.get("LAYERX_LIBRARY", "liblayerx.so.0"))

OUTPUT_ROOTFS = 1
LOG_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p)


class Progress(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("layer", ctypes.c_size_t),
                ("layers", ctypes.c_size_t), ("bytes_fed", ctypes.c_uint64),
                ("blob_bytes", ctypes.c_uint64), ("entries", ctypes.c_uint64),
                ("done", ctypes.c_int)]


PROGRESS_FN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(Progress))

lib.layerx_version.restype = ctypes.c_char_p
lib.layerx_status_name.restype = ctypes.c_char_p
lib.layerx_request_new.restype = ctypes.c_void_p
lib.layerx_request_free.argtypes = [ctypes.c_void_p]
lib.layerx_request_add_source.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.layerx_request_set_output.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
lib.layerx_request_set_log.argtypes = [ctypes.c_void_p, LOG_FN, ctypes.c_int, ctypes.c_void_p]
lib.layerx_request_set_progress.argtypes = [ctypes.c_void_p, PROGRESS_FN, ctypes.c_void_p]
lib.layerx_extract.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
lib.layerx_result_free.argtypes = [ctypes.c_void_p]
for name in ("message", "reason", "layer_name", "json"):
    fn = getattr(lib, "layerx_result_" + name)
    fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
lib.layerx_result_entry.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]
lib.layerx_result_entry.restype = ctypes.POINTER(ctypes.c_char)
lib.layerx_result_layer_index.argtypes = [ctypes.c_void_p]
lib.layerx_result_layer_index.restype = ctypes.c_size_t
lib.layerx_result_entries.argtypes = [ctypes.c_void_p]
lib.layerx_result_entries.restype = ctypes.c_uint64


def extract(rootfs, sources):
    req = lib.layerx_request_new()
    try:
        for s in sources:
            lib.layerx_request_add_source(req, os.fsencode(s))
        lib.layerx_request_set_output(req, OUTPUT_ROOTFS, os.fsencode(rootfs))
        logs, done = [], []
        on_log = LOG_FN(lambda user, level, comp, msg: logs.append((level, comp, msg)))
        on_progress = PROGRESS_FN(lambda user, p: p.contents.done and done.append(p.contents.layer))
        lib.layerx_request_set_log(req, on_log, 3, None)
        lib.layerx_request_set_progress(req, on_progress, None)
        res = ctypes.c_void_p()
        status = lib.layerx_extract(req, ctypes.byref(res))
        try:
            if status == 0:
                return {"ok": True, "entries": lib.layerx_result_entries(res),
                        "layers_done": done, "report": json.loads(lib.layerx_result_json(res))}
            size = ctypes.c_size_t()
            entry = lib.layerx_result_entry(res, ctypes.byref(size))
            return {"ok": False, "status": lib.layerx_status_name(status).decode(),
                    "message": lib.layerx_result_message(res).decode("utf-8", "replace"),
                    "layer": lib.layerx_result_layer_index(res),
                    "entry": ctypes.string_at(entry, size.value),
                    "reason": lib.layerx_result_reason(res).decode("utf-8", "replace")}
        finally:
            lib.layerx_result_free(res)
    finally:
        lib.layerx_request_free(req)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: extract.py ROOTFS SOURCE...")
    print("layerx", lib.layerx_version().decode())
    r = extract(sys.argv[1], sys.argv[2:])
    if r["ok"]:
        print(f"ok: {r['entries']} entries, layers done {r['layers_done']}")
        print(json.dumps(r["report"], indent=2))
        sys.exit(0)
    print(f"error: {r['message']}", file=sys.stderr)
    print(f"  status={r['status']} layer={r['layer']} entry={r['entry']!r} reason={r['reason']}",
          file=sys.stderr)
    sys.exit(1)
