"""A fake Hub at huggingface_hub's HTTP boundary: the endpoints of one commit and of downloads, every
request recorded.

`use_fake_hub()` swaps huggingface_hub's HTTP client factory for one whose transport is a
`FakeHub`, so its own code (create_repo, create_branch, create_commit, snapshot_download) runs down
to the wire. `FakeHub.serve(repo_id, folder, commit)` publishes a folder's files as a model repo.
"""

import base64
import hashlib
import json
import re
from contextlib import contextmanager
from urllib.parse import unquote

from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory

from nearid.loading import git_blob_id

try:
    import httpx2 as httpx  # the HTTP client of huggingface_hub >= 2
except ImportError:
    import httpx  # huggingface_hub 1.x


class FakeHub:
    """The Hub endpoints of a commit, answered like the Hub does; every request is recorded."""

    def __init__(self):
        self.requests = []
        self.commit_status = 200
        self.network_down = False
        self.served = {}  # repo id -> {revision: (commit, {repo path: bytes})}

    def serve(self, repo_id, folder, commit="f" * 40, branch="main"):
        """Publish every file of `folder` as the model repo `repo_id` at `commit`, which `branch` then points to
        (earlier commits stay served by their hash)."""
        from pathlib import Path

        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
        revisions = self.served.setdefault(repo_id, {})
        revisions[commit] = revisions[branch] = (commit, files)

    def _served(self, repo_id, revision):
        """(commit, files) of `repo_id` at `revision` (a branch or a commit), or None."""
        return self.served.get(repo_id, {}).get(unquote(revision))

    def downloads(self):
        """The repo paths of the files whose content was downloaded (GET .../resolve/...)."""
        return [r.url.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                if r.method == "GET" and "/resolve/" in r.url.path]

    def _download_endpoints(self, request):
        path = request.url.path
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path)
        if request.method == "GET" and match and self._served(match[1], match[2]):
            commit, files = self._served(match[1], match[2])
            return httpx.Response(200, json={"id": match[1], "sha": commit,
                                             "siblings": [{"rfilename": name} for name in files]})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path)
        if request.method == "GET" and match and self._served(match[1], match[2]):
            files = self._served(match[1], match[2])[1]
            return httpx.Response(200, json=[{"type": "file", "path": name, "size": len(content),
                                              "oid": git_blob_id(content)}
                                             for name, content in files.items()])
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match and self._served(match[1], match[2]) and match[3] in self._served(match[1], match[2])[1]:
            commit, files = self._served(match[1], match[2])
            content = files[match[3]]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                       "Content-Length": str(len(content))}
            return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else content)
        return None

    def __call__(self, request):
        self.requests.append(request)
        if self.network_down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        served = self._download_endpoints(request)
        if served is not None:
            return served
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            return httpx.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if request.method == "POST" and path == "/api/validate-yaml":
            return httpx.Response(200, json={"errors": [], "warnings": []})
        if request.method == "POST" and re.fullmatch(r"/api/(models|spaces)/[^/]+/[^/]+/branch/[^/]+", path):
            return httpx.Response(200, json={})
        if request.method == "POST" and re.fullmatch(r"/api/(models|spaces)/[^/]+/[^/]+/preupload/[^/]+", path):
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        match = re.fullmatch(r"/api/(?:models|spaces)/([^/]+/[^/]+)/commit/([^/]+)", path)
        if request.method == "POST" and match:
            if self.commit_status != 200:
                return httpx.Response(self.commit_status, json={"error": "Internal Error"})
            pull_request = f"https://huggingface.co/{match[1]}/discussions/7"
            return httpx.Response(200, json={"commitUrl": f"https://huggingface.co/{match[1]}/commit/{'c' * 40}",
                                             "commitOid": "c" * 40, "pullRequestUrl":
                                             pull_request if request.url.params.get("create_pr") == "1" else None})
        return httpx.Response(404, json={"error": f"the fake Hub has no {request.method} {path}"})

    def calls(self, kind):
        return [r for r in self.requests if f"/{kind}" in r.url.path]


@contextmanager
def use_fake_hub():
    fake = FakeHub()
    set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(fake), follow_redirects=True))
    try:
        yield fake
    finally:
        set_client_factory(default_client_factory)


def commit_payload(request):
    """(header, {repo path: file bytes}) of a commit request's NDJSON body."""
    lines = [json.loads(line) for line in request.content.decode().splitlines()]
    header = next(line["value"] for line in lines if line["key"] == "header")
    files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
             for line in lines if line["key"] == "file"}
    return header, files
