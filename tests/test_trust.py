"""The trust boundaries, tried as an attacker with a pull request would try them.

Each test is one attack: the PR's own prices, a forged base branch, an event that should not reach a
GPU, a planted sticky comment, a diff between unlike estimates, a cache a PR wrote, a renamed slug,
pr-fast under pull_request_target. docs/trust.md names the rule each one holds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import release_refs
from conftest import write_project
from github_fake import FakeGitHub
from gpuline import github
from gpuline.decisions.policy_source import read_at_ref
from gpuline.steps import cost_estimate as cost_estimate_step
from test_cost_estimate_cmd import EC2_T4, LOCAL, estimate_json, ledger_of

pytest_plugins = ["github_fake"]

ROOT = Path(__file__).resolve().parents[1]
REPO = "acme/vision"
TIGHT = "version: 1\nbudgets:\n  period: week\n  teams:\n    vision:\n      usd: {hard: 0.3}\n"
LOOSE = TIGHT.replace("0.3", "1000")
CHEAP = "providers:\n  ec2:\n    instances:\n      g4dn.xlarge: {gpu: t4, gpus: 1, on_demand: 0.0001}\n"


def git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # fmt: skip
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def gpu_repo(root: Path) -> tuple[Path, str]:
    """A repository whose main has a $0.30 budget for an ec2 T4 run; returns (project, base SHA)."""
    config = write_project(root / "ml", policy=TIGHT)
    config.write_text(config.read_text().replace(LOCAL, EC2_T4))
    (root / ".gitignore").write_text(".gpuline/\n")
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    base = git(root, "rev-parse", "HEAD").strip()
    git(root, "checkout", "-qb", "pr")
    return root / "ml", base


def pr_event(tmp_path: Path, base_sha: str, **extra: Any) -> str:
    path = tmp_path / "event.json"
    pr = {"number": 7, "base": {"ref": "main", "sha": base_sha}, "head": {"repo": {"full_name": REPO}}}
    path.write_text(json.dumps({"pull_request": pr, **extra}))
    return str(path)


# ---------------------------------------------------------------- 1: the PR's own prices


def test_a_pr_cannot_turn_a_deny_into_an_allow_with_its_own_pricing_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, _ = gpu_repo(tmp_path / "repo")
    (project / "pricing.yaml").write_text(CHEAP)  # g4dn.xlarge at $0.0001/h
    git(project.parent, "add", "-A")
    git(project.parent, "commit", "-qm", "cheaper GPUs, says the PR")
    args = ("--tier", "pr-fast", "--no-reserve", "--policy-ref", "main")
    code, body = estimate_json(capsys, project / "gpuline.yml", *args)
    assert code == 1 and body["ok"] is False, "the base's prices decide: $0.526/h is over the $0.30 budget"
    assert "hard USD budget" in body["error"] or "usd" in body["error"].lower()
    comment = next(project.glob(".gpuline/runs/*/cost-comment.md")).read_text()
    assert "Proposed change to `pricing.yaml`" in comment and "on_demand: 0.0001" in comment


def test_the_pr_s_policy_edit_is_shown_as_proposed_and_not_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, _ = gpu_repo(tmp_path / "repo")
    (project / "policy.yml").write_text(LOOSE)
    code, _ = estimate_json(
        capsys, project / "gpuline.yml", "--tier", "pr-fast", "--no-reserve", "--policy-ref", "main"
    )
    assert code == 1
    comment = next(project.glob(".gpuline/runs/*/cost-comment.md")).read_text()
    assert "Proposed change to `policy.yml`" in comment and "usd: {hard: 1000}" in comment


# ---------------------------------------------------------------- 3: a forged base


@pytest.mark.parametrize("forgery", ["local branch", "remote-tracking branch", "replace ref"])
def test_pr_code_cannot_forge_the_base_the_policy_is_read_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forgery: str
) -> None:
    project, base = gpu_repo(tmp_path / "origin")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--branch", "pr", str(project.parent), str(clone)], check=True)
    # What the PR's code could do in the job before the policy is read:
    (clone / "ml/policy.yml").write_text(LOOSE)
    git(clone, "commit", "-qam", "loose")
    forged = git(clone, "rev-parse", "HEAD").strip()
    if forgery == "local branch":
        git(clone, "branch", "-f", "main", forged)
    elif forgery == "remote-tracking branch":
        git(clone, "update-ref", "refs/remotes/origin/main", forged)
    else:
        tight_blob = git(clone, "rev-parse", f"{base}:ml/policy.yml").strip()
        loose_blob = git(clone, "rev-parse", f"{forged}:ml/policy.yml").strip()
        git(clone, "replace", tight_blob, loose_blob)
    monkeypatch.setenv("GITHUB_EVENT_PATH", pr_event(tmp_path, base))
    assert read_at_ref("main", clone / "ml/policy.yml") == TIGHT


def test_a_shallow_checkout_fetches_the_base_by_its_sha(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project, base = gpu_repo(tmp_path / "origin")
    (project / "policy.yml").write_text(LOOSE)
    git(project.parent, "commit", "-qam", "loose")
    clone = tmp_path / "clone"
    url = project.parent.as_uri()
    subprocess.run(["git", "clone", "-q", "--depth", "1", "--branch", "pr", url, str(clone)], check=True)
    assert subprocess.run(["git", "cat-file", "-e", base], cwd=clone, capture_output=True, check=False).returncode != 0
    monkeypatch.setenv("GITHUB_EVENT_PATH", pr_event(tmp_path, base))
    assert read_at_ref("main", clone / "ml/policy.yml") == TIGHT


def _tier(name: str) -> dict[str, Any]:
    data = yaml.safe_load((ROOT / f".github/workflows/{name}.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_pr_fast_decides_before_any_step_runs_the_pr_s_code_and_restores_no_cache() -> None:
    steps = _tier("pr-fast")["jobs"]["estimate"]["steps"]
    order = [s.get("id") or s.get("name") for s in steps]
    assert order.index("cost") < order.index("preflight"), "the smoke test (PR code) must run after the decision"
    cost = steps[order.index("cost")]
    assert cost["with"]["uv-cache"] == "false"
    assert "run-id" not in cost["with"], "the decision starts the run; it reads nothing PR code recorded"
    comment_setup = _tier("pr-fast")["jobs"]["comment"]["steps"][0]
    assert comment_setup["with"]["uv-cache"] == "false"  # the job with a write token


# ---------------------------------------------------------------- 4 and 10: the event allow-list

_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def _lookup(path: str, context: dict[str, Any]) -> Any:
    value: Any = context
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def guard(event: str, payload: dict[str, Any], *, repo: str = REPO, **inputs: str) -> subprocess.CompletedProcess[str]:
    """Run the guard action's step as the runner would: its env: evaluated against this event."""
    action = ROOT / "actions/guard"
    meta = yaml.safe_load((action / "action.yml").read_text())
    (step,) = meta["runs"]["steps"]
    given = {k: inputs.get(k.replace("-", "_"), v["default"]) for k, v in meta["inputs"].items()}
    ref = payload.get("ref") or payload.get("merge_group", {}).get("head_ref") or "refs/heads/main"
    sha = payload.get("after") or payload.get("merge_group", {}).get("head_sha") or "a" * 40
    context = {"github": {"event_name": event, "repository": repo, "ref": ref, "sha": sha, "event": payload},
               "inputs": given}  # fmt: skip
    env = {"PATH": os.environ["PATH"], "GITHUB_ACTION_PATH": str(action)}
    for name, value in step["env"].items():
        found = _EXPR.fullmatch(str(value))
        assert found, f"{name}: only plain context references are expected"
        resolved = _lookup(found.group(1), context)
        env[name] = "" if resolved is None else str(resolved)
    return subprocess.run(["bash", "-c", step["run"]], env=env, capture_output=True, text=True, check=False)


