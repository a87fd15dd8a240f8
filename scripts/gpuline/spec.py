"""gpuline.yml (what to run) and policy.yml (what is allowed) as typed models.

Both reject unknown keys: a typo such as ``max_duraton`` must fail loudly instead of silently
falling back to a default that buys hours of GPU time.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, cast

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from gpuline.errors import ConfigError, Location, clip_repr
from gpuline.yamlsource import YamlDocument, closest, dotted, load_yaml

TIERS = ("pr-fast", "nightly", "release")
Tier = Literal["pr-fast", "nightly", "release"]
Stage = Literal["staging", "production"]

MAX_DURATION_S = 366 * 24 * 3600
_DURATION = re.compile(r"^\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s)?\s*$")


def parse_duration(value: Any) -> int:
    """``90`` / ``"90s"`` / ``"20m"`` / ``"1h30m"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 20m, 1h30m or 900 (seconds)")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("expected a duration such as 20m, 1h30m or 900 (seconds)")
    if isinstance(value, int | float) or (isinstance(value, str) and value.strip().isdigit()):
        seconds = int(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)) and any(m.groups()):
        hours, minutes, secs = (int(g) if g else 0 for g in m.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    else:
        raise ValueError("expected a duration such as 20m, 1h30m or 900 (seconds)")
    if seconds <= 0:
        raise ValueError("a duration must be positive")
    if seconds > MAX_DURATION_S:
        # Beyond this no lease, TTL or estimate is meaningful (and a date past it overflows).
        raise ValueError("a duration may be at most 366 days")
    return seconds


Duration = Annotated[int, BeforeValidator(parse_duration), Field(json_schema_extra={"type": ["string", "integer"]})]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, populate_by_name=True)


# ---------------------------------------------------------------- gpuline.yml


class ModelInfo(_Model):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$", description="Registry name of the model.")
    owner: str = Field(min_length=1, description="Person or group accountable for the model.")
    team: str = Field(min_length=1, description="Team whose GPU budget pays for runs.")
    intended_use: str = Field(min_length=1, description="What the model is for, and what it is not for.")


class ArraySchema(_Model):
    dtype: str
    shape: list[int] = Field(description="Expected shape; -1 matches any length.")


class Dataset(_Model):
    uri: str = Field(description="Path relative to gpuline.yml, file://, or s3://bucket/key.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Content hash of the dataset file.")
    format: Literal["npz", "csv", "jsonl", "parquet", "other"] = "other"
    # Keys of the npz (or columns of a csv) with their dtype and shape, checked in preflight.
    schema_: dict[str, ArraySchema] | None = Field(default=None, alias="schema")


def _split_command(data: Any) -> Any:
    """A ``command`` written as one string is split the way a shell would (no shell runs it)."""
    if isinstance(data, dict) and isinstance(data.get("command"), str):
        import shlex

        data = {**data, "command": shlex.split(data["command"])}
    return data


class Entrypoint(_Model):
    command: list[str] = Field(min_length=1, description="argv of the training script, run from workdir.")
    workdir: str = Field(default=".", description="Directory relative to gpuline.yml.")
    import_check: str | None = Field(
        default=None, description="Python file imported in preflight (defaults to the first .py in command)."
    )

    _split_string_command = model_validator(mode="before")(_split_command)


class Resources(_Model):
    provider: str = Field(default="local", description="local, ec2, kubernetes, rest (or an alias).")
    gpu_type: str = Field(default="cpu", description="GPU model (t4, l4, a10g, a100, h100) or cpu.")
    # Strict: YAML's `true` is not a count (lax validation would read it as 1 GPU).
    gpu_count: int = Field(default=0, ge=0, le=64, strict=True)
    nodes: int = Field(default=1, ge=1, le=64, strict=True)
    procs_per_node: int = Field(default=1, ge=1, le=64, strict=True)
    max_duration: Duration = Field(default=3600, description="Hard stop for training (e.g. 45m, 2h).")
    lane: Literal["spot", "on-demand"] = "on-demand"
    region: str | None = None
    instance_type: str | None = Field(default=None, description="Pin an instance type instead of choosing.")
    image: str | None = Field(default=None, description="Container or machine image to run on.")
    options: dict[str, Any] = Field(default_factory=dict, description="Provider-specific settings.")

    @field_validator("provider")
    @classmethod
    def _canonical_provider(cls, name: str) -> str:
        """An alias (aws, k8s) becomes its provider's name here, so pricing, leases and the run record all
        see one name. Any other name is kept: the pricing catalog may price providers gpuline cannot
        launch, and preflight refuses one that a run would need to launch."""
        from gpuline.providers import PROVIDERS

        return PROVIDERS.canonical(name) if PROVIDERS.knows(name) else name


