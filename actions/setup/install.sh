#!/usr/bin/env bash
# Install gpuline from the checkout this action came from (so a workflow always runs the gpuline of
# the same release as its actions) into a venv of its own under $RUNNER_TEMP. The caller's Python,
# its site-packages and its PATH entries stay as they were: only a folder holding the one `gpuline`
# command is added to PATH.
#
# Input (environment): GPULINE_EXTRAS, comma-separated extras such as "train" or "aws,github".
# UV_TORCH_BACKEND (uv's own setting: cpu, cu126, auto...) picks which torch build the `train` extra
# gets; the pr-fast tier sets cpu, so a CPU-only check never downloads the CUDA libraries.
# Outputs: gpuline (path of the command), python (gpuline's venv python), version.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$(cd "$here/../.." && pwd)"
extras="${GPULINE_EXTRAS:-}"
extras="${extras// /}"
if [[ ! "$extras" =~ ^[a-z0-9,-]*$ ]]; then
  echo "::error title=gpuline setup::extras must be comma-separated names such as train or aws,github (got: ${extras})"
  exit 2
fi
if [ ! -f "$source_dir/pyproject.toml" ]; then
  echo "::error title=gpuline setup::no pyproject.toml in ${source_dir}; the action's checkout is incomplete"
  exit 3
fi

root="${RUNNER_TEMP:?RUNNER_TEMP is not set: run this inside GitHub Actions}/gpuline"
venv="$root/venv"
bin="$root/bin"
mkdir -p "$bin"

# Every extra always includes github: the comment and runner steps need PyGithub.
wanted="github${extras:+,$extras}"
stamp="$root/installed"
# Keyed by what gets installed, not by where it lies: two actions of one gpuline commit may sit in
# two folders (each action's own checkout), and the second then installs nothing.
source_hash="$(cd "$source_dir" && find pyproject.toml scripts trainer templates -type f ! -name '*.pyc' -print0 2>/dev/null |
  LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)"
key="gpuline@$source_hash [$wanted] torch:${UV_TORCH_BACKEND:-default}"
if [ -x "$venv/bin/gpuline" ] && [ -f "$stamp" ] && grep -qxF -- "$key" "$stamp"; then
  echo "gpuline already installed ($source_hash, from $source_dir) with [$wanted]"
else
  echo "::group::Installing gpuline[$wanted] from $source_dir"
  if command -v uv >/dev/null 2>&1; then
    [ -x "$venv/bin/python" ] || uv venv --quiet --python ">=3.11" "$venv"
    # uv caches a wheel built from a local folder by its pyproject.toml alone; refresh gpuline itself
    # so a changed source tree (a PR) is never served a stale build from the restored cache.
    uv pip install --quiet --python "$venv/bin/python" --refresh-package gpuline --reinstall-package gpuline \
      "${source_dir}[${wanted}]"
  else
    # Without uv (e.g. a self-hosted runner where setup-uv was skipped): the standard library's venv.
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${source_dir}[${wanted}]"
  fi
  echo "$key" >>"$stamp"
  echo "::endgroup::"
fi

ln -sf "$venv/bin/gpuline" "$bin/gpuline"
if [ -n "${GITHUB_PATH:-}" ]; then
  echo "$bin" >>"$GITHUB_PATH"
fi
version="$("$venv/bin/gpuline" --version)"
echo "$version ($venv)"
if [ -n "${GITHUB_OUTPUT:-}" ]; then
  {
    echo "gpuline=$bin/gpuline"
    echo "python=$venv/bin/python"
    echo "version=${version#gpuline }"
  } >>"$GITHUB_OUTPUT"
fi