def pull(head_repo: str) -> dict[str, Any]:
    return {"pull_request": {"number": 7, "head": {"repo": {"full_name": head_repo}}, "base": {"ref": "main"}}}


SAME, FORK = pull(REPO), pull("mallory/vision")
QUEUE_REF = "refs/heads/gh-readonly-queue/main/pr-7-" + "b" * 40
QUEUE = {"merge_group": {"head_ref": QUEUE_REF, "head_sha": "c" * 40, "base_ref": "refs/heads/main"}}
EVENTS: list[tuple[str, dict[str, Any], dict[str, str], bool]] = [
    ("push", {"ref": "refs/heads/main"}, {}, True),
    ("schedule", {"schedule": "0 3 * * *"}, {}, True),
    ("workflow_dispatch", {"inputs": {}}, {}, True),
    ("release", {"action": "published", "release": {"tag_name": "v1.0.0"}}, {}, True),
    ("pull_request", SAME, {}, True),
    ("pull_request", FORK, {}, False),
    ("pull_request", pull(""), {}, False),  # the head repository was deleted
    ("pull_request_target", SAME, {}, False),
    ("pull_request_target", FORK, {}, False),
    ("pull_request_review", FORK, {}, False),
    ("pull_request_review", SAME, {}, False),
    ("pull_request_review_comment", FORK, {}, False),
    ("issue_comment", {"issue": {"number": 7, "pull_request": {}}, "comment": {"body": "/train"}}, {}, False),
    ("workflow_run", {"workflow_run": {"head_repository": {"full_name": "mallory/vision"}}}, {}, False),
    ("repository_dispatch", {"action": "train"}, {}, False),
    ("merge_group", QUEUE, {}, False),  # not trusted unless the caller says so
    ("merge_group", QUEUE, {"merge_queue": "trust"}, True),
    (
        "merge_group",
        {"merge_group": {**QUEUE["merge_group"], "head_ref": "refs/heads/feature"}},
        {"merge_queue": "trust"},
        False,
    ),
]


