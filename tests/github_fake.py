"""A stateful fake of the parts of GitHub's REST API that gpuline uses, on pytest-httpserver.

It follows GitHub's published contract: the token's own user (``GET /user``, which an installation
token such as GITHUB_TOKEN is refused with 403), issue comments with their authors (list with Link
pagination, create, update, delete), JIT runner configs and runners, file contents at a ref,
deployments and their statuses, and workflow runs (only those a test marked finished; any other is 404).
Every ``url`` it returns points back at the fake, so PyGithub's object chains keep working.

When GitHub's own OpenAPI description is installed (npm ``@octokit/openapi``), every request is
checked against it: the operation must exist and the JSON body must match its schema. Violations are
answered 422, as GitHub would, and collected in ``FakeGitHub.violations``.

Use it from a test module::

    pytest_plugins = ["github_fake"]  # fixtures fake_github and openapi_contract
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from werkzeug import Request, Response

REPO_ROOT = Path(__file__).resolve().parents[1]
# Where `.ci/run` installs the package (an ignored folder); GPULINE_GITHUB_OPENAPI overrides it.
OPENAPI_DEFAULT = REPO_ROOT / "build/octokit/node_modules/@octokit/openapi/generated/api.github.com.json"


def openapi_path() -> Path | None:
    path = Path(os.environ.get("GPULINE_GITHUB_OPENAPI") or OPENAPI_DEFAULT)
    return path if path.is_file() else None


# ---------------------------------------------------------------- the contract


@dataclass
class Operation:
    method: str
    template: str
    pattern: re.Pattern[str]
    pointer: str  # JSON pointer of the operation inside the description
    operation: dict[str, Any]


class OpenApiContract:
    """GitHub's OpenAPI description, queried by (method, path) and used to validate request bodies."""

    def __init__(self, path: Path) -> None:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT202012

        self.path = path
        self.spec: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        self._registry = Registry().with_resource("urn:github", Resource.from_contents(self.spec, DRAFT202012))
        self._validator_cls = Draft202012Validator
        self.operations: list[Operation] = []
        for template, item in self.spec["paths"].items():
            # {path} of the contents API spans slashes; every other parameter is one segment.
            regex = "".join(
                ".+" if part == "{path}" else "[^/]+" if part.startswith("{") else re.escape(part)
                for part in re.split(r"(\{[^}]+\})", template)
            )
            for method, operation in item.items():
                if method in ("get", "post", "put", "patch", "delete"):
                    pointer = "/paths/" + template.replace("~", "~0").replace("/", "~1") + "/" + method
                    self.operations.append(
                        Operation(method.upper(), template, re.compile(f"^{regex}$"), pointer, operation)
                    )
        # Templates with more fixed segments win (".../runners/generate-jitconfig" over ".../runners/{id}").
        self.operations.sort(key=lambda op: (op.template.count("{"), -len(op.template)))

    def find(self, method: str, path: str) -> Operation | None:
        for op in self.operations:
            if op.method == method and op.pattern.match(path):
                return op
        return None

    def check(self, method: str, path: str, body: Any) -> list[str]:
        """Problems with this request according to the description (empty when it conforms)."""
        op = self.find(method, path)
        if op is None:
            return [f"{method} {path}: no such operation in GitHub's REST API"]
        content = op.operation.get("requestBody", {}).get("content", {})
        if "application/json" not in content:
            return [] if body is None else [f"{method} {op.template}: takes no JSON body"]
        required = op.operation["requestBody"].get("required", False)
        if body is None:
            return [f"{method} {op.template}: a JSON body is required"] if required else []
        schema_pointer = f"{op.pointer}/requestBody/content/application~1json/schema"
        validator = self._validator_cls({"$ref": f"urn:github#{schema_pointer}"}, registry=self._registry)
        return [f"{method} {op.template}: {e.json_path}: {e.message}" for e in validator.iter_errors(body)]


