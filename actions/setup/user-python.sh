# shellcheck shell=bash
# Sourced by the actions that run the user's code (preflight, train, eval-gate): sets GPULINE_PYTHON, the
# interpreter for the import check, the smoke test and training, from the action's `python` input
# (GPULINE_TRAIN_PYTHON):
#   gpuline  gpuline's own venv, with the extras the action installed (first on PATH for this step only)
#   path     whatever `python` is on PATH, e.g. from actions/setup-python
case "${GPULINE_TRAIN_PYTHON:-gpuline}" in
  gpuline)
    PATH="$(dirname "$GPULINE_VENV_PYTHON"):$PATH"
    GPULINE_PYTHON="$GPULINE_VENV_PYTHON"
    ;;
  path)
    GPULINE_PYTHON="$(command -v python || command -v python3)"
    ;;
  *)
    echo "::error title=gpuline::input python must be gpuline or path (got: $GPULINE_TRAIN_PYTHON)"
    exit 2
    ;;
esac
export PATH GPULINE_PYTHON
