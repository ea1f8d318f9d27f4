"""`raydpo submit` and `raydpo jobs`: a thin layer over Ray's `JobSubmissionClient`.

The job runs ``python -m raydpo.cli <stage> --config <F>`` in the cluster with the local checkout
as its working directory, so the config path is taken relative to ``--working-dir``. Secrets
(``HF_TOKEN``, MLflow credentials, ...) travel in the runtime env's ``env_vars`` and are never
printed: what is shown is the runtime env with their values replaced by ``***``.

Ray 2.60 clusters run with token auth; when a token exists locally (``~/.ray/auth_token``,
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) and ``RAY_AUTH_MODE`` is unset, it is enabled for
this process before Ray is imported, so ``raydpo submit`` works where ``ray job submit`` needs
``RAY_AUTH_MODE=token`` exported by hand.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from raydpo.orchestration.estimate import STOP_GRACE_S
from raydpo.tracking import STAGE_TAG

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
STAGES = ("sft", "dpo", "pipeline", "tune")
# passed through from the submitting shell when set; values never printed or logged
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
              "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
PLAIN_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "HF_HOME", "HF_ENDPOINT", "RAY_JOB_STOP_WAIT_TIME_S")
# never uploaded with the working dir (on top of what .gitignore lists)
EXCLUDES = [".git", ".venv", "raydpo_runs", "raydpo_output", "mlartifacts", "mlruns", "mlflow.db",
            ".raydpo_cache", "test-artifacts", "tests/schemas", "*.pyc", "__pycache__"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"


class SubmitError(ValueError):
    """Bad input to submit/jobs: printed as one line, exit code 2."""


def address(arg: str | None) -> str:
    return arg or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _enable_token_auth_if_available() -> None:
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or Path(path).is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def client(addr: str):
    _enable_token_auth_if_available()
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(addr)


def pinned_requirements() -> list[str]:
    """raydpo's own pinned dependencies, for ``--pip`` (clusters whose image lacks them)."""
    from importlib.metadata import requires

    return [r for r in (requires("raydpo") or []) if "extra ==" not in r]


def entrypoint(stage: str, config: str, overrides: list[str], resume: bool = False) -> str:
    parts = ["python", "-m", "raydpo.cli", stage, "--config", config]
    for o in overrides:
        parts += ["--set", o]
    if resume:
        parts.append("--resume")
    return shlex.join(parts)


def build_runtime_env(working_dir: str, *, pip: bool = False, image: str | None = None,
                      env: dict[str, str] | None = None, extra_env: list[str] | None = None) -> dict[str, Any]:
    """The runtime env for a raydpo job. ``env`` defaults to ``os.environ``; ``extra_env`` names
    further variables to pass through (``NAME`` copies it from ``env``, ``NAME=VALUE`` sets it)."""
    if pip and image:
        raise SubmitError("--pip and --image are exclusive: a container image already has its dependencies")
    env = dict(os.environ if env is None else env)
    env_vars = {k: env[k] for k in (*SECRET_ENV, *PLAIN_ENV) if env.get(k)}
    for item in extra_env or []:
        name, eq, value = item.partition("=")
        if not name.isidentifier():
            raise SubmitError(f"--env {item!r}: expected NAME or NAME=VALUE")
        if eq:
            env_vars[name] = value
        elif name in env:
            env_vars[name] = env[name]
        else:
            raise SubmitError(f"--env {name}: not set in this shell")
    # `ray job stop` SIGTERMs the driver, then SIGKILLs after this many seconds (Ray's default 3):
    # long enough for the workers to finish the step and checkpoint (estimate.STOP_GRACE_S)
    env_vars.setdefault(STOP_WAIT_ENV, str(STOP_GRACE_S))
    rt: dict[str, Any] = {"working_dir": working_dir, "excludes": list(EXCLUDES)}
    if env_vars:
        rt["env_vars"] = env_vars
    if pip:
        rt["pip"] = pinned_requirements()
    if image:
        rt["image_uri"] = image
    return rt