class Checkpointing(_Model):
    interval_steps: int = Field(default=100, ge=1)
    keep: int = Field(default=3, ge=1)
    max_restarts: int = Field(default=2, ge=0)
    allow_fresh_start: bool = Field(
        default=False, description="When every checkpoint is corrupt, start from step 0 instead of failing."
    )


class Gate(_Model):
    metric: str = Field(min_length=1, description="A key of the eval metrics the gate reads.")
    slice: str | None = Field(default=None, description="Check the metric on this slice of the eval set.")
    goal: Literal["maximize", "minimize"] = "maximize"
    min: float | None = None
    max: float | None = None
    max_regression: float | None = Field(
        default=None, ge=0, description="Largest relative change for the worse vs the baseline (0.02 = 2%)."
    )

    @model_validator(mode="after")
    def _has_a_threshold(self) -> Gate:
        if self.min is None and self.max is None and self.max_regression is None:
            raise ValueError("a gate needs at least one of min, max or max_regression")
        return self


class Eval(_Model):
    baseline: Stage = Field(default="production", description="Registry stage to compare against.")
    gates: list[Gate] = Field(default_factory=list)
    command: list[str] | None = Field(
        default=None,
        min_length=1,
        description=(
            "Evaluates one model: its files are in GPULINE_MODEL_PATH, the dataset in GPULINE_DATASET_PATH; "
            "it writes its metrics (JSON) to GPULINE_EVAL_PATH. Run from workdir on the candidate and the "
            "baseline in eval-gate, and on the promoted version by `gpuline verify`."
        ),
    )
    workdir: str = Field(default=".", description="Directory of eval.command, relative to gpuline.yml.")
    timeout: Duration = Field(default=1800, description="Longest one evaluation may take (e.g. 10m).")

    _split_string_command = model_validator(mode="before")(_split_command)


class Deploy(_Model):
    command: list[str] = Field(
        min_length=1,
        description=(
            "Run after a promotion to one of `stages`, with GPULINE_MODEL, GPULINE_MODEL_VERSION, "
            "GPULINE_STAGE and GPULINE_ARTIFACTS_URI set; a failure rolls the stage back."
        ),
    )
    stages: list[Stage] = Field(
        default_factory=lambda: list[Stage](["production"]), min_length=1, description="Stages whose promotion deploys."
    )
    workdir: str = Field(default=".", description="Directory of the command, relative to gpuline.yml.")
    timeout: Duration = Field(default=900, description="Longest the deploy may take (e.g. 15m).")

    _split_string_command = model_validator(mode="before")(_split_command)


class Backends(_Model):
    ledger: str = "sqlite:///.gpuline/ledger.db"
    registry: str = "file://.gpuline/registry"
    storage: str = "file://.gpuline/artifacts"


class TierOverride(_Model):
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    resources: dict[str, Any] = Field(default_factory=dict)
    checkpoint: dict[str, Any] = Field(default_factory=dict)


class Spec(_Model):
    """The whole gpuline.yml."""

    version: Literal[1] = 1
    model: ModelInfo
    dataset: Dataset
    entrypoint: Entrypoint
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    checkpoint: Checkpointing = Field(default_factory=Checkpointing)
    eval: Eval = Field(default_factory=Eval)
    deploy: Deploy | None = Field(default=None, description="A command that puts a promoted version to use.")
    secrets: list[str] = Field(default_factory=list, description="Names of env vars that must be set.")
    tiers: dict[Tier, TierOverride] = Field(default_factory=dict)
    backends: Backends = Field(default_factory=Backends)

    def for_tier(self, tier: str) -> Spec:
        """The spec with the tier's overrides merged in (what actually runs)."""
        return _tier_spec(self, tier, None)

    def config_hash(self) -> str:
        """Hash of the resolved config: two runs with equal hashes train the same thing."""
        canonical = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------- policy.yml


class Limit(_Model):
    soft: float | None = Field(default=None, ge=0, description="Above this: warn.")
    hard: float | None = Field(default=None, ge=0, description="Above this: deny.")

    @model_validator(mode="after")
    def _soft_below_hard(self) -> Limit:
        if self.soft is not None and self.hard is not None and self.soft > self.hard:
            raise ValueError("soft must not be above hard")
        return self


class TeamBudget(_Model):
    gpu_hours: Limit = Field(default_factory=Limit)
    usd: Limit = Field(default_factory=Limit)


class Budgets(_Model):
    period: Literal["week", "month"] = "week"
    teams: dict[str, TeamBudget] = Field(default_factory=dict)
    default: TeamBudget | None = Field(default=None, description="Budget of teams not listed.")
    org: TeamBudget | None = Field(default=None, description="Budget of all teams together.")


