"""The composite actions: metadata rules, generated READMEs, the shared setup, and their scripts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACTIONS = sorted(p.parent for p in (ROOT / "actions").glob("*/action.yml"))
# The guard only reads the event: it installs nothing and runs no gpuline command.
INSTALLING_ACTIONS = [a for a in ACTIONS if a.name != "guard"]
COMMAND_ACTIONS = [a for a in INSTALLING_ACTIONS if a.name != "setup"]
# action -> (gpuline command, outputs the command contract promises)
CONTRACT = {
    "preflight": ("preflight", {"run-id", "verdict"}),
    "cost-estimate": ("cost-estimate", {"run-id", "usd", "gpu-hours", "decision", "comment-path"}),
    "provision-gpu": ("provision", {"run-id", "runner-label", "runs-on", "lease-id", "instance-id", "expires-at"}),
    "train": ("train", {"run-id", "final-step", "resumed-from"}),
    "eval-gate": ("eval-gate", {"verdict", "report-path"}),
    "promote": ("promote", {"version", "stage"}),
    "teardown": ("teardown", {"actual-usd", "gpu-seconds", "comment-path"}),
}

sys.path.insert(0, str(ROOT / "scripts"))
import actions_readme  # noqa: E402


def meta(action: Path) -> dict[str, Any]:
    data = yaml.safe_load((action / "action.yml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def steps(action: Path) -> list[dict[str, Any]]:
    return list(meta(action)["runs"]["steps"])


def ids(actions: list[Path]) -> list[str]:
    return [a.name for a in actions]


def test_every_action_of_the_contract_exists() -> None:
    assert {a.name for a in COMMAND_ACTIONS} == set(CONTRACT)
    assert (ROOT / "actions/setup/action.yml").exists()
    assert (ROOT / "actions/guard/action.yml").exists()


@pytest.mark.parametrize("action", ACTIONS, ids=ids(ACTIONS))
def test_metadata_rules(action: Path) -> None:
    data = meta(action)
    assert data["name"] and data["description"]
    assert data["branding"]["icon"] and data["branding"]["color"]
    assert data["runs"]["using"] == "composite"
    for name, spec in data["inputs"].items():
        assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name), f"{name} is not kebab-case"
        assert spec.get("description"), f"input {name} has no description"
        assert isinstance(spec.get("default"), str), f"input {name} needs an explicit string default"
    for name, spec in data["outputs"].items():
        assert re.fullmatch(r"[a-z][a-z0-9]*(-[a-z0-9]+)*", name)
        assert spec.get("description") and spec.get("value"), f"output {name} is undocumented or unset"


@pytest.mark.parametrize("action", COMMAND_ACTIONS, ids=ids(COMMAND_ACTIONS))
def test_one_gpuline_command_per_action_with_the_contract_outputs(action: Path) -> None:
    command, outputs = CONTRACT[action.name]
    scripts = "\n".join(str(s.get("run", "")) for s in steps(action))
    called = re.findall(r'"\$GPULINE" ([a-z-]+)', scripts)
    assert called == [command]
    assert set(meta(action)["outputs"]) >= outputs
    for name, spec in meta(action)["outputs"].items():
        assert spec["value"] == f"${{{{ steps.run.outputs.{name} }}}}"


@pytest.mark.parametrize("action", COMMAND_ACTIONS, ids=ids(COMMAND_ACTIONS))
def test_inputs_reach_the_command_only_through_env(action: Path) -> None:
    data = meta(action)
    run = next(s for s in steps(action) if s.get("id") == "run")
    env = run["env"]
    used = {m for v in env.values() for m in re.findall(r"inputs\.([a-z0-9-]+)", str(v))}
    used |= set(re.findall(r"inputs\.([a-z0-9-]+)", str(run.get("working-directory", ""))))
    setup = next(s for s in steps(action) if s.get("id") == "setup")
    used |= set(re.findall(r"inputs\.([a-z0-9-]+)", str(setup.get("env", {}))))
    # uv-cache goes to setup-uv's own `with:` (an expression, never a script).
    used |= set(re.findall(r"inputs\.([a-z0-9-]+)", str(steps(action)[0].get("with", {}))))
    assert used == set(data["inputs"]), "every input is used, and only through env:, working-directory or setup-uv"
    for script in (str(s.get("run", "")) for s in steps(action)):
        assert "${{" not in script


@pytest.mark.parametrize("action", COMMAND_ACTIONS, ids=ids(COMMAND_ACTIONS))
def test_every_action_installs_gpuline_exactly_as_setup_does(action: Path) -> None:
    def shared(steps_: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = [dict(s) for s in steps_[:2]]
        out[1]["env"] = {}  # the extras differ on purpose
        return out

    assert shared(steps(action)) == shared(steps(ROOT / "actions/setup"))
    assert steps(action)[1]["run"] == '"$GITHUB_ACTION_PATH/../setup/install.sh"'


@pytest.mark.parametrize(
    ("action", "input_name", "variable"),
    [
        ("cost-estimate", "labels", "GPULINE_PR_LABELS"),
        ("cost-estimate", "approved-environment", "GPULINE_APPROVED_ENVIRONMENT"),
        ("provision-gpu", "github-token", "GPULINE_GITHUB_TOKEN"),
        ("teardown", "github-token", "GPULINE_GITHUB_TOKEN"),
    ],
)
def test_approvals_and_the_runner_token_reach_the_command(action: str, input_name: str, variable: str) -> None:
    run = next(s for s in steps(ROOT / "actions" / action) if s.get("id") == "run")
    assert run["env"][variable] == f"${{{{ inputs.{input_name} }}}}"


@pytest.mark.parametrize("action", COMMAND_ACTIONS, ids=ids(COMMAND_ACTIONS))
def test_every_action_can_install_the_cloud_sdks(action: Path) -> None:
    # boto3 for ec2 and the DynamoDB/S3 backends, the Kubernetes client: extras a step asks for.
    assert "extras" in meta(action)["inputs"]
    assert steps(action)[1]["env"]["GPULINE_EXTRAS"] == "${{ inputs.extras }}"


def test_only_training_actions_default_to_torch() -> None:
    for action in INSTALLING_ACTIONS:
        inputs = meta(action)["inputs"]
        default = inputs.get("extras", {}).get("default", "")
        setup_env = str(steps(action)[1]["env"]["GPULINE_EXTRAS"])
        assert ("train" in default or "train" in setup_env) == (action.name == "train"), action.name
    assert 'torch>=2.4,<2.14"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize("action", ACTIONS, ids=ids(ACTIONS))
def test_readme_is_generated_from_action_yml(action: Path) -> None:
    readme = (action / "README.md").read_text(encoding="utf-8")
    assert readme == actions_readme.render(action.name, meta(action))
    for name in meta(action)["inputs"]:
        assert f"| `{name}` |" in readme
    for name in meta(action)["outputs"]:
        assert f"| `{name}` |" in readme


def test_readme_check_fails_on_a_stale_readme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "actions/preflight"
    copy.mkdir(parents=True)
    shutil.copy(ROOT / "actions/preflight/action.yml", copy / "action.yml")
    (copy / "README.md").write_text("# out of date\n")
    monkeypatch.setattr(actions_readme, "ACTIONS", tmp_path / "actions")
    monkeypatch.setattr(actions_readme, "ROOT", tmp_path)
    assert actions_readme.main(["--check"]) == 1
    assert actions_readme.main([]) == 0
    assert actions_readme.main(["--check"]) == 0


# ---------------------------------------------------------------- shell


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed; CI must run it")
        pytest.skip("shellcheck is not installed")
    return found


@pytest.mark.parametrize("action", ACTIONS, ids=ids(ACTIONS))
def test_run_scripts_pass_shellcheck(action: Path, tmp_path: Path) -> None:
    # actionlint checks the scripts of workflows, not those of composite actions: check them here.
    binary = shellcheck()
    for i, step in enumerate(steps(action)):
        if "run" not in step:
            continue
        script = tmp_path / f"step{i}.sh"
        script.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + str(step["run"]))
        out = subprocess.run([binary, "-S", "style", str(script)], capture_output=True, text=True, check=False)
        assert out.returncode == 0, f"{action.name} step {i}:\n{out.stdout}"


def test_install_script_passes_shellcheck() -> None:
    script = str(ROOT / "actions/setup/install.sh")
    out = subprocess.run([shellcheck(), script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout


def test_the_shared_python_chooser_passes_shellcheck() -> None:
    script = str(ROOT / "actions/setup/user-python.sh")
    out = subprocess.run([shellcheck(), script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("choice", ["gpuline", "path", "conda"])
def test_the_shared_python_chooser_sets_the_interpreter_or_refuses(choice: str, tmp_path: Path) -> None:
    # A stand-in for the installed `gpuline` command: it shows what it was started with.
    fake = tmp_path / "gpuline"
    fake.write_text('#!/usr/bin/env bash\necho "python=$GPULINE_PYTHON args=$*"\n')
    fake.chmod(0o755)
    venv_python = tmp_path / "venv" / "bin" / "python"
    env = {
        "PATH": os.environ["PATH"],
        "GPULINE": str(fake),
        "GPULINE_VENV_PYTHON": str(venv_python),
        "GPULINE_TRAIN_PYTHON": choice,
    }
    script = ROOT / "actions/setup/user-python.sh"
    # As the action's step runs it: sourced, then the command.
    line = f'set -eo pipefail; . "{script}"; "$GPULINE" train'
    out = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, check=False, timeout=30)
    if choice == "conda":
        assert out.returncode == 2
        assert "input python must be gpuline or path (got: conda)" in out.stdout
        return
    assert out.returncode == 0, out.stderr
    expected = str(venv_python) if choice == "gpuline" else shutil.which("python") or shutil.which("python3")
    assert out.stdout.strip() == f"python={expected} args=train"


_NETWORK_ENV = (
    "SSL_CERT_",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "UV_",
    "PIP_",
)


def _install(
    tmp_path: Path, extras: str = "", path: str | None = None, source: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "out").write_text("")
    (tmp_path / "path").write_text("")
    env = {
        "PATH": path if path is not None else f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "RUNNER_TEMP": str(tmp_path / "runner-temp"),
        "GITHUB_OUTPUT": str(tmp_path / "out"),
        "GITHUB_PATH": str(tmp_path / "path"),
        "GPULINE_EXTRAS": extras,
        # The machine's own network settings (certificates, proxies, package indexes) stay, as on a runner.
        **{k: v for k, v in os.environ.items() if k.startswith(_NETWORK_ENV)},
    }
    script = source / "actions/setup/install.sh"
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_setup_installs_into_its_own_venv_and_puts_only_gpuline_on_path(tmp_path: Path) -> None:
    result = _install(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    outputs = dict(line.split("=", 1) for line in (tmp_path / "out").read_text().splitlines())
    venv = tmp_path / "runner-temp/gpuline/venv"
    assert outputs["python"] == str(venv / "bin/python")
    added = (tmp_path / "path").read_text().strip()
    assert sorted(p.name for p in Path(added).iterdir()) == ["gpuline"]  # no python, no pip on PATH
    version = subprocess.run([outputs["gpuline"], "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"gpuline {outputs['version']}"
    # PyGithub is in gpuline's venv (comments), not in the caller's Python.
    subprocess.run([outputs["python"], "-c", "import github"], check=True)
    # A second install in the same job is a no-op.
    again = _install(tmp_path)
    assert again.returncode == 0 and "already installed" in again.stdout


@pytest.mark.slow
def test_a_second_checkout_of_the_same_gpuline_installs_nothing_and_a_changed_one_reinstalls(tmp_path: Path) -> None:
    # Each action of one commit can come as its own checkout (act does this): same content, same install.
    copies = [tmp_path / "actions-a", tmp_path / "actions-b"]
    for copy in copies:
        for part in ("pyproject.toml", "README.md", "scripts", "trainer", "templates", "docs", "actions/setup"):
            (copy / part).parent.mkdir(parents=True, exist_ok=True)
            if (ROOT / part).is_dir():
                shutil.copytree(ROOT / part, copy / part)
            else:
                shutil.copy(ROOT / part, copy / part)
    first = _install(tmp_path, source=copies[0])
    assert first.returncode == 0 and "Installing gpuline" in first.stdout, first.stdout + first.stderr
    second = _install(tmp_path, source=copies[1])
    assert second.returncode == 0 and "already installed" in second.stdout, second.stdout + second.stderr
    # A different gpuline (one changed module) is a different install, though it lies where the first did.
    module = copies[1] / "scripts/gpuline/__init__.py"
    module.write_text(module.read_text() + "\n# changed\n")
    third = _install(tmp_path, source=copies[1])
    assert third.returncode == 0 and "Installing gpuline" in third.stdout, third.stdout + third.stderr


def test_setup_rejects_extras_that_are_not_names(tmp_path: Path) -> None:
    result = _install(tmp_path, extras="train]; rm -rf /")
    assert result.returncode == 2
    assert "::error title=gpuline setup::extras must be" in result.stdout


def test_setup_needs_runner_temp(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    script = ROOT / "actions/setup/install.sh"
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "RUNNER_TEMP" in result.stderr


def test_the_uv_cache_key_follows_the_project_s_dependencies() -> None:
    # A fixed key ("") saves the first cache and serves it forever, whatever the project later needs.
    for action in INSTALLING_ACTIONS:
        for step in steps(action):
            if str(step.get("uses", "")).startswith("astral-sh/setup-uv@"):
                globs = str(step["with"]["cache-dependency-glob"]).split()
                assert {"**/requirements*.txt", "**/pyproject.toml", "**/uv.lock"} <= set(globs), action.name


def test_the_cpu_tier_installs_the_cpu_build_of_torch() -> None:
    tier = yaml.safe_load((ROOT / ".github/workflows/pr-fast.yml").read_text())
    assert tier["env"]["UV_TORCH_BACKEND"] == "cpu"
    # A different torch build is a different install: the install script's stamp says which.
    assert "UV_TORCH_BACKEND" in (ROOT / "actions/setup/install.sh").read_text()
