"""The cost estimate as people read it: the sticky PR comment, the job summary and the log lines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gpuline.decisions.cost import Basis, CostEstimate, billing_text
from gpuline.decisions.phases import PHASES, PhaseEstimate, size_text
from gpuline.decisions.policy import Decision, approval_how
from gpuline.decisions.policy_source import ProposedChange
from gpuline.decisions.queue import QueueEstimate
from gpuline.render.markdown import key_value_table as table
from gpuline.runs import RunRecord
from gpuline.spec import Policy

COMMENT_MARKER = "<!-- gpuline:cost-estimate -->"
# How much each kind of evidence is worth: a change is shown only between estimates of one kind.
_EVIDENCE: dict[Basis, tuple[int, str]] = {
    "history": (3, "finished runs (history)"),
    "smoke": (2, "the CPU smoke test's step time"),
    "max_duration": (1, "max_duration (an upper bound)"),
}


# ---------------------------------------------------------------- the PR comment


def _delta(head: float, base: float | None) -> str:
    if base is None:
        return "new"
    if base == 0:
        return "±0%" if head == 0 else "new cost"
    change = (head - base) / base * 100
    return "±0%" if abs(change) < 0.5 else f"{change:+.0f}%"


def money(value: float) -> str:
    return f"-${-value:,.2f}" if value < 0 else f"${value:,.2f}"


def _rate(value: float) -> str:
    """Hourly prices keep their precision ($0.526, $21.9576) but show at least cents ($4.20)."""
    text = f"{value:,.4f}".rstrip("0")
    return "$" + (text + "0" if len(text.split(".")[1]) < 2 else text)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:,.1f} min"


def _minutes_range(low: float, high: float) -> str:
    if high < 60:
        return _range(f"{low:,.1f}", f"{high:,.1f}") + " s"
    return _range(f"{low / 60:,.1f}", f"{high / 60:,.1f}") + " min"


def _range(low: str, high: str) -> str:
    return low if low == high else f"{low}–{high}"


Metric = tuple[str, str, str | None, float, float | None]


def render_comment(
    est: CostEstimate,
    decision: Decision,
    base: CostEstimate | None,
    *,
    policy: Policy,
    run_id: str,
    tier: str,
    queue: QueueEstimate | None = None,
    proposed: Sequence[ProposedChange] = (),
) -> str:
    """The sticky PR comment (also the job summary): the estimate, against the base branch's when given,
    and the PR's proposed changes to the trusted files, which did not decide anything."""
    icon = {"allow": ":white_check_mark:", "warn": ":warning:", "deny": ":no_entry:"}[decision.decision]
    metrics = _metrics(est, base)
    lines = [COMMENT_MARKER, f"### {icon} gpuline cost estimate: {decision.decision}", ""]
    if base is not None:
        unlike = unlike_evidence(est, base)
        lines += ["| | base | this PR | change |", "|---|---|---|---|"]
        for i, (name, h, b, hv, bv) in enumerate(metrics):
            # The last row (the max_duration cap) is the same estimator on both sides whatever the evidence.
            change = "not comparable" if unlike and i < len(metrics) - 1 else _delta(hv, bv)
            lines.append(f"| {name} | {b} | {h} | {change} |")
        lines += [f"_{unlike}_"] if unlike else []
    else:
        lines.append(table([(name, h) for name, h, _, _, _ in metrics], ("", "")))
    lines += ["", *phase_table(est), ""]
    lines += [table(_details(est, decision, base, queue), ("", "")), ""]
    lines += _why(decision, policy)
    lines += proposed_lines(proposed)
    lines.append(
        f"<sub>run {run_id} · estimated for the {tier} tier · pricing catalog {est.catalog_version}"
        + "".join(f" · {note}" for note in est.notes)
        + "</sub>"
    )
    return "\n".join(lines) + "\n"


def unlike_evidence(est: CostEstimate, base: CostEstimate) -> str | None:
    """None when this PR and the base rest on one kind of evidence; else which side is weaker.

    A percentage between a smoke-test estimate and a max_duration bound would measure the evidence,
    not the change (a PR adding a third more steps showed -100%)."""
    head_rank, head_what = _EVIDENCE[est.duration.basis]
    base_rank, base_what = _EVIDENCE[base.duration.basis]
    if head_rank == base_rank:
        return None
    weaker = "the base" if base_rank < head_rank else "this PR"
    return (
        f"The base is estimated from {base_what} and this PR from {head_what}: {weaker} has the weaker "
        "evidence, so no change is shown."
    )


