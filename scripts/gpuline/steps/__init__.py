"""The step commands. Each module has ``run(args) -> dict`` for the CLI and a function taking a
``Context`` that ``gpuline run`` chains in one process."""