def _event_id(index: int, event: str, payload: dict[str, Any], inputs: dict[str, str], allowed: bool) -> str:
    head = {id(SAME): "-same-repo", id(FORK): "-fork"}.get(id(payload), "")
    trust = "-trusted" if inputs else ""
    return f"{index:02d}-{event}{head}{trust}-{'allowed' if allowed else 'refused'}"


@pytest.mark.parametrize(
    ("event", "payload", "inputs", "allowed"), EVENTS, ids=[_event_id(i, *case) for i, case in enumerate(EVENTS)]
)
def test_the_guard_is_an_allow_list_event_by_event(
    event: str, payload: dict[str, Any], inputs: dict[str, str], allowed: bool
) -> None:
    result = guard(event, payload, tier="nightly", **inputs)
    assert (result.returncode == 0) == allowed, result.stdout
    if not allowed:
        assert f"::error title=gpuline nightly::refusing {event}: " in result.stdout


def test_a_mismatched_merge_queue_checkout_is_refused() -> None:
    payload = {"merge_group": {**QUEUE["merge_group"]}, "after": "d" * 40}  # github.sha is not the queue's head
    result = guard("merge_group", payload, merge_queue="trust")
    assert result.returncode == 1 and "not the merge commit of the queue" in result.stdout


def test_pr_fast_lets_fork_prs_through_but_refuses_pull_request_target_saying_why() -> None:
    assert guard("pull_request", FORK, tier="pr-fast", forks="allow").returncode == 0
    refused = guard("pull_request_target", FORK, tier="pr-fast", forks="allow")
    assert refused.returncode == 1
    assert "::error title=gpuline pr-fast::refusing pull_request_target" in refused.stdout
    assert "estimate the base, not this pull request" in refused.stdout
    steps = _tier("pr-fast")["jobs"]["estimate"]["steps"]
    assert str(steps[0]["uses"]).startswith(f"{release_refs.SLUG}/actions/guard@")
    assert steps[0]["with"] == {"tier": "pr-fast", "forks": "allow"}


