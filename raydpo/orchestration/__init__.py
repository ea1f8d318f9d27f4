"""Orchestration, the driver side: Ray connection, stage launch, Tune, job submission, console."""
