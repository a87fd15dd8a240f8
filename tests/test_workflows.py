"""The reusable tiers, the project's CI and the consumer templates: static rules, linters, and real
runs under `act` (host mode) against the fake GitHub API."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from act_harness import Act, git, init_repo, require_act
from conftest import TINY_TRAIN, write_project
from github_fake import FakeGitHub

pytest_plugins = ["github_fake"]

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github/workflows"
TIERS = ("pr-fast", "nightly", "release", "reaper")
TEMPLATES = sorted((ROOT / "templates/workflows").glob("*.yml"))
CALLERS = [t for t in TEMPLATES if t.name != "dependabot.yml"]
ALL_WORKFLOWS = sorted(WORKFLOWS.glob("*.yml"))
ACTION_FILES = sorted((ROOT / "actions").glob("*/action.yml"))

sys.path.insert(0, str(ROOT / "scripts"))
import release_refs  # noqa: E402


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    # PyYAML reads the key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def tier(name: str) -> dict[str, Any]:
    return load(WORKFLOWS / f"{name}.yml")


def run_scripts(data: dict[str, Any]) -> list[str]:
    steps: list[dict[str, Any]] = []
    for job in (data.get("jobs") or {}).values():
        steps += job.get("steps") or []
    steps += (data.get("runs") or {}).get("steps") or []
    return [str(s["run"]) for s in steps if "run" in s]


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; CI must run it")
        pytest.skip(f"{name} is not installed")
    return found


# ---------------------------------------------------------------- injection


@pytest.mark.parametrize("path", ALL_WORKFLOWS + ACTION_FILES + CALLERS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_inputs_or_event_data_inside_run_scripts(path: Path) -> None:
    # `${{ }}` in run: is pasted into the script before bash sees it; event data and inputs go via env:.
    for script in run_scripts(load(path)):
        assert not re.search(r"\$\{\{\s*(inputs|github\.event)\.", script), script


def test_the_injection_check_catches_an_injected_script(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  j:\n    steps:\n      - run: echo ${{ github.event.pull_request.title }}\n")
    with pytest.raises(AssertionError):
        test_no_inputs_or_event_data_inside_run_scripts(bad)


# ---------------------------------------------------------------- the tiers


@pytest.mark.parametrize("name", TIERS)
def test_tier_is_reusable_with_a_typed_config_input(name: str) -> None:
    call = tier(name)["on"]["workflow_call"]
    assert set(tier(name)["on"]) == {"workflow_call"}
    assert call["inputs"]["config"] == {
        "description": call["inputs"]["config"]["description"],
        "type": "string",
        "default": "gpuline.yml",
    }
    assert all("type" in spec and "description" in spec for spec in call["inputs"].values())


@pytest.mark.parametrize("path", ALL_WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege_and_timeouts_everywhere(path: Path) -> None:
    data = load(path)
    text = path.read_text(encoding="utf-8")
    assert data["permissions"] == {}, "top-level permissions must be {}"
    assert "github.ref" in data["concurrency"]["group"] or "github.repository" in data["concurrency"]["group"]
    for name, job in data["jobs"].items():
        assert "timeout-minutes" in job, f"{name} has no timeout-minutes"
        assert "permissions" in job, f"{name} does not say which permissions it needs"
    # Every permission granted carries a comment saying why.
    for line in text.splitlines():
        if re.match(r"\s+(contents|id-token|pull-requests|deployments|issues|actions|checks): (read|write)", line):
            assert "#" in line, f"{path.name}: permission without a reason: {line.strip()}"


@pytest.mark.parametrize("path", ALL_WORKFLOWS + CALLERS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_never_secrets_inherit_and_checkouts_drop_credentials(path: Path) -> None:
    for job in load(path).get("jobs", {}).values():
        assert job.get("secrets") != "inherit"
        for step in job.get("steps") or []:
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False


@pytest.mark.parametrize("path", ALL_WORKFLOWS + ACTION_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_third_party_actions_are_pinned_by_sha_with_a_version_comment(path: Path) -> None:
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.search(r"uses:\s*([^\s#]+)", line)
        if not m or m.group(1).startswith(("./", f"{release_refs.SLUG}/")):
            continue
        assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", m.group(1)), line
        assert re.search(r"# v\d+\.\d+\.\d+$", line), f"no `# vX.Y.Z` comment: {line.strip()}"


def test_pr_fast_is_safe_for_forks() -> None:
    data = tier("pr-fast")
    assert "secrets" not in data["on"]["workflow_call"]
    estimate = data["jobs"]["estimate"]
    assert estimate["permissions"] == {"contents": "read"}  # runs the PR's code: read only
    assert estimate["timeout-minutes"] <= 5
    steps = {s.get("id"): s for s in estimate["steps"]}
    for step_id in ("preflight", "cost"):
        assert steps[step_id]["with"]["policy-ref"] == "${{ github.base_ref }}"
    assert steps["cost"]["with"]["reserve"] == "false"
    # Its run record stays on the runner: a shared ledger would need credentials a fork PR never gets.
    for step_id in ("preflight", "cost"):
        assert steps[step_id]["with"]["ledger"] == "sqlite:///${{ runner.temp }}/gpuline-pr/ledger.db"
    comment = data["jobs"]["comment"]
    assert comment["permissions"] == {"pull-requests": "write"}
    assert not any("checkout" in str(s.get("uses", "")) for s in comment["steps"])  # never runs PR code


def _needs(job: dict[str, Any]) -> list[str]:
    needs = job.get("needs", [])
    return [needs] if isinstance(needs, str) else list(needs)


@pytest.mark.parametrize("name", ["nightly", "release"])
def test_gpu_tiers_refuse_forks_and_pull_request_target(name: str) -> None:
    data = tier(name)
    # The guard is the allow-list action (tests/test_trust.py runs it event by event).
    (step,) = data["jobs"]["guard"]["steps"]
    assert str(step["uses"]).startswith(f"{release_refs.SLUG}/actions/guard@") and "forks" not in step["with"]
    # Every job waits for the guard, directly or through another job.
    for job_name, job in data["jobs"].items():
        seen, todo = set(), _needs(job)
        while todo:
            current = todo.pop()
            seen.add(current)
            todo += _needs(data["jobs"][current])
        assert job_name == "guard" or "guard" in seen, f"{job_name} does not wait for the guard"


@pytest.mark.parametrize("name", ["nightly", "release"])
def test_gpu_tiers_train_on_the_provisioned_runner_and_always_tear_down(name: str) -> None:
    jobs = tier(name)["jobs"]
    # The train job runs where provision says (its JSON `runs-on`), or on the runner the caller named.
    assert jobs["train"]["runs-on"] == "${{ fromJSON(needs.provision.outputs.runs-on) }}"
    assert jobs["provision"]["outputs"]["runs-on"] == (
        "${{ inputs.gpu-runner-label != '' && format('[{0}]', toJSON(inputs.gpu-runner-label))"
        " || steps.provision.outputs.runs-on }}"
    )
    provision = next(s for s in jobs["provision"]["steps"] if s.get("id") == "provision")
    assert provision["with"]["github-token"] == "${{ secrets.runner-token }}"
    assert "runner-label" not in provision["with"]  # derived from the run id
    assert jobs["teardown"]["if"].startswith("${{ always()")
    assert set(_needs(jobs["teardown"])) >= {"plan", "provision", "train", "gate", "promote"}
    teardown = next(s for s in jobs["teardown"]["steps"] if s.get("id") == "teardown")
    assert teardown["uses"].startswith(f"{release_refs.SLUG}/actions/teardown@")
    assert teardown["with"]["github-token"] == "${{ secrets.runner-token }}"


def _gpuline_steps(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(job, step) for every step of a tier that runs gpuline: an action of its own, or a run: step."""
    found = []
    for job_name, job in data["jobs"].items():
        for step in job.get("steps") or []:
            uses = str(step.get("uses", ""))
            # The guard and setup run no gpuline command: they take no backends and install nothing.
            ours = uses.startswith(f"{release_refs.SLUG}/actions/")
            action = ours and not re.search(r"/actions/(setup|guard)@", uses)
            if action or re.search(r"\bgpuline (status|rollback|reap)\b", str(step.get("run", ""))):
                found.append((job_name, step))
    return found


