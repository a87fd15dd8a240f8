"""``resources.options`` is free-form in gpuline.yml; each provider reads it through its own pydantic
model, so a typo (``subnet_id`` for ``subnet_ids``) fails with the field's full name before any call."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from gpuline.errors import ConfigError
from gpuline.yamlsource import closest, dotted

M = TypeVar("M", bound=BaseModel)


def parse_options(model: type[M], options: dict[str, Any], provider: str) -> M:
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        field = "resources.options" + ("." + dotted(loc) if loc else "")
        if first["type"] == "extra_forbidden":
            guess = closest(str(loc[-1]), list(model.model_fields))
            known = ", ".join(model.model_fields)
            hint = f"did you mean `{guess}`?" if guess else f"the {provider} provider reads {known}"
            message = "unknown key"
        else:
            message = first["msg"].removeprefix("Value error, ")
            if not isinstance(first.get("input"), dict | list):
                message += f" (got {first.get('input')!r})"
            hint = f"see the {provider} options in the README's providers page (docs/providers.md)"
        raise ConfigError(f"{field}: {message}", hint=hint) from None


def options_for(provider: str, options: dict[str, Any], region: str | None) -> dict[str, Any]:
    """The options to reopen a provider with after the fact (teardown, reap): the run's
    ``resources.options`` plus the region it ran in, which EC2 needs and the options may not say."""
    if provider in ("ec2", "aws") and region and not options.get("region"):
        return {**options, "region": region}
    return dict(options)
