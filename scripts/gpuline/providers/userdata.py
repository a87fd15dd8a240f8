"""The boot script of a gpuline machine: a TTL watchdog first, then (optionally) one single-use runner.

The watchdog is what makes a leak impossible even when every orchestrator and reaper is gone: a
systemd timer at the lease's absolute expiry (``Persistent=true``, so a reboot cannot skip it) plus a
plain ``sleep`` fallback, both powering off; with ``InstanceInitiatedShutdownBehavior=terminate`` a
power-off is a termination. The expiry is an absolute time, so a reboot never extends the lease.

The runner is registered with a just-in-time config: single use, bound to one runner name and a
label unique to the run. The config reaches the runner through ``ACTIONS_RUNNER_INPUT_JITCONFIG``
(the runner reads its flags from such variables), never argv, so it is not visible in ``ps``; the
script never prints it, and the file it is parked in is readable by root only and deleted on use.
When the runner exits (its one job is done) the machine powers off.

``GPULINE_ROOT`` prefixes every path the script writes, so a test can run it in a scratch directory.
"""

from __future__ import annotations

import re
import shlex

from gpuline import contract
from gpuline.errors import ConfigError
from gpuline.providers.base import LeaseRequest

# EC2 rejects user data above 16 KiB (before base64).
MAX_USER_DATA_BYTES = 16 * 1024
# The JIT config is base64 from GitHub; anything else would break out of the heredoc that carries it.
_JIT_CHARS = re.compile(r"^[A-Za-z0-9+/=]*$")

_HEADER = """#!/bin/bash
# gpuline bootstrap for run {run_id} (lease {lease_id}); expires {expires_iso}.
set -uo pipefail
ROOT="${{{root_env}:-}}"
EXPIRES_EPOCH={expires_epoch}
mkdir -p "$ROOT/var/log" "$ROOT/run/gpuline"
exec >>"$ROOT/var/log/gpuline-boot.log" 2>&1
echo "gpuline: boot of run {run_id} at $(date -u +%FT%TZ)"
"""

_WATCHDOG = """
# ---- TTL watchdog: power off (= terminate) at the lease's absolute expiry, reboot or not.
remaining=$(( EXPIRES_EPOCH - $(date +%s) ))
if [ "$remaining" -le 0 ]; then
  echo "gpuline: lease already expired; powering off"
  poweroff
  exit 0
fi
if command -v systemctl >/dev/null 2>&1; then
  mkdir -p "$ROOT/etc/systemd/system"
  cat >"$ROOT/etc/systemd/system/gpuline-ttl.service" <<'UNIT'
[Unit]
Description=gpuline lease expiry: power off
[Service]
Type=oneshot
ExecStart=/usr/bin/systemctl poweroff --force
UNIT
  cat >"$ROOT/etc/systemd/system/gpuline-ttl.timer" <<'UNIT'
[Unit]
Description=gpuline lease expiry {expires_iso}
[Timer]
OnCalendar={expires_calendar}
Persistent=true
AccuracySec=1s
[Install]
WantedBy=timers.target
UNIT
  systemctl daemon-reload && systemctl enable --now gpuline-ttl.timer || echo "gpuline: systemd timer failed"
fi
# A second, independent watchdog in case systemd is absent or its timer was removed.
nohup sh -c "sleep $remaining; poweroff -f" >/dev/null 2>&1 &
echo "gpuline: watchdog armed for ${{remaining}}s"
"""

_RUNNER = """
# ---- single-use GitHub runner (JIT config: one job, then this machine powers off)
RUNNER_DIR={runner_dir}
RUNNER_USER={runner_user}
RUNNER_VERSION={runner_version}
if [ ! -x "$ROOT$RUNNER_DIR/run.sh" ]; then
  arch=$(uname -m); case "$arch" in x86_64) arch=x64 ;; aarch64) arch=arm64 ;; esac
  mkdir -p "$ROOT$RUNNER_DIR"
  base=https://github.com/actions/runner/releases/download
  curl -fsSL --retry 5 -o "$ROOT/run/gpuline/runner.tgz" \\
    "$base/v$RUNNER_VERSION/actions-runner-linux-$arch-$RUNNER_VERSION.tar.gz" \\
    && tar xzf "$ROOT/run/gpuline/runner.tgz" -C "$ROOT$RUNNER_DIR" \\
    || {{ echo "gpuline: cannot install the runner; powering off"; poweroff; exit 1; }}
fi
id -u "$RUNNER_USER" >/dev/null 2>&1 || useradd -m "$RUNNER_USER"
chown -R "$RUNNER_USER" "$ROOT$RUNNER_DIR"
(umask 077; cat >"$ROOT/run/gpuline/jit" <<'JIT'
{jit_config}
JIT
)
echo "gpuline: starting runner {runner_label}"
jit=$(cat "$ROOT/run/gpuline/jit"); rm -f "$ROOT/run/gpuline/jit"
ACTIONS_RUNNER_INPUT_JITCONFIG="$jit" runuser -u "$RUNNER_USER" -w ACTIONS_RUNNER_INPUT_JITCONFIG -- \\
  "$ROOT$RUNNER_DIR/run.sh"
status=$?
unset jit
echo "gpuline: runner exited with $status; the lease is done, powering off"
poweroff
"""


def render_user_data(
    request: LeaseRequest,
    *,
    runner_dir: str = "/opt/actions-runner",
    runner_user: str = "runner",
    runner_version: str = "2.321.0",
    startup_script: str = "",
) -> str:
    """The bash script EC2 runs once at first boot."""
    expires = request.expires_at
    values = {
        "run_id": _safe_word(request.run_id),
        "lease_id": _safe_word(request.lease_id),
        "expires_iso": expires.isoformat(timespec="seconds"),
        "expires_epoch": int(expires.timestamp()),
        "expires_calendar": expires.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "root_env": contract.ROOT,
    }
    parts = [_HEADER.format(**values), _WATCHDOG.format(**values)]
    if startup_script.strip():
        parts.append("\n# ---- startup_script from resources.options\n" + startup_script.strip() + "\n")
    runner = request.runner
    if runner is not None and runner.jit_config:
        if not _JIT_CHARS.match(runner.jit_config):
            raise ConfigError(
                "the JIT runner config is not base64", hint="pass the encoded_jit_config GitHub returned, unchanged"
            )
        parts.append(
            _RUNNER.format(
                runner_dir=shlex.quote(runner_dir),
                runner_user=shlex.quote(runner_user),
                runner_version=shlex.quote(runner_version),
                runner_label=_safe_word(runner.label),
                jit_config=runner.jit_config,
            )
        )
    script = "".join(parts)
    if len(script.encode()) > MAX_USER_DATA_BYTES:
        raise ConfigError(
            f"the boot script is {len(script.encode())} bytes; EC2 allows {MAX_USER_DATA_BYTES}",
            hint="shorten resources.options.startup_script (bake setup into the image instead)",
        )
    return script


def _safe_word(value: str) -> str:
    """Ids and labels go into comments and echo lines: keep them to characters that cannot break out."""
    return re.sub(r"[^A-Za-z0-9._:-]", "_", value)
