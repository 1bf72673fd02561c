"""A fake Hub at huggingface_hub's HTTP boundary: the endpoints of one commit, every request recorded.

`use_fake_hub()` swaps huggingface_hub's HTTP client factory for one whose transport is a
`FakeHub`, so its own code (create_repo, create_branch, create_commit) runs down to the wire.
"""

import base64
import json
import re
from contextlib import contextmanager

from huggingface_hub.utils import set_client_factory
from huggingface_hub.utils._http import default_client_factory

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

    def __call__(self, request):
        self.requests.append(request)
        if self.network_down:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
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
