"""The lease: recorded on the run record before a machine is bought, held by a process or a workflow
run, and closed (machine released, cost settled) by teardown or the reaper."""
