"""gpuline.github and `gpuline comment` against a stateful fake of GitHub's REST API."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from conftest import read_outputs
from github_fake import FakeGitHub, OpenApiContract, openapi_path, serve
from gpuline import github
from gpuline.cli import main as cli_main
from gpuline.errors import InfraError, InputError, NotFoundError

# The fake GitHub's fixtures (fake_github, openapi_contract).
pytest_plugins = ["github_fake"]

REPO = "acme/vision"
PR = github.PullRequestRef(REPO, 7)


def requires_openapi() -> None:
    if openapi_path() is None:
        message = "GitHub's OpenAPI description is not installed (npm @octokit/openapi into build/octokit)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def gh(fake_github: FakeGitHub) -> Any:
    return github.client("t0ken-write", base_url=fake_github.base_url, retries=0, throttle=False)


@pytest.fixture
def api_env(fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> FakeGitHub:
    monkeypatch.setenv("GITHUB_API_URL", fake_github.base_url)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO)
    monkeypatch.setenv("GITHUB_WORKFLOW", "ML PR")
    monkeypatch.setenv("GPULINE_GITHUB_RETRIES", "0")
    return fake_github


# ---------------------------------------------------------------- sections and markers


def test_merge_sections_replaces_one_and_keeps_the_others_in_order() -> None:
    body = github.merge_sections("", {"estimate": "est v1", "preflight": "ok"}, order=("preflight", "estimate"))
    assert body.index("ok") < body.index("est v1")
    body = github.merge_sections(body, {"actual": "$1.50"}, order=("preflight", "estimate", "actual"))
    body = github.merge_sections(body, {"estimate": "est v2"}, order=("preflight", "estimate", "actual"))
    assert "est v1" not in body
    assert body.index("ok") < body.index("est v2") < body.index("$1.50")


def test_merge_sections_rejects_a_name_that_could_break_the_markers() -> None:
    with pytest.raises(InputError, match="not valid"):
        github.merge_sections("", {"a -->": "x"})


def test_sticky_marker_neutralises_characters_that_would_end_the_html_comment() -> None:
    assert github.sticky_marker("ML PR:ml/gpuline.yml") == "<!-- gpuline:sticky ML PR:ml/gpuline.yml -->"
    assert "-->" not in github.sticky_marker("x --> y").removesuffix(" -->")


# ---------------------------------------------------------------- which PR


def _event(tmp_path: Path, payload: dict[str, Any]) -> str:
    path = tmp_path / "event.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_current_pull_request_from_the_event_payload(tmp_path: Path) -> None:
    env = {"GITHUB_REPOSITORY": REPO, "GITHUB_EVENT_PATH": _event(tmp_path, {"pull_request": {"number": 12}})}
    assert github.current_pull_request(env) == github.PullRequestRef(REPO, 12)


def test_current_pull_request_ignores_plain_issues_and_pushes(tmp_path: Path) -> None:
    issue = {"GITHUB_REPOSITORY": REPO, "GITHUB_EVENT_PATH": _event(tmp_path, {"issue": {"number": 3}})}
    assert github.current_pull_request(issue) is None
    push = {"GITHUB_REPOSITORY": REPO, "GITHUB_EVENT_PATH": _event(tmp_path, {"ref": "refs/heads/main"})}
    assert github.current_pull_request(push) is None
    assert github.current_pull_request({}) is None


def test_current_pull_request_from_an_explicit_number_and_a_bad_one() -> None:
    assert github.current_pull_request({"GITHUB_REPOSITORY": REPO, "GPULINE_PR_NUMBER": "9"}) == PR.__class__(REPO, 9)
    with pytest.raises(InputError, match="GPULINE_PR_NUMBER"):
        github.current_pull_request({"GITHUB_REPOSITORY": REPO, "GPULINE_PR_NUMBER": "nine"})


# ---------------------------------------------------------------- sticky comments


def test_sticky_comment_is_created_once_then_updated_in_place(fake_github: FakeGitHub, gh: Any) -> None:
    first = github.upsert_sticky_comment(PR, {"estimate": "est 1"}, key="ML PR:gpuline.yml", gh=gh)
    second = github.upsert_sticky_comment(PR, {"estimate": "est 2"}, key="ML PR:gpuline.yml", gh=gh)
    third = github.upsert_sticky_comment(PR, {"estimate": "est 2"}, key="ML PR:gpuline.yml", gh=gh)
    comments = fake_github.comments_on(REPO, 7)
    assert (first.action, second.action, third.action) == ("created", "updated", "unchanged")
    assert len(comments) == 1 and first.comment_id == second.comment_id == comments[0]["id"]
    assert "est 2" in comments[0]["body"] and "est 1" not in comments[0]["body"]
    assert comments[0]["body"].startswith(github.sticky_marker("ML PR:gpuline.yml"))
    assert first.url.endswith(f"#issuecomment-{first.comment_id}")
    assert fake_github.violations == []


def test_teardown_section_joins_the_estimate_in_the_same_comment(fake_github: FakeGitHub, gh: Any) -> None:
    github.upsert_sticky_comment(PR, {"estimate": "estimated $2.00"}, key="k", gh=gh)
    github.upsert_sticky_comment(PR, {"actual": "actual $1.50"}, key="k", gh=gh)
    (comment,) = fake_github.comments_on(REPO, 7)
    assert "estimated $2.00" in comment["body"] and "actual $1.50" in comment["body"]


def test_each_workflow_key_gets_its_own_comment_and_others_are_left_alone(fake_github: FakeGitHub, gh: Any) -> None:
    fake_github.comments[(REPO, 7)] = [{"id": 1, "issue": 7, "body": "LGTM, someone else"}]
    github.upsert_sticky_comment(PR, {"estimate": "a"}, key="pr-tier", gh=gh)
    github.upsert_sticky_comment(PR, {"estimate": "b"}, key="nightly-tier", gh=gh)
    bodies = [c["body"] for c in fake_github.comments_on(REPO, 7)]
    assert len(bodies) == 3 and bodies[0] == "LGTM, someone else"


def test_marker_is_found_past_the_first_page_of_comments(fake_github: FakeGitHub, gh: Any) -> None:
    noise = [{"id": i, "issue": 7, "body": f"comment {i}"} for i in range(1, 151)]
    fake_github.comments[(REPO, 7)] = noise
    github.upsert_sticky_comment(PR, {"estimate": "v1"}, key="k", gh=gh)
    result = github.upsert_sticky_comment(PR, {"estimate": "v2"}, key="k", gh=gh)
    assert result.action == "updated"
    assert len(fake_github.comments_on(REPO, 7)) == 151
    assert any(r.query.get("page") == "2" for r in fake_github.requests)


def test_a_duplicate_left_by_a_race_is_removed_and_the_oldest_kept(fake_github: FakeGitHub, gh: Any) -> None:
    marker = github.sticky_marker("k")
    fake_github.comments[(REPO, 7)] = [
        {"id": 5, "issue": 7, "body": marker + "\nold"},
        {"id": 6, "issue": 7, "body": marker + "\nracer"},
    ]
    result = github.upsert_sticky_comment(PR, {"estimate": "new"}, key="k", gh=gh)
    (comment,) = fake_github.comments_on(REPO, 7)
    assert result.comment_id == 5 == comment["id"] and "new" in comment["body"]


def test_read_only_token_is_a_permission_error_with_a_hint(fake_github: FakeGitHub) -> None:
    fake_github.tokens = {"read-only": "read"}
    gh = github.client("read-only", base_url=fake_github.base_url, retries=0, throttle=False)
    with pytest.raises(github.GitHubPermissionError, match="403") as info:
        github.upsert_sticky_comment(PR, {"estimate": "x"}, key="k", gh=gh)
    assert "pull-requests: write" in (info.value.hint or "")
    assert fake_github.comments_on(REPO, 7) == []


def test_server_errors_become_infra_errors(fake_github: FakeGitHub, gh: Any) -> None:
    fake_github.fail("GET", r"/comments$", 502)
    with pytest.raises(InfraError, match="502"):
        github.upsert_sticky_comment(PR, {"estimate": "x"}, key="k", gh=gh)


def test_enterprise_server_api_prefix_is_honoured(
    httpserver: Any, openapi_contract: OpenApiContract | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = serve(httpserver, openapi_contract, prefix="/api/v3")
    try:
        monkeypatch.setenv("GITHUB_API_URL", fake.base_url + "/")
        result = github.upsert_sticky_comment(PR, {"estimate": "x"}, key="k", gh=github.client("t", throttle=False))
        assert result.action == "created"
        assert all(r.headers.get("authorization") == "token t" for r in fake.requests)
    finally:
        httpserver.clear()


# ---------------------------------------------------------------- gpuline comment


def _body(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_comment_command_creates_then_updates(
    api_env: FakeGitHub, actions_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "tok")
    monkeypatch.setenv("GITHUB_EVENT_PATH", _event(tmp_path, {"pull_request": {"number": 7}}))
    args = ["comment", "--section", "estimate", "--body-file", _body(tmp_path, "e.md", "est")]
    assert cli_main(args) == 0
    assert read_outputs(actions_env["GITHUB_OUTPUT"])["comment-action"] == "created"
    actions_env["GITHUB_OUTPUT"].write_text("")
    args += ["--section", "preflight", "--body-file", _body(tmp_path, "p.md", "preflight: pass")]
    assert cli_main(args) == 0
    outputs = read_outputs(actions_env["GITHUB_OUTPUT"])
    assert outputs["comment-action"] == "updated"
    (comment,) = api_env.comments_on(REPO, 7)
    assert str(comment["id"]) == outputs["comment-id"]
    assert comment["body"].index("preflight: pass") < comment["body"].index("est")
    # The key is the config alone: the workflow's name ("ML PR") is not part of it, so every tier
    # writing for this config (estimate on the PR, actual cost later) shares the one comment.
    assert comment["body"].startswith(github.sticky_marker("gpuline.yml"))
    assert "PR comment updated" in actions_env["GITHUB_STEP_SUMMARY"].read_text()


def test_two_tiers_write_into_one_comment_per_config(
    api_env: FakeGitHub, actions_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "tok")
    monkeypatch.setenv("GITHUB_EVENT_PATH", _event(tmp_path, {"pull_request": {"number": 7}}))
    monkeypatch.setenv("GITHUB_WORKFLOW", "gpuline PR")
    assert cli_main(["comment", "--section", "estimate", "--body-file", _body(tmp_path, "e.md", "est $2")]) == 0
    monkeypatch.setenv("GITHUB_WORKFLOW", "gpuline nightly")
    assert cli_main(["comment", "--section", "actual", "--body-file", _body(tmp_path, "a.md", "actual $1")]) == 0
    (comment,) = api_env.comments_on(REPO, 7)
    assert "est $2" in comment["body"] and "actual $1" in comment["body"]


def test_comment_command_skips_without_a_token(
    api_env: FakeGitHub, actions_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setenv("GPULINE_PR_NUMBER", "7")
    assert cli_main(["comment", "--body-file", _body(tmp_path, "e.md", "est")]) == 0
    assert read_outputs(actions_env["GITHUB_OUTPUT"])["comment-action"] == "skipped"
    assert "::notice title=gpuline comment::PR comment skipped: no GitHub token" in capsys.readouterr().out
    assert api_env.requests == []


def test_comment_command_skips_outside_a_pull_request(
    api_env: FakeGitHub, actions_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "tok")
    monkeypatch.setenv("GITHUB_EVENT_PATH", _event(tmp_path, {"ref": "refs/heads/main"}))
    assert cli_main(["comment", "--body-file", _body(tmp_path, "e.md", "est")]) == 0
    assert "not about a pull request" in actions_env["GITHUB_STEP_SUMMARY"].read_text()
    assert api_env.requests == []


def test_comment_command_warns_and_passes_on_a_fork_prs_read_only_token(
    api_env: FakeGitHub, actions_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    api_env.tokens = {"fork-token": "read"}
    monkeypatch.setenv("GITHUB_TOKEN", "fork-token")
    monkeypatch.setenv("GPULINE_PR_NUMBER", "7")
    assert cli_main(["comment", "--body-file", _body(tmp_path, "e.md", "est")]) == 0
    assert "::warning title=gpuline comment::PR comment skipped: the token may not comment" in capsys.readouterr().out
    assert read_outputs(actions_env["GITHUB_OUTPUT"])["comment-action"] == "skipped"


def test_comment_command_fails_with_exit_3_when_github_is_down(
    api_env: FakeGitHub, actions_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    api_env.fail("GET", r"/comments$", 503)
    monkeypatch.setenv("GITHUB_TOKEN", "tok")
    monkeypatch.setenv("GPULINE_PR_NUMBER", "7")
    assert cli_main(["comment", "--body-file", _body(tmp_path, "e.md", "est")]) == 3
    assert "::error title=gpuline comment%3A infrastructure error::" in capsys.readouterr().out
    assert "infrastructure error" in actions_env["GITHUB_STEP_SUMMARY"].read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no comment body given"),
        (["--body-file", "/nonexistent/e.md"], "cannot read comment body"),
        (["--section", "a", "--section", "b", "--body-file", "BODY"], "2 --section names for 1 --body-file"),
    ],
)
def test_comment_command_bad_input_exits_2(
    argv: list[str], message: str, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = _body(tmp_path, "e.md", "est")
    assert cli_main(["comment", *[body if a == "BODY" else a for a in argv], "--json"]) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and message in result["error"]


def test_comment_command_truncates_a_body_github_would_reject(
    api_env: FakeGitHub, actions_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GITHUB_TOKEN", "tok")
    monkeypatch.setenv("GPULINE_PR_NUMBER", "7")
    assert cli_main(["comment", "--body-file", _body(tmp_path, "e.md", "x" * 100_000)]) == 0
    (comment,) = api_env.comments_on(REPO, 7)
    assert len(comment["body"]) < 65536 and "truncated" in comment["body"]


# ---------------------------------------------------------------- deployments


def test_deployment_with_statuses(fake_github: FakeGitHub, gh: Any) -> None:
    sha = "a" * 40
    deployment_id = github.create_deployment(
        REPO, sha, "production", description="vision-model v3", payload={"model": "vision", "version": "3"}, gh=gh
    )
    github.set_deployment_status(
        REPO, deployment_id, "success", log_url="https://ci/run/1", environment_url="https://registry/v3", gh=gh
    )
    deployment = fake_github.deployments[REPO][deployment_id]
    assert deployment["production_environment"] is True and deployment["payload"]["version"] == "3"
    (status,) = fake_github.statuses[deployment_id]
    assert status["state"] == "success" and status["environment_url"] == "https://registry/v3"
    create = next(r for r in fake_github.requests if r.method == "POST" and r.path.endswith("/deployments"))
    assert create.body["required_contexts"] == [] and create.body["auto_merge"] is False
    assert fake_github.violations == []


def test_deployment_status_on_a_missing_deployment_is_not_found(fake_github: FakeGitHub, gh: Any) -> None:
    with pytest.raises(NotFoundError, match="404"):
        github.set_deployment_status(REPO, 999, "failure", gh=gh)


# ---------------------------------------------------------------- JIT runners


def test_jit_runner_is_created_masked_and_deleted_idempotently(
    fake_github: FakeGitHub, gh: Any, actions_env: dict[str, Path], capsys: Any
) -> None:
    runner = github.create_jit_runner(REPO, "gpuline-r-1", ["gpuline-r-1", "gpu"], gh=gh)
    assert runner.labels == ("gpuline-r-1", "gpu")
    assert runner.encoded_jit_config not in repr(runner)
    assert f"::add-mask::{runner.encoded_jit_config}" in capsys.readouterr().out
    assert [r.name for r in github.list_runners(REPO, gh=gh)] == ["gpuline-r-1"]
    assert github.delete_runner(REPO, runner.runner_id, gh=gh) is True
    assert github.delete_runner(REPO, runner.runner_id, gh=gh) is False
    assert github.list_runners(REPO, gh=gh) == []
    assert fake_github.violations == []


def test_jit_runner_for_an_organization(fake_github: FakeGitHub, gh: Any) -> None:
    runner = github.create_jit_runner("acme", "gpuline-r-2", ["gpuline-r-2"], runner_group_id=3, gh=gh)
    assert runner.runner_id in fake_github.runners["acme"]
    jit = next(r for r in fake_github.requests if r.path.endswith("generate-jitconfig"))
    assert jit.path == "/orgs/acme/actions/runners/generate-jitconfig" and jit.body["runner_group_id"] == 3


def test_jit_runner_without_admin_rights_says_which_token_is_needed(fake_github: FakeGitHub) -> None:
    fake_github.tokens = {"actions-token": "read"}
    gh = github.client("actions-token", base_url=fake_github.base_url, retries=0, throttle=False)
    with pytest.raises(github.GitHubPermissionError) as info:
        github.create_jit_runner(REPO, "gpuline-r-3", ["x"], gh=gh)
    assert "Administration: write" in (info.value.hint or "")


def test_jit_runner_input_errors(gh: Any) -> None:
    with pytest.raises(InputError, match="at least one label"):
        github.create_jit_runner(REPO, "n", [], gh=gh)
    with pytest.raises(InputError, match="neither OWNER/REPO"):
        github.create_jit_runner("a/b/c", "n", ["x"], gh=gh)


def test_duplicate_runner_name_is_a_clear_error(fake_github: FakeGitHub, gh: Any) -> None:
    github.create_jit_runner(REPO, "same", ["x"], gh=gh)
    with pytest.raises(InfraError, match="409"):
        github.create_jit_runner(REPO, "same", ["x"], gh=gh)


def test_missing_pygithub_says_which_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_github(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "github":
            raise ModuleNotFoundError("No module named 'github'", name="github")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_github)
    with pytest.raises(InputError) as info:
        github.client("t")
    assert info.value.hint == "pip install 'gpuline[github]'"


def test_token_and_api_url_from_the_environment() -> None:
    assert github.token_from_env({"GITHUB_TOKEN": "a", "GPULINE_GITHUB_TOKEN": "b"}) == "b"
    assert github.token_from_env({"GITHUB_TOKEN": "  "}) is None
    assert github.api_url({}) == "https://api.github.com"
    assert github.api_url({"GITHUB_API_URL": "https://ghe.example.com/api/v3/"}) == "https://ghe.example.com/api/v3"


def test_client_retries_must_be_a_number(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULINE_GITHUB_RETRIES", "many")
    with pytest.raises(InputError, match="GPULINE_GITHUB_RETRIES"):
        github.client("t")


# ---------------------------------------------------------------- the contract itself


def test_contract_rejects_bodies_github_would_reject(openapi_contract: OpenApiContract | None) -> None:
    requires_openapi()
    assert openapi_contract is not None
    comments = "/repos/acme/vision/issues/7/comments"
    assert openapi_contract.check("POST", comments, {"body": "hi"}) == []
    assert openapi_contract.check("POST", comments, {"text": "hi"})  # 'body' is required
    assert openapi_contract.check("POST", "/repos/acme/vision/actions/runners/generate-jitconfig", {"name": "x"})
    assert openapi_contract.check("POST", "/repos/acme/vision/deployments", {"ref": "main", "auto_merge": "no"})
    assert openapi_contract.check("GET", "/repos/acme/vision/no-such-thing", None)


def test_every_request_of_the_github_module_conforms(fake_github: FakeGitHub, gh: Any) -> None:
    requires_openapi()
    github.upsert_sticky_comment(PR, {"estimate": "a"}, key="k", gh=gh)
    github.upsert_sticky_comment(PR, {"estimate": "b"}, key="k", gh=gh)
    runner = github.create_jit_runner(REPO, "r", ["r"], gh=gh)
    github.delete_runner(REPO, runner.runner_id, gh=gh)
    deployment = github.create_deployment(REPO, "b" * 40, "staging", gh=gh)
    github.set_deployment_status(REPO, deployment, "in_progress", gh=gh)
    assert len(fake_github.requests) >= 7
    assert fake_github.violations == []


def test_the_token_is_masked_and_appears_nowhere_else(
    api_env: FakeGitHub, actions_env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    token = "ghs_" + "s3cr3t" * 6
    monkeypatch.setenv("GITHUB_TOKEN", token)
    monkeypatch.setenv("GPULINE_PR_NUMBER", "7")
    assert cli_main(["comment", "--body-file", _body(tmp_path, "e.md", "est")]) == 0
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if token in line]
    assert lines == [f"::add-mask::{token}"]  # the runner hides it from every later line
    for path in actions_env.values():
        assert token not in path.read_text()
    assert all(token not in c["body"] for c in api_env.comments_on(REPO, 7))
