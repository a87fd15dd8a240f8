"""The one entry point. Parses flags, runs one command, and is the only place that turns a
``GpulineError`` into output: a one-line message, an annotation and step summary inside Actions,
and an exit code (2 bad input, 1 refused, 3 infrastructure). Tracebacks only with ``--debug``.

Kept import-light on purpose: ``gpuline --help`` must not load pydantic, boto3 or torch.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, cast

from gpuline import console
from gpuline.inputs import Inputs

if TYPE_CHECKING:
    from gpuline.context import Context
    from gpuline.results import StepResult

# name -> (module:function, help). The function takes the command's Context and the parsed args and
# returns a typed result (gpuline.results), which this module writes: outputs, summary, JSON.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("gpuline.steps.pipeline:run", "run a whole tier: preflight through teardown"),
    "preflight": (
        "gpuline.steps.preflight:run",
        "check everything that can be checked before a GPU is bought",
    ),
    "cost-estimate": (
        "gpuline.steps.cost_estimate:run",
        "estimate GPU-hours and dollars, decide, reserve quota",
    ),
    "provision": ("gpuline.steps.provision:run", "record a lease, then start the machine"),
    "train": ("gpuline.steps.train:run", "train under the supervisor, resuming from the newest checkpoint"),
    "eval-gate": ("gpuline.steps.eval_gate:run", "compare candidate metrics with gates and the baseline"),
    "promote": ("gpuline.steps.promote:run", "register the model and move a stage to it"),
    "teardown": (
        "gpuline.steps.teardown:run",
        "release machine and quota, settle the real cost (idempotent)",
    ),
    "verify": (
        "gpuline.steps.verify:run",
        "check the version a stage holds: its files against the registry, eval.command against the gates",
    ),
    "rollback": ("gpuline.steps.rollback:run", "move a stage back to the version it held before"),
    "status": ("gpuline.steps.status:run", "show run records"),
    "models": ("gpuline.steps.models:run", "show what each stage of a model holds now, and who moved it when"),
    "reap": ("gpuline.steps.reap:run", "find and release leaked machines and expired reservations"),
    "schema": ("gpuline.steps.schema:run", "print the JSON Schema of gpuline.yml or policy.yml"),
    "report": ("gpuline.steps.report:run", "GPU-hours, dollars, idle time and refusals per team and week"),
}

# Commands that parse their own argv: name -> "module:main" with main(argv: list[str]) -> int.
STANDALONE: dict[str, str] = {"comment": "gpuline.commands.comment:main"}

TIERS = ("pr-fast", "nightly", "release")


class UsageError(Exception):
    """A flag argparse refused: reported like every other input error (one line, exit 2, JSON)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (fix: see `{self.prog} --help`)")


def build_parser(inputs: Inputs | None = None) -> argparse.ArgumentParser:
    """The parser; every flag's default is the matching input from the environment (gpuline.inputs)."""
    env = inputs or Inputs.from_env()
    common = _Parser(add_help=False)
    common.add_argument("--config", default=env.config or "gpuline.yml", help="path of gpuline.yml")
    common.add_argument("--policy", default=env.policy, help="policy.yml (default: beside the config)")
    common.add_argument(
        "--policy-ref",
        default=env.policy_ref,
        help="read the policy from this git ref (the base branch)",
    )
    common.add_argument("--run-id", default=env.run_id, help="the run to act on")
    common.add_argument("--tier", choices=TIERS, default=env.tier, help="pr-fast, nightly or release")
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks")

    parser = _Parser(
        prog="gpuline",
        description="GPU-aware CI/CD for ML repos: preflight, cost, lease, train, gate, promote, teardown.",
    )
    parser.add_argument("--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        add_args = _ADD_ARGS.get(name)
        if add_args is not None:
            add_args(p, env)
    return parser


def _run_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    p.add_argument("--provider", default=env.provider, help="override resources.provider")
    p.add_argument("--stage", choices=("staging", "production"), default=env.stage)
    p.add_argument("--labels", default=env.pr_labels or "", help="comma-separated PR labels (approvals)")
    p.add_argument("--base-ref", default=env.base_ref, help="git ref to diff the estimate against")


def _provision_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    p.add_argument("--provider", default=env.provider, help="override resources.provider")
    p.add_argument("--runner-label", default=env.runner_label, help="label of the runner to create")


def _cost_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    p.add_argument("--labels", default=env.pr_labels or "", help="comma-separated PR labels (approvals)")
    p.add_argument("--base-ref", default=env.base_ref, help="git ref to diff the estimate against")
    p.add_argument("--no-reserve", action="store_true", help="estimate and decide only; hold no quota")


def _stage_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    p.add_argument("--stage", choices=("staging", "production"), default=env.stage)
    p.add_argument("--model", default=env.model, help="model name (default: from gpuline.yml)")


def _rollback_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    _stage_args(p, env)
    p.add_argument("--reason", default=env.rollback_reason, help="why, for the registry's history")


def _status_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    p.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="runs to show (default: the newest --limit runs)")
    p.add_argument("--limit", type=int, default=20, help="how many runs to show, newest first, without RUN_ID")
    p.add_argument("--events", action="store_true", help="show each run's events under it (in --json too)")


