"""Policy read at the base branch: real git repositories in temp folders, and the contents API fake."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import write_project
from github_fake import FakeGitHub
from gpuline.decisions.policy_source import FileNotAtRef, read_at_ref
from gpuline.errors import InputError

TIGHT = """\
version: 1
budgets:
  period: week
  teams:
    vision:
      gpu_hours: {hard: 0.01}
"""
LOOSE = TIGHT.replace("0.01", "1000")
# The fake GitHub's fixtures (fake_github, openapi_contract).
pytest_plugins = ["github_fake"]

REPO = "acme/vision"


def git(cwd: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": "/usr/bin:/bin", "HOME": str(cwd)}  # fmt: skip
    out = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return out.stdout


@pytest.fixture
def pr_repo(tmp_path: Path) -> Path:
    """A repository whose `main` has a tight budget and whose checked-out PR branch loosens it."""
    root = tmp_path / "repo"
    write_project(root / "ml", policy=TIGHT)
    git(root, "init", "-q", "-b", "main")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "base")
    git(root, "checkout", "-qb", "pr")
    (root / "ml/policy.yml").write_text(LOOSE)
    git(root, "commit", "-qam", "raise my own budget")
    return root


def test_reads_the_base_branch_not_the_working_tree(pr_repo: Path) -> None:
    assert (pr_repo / "ml/policy.yml").read_text() == LOOSE
    assert read_at_ref("main", pr_repo / "ml/policy.yml") == TIGHT


def test_relative_paths_are_taken_from_the_current_directory(pr_repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(pr_repo / "ml")
    assert read_at_ref("main", "policy.yml") == TIGHT


def test_base_known_only_as_a_remote_tracking_branch(pr_repo: Path, tmp_path: Path) -> None:
    # actions/checkout of a PR leaves the base as origin/main and no local main.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--branch", "pr", str(pr_repo), str(clone)], check=True)
    assert "main" not in git(clone, "branch", "--format=%(refname:short)").split()
    assert read_at_ref("main", clone / "ml/policy.yml") == TIGHT


def test_missing_at_the_ref_is_not_found_unless_a_default_is_given(pr_repo: Path) -> None:
    (pr_repo / "ml/extra.yml").write_text("x: 1\n")
    git(pr_repo, "add", "-A")
    git(pr_repo, "commit", "-qm", "new file")
    with pytest.raises(FileNotAtRef, match=r"ml/extra\.yml does not exist at main") as info:
        read_at_ref("main", pr_repo / "ml/extra.yml")
    assert "merge ml/extra.yml into main" in (info.value.hint or "")
    assert read_at_ref("main", pr_repo / "ml/extra.yml", default="") == ""


@pytest.mark.parametrize("ref", ["", "--output=/tmp/x", "main..pr", "a b", "main:ml"])
def test_refs_that_could_be_options_or_ranges_are_refused(pr_repo: Path, ref: str) -> None:
    with pytest.raises(InputError, match="not a valid git ref"):
        read_at_ref(ref, pr_repo / "ml/policy.yml")


def test_a_path_outside_the_workspace_is_refused(
    tmp_path: Path, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "elsewhere").mkdir()
    _api(monkeypatch, fake_github, tmp_path / "ws")
    with pytest.raises(InputError, match="outside the git repository"):
        read_at_ref("main", tmp_path / "elsewhere" / "policy.yml")
    assert fake_github.requests == []


def test_unknown_ref_without_a_token_says_how_to_fix_it(pr_repo: Path) -> None:
    with pytest.raises(InputError, match="not in this clone") as info:
        read_at_ref("release-9", pr_repo / "ml/policy.yml")
    assert "fetch-depth: 0" in (info.value.hint or "")


def _api(monkeypatch: pytest.MonkeyPatch, fake: FakeGitHub, workspace: Path) -> None:
    monkeypatch.setenv("GITHUB_API_URL", fake.base_url)
    monkeypatch.setenv("GITHUB_REPOSITORY", REPO)
    monkeypatch.setenv("GITHUB_TOKEN", "tok")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(workspace))
    monkeypatch.setenv("GPULINE_GITHUB_RETRIES", "0")


def test_shallow_clone_falls_back_to_the_contents_api(
    pr_repo: Path, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    _api(monkeypatch, fake_github, pr_repo)
    fake_github.put_file(REPO, "release-9", "ml/policy.yml", TIGHT)
    assert read_at_ref("release-9", pr_repo / "ml/policy.yml") == TIGHT
    (request,) = fake_github.requests
    assert request.path == "/repos/acme/vision/contents/ml/policy.yml" and request.query == {"ref": "release-9"}
    assert fake_github.violations == []


def test_contents_api_outside_any_clone_and_a_missing_file(
    tmp_path: Path, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace = tmp_path / "ws"
    (workspace / "ml").mkdir(parents=True)
    _api(monkeypatch, fake_github, workspace)
    fake_github.put_file(REPO, "main", "ml/policy.yml", TIGHT)
    assert read_at_ref("main", workspace / "ml/policy.yml") == TIGHT
    with pytest.raises(FileNotAtRef, match="does not exist at main in acme/vision"):
        read_at_ref("main", workspace / "ml/other.yml")


def test_contents_api_refusal_is_a_permission_error(
    tmp_path: Path, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    _api(monkeypatch, fake_github, tmp_path)
    fake_github.tokens = {"other": "write"}
    with pytest.raises(InputError, match="401") as info:
        read_at_ref("main", tmp_path / "policy.yml")
    assert "contents: read" in (info.value.hint or "")


def _cost_estimate(project: Path, *args: str) -> tuple[int, dict[str, Any]]:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(project)}
    out = subprocess.run(
        [sys.executable, "-m", "gpuline.cli", "cost-estimate", "--tier", "pr-fast", "--no-reserve", "--json", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return out.returncode, json.loads(out.stdout)


def test_a_pr_that_raises_its_own_budget_gets_the_base_branchs_decision(pr_repo: Path) -> None:
    # Read from the working tree, the PR's own edit would let it through ...
    code, result = _cost_estimate(pr_repo / "ml")
    assert code == 0 and result["ok"] is True
    # ... read from the base branch, the budget that was reviewed and merged decides.
    code, result = _cost_estimate(pr_repo / "ml", "--policy-ref", "main")
    assert code == 1 and result["ok"] is False
    assert "hard GPU-hours budget of 0.01" in result["error"]