def redacted(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """The runtime env with every env var value hidden except known non-secrets."""
    out = dict(runtime_env)
    if "env_vars" in out:
        out["env_vars"] = {k: (v if k in PLAIN_ENV else "***") for k, v in out["env_vars"].items()}
    return out


def _relative_config(config: str, working_dir: str) -> str:
    wd = Path(working_dir).resolve()
    p = Path(config)
    full = (p if p.is_absolute() else Path.cwd() / p).resolve()
    if not full.is_file():
        raise SubmitError(f"--config {config}: no such file")
    try:
        return str(full.relative_to(wd))
    except ValueError:
        raise SubmitError(f"--config {config} is outside --working-dir {wd}: the job only sees the working dir") from None


def job_storage_problem(storage_path: str) -> str | None:
    """A relative ``run.storage_path`` lands in the job's package folder, which goes away with the
    job (and a resubmission gets another): refused before submitting, as the job would refuse it
    (`raydpo.orchestration.nodes.check_job_storage`)."""
    import os

    from raydpo import storage

    if storage.is_remote(storage_path) or os.path.isabs(os.path.expanduser(storage_path)):
        return None
    return (f"run.storage_path {storage_path!r} is relative: a job's working dir goes away with it; set an absolute "
            "path every node shares or a cloud URI, e.g. --set run.storage_path=s3://bucket/runs")


def submit(args) -> int:
    from raydpo.config import ConfigError, load_config

    wd = str(Path(args.working_dir).resolve())
    if not Path(wd).is_dir():
        raise SubmitError(f"--working-dir {args.working_dir}: not a directory")
    rel = _relative_config(args.config, wd)
    try:  # fail here, not minutes later on the cluster
        cfg = load_config(str(Path(wd) / rel), args.set)
    except ConfigError as e:
        print(f"raydpo submit: invalid config {args.config}:\n{e}", file=sys.stderr)
        return 2
    problem = job_storage_problem(cfg.run.storage_path)
    if problem:
        print(f"raydpo submit: {problem}", file=sys.stderr)
        return 2
    rt = build_runtime_env(wd, pip=args.pip, image=args.image, extra_env=args.env)
    ep = entrypoint(args.stage, rel, args.set, resume=getattr(args, "resume", False))
    addr = address(args.address)
    c = client(addr)
    job_id = c.submit_job(entrypoint=ep, runtime_env=rt, submission_id=args.job_id,
                          metadata={STAGE_TAG: args.stage, "raydpo.config": rel})
    print(f"submitted {job_id} to {addr}")
    print(f"  entrypoint:  {ep}")
    print(f"  runtime env: {redacted(rt)}")
    print(f"  status:      raydpo jobs status {job_id} --address {addr}")
    print(f"  logs:        raydpo jobs logs {job_id} --address {addr} --follow")
    if args.no_wait:
        return 0
    status = follow(c, job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def follow(c, job_id: str, out=sys.stdout) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    import asyncio

    async def tail() -> None:
        async for lines in c.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # the log stream can drop (head restart); fall back to polling
        print(f"[raydpo] log stream ended ({type(e).__name__}); polling status", file=sys.stderr)
    while (status := str(c.get_job_status(job_id)).split(".")[-1]) not in TERMINAL:
        time.sleep(2)
    return status


def jobs(args) -> int:
    c = client(address(args.address))
    if args.action == "list":
        for j in c.list_jobs():
            print(f"{j.submission_id or j.job_id}\t{j.status}\t{j.entrypoint}")
        return 0
    if not args.job_id:
        raise SubmitError(f"raydpo jobs {args.action}: JOB_ID is required")
    if args.action == "status":
        info = c.get_job_info(args.job_id)
        print(f"{args.job_id}\t{info.status}\t{info.message or ''}".rstrip())
        return 0
    if args.action == "logs":
        if args.follow:
            status = follow(c, args.job_id)
            print(f"job {args.job_id}: {status}")
        else:
            sys.stdout.write(c.get_job_logs(args.job_id))
        return 0
    if args.action == "stop":
        stopped = c.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    raise SubmitError(f"unknown action {args.action}")


def add_parsers(sub) -> None:
    s = sub.add_parser("submit", help="submit a raydpo stage as a Ray job (JobSubmissionClient)")
    s.add_argument("--address", help=f"Ray dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    s.add_argument("--config", required=True, help="config YAML inside --working-dir")
    s.add_argument("--stage", choices=STAGES, default="pipeline")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    s.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default: .)")
    s.add_argument("--pip", action="store_true", help="install raydpo's pinned dependencies in the job's env")
    s.add_argument("--image", help="run the job in this container image (runtime_env image_uri)")
    s.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                   help=f"pass an env var to the job (always passed when set: {', '.join(SECRET_ENV + PLAIN_ENV)})")
    s.add_argument("--job-id", help="submission id (default: Ray generates one)")
    s.add_argument("--resume", action="store_true", help="with --stage tune: continue the search")
    s.add_argument("--no-wait", action="store_true", help="return after submitting instead of following logs")
    s.set_defaults(fn=_guard(submit))

    j = sub.add_parser("jobs", help="status, logs, stop or list Ray jobs")
    j.add_argument("action", choices=("status", "logs", "stop", "list"))
    j.add_argument("job_id", nargs="?")
    j.add_argument("--address", help=f"Ray dashboard address (default: $RAY_ADDRESS or {DEFAULT_ADDRESS})")
    j.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    j.set_defaults(fn=_guard(jobs))


def _guard(fn):
    def run(args) -> int:
        try:
            return fn(args)
        except SubmitError as e:
            print(f"raydpo {args.command}: {e}", file=sys.stderr)
            return 2
        except ConnectionError as e:
            print(f"raydpo {args.command}: cannot reach the Ray cluster at {address(args.address)}: {e}", file=sys.stderr)
            return 2
    return run
