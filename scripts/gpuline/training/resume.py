"""Choosing where a run resumes: the newest checkpoint that verifies, local or in the store.

Corrupt checkpoints are skipped and said so. When every checkpoint that claimed to be complete is
corrupt, the run stops rather than silently training from step 0, unless the config allows a fresh
start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpuline.errors import InfraError
from gpuline.storage import CorruptCheckpoint, download_checkpoint, remote_checkpoints
from gpuline.training import checkpoints
from gpuline.training.request import TrainRequest


@dataclass
class ResumePoint:
    path: Path | None
    step: int | None
    uri: str | None


def find_resume_point(req: TrainRequest, local_dir: Path) -> ResumePoint:
    """The newest checkpoint that verifies, local or remote; corrupt ones are skipped and said so."""
    local = dict(checkpoints.step_dirs(local_dir))
    remote = {c.step: c for c in remote_checkpoints(req.storage, req.checkpoint_prefix)}
    claimed_complete: set[int] = set()  # steps whose manifest said "complete" somewhere
    reasons: list[str] = []

    def skip(step: int, uri: str, reason: str) -> None:
        req.log(f"skipping checkpoint step {step} ({uri}): {reason}")
        req.on_event("checkpoint_skipped", {"step": step, "uri": uri, "reason": reason})
        reasons.append(f"step {step}: {reason}")

    for step in sorted(set(local) | set(remote), reverse=True):
        remote_uri = req.storage.uri_for(remote[step].key) if step in remote else None
        if step in local:
            result = checkpoints.verify(local[step])
            if result.ok:
                durable = step in remote and remote[step].complete
                return ResumePoint(local[step], step, remote_uri if durable else local[step].as_uri())
            if (local[step] / checkpoints.MANIFEST).exists():
                claimed_complete.add(step)
            skip(step, local[step].as_uri(), result.reason)
        if step in remote:
            assert remote_uri is not None
            if not remote[step].complete:
                skip(step, remote_uri, "incomplete: no manifest.json")
                continue
            claimed_complete.add(step)
            try:
                path = download_checkpoint(req.storage, remote[step].key, local_dir)
            except CorruptCheckpoint as exc:
                skip(step, remote_uri, str(exc).removeprefix(f"{remote_uri}: "))
                continue
            return ResumePoint(path, step, remote_uri)
    if claimed_complete:
        _all_corrupt(req, len(claimed_complete), reasons)
    return ResumePoint(None, None, None)


def _all_corrupt(req: TrainRequest, count: int, reasons: list[str]) -> None:
    """Every checkpoint that claimed to be complete failed to verify: stop, or say we start over."""
    if not req.allow_fresh_start:
        where = req.storage.uri_for(req.checkpoint_prefix)
        raise InfraError(
            f"all {count} checkpoints of run {req.run_id} are corrupt ({'; '.join(reasons)})",
            hint=f"restore a good checkpoint under {where}, or set checkpoint.allow_fresh_start: true "
            "to train from step 0",
        )
    req.log(f"all checkpoints of run {req.run_id} are corrupt; starting fresh (checkpoint.allow_fresh_start)")
