"""gpuline: GPU-aware CI/CD for machine-learning repos.

The orchestration package. It never imports torch; the torch side lives in ``gpuline_trainer``.
"""

__version__ = "0.1.0"
