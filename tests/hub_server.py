"""A small Hugging Face Hub-compatible HTTP server for tests: the endpoints the real `huggingface_hub` client
calls to create repos and branches, commit files (regular and LFS), and download them, with repos stored on disk.

Every request must carry `Authorization: Bearer <token>` with the server's token, otherwise it gets the Hub's 401.
Run it with `HubServer(root, token).start()`; point clients at it with HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET=1.
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".png")
REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
TYPES = r"(?P<type>models|datasets|spaces)"


class RepoStore:
    """Repos on disk: <root>/<ns>/<name>/refs/<branch>.json = {"commit", "files": {path: {"blob", "size", "lfs"}}},
    the same per commit id under snapshots/, blobs (by sha256) under <root>/blobs, and the commit log per repo."""

    def __init__(self, root: Path):
        self.root = root
        self.lock = threading.Lock()
        self.quota_bytes = None  # a commit adding more is refused, as the Hub refuses one past a storage limit
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def repo_dir(self, ns, name) -> Path:
        return self.root / ns / name

    def exists(self, ns, name) -> bool:
        return (self.repo_dir(ns, name) / "refs").is_dir()

    def ref(self, ns, name, revision) -> dict | None:
        """A branch's head, or the snapshot of a commit id."""
        for kind in ("refs", "snapshots"):
            path = self.repo_dir(ns, name) / kind / f"{revision}.json"
            if path.exists():
                return json.loads(path.read_text())
        return None

    def write_ref(self, ns, name, branch, ref):
        for path in (self.repo_dir(ns, name) / "refs" / f"{branch}.json",
                     self.repo_dir(ns, name) / "snapshots" / f"{ref['commit']}.json"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(ref))

    def branches(self, ns, name) -> list[str]:
        return sorted(p.stem for p in (self.repo_dir(ns, name) / "refs").glob("*.json"))

    def create(self, ns, name, private: bool):
        self.write_ref(ns, name, "main", {"commit": hashlib.sha1(f"{ns}/{name}".encode()).hexdigest(), "files": {}})
        (self.repo_dir(ns, name) / "settings.json").write_text(json.dumps({"private": private}))

    def private(self, ns, name) -> bool:
        return json.loads((self.repo_dir(ns, name) / "settings.json").read_text())["private"]

    def put_blob(self, data: bytes) -> str:
        oid = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / oid).write_bytes(data)
        return oid

    def has_blob(self, oid) -> bool:
        return (self.root / "blobs" / oid).exists()

    def blob(self, oid) -> bytes:
        return (self.root / "blobs" / oid).read_bytes()

    def commits(self, ns, name) -> list[dict]:
        log = self.repo_dir(ns, name) / "commits.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def commit(self, ns, name, branch, summary, changes: dict, deletions: list[str]) -> str:
        ref = self.ref(ns, name, branch)
        files = {**ref["files"], **changes}
        for path in deletions:
            files.pop(path, None)
        oid = hashlib.sha1(json.dumps([ref["commit"], summary, sorted(files.items())]).encode()).hexdigest()
        self.write_ref(ns, name, branch, {"commit": oid, "files": files})
        with open(self.repo_dir(ns, name) / "commits.jsonl", "a") as log:
            log.write(json.dumps({"oid": oid, "branch": branch, "summary": summary, "paths": sorted(changes)}) + "\n")
        return oid


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: RepoStore
    token: str
    url: str

    def log_message(self, *args):  # keep test output quiet
        pass

    # -- plumbing -----------------------------------------------------------------------------------------------
    def body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status: int, payload=None, headers: dict | None = None, raw: bytes | None = None, head=False):
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.send_response(status)
        content_type = "application/octet-stream" if raw is not None else "application/json"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def error(self, status: int, code: str, message: str, head=False):
        self.send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    def authorized(self, head=False) -> bool:
        if self.headers.get("Authorization") == f"Bearer {self.token}":
            return True
        self.send(401, {"error": "Invalid credentials in Authorization header"},
                  {"X-Error-Message": "Invalid credentials in Authorization header"}, head=head)
        return False

    def route(self, routes, head=False, signed=False):
        """Dispatch to the first matching route; every route needs the token, except `signed` ones whose URL
        carries its own signature (like the presigned storage URLs the Hub hands out for LFS uploads)."""
        self.payload = self.body()  # read first, so an early answer leaves the connection clean
        path = unquote(urlparse(self.path).path)
        for pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match:
                if not signed and not self.authorized(head):
                    return
                with self.store.lock:
                    return handler(head=head, **match.groupdict()) if head else handler(**match.groupdict())
        self.error(404, "RouteNotFound", f"no route for {self.command} {path}", head=head)

    def known_repo(self, ns, name, head=False) -> bool:
        if self.store.exists(ns, name):
            return True
        self.error(404, "RepoNotFound", f"Repository {ns}/{name} not found", head=head)
        return False

    # -- verbs --------------------------------------------------------------------------------------------------
    def do_POST(self):
        self.route([
            (r"/api/repos/create", self.create_repo),
            (r"/api/validate-yaml", lambda: self.send(200, {"errors": [], "warnings": []})),
            (rf"/api/{TYPES}/{REPO}/preupload/(?P<rev>[^/]+)", self.preupload),
            (rf"/api/{TYPES}/{REPO}/commit/(?P<rev>[^/]+)", self.commit),
            (rf"/api/{TYPES}/{REPO}/branch/(?P<branch>[^/]+)", self.create_branch),
            (rf"/{REPO}\.git/info/lfs/objects/batch", self.lfs_batch),
        ])

    def do_PUT(self):
        self.route([(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.lfs_upload)], signed=True)

    def do_GET(self):
        self.route(self.read_routes())

    def do_HEAD(self):
        self.route(self.read_routes(), head=True)

    def read_routes(self):
        return [
            (r"/api/whoami-v2", lambda head=False: self.send(200, {"type": "user", "name": "user"}, head=head)),
            (rf"/api/{TYPES}/{REPO}/refs", self.refs),
            (rf"/api/{TYPES}/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree),
            (rf"/api/{TYPES}/{REPO}(?:/revision/(?P<rev>[^/]+))?", self.repo_info),
            (rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
        ]

    # -- endpoints ----------------------------------------------------------------------------------------------
    def create_repo(self):
        request = json.loads(self.payload or b"{}")
        ns = request.get("organization") or "user"
        name = request["name"]
        url = f"{self.url}/{ns}/{name}"
        if self.store.exists(ns, name):
            return self.send(409, {"error": "You already created this model repo", "url": url})
        # huggingface_hub 2.x sends "visibility", 1.x "private".
        self.store.create(ns, name, request.get("visibility") == "private" or bool(request.get("private")))
        self.send(200, {"url": url, "name": f"{ns}/{name}"})

    def create_branch(self, type, ns, name, branch):
        if not self.known_repo(ns, name):
            return
        if self.store.ref(ns, name, branch) is not None:
            return self.error(409, "BranchAlreadyExists", f"Reference {branch} already exists")
        self.store.write_ref(ns, name, branch, self.store.ref(ns, name, "main"))
        self.send(200, {})

    def preupload(self, type, ns, name, rev):
        request = json.loads(self.payload)
        if not self.known_repo(ns, name):
            return
        files = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                  "shouldIgnore": False} for f in request["files"]]
        self.send(200, {"files": files, "commitOid": self.store.ref(ns, name, rev)["commit"]})

    def lfs_batch(self, ns, name):
        request = json.loads(self.payload)
        objects = []
        for item in request["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if not self.store.has_blob(item["oid"]):
                signature = self.signature(item["oid"])
                entry["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{item['oid']}?sig={signature}"}}
            objects.append(entry)
        self.send(200, {"transfer": "basic", "objects": objects})

    def signature(self, oid: str) -> str:
        return hashlib.sha256(f"{self.token}:{oid}".encode()).hexdigest()

    def lfs_upload(self, oid):
        if parse_qs(urlparse(self.path).query).get("sig") != [self.signature(oid)]:
            return self.error(403, "SignatureDoesNotMatch", "bad upload signature")
        data = self.payload
        if hashlib.sha256(data).hexdigest() != oid:
            return self.error(400, "BadRequest", "content does not match its oid")
        self.store.put_blob(data)
        self.send(200, {})

    def commit(self, type, ns, name, rev):
        lines = [json.loads(line) for line in self.payload.decode().splitlines() if line.strip()]
        if not self.known_repo(ns, name):
            return
        if self.store.ref(ns, name, rev) is None:
            return self.error(404, "RevisionNotFound", f"Revision {rev} not found")
        summary, changes, deletions = "", {}, []
        size = sum(line["value"]["size"] if line["key"] == "lfsFile" else len(base64.b64decode(line["value"]["content"]))
                   for line in lines if line["key"] in ("file", "lfsFile"))
        if self.store.quota_bytes is not None and size > self.store.quota_bytes:
            return self.error(413, "StorageLimitReached", f"This commit ({size} bytes) exceeds the repository's "
                              f"storage limit of {self.store.quota_bytes} bytes")
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                data = base64.b64decode(value["content"])
                changes[value["path"]] = {"blob": self.store.put_blob(data), "size": len(data), "lfs": False}
            elif key == "lfsFile":
                if not self.store.has_blob(value["oid"]):
                    return self.error(400, "BadRequest", f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = {"blob": value["oid"], "size": value["size"], "lfs": True}
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append(value["path"])
        oid = self.store.commit(ns, name, rev, summary, changes, deletions)
        self.send(200, {"commitUrl": f"{self.url}/{ns}/{name}/commit/{oid}", "commitOid": oid,
                        "pullRequestUrl": None})

    def refs(self, type, ns, name):
        if not self.known_repo(ns, name):
            return
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": self.store.ref(ns, name, b)["commit"]}
                    for b in self.store.branches(ns, name)]
        self.send(200, {"branches": branches, "tags": [], "converts": []})

    def resolved_ref(self, ns, name, rev, head=False):
        if not self.known_repo(ns, name, head):
            return None
        ref = self.store.ref(ns, name, rev or "main")
        if ref is None:
            self.error(404, "RevisionNotFound", f"Revision {rev} not found", head=head)
        return ref

    def repo_info(self, type, ns, name, rev=None, head=False):
        ref = self.resolved_ref(ns, name, rev, head)
        if ref is None:
            return
        self.send(200, {"id": f"{ns}/{name}", "modelId": f"{ns}/{name}", "sha": ref["commit"],
                        "private": self.store.private(ns, name),
                        "siblings": [{"rfilename": path} for path in sorted(ref["files"])]}, head=head)

    def tree(self, type, ns, name, rev, path=None, head=False):
        ref = self.resolved_ref(ns, name, rev, head)
        if ref is None:
            return
        prefix = (path or "").strip("/")
        recursive = parse_qs(urlparse(self.path).query).get("recursive", ["false"])[0].lower() in ("true", "1")
        entries, folders = [], set()
        for file_path, entry in sorted(ref["files"].items()):
            if prefix and not file_path.startswith(prefix + "/"):
                continue
            rest = file_path[len(prefix) + 1 :] if prefix else file_path
            parts = rest.split("/")[:-1]
            for depth in range(1, len(parts) + 1 if recursive else min(len(parts), 1) + 1):
                folders.add("/".join(([prefix] if prefix else []) + parts[:depth]))
            if parts and not recursive:
                continue
            item = {"type": "file", "path": file_path, "size": entry["size"], "oid": entry["blob"]}
            if entry["lfs"]:
                item["lfs"] = {"oid": entry["blob"], "size": entry["size"], "pointerSize": 134}
            entries.append(item)
        if prefix and not entries and not folders:
            return self.error(404, "EntryNotFound", f"{prefix} does not exist", head=head)
        self.send(200, [{"type": "directory", "path": f, "oid": ref["commit"]} for f in sorted(folders)] + entries,
                  head=head)

    def resolve(self, ns, name, rev, path, head=False):
        ref = self.resolved_ref(ns, name, rev, head)
        if ref is None:
            return
        entry = ref["files"].get(path)
        if entry is None:
            return self.error(404, "EntryNotFound", f"{path} does not exist on {rev}", head=head)
        data = self.store.blob(entry["blob"])
        headers = {"X-Repo-Commit": ref["commit"], "ETag": f'"{entry["blob"]}"'}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["blob"]}"', "X-Linked-Size": str(entry["size"])})
        self.send(200, headers=headers, raw=data, head=head)


class HubServer:
    def __init__(self, root: Path, token: str):
        self.store = RepoStore(Path(root))
        handler = type("Handler", (HubHandler,), {"store": self.store, "token": token})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        handler.url = self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