def proposed_lines(proposed: Sequence[ProposedChange]) -> list[str]:
    """The PR's edits to policy and prices: listed for review, never used for this decision."""
    if not proposed:
        return []
    names = ", ".join(f"`{c.name}`" for c in proposed)
    lines = [
        f"**Proposed change to {names}** (not used: this decision follows the base branch's copy; "
        "the change takes effect once it is reviewed and merged).",
        "",
    ]
    for change in proposed:
        body = change.diff.replace("````", "` ` ` `")
        lines += [f"<details><summary>{change.name}</summary>", "", "````diff", body, "````", "", "</details>", ""]
    return lines


def _metrics(est: CostEstimate, base: CostEstimate | None) -> list[Metric]:
    d = est.duration
    bound = " (upper bound)" if d.upper_bound else ""
    return [
        (
            "paid time p50–p90" + bound,
            _minutes_range(d.paid_p50_s, d.paid_p90_s),
            _minutes_range(base.duration.paid_p50_s, base.duration.paid_p90_s) if base else None,
            d.paid_p50_s,
            base.duration.paid_p50_s if base else None,
        ),
        (
            "training time p50–p90" + bound,
            _minutes_range(d.p50_s, d.p90_s),
            _minutes_range(base.duration.p50_s, base.duration.p90_s) if base else None,
            d.p50_s,
            base.duration.p50_s if base else None,
        ),
        (
            "GPU-hours p50–p90",
            _range(f"{est.gpu_hours_p50:.3f}", f"{est.gpu_hours_p90:.3f}"),
            _range(f"{base.gpu_hours_p50:.3f}", f"{base.gpu_hours_p90:.3f}") if base else None,
            est.gpu_hours_p50,
            base.gpu_hours_p50 if base else None,
        ),
        (
            "cost p50–p90",
            _range(money(est.usd_p50), money(est.usd_p90)),
            _range(money(base.usd_p50), money(base.usd_p90)) if base else None,
            est.usd_p50,
            base.usd_p50 if base else None,
        ),
        (
            "at most (max_duration)",
            f"{money(est.usd_cap)}, {est.gpu_hours_cap:.3f} GPU-hours",
            f"{money(base.usd_cap)}, {base.gpu_hours_cap:.3f} GPU-hours" if base else None,
            est.usd_cap,
            base.usd_cap if base else None,
        ),
    ]


def _details(
    est: CostEstimate, decision: Decision, base: CostEstimate | None, queue: QueueEstimate | None
) -> list[tuple[str, str]]:
    d = est.duration
    info: list[tuple[str, str]] = [
        ("instance", f"{est.instance_type} ({est.gpus_per_node} x {est.gpu_type}) x {est.nodes}, {est.lane} lane"),
        ("price", f"{_rate(est.hourly_usd)}/hour per node, {billing_text(est)}"),
        ("estimate basis", d.note),
        *([("base estimate basis", base.duration.note)] if base else []),
        ("start-up", f"{_minutes(d.startup_s)} ({d.startup_note})"),
        ("data", data_text(est)),
    ]
    if queue is not None:
        info.append(("queue", queue.describe()))
    for line in decision.budgets:
        before, after = line.remaining_before, line.remaining_after
        if before is None or after is None:
            continue
        fmt = money if line.key == "usd" else (lambda v: f"{v:,.2f}")
        info.append(
            (
                f"{line.scope} {line.unit} left ({decision.period})",
                f"{fmt(before)} → {fmt(after)} after this run at its most",
            )
        )
    return info


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:,.1f} s"
    return f"{seconds / 60:,.1f} min" if seconds < 3600 else f"{seconds / 3600:,.2f} h"


def error_text(est: CostEstimate) -> str:
    """The stated error of the paid p50: measured by the benchmark when there is no history."""
    error = est.duration.expected_error
    return f"no history: ±{error * 100:.0f}% expected" if error is not None else "training from history"


def phase_table(est: CostEstimate) -> list[str]:
    """Every phase of the paid time with its p50, p90 and evidence; phases that take nothing are left
    out (a laptop's boot, a run without eval.command) so the table shows where the money goes."""
    d = est.duration
    if not d.phases:
        return []
    lines = ["| phase | p50 | p90 | evidence |", "|---|---|---|---|"]
    for p in d.phases:
        if p.name != "train" and p.p90_s <= 0:
            continue
        name = p.name if p.paid else f"{p.name} (not paid)"
        detail = f": {p.detail}" if p.detail and p.name != "train" else ""
        lines.append(f"| {name} | {_seconds(p.p50_s)} | {_seconds(p.p90_s)} | {p.evidence}{detail} |")
    lines.append(
        f"| **paid, all phases** | **{_seconds(d.paid_p50_s)}** | **{_seconds(d.paid_p90_s)}** | {error_text(est)} |"
    )
    return lines