class TierPolicy(_Model):
    max_duration: Duration | None = None
    allowed_gpu_types: list[str] | None = None
    max_gpus: int | None = Field(default=None, ge=0)
    allowed_lanes: list[Literal["spot", "on-demand"]] | None = None


class Lane(_Model):
    capacity: int = Field(ge=0, description="Machines that may run at once in this lane.")


class Approval(_Model):
    label: str | None = Field(
        default=None, description="A PR label that turns a deny into a warning (an approved exception)."
    )
    environment: str | None = Field(default=None, description="An environment whose reviewers approve.")


class Policy(_Model):
    version: Literal[1] = 1
    budgets: Budgets = Field(default_factory=Budgets)
    tiers: dict[Tier, TierPolicy] = Field(default_factory=dict)
    lanes: dict[Literal["spot", "on-demand"], Lane] = Field(default_factory=dict)
    approval: Approval = Field(default_factory=Approval)

    def budget_for(self, team: str) -> TeamBudget | None:
        return self.budgets.teams.get(team) or self.budgets.default


# ---------------------------------------------------------------- loading


def load_spec(path: Path) -> Spec:
    doc = load_yaml(path)
    return _validate(doc, Spec)


def load_policy(path: Path, text: str | None = None) -> Policy:
    doc = load_yaml(path, text)
    if doc.data is None:
        return Policy()
    return _validate(doc, Policy)


M = TypeVar("M", bound=BaseModel)


def _validate(doc: YamlDocument, model: type[M]) -> M:
    if not isinstance(doc.data, dict):
        raise ConfigError(
            "expected a mapping at the top level",
            location=Location(doc.path, line=1),
            hint=f"start the file with keys such as {', '.join(list(model.model_fields)[:3])}",
        )
    try:
        validated = model.model_validate(doc.data)
    except ValidationError as exc:
        raise _to_config_error(doc, model, exc) from None
    if isinstance(validated, Spec):
        # Each tier as it will run: a typo under tiers.nightly.resources fails here, at its line.
        for tier in validated.tiers:
            _tier_spec(validated, tier, doc)
    return validated


def _tier_spec(spec: Spec, tier: str, doc: YamlDocument | None) -> Spec:
    """``spec`` with the tier's overrides merged in; a bad override is a ConfigError at tiers.TIER...."""
    override = spec.tiers.get(cast(Tier, tier))
    if override is None:
        return spec
    data = spec.model_dump(by_alias=True)
    for section in ("hyperparameters", "resources", "checkpoint"):
        data[section] = {**data[section], **getattr(override, section)}
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        loc = exc.errors()[0]["loc"]
        # The error is the override's when the key it names came from the override.
        ours = len(loc) >= 2 and loc[0] in data and loc[1] in getattr(override, str(loc[0]), {})
        raise _to_config_error(doc, Spec, exc, ("tiers", tier) if ours else ()) from None


def _to_config_error(
    doc: YamlDocument | None, model: type[BaseModel], exc: ValidationError, prefix: tuple[str, ...] = ()
) -> ConfigError:
    first = exc.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    field = dotted(prefix + loc)
    kind = first["type"]
    if kind == "missing":
        message, hint = "required field is missing", f"add `{loc[-1]}:` here"
    elif kind == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        choices = list(parent.model_fields) if parent else []
        aliases = [f.alias for f in parent.model_fields.values() if f.alias] if parent else []
        guess = closest(str(loc[-1]), choices + aliases)
        message = "unknown key"
        hint = f"did you mean `{guess}`?" if guess else f"valid keys are {', '.join(choices + aliases)}"
    else:
        value = first.get("input")
        message = first["msg"].removeprefix("Value error, ")
        if not isinstance(value, dict | list):
            message += f" (got {clip_repr(value)})"
        hint = "see `gpuline schema` for the expected type"
    extra = f"; {len(exc.errors()) - 1} more problem(s) after fixing this" if len(exc.errors()) > 1 else ""
    where = Location(doc.path if doc else "gpuline.yml", line=doc.line_of(prefix + loc) if doc else None, field=field)
    return ConfigError(message + extra, hint=hint, location=where)


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The nested model class that owns the keys at ``loc`` (for 'did you mean' hints)."""
    current: type[BaseModel] = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = current.model_fields.get(str(part))
        if field is None:
            return None
        inner = _model_in(field.annotation)
        if inner is None:
            return None
        current = inner
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def json_schema(policy: bool = False) -> dict[str, Any]:
    model: type[BaseModel] = Policy if policy else Spec
    schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "policy.yml" if policy else "gpuline.yml"
    return schema
