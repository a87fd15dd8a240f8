"""The deploy hook: after a promotion, the project's ``deploy.command`` puts the version to use.

The command gets the model, version, stage and artifacts URI in its environment (the place to point
an endpoint or a model server at the new files). With a GitHub token in Actions the promotion is
also a GitHub deployment of the commit, to an environment named after the stage, whose status
follows the command. A failed deploy is the promote step's failure; the step rolls the stage back.
"""

from __future__ import annotations

import os

from gpuline import contract as c
from gpuline import gha
from gpuline.context import Context
from gpuline.errors import GpulineError, RefusedError
from gpuline.inputs import github_token
from gpuline.registry import audit
from gpuline.registry.base import ModelVersion
from gpuline.training.evaluate import run_command


def applies(ctx: Context, stage: str) -> bool:
    hook = ctx.spec.deploy
    return hook is not None and stage in hook.stages


def run_hook(ctx: Context, version: ModelVersion, stage: str) -> int | None:
    """Run ``deploy.command`` for ``version`` now in ``stage``; the GitHub deployment's id, if one was made."""
    hook = ctx.spec.deploy
    assert hook is not None and stage in hook.stages
    deployment = _record_deployment(version, stage)
    env = {
        c.MODEL: version.model,
        c.MODEL_VERSION: str(version.version),
        c.STAGE: stage,
        c.ARTIFACTS_URI: version.artifacts_uri,
    }
    try:
        run_command(
            "deploy.command",
            hook.command,
            cwd=ctx.project_dir / hook.workdir,
            env=env,
            timeout_s=hook.timeout,
            python=ctx.inputs.python,
        )
    except RefusedError as exc:
        _set_status(deployment, "failure", exc.one_line())
        raise
    _set_status(deployment, "success", f"{version.model} v{version.version} deployed to {stage}")
    return deployment[1] if deployment else None


def _record_deployment(version: ModelVersion, stage: str) -> tuple[str, int] | None:
    """A GitHub deployment of this commit to ``stage`` (None outside Actions or without a token)."""
    repo, sha = os.environ.get("GITHUB_REPOSITORY"), os.environ.get("GITHUB_SHA")
    if not (repo and sha and github_token()):
        return None
    from gpuline.github.deployments import create_deployment, set_deployment_status

    payload = {"model": version.model, "version": version.version, "artifacts_uri": version.artifacts_uri}
    try:
        deployment_id = create_deployment(
            repo, sha, stage, description=f"{version.model} v{version.version}", payload=payload
        )
        set_deployment_status(repo, deployment_id, "in_progress", log_url=audit.workflow_run_url() or None)
    except GpulineError as exc:
        # The record of a deploy must not stop the deploy itself.
        gha.annotate("warning", f"the promotion was not recorded as a GitHub deployment: {exc.one_line()}")
        return None
    return repo, deployment_id


def _set_status(deployment: tuple[str, int] | None, state: str, description: str) -> None:
    if deployment is None:
        return
    from gpuline.github.deployments import set_deployment_status

    repo, deployment_id = deployment
    try:
        set_deployment_status(
            repo,
            deployment_id,
            "success" if state == "success" else "failure",
            description=description,
            log_url=audit.workflow_run_url() or None,
        )
    except GpulineError as exc:
        gha.annotate("warning", f"deployment {deployment_id}'s status was not set: {exc.one_line()}")
