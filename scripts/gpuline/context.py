"""What every step needs: the resolved spec, the policy, the backends and the run record.

Backends open lazily, so ``gpuline schema`` never touches the ledger and ``cost-estimate`` never
loads a storage SDK.
"""

from __future__ import annotations

import argparse
import os
import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuline import gha
from gpuline.errors import ConfigError, InputError, Location
from gpuline.inputs import Inputs
from gpuline.ledger import open_ledger
from gpuline.registry import open_registry
from gpuline.registry.base import ModelRegistry
from gpuline.runs import Ledger, Lineage, Project, RunRecord, new_run_id, utcnow
from gpuline.spec import Backends, Policy, Spec, load_policy, load_spec
from gpuline.yamlsource import YamlDocument, load_yaml

if TYPE_CHECKING:
    from gpuline.storage import Storage


@dataclass
class Context:
    config_path: Path
    tier: str
    policy_path: Path | None = None
    policy_ref: str | None = None
    run_id: str | None = None
    json: bool = False
    inputs: Inputs = field(default_factory=Inputs.from_env)
    # Set when this context created the run: the caller reports the new id even if a step then fails.
    created_run: bool = False
    # The tier asked for by --tier or GPULINE_TIER (None: not given). A run keeps the tier it was
    # created with, so asking for another one on an existing run is an error, not a silent switch.
    tier_given: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, default_tier: str = "nightly") -> Context:
        """The context of one command; ``args`` carries the inputs the CLI read (flags over environment)."""
        inputs = getattr(args, "inputs", None)
        return cls(
            config_path=Path(args.config),
            tier=args.tier or default_tier,
            tier_given=args.tier,
            policy_path=Path(args.policy) if args.policy else None,
            policy_ref=args.policy_ref,
            run_id=args.run_id,
            json=args.json,
            inputs=inputs if isinstance(inputs, Inputs) else Inputs.from_env(),
        )

    # ------------------------------------------------------------ configuration

    def use_tier(self, tier: str) -> None:
        """Act as ``tier`` (a run keeps the tier it was created with, whatever later flags say)."""
        if tier != self.tier:
            self.tier = tier
            self.__dict__.pop("spec", None)

    @property
    def project_dir(self) -> Path:
        return self.config_path.resolve().parent

    @cached_property
    def project(self) -> Project:
        """This project's identity, as its runs carry it."""
        return project_of(self.config_path)

    def _backends_dir(self, given: str | None) -> Path:
        """The folder relative backend URIs resolve in. Unless the URI was given (GPULINE_LEDGER and
        the like: `gpuline models` on a shared registry needs no project), a gpuline.yml that does not
        exist (a typo'd --config, a folder without one) is an error here: a ledger created beside it
        would read as "no runs" and record new ones where no project will look for them."""
        if given is None and not self.config_path.is_file():
            what = "is a directory, not a file" if self.config_path.is_dir() else "file not found"
            raise InputError(
                what,
                location=Location(self.config_path),
                hint="pass --config PATH (GPULINE_CONFIG) of the project's gpuline.yml, or run from its folder",
            )
        return self.project_dir

    @cached_property
    def base_spec(self) -> Spec:
        return load_spec(self.config_path)

    @cached_property
    def spec_source(self) -> YamlDocument:
        return load_yaml(self.config_path)

    def line_of(self, loc: tuple[int | str, ...]) -> int | None:
        return self.spec_source.line_of(loc)

    @cached_property
    def spec(self) -> Spec:
        """The spec as this tier runs it (tier overrides merged)."""
        return self.base_spec.for_tier(self.tier)

    @cached_property
    def policy(self) -> Policy:
        path = self.policy_path or self.project_dir / "policy.yml"
        if self.policy_ref:
            # Policy is trusted input: read it from the base branch, never from the PR's working tree.
            from gpuline.decisions.policy_source import read_at_ref

            text = read_at_ref(self.policy_ref, path)
            return load_policy(path, text)
        if not path.exists():
            if self.policy_path is not None:
                raise InputError("policy file not found", hint="pass an existing --policy PATH")
            return Policy()
        return load_policy(path)

    # ------------------------------------------------------------ backends

    @cached_property
    def backends(self) -> Backends:
        try:
            return self.base_spec.backends
        except ConfigError:
            # Teardown, status and reap must work even when gpuline.yml broke after the run started.
            return Backends()

    @cached_property
    def ledger(self) -> Ledger:
        base = self._backends_dir(self.inputs.ledger)
        return open_ledger(self.inputs.ledger or self.backends.ledger, base)

    @cached_property
    def registry(self) -> ModelRegistry:
        """The model registry, its credentials masked in the log before any step uses it."""
        base = self._backends_dir(self.inputs.registry)
        registry = open_registry(self.inputs.registry or self.backends.registry, base)
        for secret in registry.secrets():
            gha.mask(secret)
        return registry

    @cached_property
    def storage(self) -> Storage:
        from gpuline.storage import open_storage

        base = self._backends_dir(self.inputs.storage)
        return open_storage(self.inputs.storage or self.backends.storage, base)

    def workdir(self, run_id: str) -> Path:
        path = self.project_dir / ".gpuline" / "runs" / run_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    # ------------------------------------------------------------ the run record

    def require_run(self) -> RunRecord:
        """The run named by --run-id, acted on as the tier it was created with."""
        if not self.run_id:
            raise InputError("no run given", hint="pass --run-id ID (printed by `gpuline preflight` or `provision`)")
        record = self.ledger.get_run(self.run_id)
        self._check_project(record)
        if self.tier_given is not None and self.tier_given != record.tier:
            raise InputError(
                f"run {record.run_id} is a {record.tier} run; it cannot be acted on as {self.tier_given}",
                hint=f"drop --tier (GPULINE_TIER) or pass --tier {record.tier}; a new run takes a new tier",
            )
        self.use_tier(record.tier)
        return record

    def _check_project(self, record: RunRecord) -> None:
        """Refuse another project's run: a shared ledger holds many projects' runs, and one reached by
        a wrong or stale --run-id must not train here or be promoted into this project's registry."""
        if record.project is None or record.project.same_as(self.project):
            return
        raise InputError(
            f"run {record.run_id} belongs to the project {record.project.describe()}, "
            f"not to this one ({self.project.describe()})",
            hint="pass a run this project created (`gpuline status` lists them), or the --config that created it",
        )

    def refuse_closed(self) -> None:
        """A closed run (torn down, or closed by the reaper) never runs a step again: its lease and
        quota are gone, so training it would use a machine nothing pays for or tears down, and
        promoting it would release what its record calls failed."""
        record = self.ledger.get_run(self.run_id or "")
        released = record.times.released
        if released is None:
            return
        raise InputError(
            f"run {record.run_id} was closed at {released:%Y-%m-%d %H:%M:%S} UTC "
            f"({record.status} after {record.stage}); a closed run is never resumed",
            hint="start a new run: drop --run-id (GPULINE_RUN_ID)",
        )

    def ensure_run(self) -> RunRecord:
        """The run named by --run-id, or a new one: the first step that needs a run creates it."""
        if self.run_id:
            return self.require_run()
        spec = self.spec
        record = RunRecord(
            run_id=new_run_id(),
            model=spec.model.name,
            team=spec.model.team,
            tier=self.tier,
            project=self.project,
            lineage=collect_lineage(self, spec),
            resolved_config=spec.model_dump(mode="json", by_alias=True),
            provider=spec.resources.provider,
            gpu_type=spec.resources.gpu_type,
            gpu_count=spec.resources.gpu_count,
            lane=spec.resources.lane,
        )
        record.times.requested = utcnow()
        self.ledger.create_run(record)
        self.ledger.append_event(record.run_id, "run.created", {"tier": self.tier, "config": str(self.config_path)})
        self.run_id = record.run_id
        self.created_run = True
        return record

    def event(self, kind: str, **data: Any) -> None:
        assert self.run_id
        self.ledger.append_event(self.run_id, kind, data)