def test_the_guard_script_passes_shellcheck() -> None:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("shellcheck is not installed")
    out = subprocess.run([found, str(ROOT / "actions/guard/guard.sh")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("name", ["nightly", "release"])
def test_the_gpu_tiers_guard_with_the_allow_list(name: str) -> None:
    (step,) = _tier(name)["jobs"]["guard"]["steps"]
    assert str(step["uses"]).startswith(f"{release_refs.SLUG}/actions/guard@")
    # The tiers that spend money keep the defaults: no forks, no merge queue.
    assert step["with"] == {"tier": name}
    # With the tier's own inputs, the attacks are refused and a same-repo PR passes.
    assert guard("pull_request", FORK, tier=name).returncode != 0
    assert guard("pull_request_review", FORK, tier=name).returncode != 0
    assert guard("pull_request_target", FORK, tier=name).returncode != 0


@pytest.mark.parametrize("name", ["nightly", "release"])
def test_the_gpu_tiers_read_the_policy_at_the_base_on_pull_requests(name: str) -> None:
    plan = _tier(name)["jobs"]["plan"]["steps"]
    for action in ("preflight", "cost-estimate"):
        (step,) = [s for s in plan if str(s.get("uses", "")).startswith(f"{release_refs.SLUG}/actions/{action}@")]
        assert step["with"]["policy-ref"] == "${{ github.event_name == 'pull_request' && github.base_ref || '' }}"


# ---------------------------------------------------------------- 5: the sticky comment


@pytest.fixture
def gh(fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("GITHUB_API_URL", fake_github.base_url)
    return github.client("tok", base_url=fake_github.base_url, retries=0, throttle=False)


PR = github.PullRequestRef(REPO, 7)


def test_a_planted_comment_with_the_marker_is_neither_taken_over_nor_kept_over_ours(
    fake_github: FakeGitHub, gh: Any
) -> None:
    marker = github.sticky_marker("k")
    planted = fake_github.plant_comment(REPO, 7, marker + "\n:white_check_mark: all within budget", "mallory")
    ours = github.upsert_sticky_comment(PR, {"estimate": "deny: $900"}, key="k", gh=gh)
    again = github.upsert_sticky_comment(PR, {"estimate": "deny: $901"}, key="k", gh=gh)
    comments = {c["id"]: c for c in fake_github.comments_on(REPO, 7)}
    assert comments[planted["id"]]["body"].endswith("all within budget"), "another author's comment is untouched"
    assert ours.comment_id != planted["id"] and again.comment_id == ours.comment_id
    assert "deny: $901" in comments[ours.comment_id]["body"]
    assert not any(
        r.method in ("PATCH", "DELETE") and r.path.endswith(f"/{planted['id']}") for r in fake_github.requests
    )
    assert fake_github.violations == []


def test_an_older_planted_comment_does_not_get_the_bot_s_own_deleted(fake_github: FakeGitHub, gh: Any) -> None:
    marker = github.sticky_marker("k")
    planted = fake_github.plant_comment(REPO, 7, marker + "\nplanted", "mallory")
    real = {"id": planted["id"] + 1, "issue": 7, "body": marker + "\nreal"}  # written by GITHUB_TOKEN
    fake_github.comments[(REPO, 7)].append(real)
    result = github.upsert_sticky_comment(PR, {"estimate": "new"}, key="k", gh=gh)
    assert result.comment_id == real["id"]
    assert [c["id"] for c in fake_github.comments_on(REPO, 7)] == [planted["id"], real["id"]]


def test_a_user_token_matches_comments_by_its_own_login(fake_github: FakeGitHub, gh: Any) -> None:
    fake_github.users = {"tok": "ml-bot"}
    marker = github.sticky_marker("k")
    fake_github.comments[(REPO, 7)] = [{"id": 1, "issue": 7, "body": marker + "\nby the actions bot"}]
    result = github.upsert_sticky_comment(PR, {"estimate": "x"}, key="k", gh=gh)
    assert result.action == "created" and len(fake_github.comments_on(REPO, 7)) == 2
    assert fake_github.comments_on(REPO, 7)[-1]["user"]["login"] == "ml-bot"
    assert any(r.path == "/user" for r in fake_github.requests)


def test_the_whole_body_stays_under_github_s_limit_with_the_sections_already_there(
    fake_github: FakeGitHub, gh: Any
) -> None:
    github.upsert_sticky_comment(PR, {"actual": "a" * 60_000}, key="k", gh=gh)
    github.upsert_sticky_comment(PR, {"estimate": "e" * 30_000, "preflight": "passed"}, key="k", gh=gh)
    (comment,) = fake_github.comments_on(REPO, 7)
    assert len(comment["body"]) < github.MAX_BODY_CHARS
    assert "passed" in comment["body"] and "truncated" in comment["body"]


# ---------------------------------------------------------------- 6: like with like


def test_the_diff_never_prints_a_percentage_between_unlike_evidence(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    project, _ = gpu_repo(tmp_path / "repo")
    config = project / "gpuline.yml"
    config.write_text(config.read_text().replace("steps: 10", "steps: 40"))
    (project / "policy.yml").write_text(LOOSE)  # this test is about the diff, not the decision
    # The head's estimate rests on a smoke-test step time, the base's on max_duration.
    ledger_of(config).create_run(
        cost_estimate_step.RunRecord(run_id="run-smoked", model="tiny", team="vision", tier="pr-fast", smoke_step_s=2.0)
    )
    _, body = estimate_json(capsys, config, "--run-id", "run-smoked", "--base-ref", "main", "--no-reserve")
    assert body["estimate"]["duration"]["basis"] == "smoke" and body["base"]["duration"]["basis"] == "max_duration"
    comment = Path(body["comment_path"]).read_text()
    rows = [line for line in comment.splitlines() if line.startswith(("| training time", "| GPU-hours", "| cost p50"))]
    assert rows and all(line.endswith("| not comparable |") for line in rows), rows
    assert "the base has the weaker evidence, so no change is shown" in comment


# ---------------------------------------------------------------- 7: the uv cache


def _evaluate(expression: str, context: dict[str, Any]) -> Any:
    """The subset of GitHub's expression language the actions use: literals, context paths, !, ==,
    !=, &&, || (returning an operand, as GitHub does), parentheses and startsWith (case-insensitive)."""
    tokens = re.findall(r"'(?:[^']|'')*'|&&|\|\||==|!=|!|\(|\)|,|[\w.-]+", expression)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom() -> Any:
        token = take()
        if token == "!":
            return not atom()
        if token == "(":
            value = either()
            assert take() == ")"
            return value
        if token.startswith("'"):
            return token[1:-1].replace("''", "'")
        if token in ("true", "false"):
            return token == "true"
        if peek() == "(":
            take()
            args = [either()]
            while take() == ",":
                args.append(either())
            assert token == "startsWith"
            return str(args[0] or "").lower().startswith(str(args[1]).lower())
        return _lookup(token, context)

    def compare() -> Any:
        left = atom()
        while peek() in ("==", "!="):
            op, right = take(), atom()
            same = (
                str(left).lower() == str(right).lower()
                if isinstance(left, str) and isinstance(right, str)
                else left == right
            )
            left = same if op == "==" else not same
        return left

    def both() -> Any:
        left = compare()
        while peek() == "&&":
            take()
            right = compare()
            left = right if left else left
        return left

    def either() -> Any:
        left = both()
        while peek() == "||":
            take()
            right = both()
            left = left if left else right
        return left

    value = either()
    assert pos == len(tokens), expression
    return value


def uv_with(event: str, ref: str = "refs/heads/main", uv_cache: str = "true") -> dict[str, str]:
    """setup-uv's inputs in every gpuline action, as the runner would render them for this event."""
    context = {"github": {"event_name": event, "ref": ref}, "inputs": {"uv-cache": uv_cache}}
    rendered: dict[str, dict[str, str]] = {}
    for action in sorted((ROOT / "actions").glob("*/action.yml")):
        for step in yaml.safe_load(action.read_text())["runs"]["steps"]:
            if str(step.get("uses", "")).startswith("astral-sh/setup-uv@"):
                out = {}
                for key in ("enable-cache", "cache-suffix"):
                    value: Any = _evaluate(_EXPR.fullmatch(str(step["with"][key])).group(1), context)  # type: ignore[union-attr]
                    out[key] = str(value).lower() if isinstance(value, bool) else str(value)
                rendered[action.parent.name] = out
    assert len(set(map(json.dumps, rendered.values()))) == 1, "every action renders the same cache settings"
    return next(iter(rendered.values()))


@pytest.mark.parametrize(
    ("event", "ref"),
    [
        ("release", "refs/tags/v1.0.0"),
        ("push", "refs/tags/v1.0.0"),
        ("pull_request_target", "refs/heads/main"),
        ("workflow_run", "refs/heads/main"),
    ],
)
def test_no_cache_is_restored_on_release_tag_pull_request_target_or_workflow_run(event: str, ref: str) -> None:
    assert uv_with(event, ref)["enable-cache"] == "false"


def test_pr_written_cache_entries_carry_a_key_no_trusted_tier_restores() -> None:
    pr_key = uv_with("pull_request", "refs/pull/7/merge")["cache-suffix"]
    for event in ("push", "schedule", "workflow_dispatch"):
        trusted = uv_with(event)
        assert trusted["enable-cache"] == "true" and trusted["cache-suffix"] != pr_key
    assert uv_with("pull_request", "refs/pull/7/merge", uv_cache="false")["enable-cache"] == "false"


# ---------------------------------------------------------------- 9: references to the tiers' own actions


def test_release_refs_check_fails_when_it_finds_no_reference(tmp_path: Path) -> None:
    for rel in [*release_refs.TIER_FILES, "templates/workflows/pr.yml"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        # A renamed or forked repository: the slug in the workflows is no longer the checked one.
        (tmp_path / rel).write_text((ROOT / rel).read_text().replace(f"{release_refs.SLUG}/", "acme/gpuline/"))
    problems = release_refs.check(tmp_path)
    assert any("0 references" in p for p in problems), problems


# ---------------------------------------------------------------- 8: release approval scope


def _login_role(job: dict[str, Any]) -> str | None:
    step = next((s for s in job["steps"] if "configure-aws-credentials" in str(s.get("uses", ""))), None)
    return None if step is None else str(step["with"]["role-to-assume"])


def test_release_gives_each_job_the_narrowest_role_and_environment() -> None:
    jobs = _tier("release")["jobs"]
    registry_role = "${{ inputs.aws-registry-role || inputs.aws-role-to-assume }}"
    # Only the jobs that move production hold the registry role, each in an environment of its own
    # (so an IAM trust policy can require `sub: repo:ORG/REPO:environment:<name>`).
    assert _login_role(jobs["promote"]) == registry_role and jobs["promote"]["environment"]["name"] == "production"
    assert _login_role(jobs["rollback"]) == registry_role
    assert jobs["rollback"]["environment"]["name"] == "${{ inputs.rollback-environment }}"
    # The train job runs your code on the GPU machine, with a role of its own.
    assert _login_role(jobs["train"]) == "${{ inputs.aws-train-role || inputs.aws-role-to-assume }}"
    for name, job in jobs.items():
        if name not in ("promote", "rollback"):
            assert "aws-registry-role" not in str(job), f"{name} can reach the registry role"
    # An approval is claimed only by the job that ran in the approval environment.
    plan = jobs["plan"]
    assert plan["environment"] == "${{ inputs.approval-environment }}"
    for name, job in jobs.items():
        if name != "plan":
            assert "approved-environment" not in str(job), f"{name} claims an approval it did not get"


# ---------------------------------------------------------------- 11: third-party actions kept current

# The majors that run on node24 (node20 is end-of-life on the runners); Dependabot moves them on.
CURRENT_MAJORS = {
    "actions/checkout": 7,
    "actions/upload-artifact": 7,
    "actions/download-artifact": 8,
    "astral-sh/setup-uv": 10,
    "aws-actions/configure-aws-credentials": 6,
}


def test_third_party_actions_are_pinned_by_sha_at_current_majors() -> None:
    import re

    pinned = re.compile(r"uses:\s*([\w.-]+/[\w.-]+)@([0-9a-f]{40}) # v(\d+)\.\d+\.\d+")
    seen: dict[str, set[int]] = {}
    for path in [*ROOT.glob(".github/workflows/*.yml"), *ROOT.glob("actions/*/action.yml")]:
        for repo, _, major in pinned.findall(path.read_text()):
            seen.setdefault(repo, set()).add(int(major))
    assert set(seen) == set(CURRENT_MAJORS), seen
    for repo, majors in seen.items():
        assert majors == {CURRENT_MAJORS[repo]}, f"{repo} pinned at v{sorted(majors)}"


# ---------------------------------------------------------------- 9: the tiers run the actions of their own release


def _release_repo(tmp_path: Path) -> Path:
    import shutil
    import subprocess

    repo = tmp_path / "gpuline"
    for rel in [*release_refs.TIER_FILES]:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, repo / rel)
    shutil.copytree(ROOT / "templates/workflows", repo / "templates/workflows")
    shutil.copytree(ROOT / "actions", repo / "actions")
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@e"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "main"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, env={**os.environ, **env})
    return repo


def test_a_release_pins_the_tiers_to_a_commit_and_check_catches_actions_that_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@e")
    repo = _release_repo(tmp_path)
    head = ["git", "-C", str(repo), "rev-parse", "HEAD"]
    base = subprocess.run(head, check=True, capture_output=True, text=True).stdout.strip()
    release_refs.release("v9.9.9", repo)
    nightly = (repo / ".github/workflows/nightly.yml").read_text()
    # Every tier names the released commit (immutable), never a tag that could be moved later.
    assert {ref for _, ref in release_refs.self_references(nightly)} == {base}
    template = (repo / "templates/workflows/nightly.yml").read_text()
    assert {ref for _, ref in release_refs.self_references(template)} == {"v9.9.9"}
    assert release_refs.check(repo) == []
    # An action edited after the pin: the tiers would run the old one, and check says so.
    train = repo / "actions/train/action.yml"
    train.write_text(train.read_text() + "# changed\n")
    problems = release_refs.check(repo)
    assert any("actions/ changed since" in p for p in problems), problems
    # A release from a dirty tree is refused: what is pinned must be what is committed.
    with pytest.raises(ValueError, match="working tree has changes"):
        release_refs.release("v9.9.10", repo)