@pytest.mark.parametrize("name", ["nightly", "release"])
def test_every_gpuline_step_gets_the_backends_itself(name: str) -> None:
    # A step's env: always sets its variables, empty ones included, so a workflow-level
    # GPULINE_LEDGER is hidden by an action's empty `ledger` input: each step gets them itself.
    data = tier(name)
    assert not any(k.startswith("GPULINE_") for k in (data.get("env") or {}))
    steps = _gpuline_steps(data)
    assert len(steps) >= 7
    for job_name, step in steps:
        given = (
            step.get("with")
            if "uses" in step
            else {k.removeprefix("GPULINE_").lower(): v for k, v in (step.get("env") or {}).items()}
        )
        for backend in ("ledger", "registry", "storage"):
            assert given.get(backend) == f"${{{{ inputs.{backend} }}}}", f"{job_name}: {step.get('name')} {backend}"


@pytest.mark.parametrize("name", ["nightly", "release"])
def test_every_gpuline_step_installs_the_cloud_sdks(name: str) -> None:
    # boto3 (ec2, DynamoDB, S3) and the Kubernetes client are extras: each step installs them.
    data = tier(name)
    assert data["on"]["workflow_call"]["inputs"]["cloud-extras"]["default"] == "aws,kubernetes,mlflow"
    for job_name, step in _gpuline_steps(data):
        if "uses" not in step:
            continue
        extras = step["with"]["extras"]
        if step["uses"].split("@")[0].endswith(("/preflight", "/train")):
            assert extras == "${{ steps.state.outputs.extras }}", job_name  # your extras and the SDKs
        elif step["uses"].split("@")[0].endswith("/eval-gate"):
            # With eval.command the gate runs your code (plan decides from gpuline.yml), else the SDKs only.
            assert extras == "${{ needs.plan.outputs.eval-extras }}", job_name
        else:
            assert extras == "${{ inputs.cloud-extras }}", f"{job_name}: {step.get('name')}"
    for job_name, job in data["jobs"].items():
        for step in job.get("steps") or []:
            if "/actions/setup@" in str(step.get("uses", "")):
                wanted = "needs.plan.outputs.eval-extras" if job_name == "verify" else "inputs.cloud-extras"
                assert step["with"]["extras"] == f"${{{{ {wanted} }}}}", job_name
    assert "steps.preflight.outputs.eval-command == 'true'" in data["jobs"]["plan"]["outputs"]["eval-extras"]