def collect_lineage(ctx: Context, spec: Spec) -> Lineage:
    env = os.environ
    server = env.get("GITHUB_SERVER_URL", "https://github.com")
    run_url = ""
    if env.get("GITHUB_REPOSITORY") and env.get("GITHUB_RUN_ID"):
        run_url = f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    image = ctx.inputs.image_digest or (spec.resources.image or "")
    return Lineage(
        repo=env.get("GITHUB_REPOSITORY") or _git(ctx.project_dir, "config", "--get", "remote.origin.url"),
        commit=env.get("GITHUB_SHA") or _git(ctx.project_dir, "rev-parse", "HEAD"),
        ref=env.get("GITHUB_REF") or _git(ctx.project_dir, "rev-parse", "--abbrev-ref", "HEAD"),
        workflow_run_url=run_url,
        actor=env.get("GITHUB_ACTOR") or env.get("USER", ""),
        config_path=str(ctx.config_path),
        config_hash=spec.config_hash(),
        image_digest=image,
        dataset_uri=spec.dataset.uri,
        dataset_sha256=spec.dataset.sha256,
    )


def project_of(config_path: Path) -> Project:
    """The repository (GITHUB_REPOSITORY, else the clone's origin) and the config's path inside it
    (its checkout's root from git, else GITHUB_WORKSPACE): the same on every machine a workflow's
    jobs run on, whatever folder each checked the repository out into."""
    path = config_path.resolve()
    env = os.environ
    repository = env.get("GITHUB_REPOSITORY") or repository_name(
        _git(path.parent, "config", "--get", "remote.origin.url")
    )
    top = _git(path.parent, "rev-parse", "--show-toplevel") or env.get("GITHUB_WORKSPACE", "")
    root = Path(top).resolve() if top else None
    inside = path.relative_to(root).as_posix() if root is not None and path.is_relative_to(root) else str(path)
    return Project(repository=repository, config=inside)


def repository_name(remote_url: str) -> str:
    """``owner/name`` of a remote URL (``https://host/o/n.git``, ``git@host:o/n.git``), as GitHub spells it."""
    url = remote_url.strip().removesuffix("/").removesuffix(".git")
    path = url.split("://", 1)[1].partition("/")[2] if "://" in url else url.rpartition(":")[2]
    parts = [p for p in path.split("/") if p]
    return "/".join(parts[-2:])


def _git(cwd: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
