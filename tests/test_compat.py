from __future__ import annotations

from gpuline.training import compat


def test_cpu_runs_have_no_cuda_requirements() -> None:
    report = compat.check("cpu", 0, detect=False)
    assert not report.problems


def test_cpu_build_of_torch_is_noted_not_failed() -> None:
    report = compat.check("a100", 1, torch_version="2.13.0+cpu", cuda=None, detect=False)
    assert not report.problems and "CPU build" in report.notes[0]


def test_new_cuda_line_drops_old_gpus() -> None:
    report = compat.check("v100", 1, torch_version="2.13.0+cu128", cuda="12.8", detect=False)
    assert report.problems and "no kernels for v100" in report.problems[0]


def test_old_driver_is_a_problem() -> None:
    report = compat.check("h100", 1, torch_version="2.13.0+cu126", cuda="12.6", driver="470.82", detect=False)
    assert any("driver 470.82" in p for p in report.problems)


def test_matching_stack_is_fine() -> None:
    report = compat.check("h100", 8, torch_version="2.13.0+cu126", cuda="12.6", driver="560.35", detect=False)
    assert report.problems == []


def test_torch_build_reads_metadata_of_this_machine() -> None:
    version, cuda = compat.torch_build()
    assert version is not None and version.startswith("2.")
    assert cuda is None or cuda.count(".") == 1