@pytest.fixture(scope="session")
def openapi_contract() -> OpenApiContract | None:
    path = openapi_path()
    return OpenApiContract(path) if path else None


# ---------------------------------------------------------------- the fake


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str]


@dataclass
class _Injected:
    method: str
    pattern: re.Pattern[str]
    status: int
    times: int


@dataclass
class FakeGitHub:
    base_url: str
    contract: OpenApiContract | None = None
    # GitHub Enterprise Server serves the API under /api/v3; the fake can do the same.
    prefix: str = ""
    # token -> "write" | "read"; empty means any token may do anything.
    tokens: dict[str, str] = field(default_factory=dict)
    # token -> login of the user it belongs to (a PAT). Any other token is an installation token, as
    # GITHUB_TOKEN is: GET /user refuses it and its comments are authored by github-actions[bot].
    users: dict[str, str] = field(default_factory=dict)
    comments: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    runners: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    contents: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    deployments: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    # (repo, run id) -> the workflow run as GET .../actions/runs/{id} answers it (status, conclusion).
    workflow_runs: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    # runner name -> the encoded_jit_config handed out for it, as the machine would receive it.
    jit_configs: dict[str, str] = field(default_factory=dict)
    statuses: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1001))
    _injected: list[_Injected] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _token: str = ""  # of the request being handled

    # ------------------------------------------------------------ test helpers

    def fail(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        """Answer the next ``times`` matching requests with ``status``."""
        self._injected.append(_Injected(method, re.compile(path_regex), status, times))

    def put_file(self, repo: str, ref: str, path: str, text: str) -> None:
        self.contents[(repo, ref, path)] = text.encode()

    def finish_workflow_run(self, repo: str, run_id: int, conclusion: str = "cancelled") -> None:
        """GitHub's record of a workflow run that ended (a cancelled run ends ``completed``)."""
        self.workflow_runs[(repo, run_id)] = {"status": "completed", "conclusion": conclusion}

    def plant_comment(self, repo: str, number: int, body: str, login: str, user_type: str = "User") -> dict[str, Any]:
        """A comment someone else wrote (``login``), as another user or app would have posted it."""
        comment = {"id": next(self._ids), "issue": number, "body": body, "user": self._user(login, user_type)}
        self.comments.setdefault((repo, number), []).append(comment)
        return comment

    def comments_on(self, repo: str, number: int) -> list[dict[str, Any]]:
        return self.comments.get((repo, number), [])

    def writes(self) -> list[Recorded]:
        return [r for r in self.requests if r.method != "GET"]

    # ------------------------------------------------------------ dispatch

    def handle(self, request: Request) -> Response:
        with self._lock:
            return self._handle(request)

    def _handle(self, request: Request) -> Response:
        path = request.path
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return self._error(404, f"Not Found (the API lives under {self.prefix})")
            path = path.removeprefix(self.prefix)
        raw = request.get_data(as_text=True)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            return self._error(400, "Problems parsing JSON")
        self.requests.append(
            Recorded(request.method, path, dict(request.args), body, {k.lower(): v for k, v in request.headers.items()})
        )
        if self.contract is not None:
            problems = self.contract.check(request.method, path, body)
            if problems:
                self.violations.extend(problems)
                return self._error(422, "; ".join(problems))
        for inj in self._injected:
            if inj.times > 0 and inj.method == request.method and inj.pattern.search(path):
                inj.times -= 1
                return self._error(inj.status, "injected failure")
        auth = request.headers.get("Authorization", "")
        token = auth.split(" ", 1)[1] if " " in auth else ""
        if self.tokens:
            if token not in self.tokens:
                return self._error(401, "Bad credentials")
            if self.tokens[token] != "write" and request.method != "GET":
                return self._error(403, "Resource not accessible by integration")
        self._token = token
        for method, pattern, handler in self._routes():
            m = re.fullmatch(pattern, path)
            if m and method == request.method:
                return handler(request, body, *m.groups())  # type: ignore[no-any-return]
        return self._error(404, "Not Found")

    def _routes(self) -> list[tuple[str, str, Any]]:
        repo = r"/repos/([^/]+/[^/]+)"
        return [
            ("GET", r"/user", self._get_user),
            ("GET", repo, self._get_repo),
            ("GET", rf"{repo}/issues/(\d+)", self._get_issue),
            ("GET", rf"{repo}/issues/(\d+)/comments", self._list_comments),
            ("POST", rf"{repo}/issues/(\d+)/comments", self._create_comment),
            ("PATCH", rf"{repo}/issues/comments/(\d+)", self._update_comment),
            ("DELETE", rf"{repo}/issues/comments/(\d+)", self._delete_comment),
            ("GET", rf"{repo}/contents/(.+)", self._get_contents),
            ("POST", rf"{repo}/deployments", self._create_deployment),
            ("GET", rf"{repo}/deployments/(\d+)", self._get_deployment),
            ("POST", rf"{repo}/deployments/(\d+)/statuses", self._create_status),
            ("POST", r"(?:/repos/([^/]+/[^/]+)|/orgs/([^/]+))/actions/runners/generate-jitconfig", self._jit),
            ("GET", r"(?:/repos/([^/]+/[^/]+)|/orgs/([^/]+))/actions/runners", self._list_runners),
            ("DELETE", r"(?:/repos/([^/]+/[^/]+)|/orgs/([^/]+))/actions/runners/(\d+)", self._delete_runner),
            ("GET", rf"{repo}/actions/runs/(\d+)", self._get_workflow_run),
        ]

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(json.dumps(data), status=status, content_type="application/json", headers=headers)

    def _error(self, status: int, message: str) -> Response:
        return self._json({"message": message, "documentation_url": "https://docs.github.com/rest"}, status)

    def _repo_json(self, repo: str) -> dict[str, Any]:
        owner, name = repo.split("/")
        return {
            "id": 1,
            "name": name,
            "full_name": repo,
            "owner": {"login": owner, "id": 1, "type": "Organization"},
            "url": f"{self.base_url}/repos/{repo}",
            "html_url": f"{self.base_url}/{repo}",
            "private": False,
        }

    def _user(self, login: str, user_type: str = "User") -> dict[str, Any]:
        # GitHub's simple-user: stable ids, so one login is one account.
        ident = 41898282 if login == "github-actions[bot]" else int(hashlib.sha1(login.encode()).hexdigest()[:7], 16)
        return {"login": login, "id": ident, "type": user_type, "url": f"{self.base_url}/users/{login}"}

    def _author(self) -> dict[str, Any]:
        """Who the current request's token writes as."""
        login = self.users.get(self._token)
        return self._user(login) if login else self._user("github-actions[bot]", "Bot")

    def _comment_json(self, repo: str, comment: dict[str, Any]) -> dict[str, Any]:
        return {
            # Comments a test stored without an author were written by GITHUB_TOKEN.
            "user": self._user("github-actions[bot]", "Bot"),
            **comment,
            "url": f"{self.base_url}/repos/{repo}/issues/comments/{comment['id']}",
            "html_url": f"{self.base_url}/{repo}/pull/{comment['issue']}#issuecomment-{comment['id']}",
            "issue_url": f"{self.base_url}/repos/{repo}/issues/{comment['issue']}",
        }

    def _find_comment(self, repo: str, comment_id: int) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        for (r, _), items in self.comments.items():
            if r != repo:
                continue
            for c in items:
                if c["id"] == comment_id:
                    return items, c
        return None

    # ------------------------------------------------------------ handlers

    def _get_user(self, request: Request, body: Any) -> Response:
        login = self.users.get(self._token)
        if login is None:
            # What GitHub answers an installation token (GITHUB_TOKEN) on GET /user.
            return self._error(403, "Resource not accessible by integration")
        return self._json({**self._user(login), "name": login, "html_url": f"{self.base_url}/{login}"})

    def _get_repo(self, request: Request, body: Any, repo: str) -> Response:
        return self._json(self._repo_json(repo))

    def _get_issue(self, request: Request, body: Any, repo: str, number: str) -> Response:
        n = int(number)
        return self._json(
            {
                "id": n,
                "number": n,
                "title": f"PR {n}",
                "state": "open",
                "url": f"{self.base_url}/repos/{repo}/issues/{n}",
                "comments_url": f"{self.base_url}/repos/{repo}/issues/{n}/comments",
                "html_url": f"{self.base_url}/{repo}/pull/{n}",
                "pull_request": {"url": f"{self.base_url}/repos/{repo}/pulls/{n}"},
                "comments": len(self.comments_on(repo, n)),
            }
        )

    def _list_comments(self, request: Request, body: Any, repo: str, number: str) -> Response:
        items = self.comments_on(repo, int(number))
        per_page = min(int(request.args.get("per_page", 30)), 100)
        page = int(request.args.get("page", 1))
        chunk = items[(page - 1) * per_page : page * per_page]
        headers = {}
        if page * per_page < len(items):
            query = urlencode({"per_page": per_page, "page": page + 1})
            headers["Link"] = f'<{self.base_url}/repos/{repo}/issues/{number}/comments?{query}>; rel="next"'
        return self._json([self._comment_json(repo, c) for c in chunk], headers=headers)

    def _create_comment(self, request: Request, body: Any, repo: str, number: str) -> Response:
        comment = {"id": next(self._ids), "issue": int(number), "body": body["body"], "user": self._author()}
        self.comments.setdefault((repo, int(number)), []).append(comment)
        return self._json(self._comment_json(repo, comment), 201)

    def _update_comment(self, request: Request, body: Any, repo: str, comment_id: str) -> Response:
        found = self._find_comment(repo, int(comment_id))
        if found is None:
            return self._error(404, "Not Found")
        found[1]["body"] = body["body"]
        return self._json(self._comment_json(repo, found[1]))

    def _delete_comment(self, request: Request, body: Any, repo: str, comment_id: str) -> Response:
        found = self._find_comment(repo, int(comment_id))
        if found is None:
            return self._error(404, "Not Found")
        found[0].remove(found[1])
        return Response(status=204)

    def _get_contents(self, request: Request, body: Any, repo: str, path: str) -> Response:
        ref = request.args.get("ref", "main")
        data = self.contents.get((repo, ref, path))
        if data is None:
            return self._error(404, "Not Found")
        return self._json(
            {
                "type": "file",
                "encoding": "base64",
                "size": len(data),
                "name": path.rsplit("/", 1)[-1],
                "path": path,
                "sha": hashlib.sha1(data).hexdigest(),  # git names blobs by SHA-1
                "content": base64.b64encode(data).decode(),
                "url": f"{self.base_url}/repos/{repo}/contents/{path}?ref={ref}",
            }
        )

    def _deployment_json(self, repo: str, d: dict[str, Any]) -> dict[str, Any]:
        return {
            **d,
            "url": f"{self.base_url}/repos/{repo}/deployments/{d['id']}",
            "statuses_url": f"{self.base_url}/repos/{repo}/deployments/{d['id']}/statuses",
            "repository_url": f"{self.base_url}/repos/{repo}",
        }

    def _create_deployment(self, request: Request, body: Any, repo: str) -> Response:
        d = {
            "id": next(self._ids),
            "ref": body["ref"],
            "sha": body["ref"],
            "task": body.get("task", "deploy"),
            "environment": body.get("environment", "production"),
            "description": body.get("description"),
            "payload": body.get("payload", {}),
            "production_environment": body.get("production_environment", False),
        }
        self.deployments.setdefault(repo, {})[d["id"]] = d
        return self._json(self._deployment_json(repo, d), 201)

    def _get_deployment(self, request: Request, body: Any, repo: str, deployment_id: str) -> Response:
        d = self.deployments.get(repo, {}).get(int(deployment_id))
        return self._json(self._deployment_json(repo, d)) if d else self._error(404, "Not Found")

    def _create_status(self, request: Request, body: Any, repo: str, deployment_id: str) -> Response:
        if int(deployment_id) not in self.deployments.get(repo, {}):
            return self._error(404, "Not Found")
        status = {"id": next(self._ids), **body}
        self.statuses.setdefault(int(deployment_id), []).append(status)
        url = f"{self.base_url}/repos/{repo}/deployments/{deployment_id}/statuses/{status['id']}"
        return self._json({**status, "url": url}, 201)

    def _runner_json(self, r: dict[str, Any]) -> dict[str, Any]:
        labels = [{"id": i + 1, "name": n, "type": "custom"} for i, n in enumerate(r["labels"])]
        return {"id": r["id"], "name": r["name"], "os": "linux", "status": r["status"], "busy": False, "labels": labels}

    def _jit(self, request: Request, body: Any, repo: str | None, org: str | None) -> Response:
        scope = repo or org or ""
        runners = self.runners.setdefault(scope, {})
        if any(r["name"] == body["name"] for r in runners.values()):
            return self._error(409, "Already exists - A runner with the same name already exists")
        runner = {"id": next(self._ids), "name": body["name"], "labels": body["labels"], "status": "offline"}
        runners[runner["id"]] = runner
        config = base64.b64encode(json.dumps({"runner": runner["id"], "secret": "jit-" + os.urandom(8).hex()}).encode())
        self.jit_configs[runner["name"]] = config.decode()
        return self._json({"runner": self._runner_json(runner), "encoded_jit_config": config.decode()}, 201)

    def _list_runners(self, request: Request, body: Any, repo: str | None, org: str | None) -> Response:
        items = list(self.runners.get(repo or org or "", {}).values())
        per_page = min(int(request.args.get("per_page", 30)), 100)
        page = int(request.args.get("page", 1))
        chunk = items[(page - 1) * per_page : page * per_page]
        return self._json({"total_count": len(items), "runners": [self._runner_json(r) for r in chunk]})

    def _delete_runner(self, request: Request, body: Any, repo: str | None, org: str | None, rid: str) -> Response:
        runners = self.runners.get(repo or org or "", {})
        if int(rid) not in runners:
            return self._error(404, "Not Found")
        del runners[int(rid)]
        return Response(status=204)

    def _get_workflow_run(self, request: Request, body: Any, repo: str, run_id: str) -> Response:
        found = self.workflow_runs.get((repo, int(run_id)))
        if found is None:
            return self._error(404, "Not Found")
        return self._json(
            {
                "id": int(run_id),
                "name": "workflow",
                "head_branch": "main",
                "event": "workflow_dispatch",
                **found,
                "url": f"{self.base_url}/repos/{repo}/actions/runs/{run_id}",
                "html_url": f"{self.base_url}/{repo}/actions/runs/{run_id}",
            }
        )


def serve(httpserver: Any, contract: OpenApiContract | None, prefix: str = "") -> FakeGitHub:
    """Install a fresh fake on ``httpserver``; its ``base_url`` is what GITHUB_API_URL should be."""
    fake = FakeGitHub(base_url=httpserver.url_for(prefix).rstrip("/"), contract=contract, prefix=prefix)
    httpserver.expect_request(re.compile(r"^/.*")).respond_with_handler(fake.handle)
    return fake


@pytest.fixture
def fake_github(httpserver: Any, openapi_contract: OpenApiContract | None) -> Iterator[FakeGitHub]:
    """A fresh fake GitHub on the session's pytest-httpserver (cleared after the test)."""
    fake = serve(httpserver, openapi_contract)
    yield fake
    httpserver.clear()
