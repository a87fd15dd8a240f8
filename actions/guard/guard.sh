#!/usr/bin/env bash
# The event allow-list of the gpuline tiers. A deny-list lets every event nobody thought of through
# (pull_request_review and issue_comment check out or act on fork code; workflow_run and
# pull_request_target run with the base repository's token and secrets), so anything not named here
# is refused, with the reason in the annotation.
#
# Input (environment, set by action.yml from the event): GUARD_TIER, GUARD_FORKS (allow|refuse),
# GUARD_MERGE_QUEUE (trust|refuse), EVENT_NAME, REPO, REF, SHA, HEAD_REPO (pull requests),
# QUEUE_HEAD_REF and QUEUE_HEAD_SHA (merge groups). Output: trigger.
set -euo pipefail

tier="${GUARD_TIER:-gpuline}"
event="${EVENT_NAME:-}"
allowed="push, schedule, workflow_dispatch, release, pull_request from this repository, merge_group of a trusted queue"

allow() {
  echo "trigger allowed: $1"
  if [ -n "${GITHUB_OUTPUT:-}" ]; then echo "trigger=$1" >>"$GITHUB_OUTPUT"; fi
  exit 0
}

refuse() {
  echo "::error title=gpuline ${tier}::refusing ${event:-an unnamed event}: $1"
  exit 1
}

case "$event" in
  push | schedule | workflow_dispatch | release)
    # Only someone with write access can push, dispatch or publish a release; schedules run the default branch.
    allow "$event"
    ;;
  pull_request)
    if [ -n "${HEAD_REPO:-}" ] && [ "$HEAD_REPO" = "${REPO:-}" ]; then
      allow "pull_request from this repository"
    fi
    if [ "${GUARD_FORKS:-refuse}" = "allow" ]; then
      allow "pull_request from ${HEAD_REPO:-a deleted fork} (no secrets, read-only token)"
    fi
    refuse "the pull request comes from the fork ${HEAD_REPO:-(deleted)}: fork code never gets GPUs or secrets. Use the pr-fast tier for forks."
    ;;
  merge_group)
    if [ "${GUARD_MERGE_QUEUE:-refuse}" != "trust" ]; then
      refuse "merge queues are not trusted by this caller. Pass merge-queue: trust where branch protection requires review before a pull request enters the queue."
    fi
    # The queue's merge commit lives on refs/heads/gh-readonly-queue/<base>/...; a checkout of
    # anything else is not what the queue tested.
    if [[ "${QUEUE_HEAD_REF:-}" != refs/heads/gh-readonly-queue/* ]] || [ "${REF:-}" != "${QUEUE_HEAD_REF:-}" ] ||
      [ -z "${QUEUE_HEAD_SHA:-}" ] || [ "${SHA:-}" != "${QUEUE_HEAD_SHA:-}" ]; then
      refuse "the checkout (${REF:-?}@${SHA:-?}) is not the merge commit of the queue (${QUEUE_HEAD_REF:-?}@${QUEUE_HEAD_SHA:-?})."
    fi
    allow "merge_group ${QUEUE_HEAD_REF}"
    ;;
  pull_request_target)
    if [ "$tier" = "pr-fast" ]; then
      refuse "under pull_request_target actions/checkout checks out the base branch, so pr-fast would estimate the base, not this pull request, while holding the base repository's token. Call pr-fast from on: pull_request (fork pull requests are safe there)."
    fi
    refuse "it runs with secrets and a write token on code the pull request controls. Call this tier from push, schedule, workflow_dispatch or release."
    ;;
  *)
    refuse "only these triggers are allowed: ${allowed}. Other events (reviews, comments, workflow_run) can run code no one with write access approved."
    ;;
esac
