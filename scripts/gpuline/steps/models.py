"""models: what each stage of a model holds now, and its audited history (who, when, why, from where).

``gpuline models MODEL``; without a name, the model of gpuline.yml, or every model in the registry
when there is no gpuline.yml.
"""

from __future__ import annotations

import argparse
from urllib.parse import urlsplit, urlunsplit

from gpuline.context import Context
from gpuline.errors import InputError, NotFoundError
from gpuline.registry.base import ModelRegistry
from gpuline.results import ModelsResult, ModelView

SHOWN = ("production", "staging")  # the order people read them in


def run(ctx: Context, args: argparse.Namespace) -> ModelsResult:
    registry = ctx.registry
    names = [args.model] if args.model else _default_names(ctx, registry)
    views = [view(registry, name, limit=args.limit) for name in names]
    if args.model and not views[0].history and not registry.versions(args.model):
        raise NotFoundError(
            f"model {args.model} is not in the registry {_shown(_uri(ctx))}",
            hint="check the name (`gpuline models` lists every model) and backends.registry",
        )
    return ModelsResult(registry=_shown(_uri(ctx)), models=views)


def view(registry: ModelRegistry, model: str, *, limit: int | None = None) -> ModelView:
    stages = {stage: registry.in_stage(model, stage) for stage in SHOWN}
    changes = [c for stage in SHOWN for c in registry.history(model, stage)]
    changes.sort(key=lambda c: c.at, reverse=True)
    return ModelView(model=model, stages=stages, history=changes[:limit] if limit else changes)


def _default_names(ctx: Context, registry: ModelRegistry) -> list[str]:
    try:
        return [ctx.base_spec.model.name]
    except InputError:  # no (valid) gpuline.yml here: show the whole registry
        return registry.models()


def _uri(ctx: Context) -> str:
    return ctx.inputs.registry or ctx.backends.registry


def _shown(uri: str) -> str:
    """The registry URI without any user name or password written into it."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
