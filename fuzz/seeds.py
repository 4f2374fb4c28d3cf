#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora (corpus/TARGET/seed-*) from the project's examples and
from the inputs its tests use, in each target's input format (see fuzz_targets/*.rs).
Run from fuzz/: python3 seeds.py. The seeds are committed; what libFuzzer adds is not."""
import glob, io, json, os, tarfile

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")


def field(b: bytes) -> bytes:
    """One length-prefixed field (at most 255 bytes), as poolkeeper_fuzz::Fields reads it."""
    b = b[:255]
    return bytes([len(b)]) + b


def write(target, name, data: bytes):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# spec_files: a byte choosing .yaml (0), .json (1) or a Pod Manager .json (2), then the text.
for path in sorted(glob.glob(os.path.join(ROOT, "..", "examples", "**", "*.*"), recursive=True)):
    base = os.path.basename(path)
    if path.endswith((".yaml", ".yml")):
        write("spec_files", base, b"\x00" + open(path, "rb").read())
    elif path.endswith(".json"):
        which = b"\x02" if "pod-manager" in path else b"\x01"
        write("spec_files", os.path.basename(os.path.dirname(path)) + "-" + base, which + open(path, "rb").read())
write("spec_files", "bad-indent.yaml", b"\x00apiVersion: poolkeeper.dev/v1alpha1\nkind: Pool\nmetadata:\n name: a\n  spec: {}\n")
write("spec_files", "two-docs.yaml", b"\x00kind: User\nmetadata: {name: a}\nspec: {quota: {maxClaims: 1}}\n---\nkind: Claim\nmetadata: {name: c}\nspec: {pool: p, user: a, ttl: 1h}\n")


def tar_of(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, kind, content in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(content) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = "/etc/passwd"
            t.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


REG, DIR, SYM = tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE
# tar_upload: 0 then a raw archive, or 1 then entries (count; type, path, content fields).
for name, entries in {
    "plain": [("index.html", REG, b"<h1>hi</h1>"), ("css/site.css", REG, b"body{}")],
    "dot-slash-twice": [("x", REG, b"1"), ("./x", REG, b"2")],
    "file-and-folder": [("a", REG, b"1"), ("a/b", REG, b"2")],
    "dotdot": [("../escape", REG, b"1")],
    "absolute": [("/etc/passwd", REG, b"1")],
    "symlink": [("link", SYM, b"")],
    "folders": [("d", DIR, b""), ("d/f", REG, b"x")],
}.items():
    write("tar_upload", name, b"\x00" + tar_of(entries))
write("tar_upload", "built", b"\x01\x03" + b"\x00" + field(b"a/b") + field(b"x") + b"\x03" + field(b"a") + field(b"") + b"\x04" + field(b"l") + field(b""))


def form(parts):
    out = b""
    for name, filename, content in parts:
        out += b"--b\r\nContent-Disposition: form-data; name=\"" + name + b"\""
        if filename is not None:
            out += b"; filename=\"" + filename + b"\""
        out += b"\r\n\r\n" + content + b"\r\n"
    return out + b"--b--\r\n"


# multipart_upload: 0, a Content-Type field, the raw body; or 1 and parts.
ct = field(b"multipart/form-data; boundary=b")
write("multipart_upload", "two-files", b"\x00" + ct + form([(b"file", b"index.html", b"hi"), (b"file", b"js/app.js", b"1")]))
write("multipart_upload", "same-twice", b"\x00" + ct + form([(b"file", b"x", b"1"), (b"file", b"./x", b"2")]))
write("multipart_upload", "no-filename", b"\x00" + ct + form([(b"field", None, b"v")]))
write("multipart_upload", "dotdot", b"\x00" + ct + form([(b"file", b"../x", b"v")]))
write("multipart_upload", "built", b"\x01\x02" + field(b"file") + field(b"a") + field(b"1") + b"\x01" + field(b"file") + field(b"a/b") + field(b"2") + b"\x01")

# webhook: a mode (0: the fuzzed headers; else signed), timestamp and signature fields, body.
events = [
    {"event": "provision", "resource_name": "lab-1", "username": "fuzz", "user_id": 7,
     "custom_parameters": {"image": "fuzz/web:1", "cpu_limit": "1", "memory_limit": "256m",
                           "storage_limit": "1Gi", "persistent_storage": True,
                           "environment": {"A": "b"}, "ports": [80]}},
    {"event": "release", "resource_name": "lab-1", "username": "fuzz"},
    {"event": "provision", "resource_name": "lab-1", "username": "someone-else"},
    {"event": "reboot", "resource_name": "x", "username": "fuzz"},
    {"event": "provision", "resource_name": "x", "username": "fuzz", "extra": 1},
]
for i, e in enumerate(events):
    write("webhook", f"event-{i}", b"\x01" + field(b"") + field(b"") + json.dumps(e).encode())
write("webhook", "bad-signature", b"\x00" + field(b"1700000000") + field(b"sha256=00") + json.dumps(events[0]).encode())

# api_requests: method, route, name, query, auth, content type (indices into the target's
# tables), then the body.
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
ROUTES = ["/api/v1/claims", "/api/v1/claims/{}", "/api/v1/claims/{}/files", "/api/v1/pools/{}/scale",
          "/api/v1/pools/{}/reinitialise", "/api/v1/users/{}", "/api/v1/users/{}/release", "/api/v1/{}",
          "/api/v1/pools/{}", "/webhooks/reservations", "/healthz", "/readyz", "/metrics", "/openapi.json", "/{}"]


def request(method, route, name=b"", query=b"", auth=0, ctype=0, body=b""):
    return (bytes([METHODS.index(method), ROUTES.index(route)]) + field(name) + field(query)
            + bytes([auth]) + bytes([ctype]) + body)


write("api_requests", "create-claim", request("POST", "/api/v1/claims", body=json.dumps({"pool": "web", "ttl": "10m"}).encode()))
write("api_requests", "create-named", request("POST", "/api/v1/claims", body=json.dumps({"name": "c1", "pool": "web", "files": {"a.txt": "hi"}}).encode()))
write("api_requests", "get-claim", request("GET", "/api/v1/claims/{}", b"c1"))
write("api_requests", "delete-claim", request("DELETE", "/api/v1/claims/{}", b"c1"))
write("api_requests", "upload-tar", request("PUT", "/api/v1/claims/{}/files", b"c1", ctype=1, body=tar_of([("index.html", REG, b"hi")])))
write("api_requests", "upload-form", request("PUT", "/api/v1/claims/{}/files", b"c1", ctype=2, body=form([(b"file", b"a.txt", b"x")])))
write("api_requests", "scale", request("POST", "/api/v1/pools/{}/scale", b"web", auth=1, body=b'{"warm": 3}'))
write("api_requests", "reinitialise", request("POST", "/api/v1/pools/{}/reinitialise", b"web", auth=1))
write("api_requests", "release-user", request("POST", "/api/v1/users/{}/release", b"fuzz", auth=1))
write("api_requests", "list-pools", request("GET", "/api/v1/{}", b"pools", query=b"limit=1"))
write("api_requests", "list-claims-query", request("GET", "/api/v1/claims", query=b"pool=web&user=fuzz"))
write("api_requests", "metrics", request("GET", "/metrics"))