def test_the_plan_jobs_extras_join_yours_and_the_cloud_sdks(tmp_path: Path) -> None:
    script = next(s for s in tier("nightly")["jobs"]["plan"]["steps"] if s.get("id") == "state")["run"]

    def extras(mine: str, cloud: str) -> str:
        out = tmp_path / "out"
        out.write_text("")
        env = {"PATH": os.environ["PATH"], "CONFIG": "gpuline.yml", "WORKDIR": ".", "EXTRAS": mine,
               "CLOUD_EXTRAS": cloud, "GITHUB_OUTPUT": str(out)}  # fmt: skip
        subprocess.run(["bash", "-c", script], env=env, check=True)
        return dict(line.split("=", 1) for line in out.read_text().splitlines())["extras"]

    assert extras("train", "aws,kubernetes") == "train,aws,kubernetes"
    assert extras("", "aws") == "aws"
    assert extras("train", "") == "train"
    assert extras("", "") == ""


@pytest.mark.parametrize("name", ["nightly", "release"])
def test_the_plan_job_passes_the_approvals_policy_yml_accepts(name: str) -> None:
    plan = tier(name)["jobs"]["plan"]
    cost = next(s for s in plan["steps"] if s.get("id") == "cost")
    assert cost["with"]["labels"] == "${{ join(github.event.pull_request.labels.*.name, ',') }}"
    if name == "release":
        # The plan job runs in the environment the caller names; that name is the approval.
        assert plan["environment"] == "${{ inputs.approval-environment }}"
        assert cost["with"]["approved-environment"] == "${{ inputs.approval-environment }}"
        assert tier(name)["on"]["workflow_call"]["inputs"]["approval-environment"]["default"] == ""
    else:
        assert "environment" not in plan and "approved-environment" not in cost["with"]


def test_pr_comments_use_the_default_key_in_every_tier() -> None:
    # One sticky comment per config: no step picks a key of its own, and every comment step names
    # the config the same way (the key is the config path).
    for name in ("pr-fast", "nightly", "release"):
        text = (WORKFLOWS / f"{name}.yml").read_text(encoding="utf-8")
        assert "GPULINE_COMMENT_KEY" not in text and "--key" not in text
        for job in tier(name)["jobs"].values():
            for step in job.get("steps") or []:
                if "gpuline comment" in str(step.get("run", "")):
                    assert step["env"]["GPULINE_CONFIG"] == "${{ inputs.config }}"


def test_release_promotes_to_production_behind_an_environment_and_rolls_back() -> None:
    jobs = tier("release")["jobs"]
    assert jobs["promote"]["environment"]["name"] == "production"
    promote = next(s for s in jobs["promote"]["steps"] if s.get("id") == "promote")
    assert promote["with"]["stage"] == "production"
    rollback = jobs["rollback"]
    assert "needs.verify.result == 'failure'" in rollback["if"]
    assert "needs.promote.result == 'success'" in rollback["if"]
    assert "gpuline rollback --stage production" in rollback["steps"][-2]["run"]


def test_nightly_promotes_to_staging() -> None:
    promote = next(s for s in tier("nightly")["jobs"]["promote"]["steps"] if s.get("id") == "promote")
    assert promote["with"]["stage"] == "staging"


def test_ci_has_a_smoke_job_per_action_and_one_that_must_fail() -> None:
    jobs = load(WORKFLOWS / "ci.yml")["jobs"]
    used = {s["uses"] for s in jobs["smoke"]["steps"] if str(s.get("uses", "")).startswith("./actions/")}
    assert used == {f"./actions/{p.parent.name}" for p in ACTION_FILES if p.parent.name != "setup"}
    bad = next(s for s in jobs["smoke-must-fail"]["steps"] if s.get("id") == "bad")
    assert bad["continue-on-error"] is True and bad["uses"] == "./actions/preflight"
    assert set(_needs(jobs["all-green"])) == set(jobs) - {"all-green"}


# ---------------------------------------------------------------- one release, one set of actions


def test_tiers_call_the_actions_of_their_own_release() -> None:
    assert release_refs.check(ROOT) == []
    for name in TIERS:
        text = (WORKFLOWS / f"{name}.yml").read_text(encoding="utf-8")
        assert "./actions/" not in text
        assert release_refs.self_references(text), f"{name} calls none of its actions"


def test_release_rewrite_moves_every_reference_together(tmp_path: Path) -> None:
    for rel in [*release_refs.TIER_FILES, *(t.relative_to(ROOT).as_posix() for t in TEMPLATES)]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    changed = release_refs.set_ref("v2.3.4", tmp_path)
    assert len(changed) == len(release_refs.TIER_FILES) + len(CALLERS)
    assert release_refs.check(tmp_path) == []
    refs = {ref for f in release_refs.files(tmp_path) for _, ref in release_refs.self_references(f.read_text())}
    assert refs == {"v2.3.4"}
    # Back to main between releases: the tiers follow, the templates keep the released version.
    release_refs.set_ref("main", tmp_path)
    assert release_refs.check(tmp_path) == []


def test_release_check_catches_disagreement_and_the_callers_checkout(tmp_path: Path) -> None:
    for rel in release_refs.TIER_FILES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    nightly = tmp_path / ".github/workflows/nightly.yml"
    text = nightly.read_text()
    nightly.write_text(text.replace("actions/train@main", "actions/train@v9.9.9", 1))
    assert any("disagree" in p for p in release_refs.check(tmp_path))
    nightly.write_text(text.replace(f"{release_refs.SLUG}/actions/train@main", "./actions/train", 1))
    assert any("caller's repository" in p for p in release_refs.check(tmp_path))
    with pytest.raises(ValueError, match="not main"):
        release_refs.set_ref("latest", tmp_path)