def _models_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    p.add_argument("model", nargs="?", default=env.model, metavar="MODEL", help="default: the model of gpuline.yml")
    p.add_argument("--limit", type=int, default=20, help="history entries to show, newest first (0: all)")


def _reap_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    p.add_argument("--grace", default=env.boot_grace or "10m", help="boot grace period (never reap younger)")
    p.add_argument("--provider", action="append", default=None, help="providers to sweep (default: all in use)")


def _schema_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    p.add_argument(
        "--policy-schema",
        "--for-policy",
        dest="for_policy",
        action="store_true",
        help="the schema of policy.yml instead of gpuline.yml",
    )


def _report_args(p: argparse.ArgumentParser, env: Inputs) -> None:
    p.add_argument("--weeks", type=int, default=4, help="how many ISO weeks back, this one included")
    p.add_argument("--team", default=None, help="only this team")


_ADD_ARGS: dict[str, Callable[[argparse.ArgumentParser, Inputs], None]] = {
    "run": _run_args,
    "cost-estimate": _cost_args,
    "provision": _provision_args,
    "promote": _stage_args,
    "verify": _stage_args,
    "rollback": _rollback_args,
    "status": _status_args,
    "models": _models_args,
    "reap": _reap_args,
    "schema": _schema_args,
    "report": _report_args,
}


