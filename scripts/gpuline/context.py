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
from gpuline.errors import ConfigError, InputError
from gpuline.inputs import Inputs
from gpuline.ledger import open_ledger
from gpuline.registry import open_registry
from gpuline.registry.base import ModelRegistry
from gpuline.runs import Ledger, Lineage, RunRecord, new_run_id, utcnow
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
        return open_ledger(self.inputs.ledger or self.backends.ledger, self.project_dir)

    @cached_property
    def registry(self) -> ModelRegistry:
        """The model registry, its credentials masked in the log before any step uses it."""
        registry = open_registry(self.inputs.registry or self.backends.registry, self.project_dir)
        for secret in registry.secrets():
            gha.mask(secret)
        return registry

    @cached_property
    def storage(self) -> Storage:
        from gpuline.storage import open_storage

        return open_storage(self.inputs.storage or self.backends.storage, self.project_dir)

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
        if self.tier_given is not None and self.tier_given != record.tier:
            raise InputError(
                f"run {record.run_id} is a {record.tier} run; it cannot be acted on as {self.tier_given}",
                hint=f"drop --tier (GPULINE_TIER) or pass --tier {record.tier}; a new run takes a new tier",
            )
        self.use_tier(record.tier)
        return record

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


def _git(cwd: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""