def phase_comparison(phases: Sequence[PhaseEstimate], actual: Mapping[str, float]) -> str:
    """Actual seconds per phase beside the estimate's p50 and p90: the hook for the run record's ledger of
    actual phases (names as in ``gpuline.decisions.phases.PHASES``). A phase only one side knows is
    shown with a dash on the other."""
    estimated: dict[str, PhaseEstimate] = {p.name: p for p in phases}
    names = [n for n in PHASES if n in estimated or n in actual] + sorted(set(actual) - set(PHASES))
    lines = ["| phase | estimate p50–p90 | actual | |", "|---|---|---|---|"]
    for name in names:
        p, seconds = estimated.get(name), actual.get(name)
        span = _range(_seconds(p.p50_s), _seconds(p.p90_s)) if p else "–"
        shown = _seconds(seconds) if seconds is not None else "–"
        lines.append(f"| {name} | {span} | {shown} | {_verdict(p, seconds)} |")
    paid = [p for p in phases if p.paid]
    total_actual = sum(v for k, v in actual.items() if k in estimated and estimated[k].paid)
    lines.append(
        f"| **paid** | {_range(_seconds(sum(p.p50_s for p in paid)), _seconds(sum(p.p90_s for p in paid)))} "
        f"| {_seconds(total_actual)} | {_verdict(_sum(paid), total_actual)} |"
    )
    return "\n".join(lines) + "\n"


def _sum(phases: Sequence[PhaseEstimate]) -> PhaseEstimate:
    return PhaseEstimate("train", sum(p.p50_s for p in phases), sum(p.p90_s for p in phases), "")


def _verdict(p: PhaseEstimate | None, seconds: float | None) -> str:
    if p is None or seconds is None:
        return ""
    if seconds > p.p90_s:
        return "over p90"
    if p.p50_s > 0:
        return f"{(seconds - p.p50_s) / p.p50_s * 100:+.0f}% vs p50"
    return ""


def data_text(est: CostEstimate) -> str:
    """Egress and storage dollars, with the volumes they come from."""
    d = est.duration
    pulled = (
        f"dataset {size_text(d.dataset_bytes)} x {est.nodes} node(s)" if d.dataset_bytes else "dataset size unknown"
    )
    text = f"egress {money(est.egress_usd)} per run ({pulled})"
    if est.storage_usd_month is None or d.checkpoint_bytes is None:
        return text + "; checkpoint storage unknown (the smoke test saved no checkpoint)"
    size = size_text(d.checkpoint_bytes)
    return f"{text}; checkpoint storage {money(est.storage_usd_month)} per month (kept checkpoints of {size} each)"


def _why(decision: Decision, policy: Policy) -> list[str]:
    lines: list[str] = []
    if decision.reasons:
        lines += ["**Why:** " + "; ".join(decision.reasons), ""]
    if decision.suggestions:
        lines.append("**Would fit:**")
        lines += [f"- {s}" for s in decision.suggestions]
        lines.append("")
    if decision.decision == "deny" and not any("exception" in s for s in decision.suggestions):
        how = approval_how(policy)
        if how:
            lines += [f"Exceptions: {how}.", ""]
    return lines


def log_lines(est: CostEstimate, decision: Decision, queue: QueueEstimate) -> list[str]:
    """The three lines the job log shows: the estimate, the queue and the decision."""
    d = est.duration
    return [
        f"estimate: {est.instance_type} x{est.nodes} ({est.lane}), {_minutes_range(d.paid_p50_s, d.paid_p90_s)} paid "
        f"({_minutes_range(d.p50_s, d.p90_s)} training, {_minutes(d.startup_s)} start-up; {error_text(est)}), "
        f"{est.gpu_hours_p90:.3f} GPU-hours, ${est.usd_p90:.2f} (at most ${est.usd_cap:.2f}) [{d.note}]",
        f"queue: {queue.describe()}",
        f"decision: {decision.summary()}",
    ]


def actual_section(record: RunRecord, estimated_phases: Sequence[PhaseEstimate] = ()) -> str:
    """The PR comment's ``actual`` section: what the run really cost, from the run record (and the
    estimate the ledger kept), so the teardown job can write it on a fresh runner with nothing carried
    from the job that estimated. With the estimate's phases, actual vs estimate per phase follows."""
    from gpuline.phases import actual_phases

    estimated = f"; estimated ${record.estimated_usd:.2f}" if record.estimated_usd is not None else ""
    source = f", cost from the {record.cost_source}" if record.cost_source else ""
    text = (
        f"**Actual:** ${record.actual_usd or 0:.2f}, {record.gpu_seconds / 3600:.3f} GPU-hours "
        f"({record.idle_seconds:.0f} idle GPU-seconds), run {record.status}{estimated}{source} (`{record.run_id}`).\n"
    )
    actual = actual_phases(record)
    if estimated_phases and actual:
        text += "\n" + phase_comparison(estimated_phases, {str(name): s for name, s in actual.items()})
    return text