def _schema_alias(argv: list[str]) -> list[str]:
    # `gpuline schema --policy` reads naturally but --policy is also the common "path of policy.yml" flag.
    if argv[:1] == ["schema"] and "--policy" in argv:
        argv = [a if a != "--policy" else "--policy-schema" for a in argv]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    args_list = _schema_alias(list(sys.argv[1:] if argv is None else argv))
    if args_list and args_list[0] in STANDALONE:
        module_name, _, func_name = STANDALONE[args_list[0]].partition(":")
        standalone: Callable[[list[str]], int] = getattr(importlib.import_module(module_name), func_name)
        return standalone(args_list[1:])
    inputs = Inputs.from_env()  # the one read of the environment's inputs for this command
    parser = build_parser(inputs)
    try:
        args = parser.parse_args(args_list)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        if "--json" in args_list:
            print(json.dumps({"ok": False, "error": str(exc), "exit_code": 2}))
        return 2
    args.inputs = inputs
    if args.version:
        from gpuline import __version__

        print(f"gpuline {__version__}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    return dispatch(args)


def dispatch(args: argparse.Namespace) -> int:
    from gpuline import gha

    gha.set_json_mode(args.json)
    stdout = sys.stdout
    sys.stdout = cast(TextIO, console.SafeStdout(stdout))
    try:
        return _dispatch(args)
    finally:
        sys.stdout = stdout
        gha.set_json_mode(False)


def _dispatch(args: argparse.Namespace) -> int:
    from gpuline.context import Context
    from gpuline.errors import GpulineError

    target, _ = COMMANDS[args.command]
    module_name, _, func_name = target.partition(":")
    ctx = Context.from_args(args)
    try:
        _check_tier(args.tier)
        _say_default_tier(args)
        func: Callable[[Context, argparse.Namespace], StepResult]
        func = getattr(importlib.import_module(module_name), func_name)
        result = func(ctx, args)
    except GpulineError as exc:
        return _fail(ctx, exc, args)
    except KeyboardInterrupt:
        _write(ctx, None, args)
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # The machine's fault, not the input's and not a bug: a full disk, a file gone unreadable.
        if args.debug:
            raise
        return _fail(ctx, console.os_error(exc), args)
    except Exception as exc:
        _write(ctx, None, args)
        if args.debug:
            raise
        return _internal_error(exc, args)
    _write(ctx, result, args)
    if args.json:
        print(json.dumps({"ok": True, **result.to_json()}, default=str, indent=2))
    return 0


def _check_tier(tier: str | None) -> None:
    """argparse checks --tier's choices but not a default taken from GPULINE_TIER: check it the same way."""
    from gpuline.errors import InputError

    if tier is not None and tier not in TIERS:
        raise InputError(
            f"GPULINE_TIER={tier[:40]!r} is not a tier",
            hint=f"use one of {', '.join(TIERS)} (the `tier` input of the actions), or unset it",
        )


def _say_default_tier(args: argparse.Namespace) -> None:
    """`gpuline run` without a tier runs nightly (training, promotion to staging): say so first."""
    from gpuline import gha

    if args.command == "run" and args.tier is None and not args.run_id:
        gha.info(
            "gpuline run: no --tier given, so this runs the nightly tier (the default: preflight through "
            "teardown, promoting to staging); pass --tier pr-fast, nightly or release to choose"
        )


def _write(ctx: Context, result: object, args: argparse.Namespace) -> None:
    """Write a result (a failed step's too, when it produced one) and the id of a run this command created."""
    from gpuline import gha
    from gpuline.render import summary
    from gpuline.results import StepResult

    if ctx.created_run and ctx.run_id:
        # Even when a step fails: teardown (if: always()) needs the id to end the run.
        gha.set_output("run-id", ctx.run_id)
    if isinstance(result, StepResult):
        summary.write(result, json_mode=args.json)


def _fail(ctx: Context, exc: Exception, args: argparse.Namespace) -> int:
    """Report a GpulineError: its result if it carries one, one line, and the JSON document."""
    from gpuline.errors import GpulineError

    assert isinstance(exc, GpulineError)
    # The disk that failed the step may fail the summary too; the error line still goes out.
    with contextlib.suppress(OSError):
        _write(ctx, exc.result, args)
    _report(exc, args)
    if args.json:
        print(json.dumps(_failure_json(ctx, exc), default=str, indent=2))
    return exc.exit_code


def _failure_json(ctx: Context, exc: Exception) -> dict[str, Any]:
    """The JSON of a failed command: the error, and what it did before it failed (the run, every
    step's result, and at the top the gate verdicts and the policy's decision with its suggestions)."""
    from gpuline.errors import GpulineError
    from gpuline.results import StepResult

    assert isinstance(exc, GpulineError)
    out: dict[str, Any] = {"ok": False, "error": exc.one_line(), "exit_code": exc.exit_code}
    if ctx.run_id:
        out["run_id"] = ctx.run_id  # the run the failure belongs to (none when it failed before one existed)
    if not isinstance(exc.result, StepResult):
        return out
    body = exc.result.to_json()
    out.update({k: v for k, v in body.items() if k not in ("ok", "error", "exit_code")})
    # A step's own keys, or those of the steps of `gpuline run` (one object per step).
    parts: list[dict[str, Any]] = [body, *(v for v in body.values() if isinstance(v, dict))]
    for part in parts:
        decision, gates = part.get("decision"), part.get("gates")
        if isinstance(decision, dict) and "suggestions" not in out:
            out["decision"], out["suggestions"] = decision, decision.get("suggestions", [])
        if isinstance(gates, list) and "gates" not in out:
            out["gates"] = gates
    return out


def _internal_error(exc: Exception, args: argparse.Namespace) -> int:
    from gpuline import gha
    from gpuline.errors import clip

    line = f"internal error: {type(exc).__name__}: {clip(str(exc), 300)}"
    fix = "this is a bug in gpuline; rerun with --debug for the traceback"
    gha.annotate("error", f"{line} ({fix})", title="gpuline internal error")
    if args.json:
        print(json.dumps({"ok": False, "error": f"{line} (fix: {fix})", "exit_code": 3}))
    return 3


def _report(exc: Exception, args: argparse.Namespace) -> None:
    from gpuline import gha
    from gpuline.errors import GpulineError

    assert isinstance(exc, GpulineError)
    if args.debug:
        import traceback

        traceback.print_exc()
    message = exc.message + (f" (fix: {exc.hint})" if exc.hint else "")
    if gha.in_actions():
        gha.annotate("error", message, title=f"gpuline {args.command}: {exc.title}", location=exc.location)
    else:
        print(f"error: {exc.one_line()}", file=sys.stderr)
    where = f" in `{exc.location.render()}`" if exc.location else ""
    gha.append_summary(
        f"### :x: gpuline {args.command}: {exc.title}\n\n{exc.message}{where}\n\n"
        + (f"**Fix:** {exc.hint}\n" if exc.hint else "")
    )


if __name__ == "__main__":
    raise SystemExit(main())
