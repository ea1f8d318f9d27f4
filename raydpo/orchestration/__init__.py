"""Orchestration, the driver side: Ray connection, a stage's launch and its checks, base/merge, errors, reference pass, training stream, Tune, job submission, console, estimates."""
