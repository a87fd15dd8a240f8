"""The single-use GitHub runner a leased machine becomes: registered before launch, deleted at the end.

Inside GitHub Actions a machine bought for a run must become the runner of the run's train job, or it
would sit idle while the job waits for a runner that never comes. So the runner is the default
there: its name and label are unique to the run (``gpuline-<run id>``), so no other queued job can
land on the machine, and a label passed in is added beside it. Its just-in-time config travels to
the machine in its boot script and is masked in the log.
"""

from __future__ import annotations

import contextlib
import json

from gpuline import gha
from gpuline.errors import InputError
from gpuline.inputs import Inputs, runner_scope
from gpuline.providers.base import Provider, RunnerRequest
from gpuline.runs import Ledger

EVENT = "runner.registered"
# What the local provider's train job runs on when no label is given: the runners the workflow already has.
LOCAL_RUNS_ON = ["ubuntu-latest"]


def wants_runner(provider_name: str, provider: Provider) -> bool:
    """Whether the machine is a fresh host that needs a runner (not the local one, not a training pod)."""
    return provider_name != "local" and bool(getattr(provider, "wants_runner", True))


def unique_label(run_id: str) -> str:
    return f"gpuline-{run_id}"


def runs_on(provider_name: str, runner_label: str | None) -> str:
    """The train job's ``runs-on``, as JSON: the run's own runner, or for the local provider the label
    given (``self`` means this workflow's usual runners)."""
    if provider_name == "local":
        labels = [runner_label] if runner_label and runner_label != "self" else LOCAL_RUNS_ON
        return json.dumps(labels)
    return json.dumps(["self-hosted", runner_label]) if runner_label else ""


def needed(provider_name: str, provider: Provider, label: str | None) -> bool:
    """Whether the machine must register a runner: asked for by a label, or by default inside Actions
    (a laptop's `gpuline provision` has no job to pick up)."""
    return wants_runner(provider_name, provider) and (bool(label) or gha.in_actions())


def check(provider_name: str, provider: Provider, label: str | None, inputs: Inputs) -> str | None:
    """Where the runner will register, checked before anything is bought; None when none is needed."""
    if not needed(provider_name, provider, label):
        return None
    from gpuline import github

    scope = runner_scope(inputs)
    if not scope:
        raise InputError(
            f"the {provider_name} machine must become the train job's runner, but there is no repository "
            "to register it with",
            hint="set GITHUB_REPOSITORY (set in Actions) or GPULINE_RUNNER_SCOPE=ORG",
        )
    if not github.token_from_env():
        raise InputError(
            f"the {provider_name} machine must become the train job's runner, which needs a GitHub token",
            hint="pass the tier's runner-token secret (a GitHub App token or fine-grained PAT with "
            "Administration: write); GPULINE_GITHUB_TOKEN outside the tiers",
        )
    return scope


def register(
    ledger: Ledger, run_id: str, provider_name: str, provider: Provider, label: str | None, inputs: Inputs
) -> RunnerRequest | None:
    """The runner the machine starts, if any (see :func:`needed`)."""
    if not wants_runner(provider_name, provider):
        # The local provider's "runner" is the machine gpuline runs on; a pod that trains needs none.
        return RunnerRequest(label=label, jit_config="") if label else None
    scope = check(provider_name, provider, label, inputs)
    if scope is None:
        return None
    from gpuline import github

    unique = unique_label(run_id)
    labels = [unique] + ([label] if label and label not in (unique, "auto") else [])
    jit = github.create_jit_runner(scope, unique, labels)
    gha.mask(jit.encoded_jit_config)
    ledger.append_event(run_id, EVENT, {"runner_id": jit.runner_id, "name": jit.name, "labels": labels, "scope": scope})
    return RunnerRequest(label=unique, jit_config=jit.encoded_jit_config)


def unregister(ledger: Ledger, run_id: str) -> list[str]:
    """Delete the run's runner registrations (best effort: the reaper deletes what is left); returns
    the names deleted."""
    registered = [e.data for e in ledger.events(run_id) if e.kind == EVENT]
    if not registered:
        return []
    from gpuline import github

    if not github.token_from_env():
        return []
    deleted = []
    for runner in registered:
        with contextlib.suppress(Exception):
            if github.delete_runner(str(runner["scope"]), int(runner["runner_id"])):
                deleted.append(str(runner.get("name", runner["runner_id"])))
    return deleted