def test_release_refs_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert release_refs.main(["check"]) == 0
    assert "agrees" in capsys.readouterr().out
    assert release_refs.main(["set", "not a ref"]) == 2


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("path", CALLERS, ids=lambda p: p.name)
def test_templates_call_a_pinned_tier_with_explicit_permissions(path: Path) -> None:
    data = load(path)
    assert data["permissions"] == {}
    for job in data["jobs"].values():
        assert re.fullmatch(rf"{release_refs.SLUG}/\.github/workflows/[\w-]+\.yml@v\d[\w.]*", job["uses"])
        assert job["permissions"]
        assert job["with"]["config"] == "gpuline.yml"


def test_dependabot_configs_watch_github_actions() -> None:
    ours = yaml.safe_load((ROOT / ".github/dependabot.yml").read_text())
    theirs = yaml.safe_load((ROOT / "templates/workflows/dependabot.yml").read_text())
    for config in (ours, theirs):
        assert any(u["package-ecosystem"] == "github-actions" for u in config["updates"])


# ---------------------------------------------------------------- linters


def test_actionlint_with_shellcheck_has_no_findings() -> None:
    actionlint = tool("actionlint")
    tool("shellcheck")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    files = [str(p) for p in ALL_WORKFLOWS + CALLERS]
    out = subprocess.run([actionlint, *files], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_zizmor_has_no_findings() -> None:
    zizmor = tool("zizmor")
    targets = [".github", "actions", *(p.relative_to(ROOT).as_posix() for p in CALLERS)]
    out = subprocess.run(
        [zizmor, "--offline", "--no-progress", *targets], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "No findings to report" in out.stdout + out.stderr


# ---------------------------------------------------------------- real runs under act

STAND_IN_TRAIN = (
    "def main():\n" + textwrap.indent(TINY_TRAIN.strip(), "    ") + "\n\n\nif __name__ == '__main__':\n    main()\n"
)
POLICY = """\
version: 1
budgets:
  period: week
  teams:
    vision:
      gpu_hours: {hard: 100}
"""


def example_into(dest: Path) -> None:
    """The reference example project; a minimal stand-in while it is still being written."""
    example = ROOT / "templates/example"
    if (example / "gpuline.yml").exists():
        shutil.copytree(example, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".gpuline", "__pycache__"))
    else:
        write_project(dest, policy=POLICY, train_py=STAND_IN_TRAIN)


@pytest.fixture(scope="module")
def act_setup(tmp_path_factory: pytest.TempPathFactory) -> Act:
    require_act()
    work = tmp_path_factory.mktemp("act")
    act = Act.create(work)
    example = act.gpuline / "templates/example"
    if not (example / "gpuline.yml").exists():
        example_into(example)
        git(act.gpuline, "add", "-A")
        git(act.gpuline, "commit", "-qm", "example stand-in")
    return act


def honours_gpuline_python() -> bool:
    """Whether gpuline runs user code with $GPULINE_PYTHON (the actions' choice) instead of its own venv."""
    return any("GPULINE_PYTHON" in p.read_text() for p in (ROOT / "scripts/gpuline").rglob("*.py"))


@pytest.mark.slow
def test_act_smoke_job_runs_every_action_on_the_example(act_setup: Act) -> None:
    if not honours_gpuline_python():
        pytest.skip("the example's train.py needs numpy/torch from the runner's python: needs GPULINE_PYTHON support")
    result = act_setup.run(act_setup.gpuline, "push", ".github/workflows/ci.yml", job="smoke")
    assert result.returncode == 0, result.log[-6000:]
    for action in ("preflight", "cost-estimate", "provision-gpu", "train", "eval-gate", "promote", "teardown"):
        assert f"Success - Main ./actions/{action}" in result.log
    assert "Job succeeded" in result.log


@pytest.mark.slow
def test_act_bad_config_fails_with_an_annotation_at_the_line(act_setup: Act) -> None:
    result = act_setup.run(act_setup.gpuline, "push", ".github/workflows/ci.yml", job="smoke-must-fail")
    assert result.returncode == 0, result.log[-6000:]  # the job passes because preflight failed
    assert "Failure - Main ./actions/preflight" in result.log
    config = (act_setup.gpuline / "templates/example/gpuline.yml").read_text().splitlines()
    bad_line = len(config) + 1  # the job appends `resourcez:` after the last line
    assert re.search(rf"::error file=[^,]*gpuline\.yml,line={bad_line},title=gpuline preflight", result.log)
    assert "did you mean `resources`?" in result.log
    assert "preflight failed as it should" in result.log


def fit_pr_fast(config: Path) -> None:
    """Give the project a pr-fast override that fits a CPU PR check, if it has none."""
    data = yaml.safe_load(config.read_text())
    override = data.setdefault("tiers", {}).setdefault("pr-fast", {})
    override.setdefault("resources", {}).setdefault("max_duration", "5m")
    override.setdefault("hyperparameters", {}).setdefault("steps", 20)
    config.write_text(yaml.safe_dump(data, sort_keys=False))


def consumer_repo(root: Path, act: Act) -> Path:
    """A repository that uses gpuline: the example on main, and a PR branch that edits it."""
    repo = root / "consumer"
    if honours_gpuline_python():
        example_into(repo)
        fit_pr_fast(repo / "gpuline.yml")
    else:
        # A pure-Python trainer, which gpuline's own venv can import and smoke-test.
        write_project(repo, policy=POLICY, train_py=STAND_IN_TRAIN)
    if not (repo / "policy.yml").exists():
        (repo / "policy.yml").write_text(POLICY)
    workflows = repo / ".github/workflows"
    workflows.mkdir(parents=True)
    caller = (ROOT / "templates/workflows/pr.yml").read_text()
    # The runner's python (this test's, which has the example's packages) instead of installing torch.
    (workflows / "pr.yml").write_text(caller + '      python: path\n      extras: ""\n')
    (repo / ".gitignore").write_text(".gpuline/\n__pycache__/\n")
    init_repo(repo)
    git(repo, "checkout", "-qb", "feature")
    (repo / "NOTES.md").write_text("a change under review\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "change")
    return repo


@pytest.mark.slow
def test_act_pr_fast_tier_end_to_end_with_one_sticky_comment(
    act_setup: Act, fake_github: FakeGitHub, tmp_path: Path
) -> None:
    repo = consumer_repo(tmp_path, act_setup)
    event = tmp_path / "event.json"
    pr = {"number": 7, "base": {"ref": "main"}, "head": {"ref": "feature", "repo": {"full_name": "acme/vision"}}}
    event.write_text(json.dumps({"pull_request": {**pr, "labels": []}, "repository": {"full_name": "acme/vision"}}))
    secret = "ghs_" + os.urandom(12).hex()
    env = {"GITHUB_API_URL": fake_github.base_url, "GPULINE_GITHUB_RETRIES": "0"}

    first = act_setup.run(repo, "pull_request", ".github/workflows/pr.yml", event_file=event, env=env,
                          secrets={"GITHUB_TOKEN": secret})  # fmt: skip
    assert first.returncode == 0, first.log[-8000:]
    (comment,) = fake_github.comments_on("acme/vision", 7)
    assert "Preflight passed" in comment["body"] and "gpuline:section estimate" in comment["body"]
    assert "PR comment created" in first.log

    second = act_setup.run(repo, "pull_request", ".github/workflows/pr.yml", event_file=event, env=env,
                           secrets={"GITHUB_TOKEN": secret})  # fmt: skip
    assert second.returncode == 0, second.log[-8000:]
    comments = fake_github.comments_on("acme/vision", 7)
    assert [c["id"] for c in comments] == [comment["id"]], "the second run must update, not add"
    assert "PR comment unchanged" in second.log or "PR comment updated" in second.log
    assert fake_github.violations == []
    assert all(r.headers.get("authorization") == f"token {secret}" for r in fake_github.requests)

    # The token never shows: not in the log, the comment, an output, a summary or any file left behind.
    assert secret not in first.log + second.log
    assert all(secret not in c["body"] for c in comments)
    for folder in (first.cache, repo):
        for path in folder.rglob("*"):
            if path.is_file() and path.stat().st_size < 5_000_000:
                assert secret.encode() not in path.read_bytes(), f"the token leaked into {path}"


@pytest.mark.slow
def test_act_pr_fast_without_a_token_skips_the_comment_and_passes(
    act_setup: Act, fake_github: FakeGitHub, tmp_path: Path
) -> None:
    repo = consumer_repo(tmp_path, act_setup)
    event = tmp_path / "event.json"
    pr = {"number": 8, "base": {"ref": "main"}, "head": {"ref": "feature", "repo": {"full_name": "acme/vision"}}}
    event.write_text(json.dumps({"pull_request": {**pr, "labels": []}}))
    result = act_setup.run(repo, "pull_request", ".github/workflows/pr.yml", event_file=event,
                           env={"GITHUB_API_URL": fake_github.base_url})  # fmt: skip
    assert result.returncode == 0, result.log[-8000:]
    assert "PR comment skipped: no GitHub token" in result.log
    assert fake_github.requests == []


def caller(tier_name: str, on: str, with_: dict[str, str]) -> str:
    """A consumer's caller of a GPU tier (the templates' permissions, these inputs)."""
    lines = [
        f"name: gpuline {tier_name}",
        f"on: {on}",
        "permissions: {}",
        "jobs:",
        "  gpuline:",
        f"    uses: gpuline/gpuline/.github/workflows/{tier_name}.yml@v1",
        "    permissions:",
        "      contents: read",
        "      id-token: write",
        "      deployments: write",
        "      pull-requests: write",
        "    with:",
        "      config: gpuline.yml",
        *(f"      {key}: {json.dumps(value)}" for key, value in with_.items()),
    ]
    return "\n".join(lines) + "\n"


# The runner's python (this test's, with the example's packages) and no cloud SDKs: the example runs
# on the local provider with local backends, so nothing needs torch or boto3 installed again.
FAST = {"python": "path", "extras": "", "cloud-extras": ""}
GPU_JOBS = ("preflight and cost estimate", "provision GPU", "train", "eval gate", "promote to staging", "teardown")
PR = 7


def explain(log: str) -> str:
    """What a failed act run says: its errors and failed steps, then its last lines (debug lines left out)."""
    lines = [line for line in log.splitlines() if "[DEBUG]" not in line and "level=debug" not in line]
    errors = [line for line in lines if re.search(r"::error|❌|Traceback|error:", line) and 'echo "::error' not in line]
    return "\n".join(errors[-60:]) + "\n----- last lines -----\n" + "\n".join(lines[-60:])


def job_succeeded(log: str, tier_name: str, job: str) -> bool:
    return re.search(rf"{tier_name}/{re.escape(job)}[^\]]*\]\s+🏁  Job succeeded", log) is not None


def evaluated_runs_on(log: str, job: str = "train") -> list[str] | None:
    """The labels act evaluated for a job's runs-on from provision's output (logged with --verbose)."""
    found = re.search(
        rf"/{re.escape(job)}\s*\] \[DEBUG\] expression "
        r"'\$\{\{ fromJSON\(needs\.provision\.outputs\.runs-on\) \}\}' evaluated to '\[(?P<labels>.*)\]'",
        log,
    )
    return re.findall(r"string=([^)]+)\)", found.group("labels")) if found else None


def pr_event(path: Path, number: int, labels: tuple[str, ...] = (), inputs: dict[str, str] | None = None) -> Path:
    pr = {
        "number": number,
        "base": {"ref": "main"},
        "head": {"ref": "feature", "repo": {"full_name": "acme/vision"}},
        "labels": [{"name": name} for name in labels],
    }
    body: dict[str, Any] = {"pull_request": pr, "repository": {"full_name": "acme/vision"}}
    if inputs is not None:
        body["inputs"] = inputs
    path.write_text(json.dumps(body))
    return path


@dataclass
class PrRuns:
    """pr-fast, then the nightly tier, for one pull request of the repository itself."""

    repo: Path
    pr_fast: Any
    nightly: Any
    fake: FakeGitHub


@pytest.fixture(scope="module")
def github_server(openapi_contract: Any) -> Iterator[Any]:
    """A GitHub fake of this module's own, for act runs shared by several tests."""
    from pytest_httpserver import HTTPServer

    server = HTTPServer(host="127.0.0.1", port=0)
    server.start()
    try:
        yield server
    finally:
        server.clear()
        server.stop()


@pytest.fixture(scope="module")
def pr_runs(
    act_setup: Act, tmp_path_factory: pytest.TempPathFactory, github_server: Any, openapi_contract: Any
) -> PrRuns:
    if not honours_gpuline_python():
        pytest.skip("the example's train.py needs numpy/torch from the runner's python: needs GPULINE_PYTHON support")
    from github_fake import serve

    github_server.clear()
    fake = serve(github_server, openapi_contract)
    root = tmp_path_factory.mktemp("pr-runs")
    repo = consumer_repo(root, act_setup)
    # The same repository also trains its PRs on the nightly tier (same-repo PRs only: the guard).
    (repo / ".github/workflows/nightly.yml").write_text(caller("nightly", "pull_request", FAST))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "nightly on PRs")
    event = pr_event(root / "event.json", PR)
    env = {"GITHUB_API_URL": fake.base_url, "GPULINE_GITHUB_RETRIES": "0"}
    secrets = {"GITHUB_TOKEN": "ghs_" + "1" * 36}
    pr_fast = act_setup.run(
        repo, "pull_request", ".github/workflows/pr.yml", event_file=event, env=env, secrets=secrets
    )
    nightly = act_setup.run(
        repo, "pull_request", ".github/workflows/nightly.yml", event_file=event, env=env, secrets=secrets, verbose=True
    )
    return PrRuns(repo, pr_fast, nightly, fake)


@pytest.mark.slow
def test_act_nightly_trains_on_the_runner_provision_names(pr_runs: PrRuns) -> None:
    # Break 1: no gpu-runner-label, so the train job's runs-on is provision's `runs-on` output (the
    # local provider: this workflow's usual runners), not a label nothing answers to.
    log = pr_runs.nightly.log
    assert pr_runs.nightly.returncode == 0, explain(log)
    assert evaluated_runs_on(log) == ["ubuntu-latest"], explain(log)
    for name in GPU_JOBS:
        assert job_succeeded(log, "nightly", name), name


@pytest.mark.slow
def test_act_nightly_tier_carries_the_run_from_job_to_job(pr_runs: PrRuns) -> None:
    # Each job starts from a clean checkout (act_harness), so the run reaches train, the gate and
    # teardown only through the state artifact (carry-state: true, the default).
    log = pr_runs.nightly.log
    assert pr_runs.nightly.returncode == 0, explain(log)
    assert "Restore the run state" in log
    assert "gpuline eval gate: pass" in log


@pytest.mark.slow
def test_act_estimate_and_actual_land_in_one_pr_comment(pr_runs: PrRuns) -> None:
    # Break 8: pr-fast writes preflight and estimate, the nightly tier's teardown adds the actual
    # cost: one gpuline comment per config on the PR, whichever workflow wrote to it.
    assert pr_runs.pr_fast.returncode == 0, explain(pr_runs.pr_fast.log)
    assert pr_runs.nightly.returncode == 0, explain(pr_runs.nightly.log)
    comments = pr_runs.fake.comments_on("acme/vision", PR)
    assert len(comments) == 1, [c["body"][:200] for c in comments]
    body = comments[0]["body"]
    for section in ("preflight", "estimate", "actual"):
        assert f"gpuline:section {section}" in body, body
    # The actual cost of the run that trained (not of one stopped before its GPU job).
    assert re.search(r"\*\*Actual:\*\* \$[0-9.]+, .*run succeeded", body), body
    assert pr_runs.fake.violations == []


# ---------------------------------------------------------------- shared backends, no carried state


@dataclass
class SharedRun:
    repo: Path
    shared: Path
    result: Any
    fake: FakeGitHub


@pytest.fixture(scope="module")
def shared_run(
    act_setup: Act, tmp_path_factory: pytest.TempPathFactory, github_server: Any, openapi_contract: Any
) -> SharedRun:
    """The nightly tier with its backends given as inputs, outside the project, and no state carried
    between jobs: only the backends can join them. On an existing runner (gpu-runner-label)."""
    if not honours_gpuline_python():
        pytest.skip("the example's train.py needs numpy/torch from the runner's python: needs GPULINE_PYTHON support")
    from github_fake import serve

    github_server.clear()
    fake = serve(github_server, openapi_contract)
    root = tmp_path_factory.mktemp("shared-run")
    shared = root / "shared"
    repo = root / "consumer"
    example_into(repo)
    inputs = {
        **FAST,
        "carry-state": "false",
        "gpu-runner-label": "ubuntu-latest",
        "ledger": f"sqlite:///{shared}/ledger.db",
        "registry": (shared / "registry").as_uri(),
        "storage": (shared / "artifacts").as_uri(),
    }
    (repo / ".github/workflows").mkdir(parents=True)
    (repo / ".github/workflows/nightly.yml").write_text(
        caller("nightly", "pull_request", inputs).replace('"false"', "false")
    )
    (repo / ".gitignore").write_text(".gpuline/\n__pycache__/\n")
    init_repo(repo)
    event = pr_event(root / "event.json", PR + 1)
    result = act_setup.run(
        repo,
        "pull_request",
        ".github/workflows/nightly.yml",
        event_file=event,
        env={"GITHUB_API_URL": fake.base_url, "GPULINE_GITHUB_RETRIES": "0"},
        secrets={"GITHUB_TOKEN": "ghs_" + "2" * 36},
        verbose=True,
    )
    return SharedRun(repo, shared, result, fake)


@pytest.mark.slow
def test_act_shared_backends_reach_every_step_without_carried_state(shared_run: SharedRun) -> None:
    # Break 2: every step gets ledger/registry/storage through `with:`; nothing falls back to the
    # project's .gpuline/ (each job's fresh checkout has none), so train finds the run plan created.
    from gpuline.ledger import open_ledger
    from gpuline.registry import open_registry

    log = shared_run.result.log
    assert shared_run.result.returncode == 0, explain(log)
    for name in GPU_JOBS:
        assert job_succeeded(log, "nightly", name), name
    assert "Run Main Restore the run state" not in log  # carry-state: false
    # gpu-runner-label given: the train job runs there, provision starts nothing.
    assert evaluated_runs_on(log) == ["ubuntu-latest"]
    ledger = open_ledger(f"sqlite:///{shared_run.shared}/ledger.db", shared_run.repo)
    (record,) = ledger.list_runs()
    assert record.status == "succeeded" and record.promoted_stage == "staging"
    assert record.checkpoints and all(str(shared_run.shared / "artifacts") in c.uri for c in record.checkpoints)
    registry = open_registry((shared_run.shared / "registry").as_uri(), shared_run.repo)
    assert registry.in_stage(record.model, "staging") is not None
    assert not (shared_run.repo / ".gpuline/ledger.db").exists()
    assert not (shared_run.repo / ".gpuline/registry").exists()


@pytest.mark.slow
def test_act_actual_cost_reaches_the_pr_comment_without_carried_state(shared_run: SharedRun) -> None:
    # With shared backends the run needs no carried state, and teardown's actual cost still belongs
    # in the PR's comment: teardown runs on a fresh runner, where only the backends know the run.
    assert shared_run.result.returncode == 0, explain(shared_run.result.log)
    comments = shared_run.fake.comments_on("acme/vision", PR + 1)
    assert len(comments) == 1, "teardown wrote no actual cost to the PR"
    body = comments[0]["body"]
    assert "gpuline:section actual" in body and "**Actual:**" in body
    # Actual vs estimate per phase: the estimate's phases from the shared ledger, the run's own from its record.
    assert "| phase | estimate p50–p90 | actual | |" in body and "| train |" in body and "| **paid** |" in body
    assert shared_run.fake.violations == []


# ---------------------------------------------------------------- approvals (break 6)

# A run that needs an approval: the team's hard GPU-hour budget is below what the run may use
# (20 minutes of the one CPU device), so cost-estimate denies it unless policy.yml's approval is given.
APPROVAL_POLICY = """\
version: 1
budgets:
  period: week
  teams:
    vision:
      gpu_hours: {hard: 0.01}
approval:
  label: gpu-budget-approved
  environment: gpu-approval
"""


@pytest.fixture(scope="module")
def approval_repo(act_setup: Act, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not honours_gpuline_python():
        pytest.skip("the example's train.py needs numpy/torch from the runner's python: needs GPULINE_PYTHON support")
    repo = tmp_path_factory.mktemp("approvals") / "consumer"
    example_into(repo)
    (repo / "policy.yml").write_text(APPROVAL_POLICY)
    (repo / ".gitignore").write_text(".gpuline/\n__pycache__/\n")
    init_repo(repo)
    return repo


def run_plan(act: Act, repo: Path, tier_name: str, event: Path, inputs: dict[str, str]) -> Any:
    """The tier called as a consumer calls it on a pull request (the guard sees that event, as on
    GitHub, where a called workflow's event is its caller's); a refused plan skips all but teardown."""
    workflow = repo / f".github/workflows/gpuline-{tier_name}.yml"
    workflow.parent.mkdir(parents=True, exist_ok=True)
    workflow.write_text(caller(tier_name, "pull_request", inputs))
    return act.run(repo, "pull_request", str(workflow.relative_to(repo)), event_file=event)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tier_name", "labels", "approval_environment", "admitted"),
    [
        ("nightly", (), "", False),
        ("nightly", ("gpu-budget-approved",), "", True),
        ("release", (), "", False),
        ("release", (), "gpu-approval", True),
    ],
    ids=["nightly-no-label", "nightly-label", "release-no-environment", "release-environment"],
)
def test_act_a_run_over_budget_is_refused_without_approval_and_admitted_with_it(
    act_setup: Act,
    approval_repo: Path,
    tmp_path: Path,
    tier_name: str,
    labels: tuple[str, ...],
    approval_environment: str,
    admitted: bool,
) -> None:
    inputs = dict(FAST)
    if approval_environment:
        inputs["approval-environment"] = approval_environment
    event = pr_event(tmp_path / "event.json", PR + 2, labels)
    result = run_plan(act_setup, approval_repo, tier_name, event, inputs)
    log = result.log
    assert job_succeeded(log, tier_name, "preflight and cost estimate") is admitted, explain(log)
    if admitted:
        assert result.returncode == 0, explain(log)
        how = f"label:{labels[0]}" if labels else f"environment:{approval_environment}"
        assert f"approved by {how}" in log, explain(log)
        assert "::set-output:: decision=warn" in log
    else:
        assert result.returncode != 0
        assert "::set-output:: decision=deny" in log, explain(log)
        assert "ask for an exception" in log, explain(log)


# ---------------------------------------------------------------- a PR that edits what decides money

TIGHT_BUDGET = "version: 1\nbudgets:\n  period: week\n  teams:\n    vision:\n      usd: {hard: 0.3}\n"
CHEAP_T4 = "providers:\n  ec2:\n    instances:\n      g4dn.xlarge: {gpu: t4, gpus: 1, on_demand: 0.0001}\n"
T4_HOUR = "  provider: ec2\n  gpu_type: t4\n  gpu_count: 1\n  max_duration: 1h\n"


@pytest.mark.slow
def test_act_pr_fast_decides_by_the_base_when_the_pr_edits_policy_and_pricing(
    act_setup: Act, fake_github: FakeGitHub, tmp_path: Path
) -> None:
    # main: a $0.30 weekly budget for an hour on a T4 ($0.526/h in the catalog): refused.
    repo = tmp_path / "consumer"
    config = write_project(repo, policy=TIGHT_BUDGET, train_py=STAND_IN_TRAIN)
    config.write_text(config.read_text().replace("  provider: local\n  gpu_type: cpu\n  max_duration: 10m\n", T4_HOUR))
    workflows = repo / ".github/workflows"
    workflows.mkdir(parents=True)
    (workflows / "pr.yml").write_text((ROOT / "templates/workflows/pr.yml").read_text() + '      extras: ""\n')
    (repo / ".gitignore").write_text(".gpuline/\n__pycache__/\n")
    init_repo(repo)
    base_sha = git(repo, "rev-parse", "HEAD").strip()
    # The PR raises its own budget and prices the T4 at a hundredth of a cent.
    git(repo, "checkout", "-qb", "feature")
    (repo / "policy.yml").write_text(TIGHT_BUDGET.replace("0.3", "1000"))
    (repo / "pricing.yaml").write_text(CHEAP_T4)
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "a bigger budget and cheaper GPUs, says the PR")
    event = tmp_path / "event.json"
    pr = {"number": 9, "base": {"ref": "main", "sha": base_sha},
          "head": {"ref": "feature", "repo": {"full_name": "acme/vision"}}, "labels": []}  # fmt: skip
    event.write_text(json.dumps({"pull_request": pr, "repository": {"full_name": "acme/vision"}}))
    env = {"GITHUB_API_URL": fake_github.base_url, "GPULINE_GITHUB_RETRIES": "0"}
    result = act_setup.run(repo, "pull_request", ".github/workflows/pr.yml", event_file=event, env=env,
                           secrets={"GITHUB_TOKEN": "ghs_" + "2" * 36})  # fmt: skip
    log = result.log
    assert result.returncode != 0, "the base's budget and prices refuse the run"
    assert "::set-output:: decision=deny" in log, explain(log)
    (comment,) = fake_github.comments_on("acme/vision", 9)
    body = comment["body"]
    assert "Proposed change to" in body and "`policy.yml`" in body and "`pricing.yaml`" in body, body
    assert "on_demand: 0.0001" in body and "usd: {hard: 1000}" in body, body
    assert fake_github.violations == []

    # The same PR on the nightly tier (same repository, so the guard lets it through): the plan job
    # reads the base's policy and prices too, and nothing is provisioned.
    nightly = run_plan(act_setup, repo, "nightly", event, {**FAST, "provider": "ec2"})
    assert nightly.returncode != 0
    assert "::set-output:: decision=deny" in nightly.log, explain(nightly.log)
    assert not job_succeeded(nightly.log, "nightly", "preflight and cost estimate")
    assert "gpuline provision" not in nightly.log
