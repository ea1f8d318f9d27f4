"""Clusters past one machine, on this one: the pieces issue 24's integration tests start.

* `head`: a ``ray start --head --num-cpus 0`` of its own, as every shipped cluster config starts
  (an autoscaler's head runs no work), with token auth and the job API on 127.0.0.1.
* `worker_node`: a second Ray node joined to it, in a mount namespace of its own (``unshare -m``):
  a private ``/tmp`` and an empty private view of the folders named ``private`` (the driver's run
  folders), while the folders named ``shared`` stay the same folder on both (the NFS case). Both
  nodes are on 127.0.0.1; only what each sees on disk differs, which is what a second machine
  changes for raydpo. It can join late (``delay_s``): the cluster a command started on grows.
* `s3_server`: moto's standalone S3-API server (what Ray's own storage tests use) with a bucket,
  and the ``AWS_*`` environment a client needs; `list_keys` reads a bucket with boto3, a client
  other than the pyarrow one raydpo writes with.

Each piece runs in a process group of its own (``start_new_session``) and is stopped by
signalling that group and nothing else: never ``ray stop``, which stops every Ray on the machine.
A test module imports this file (it cannot import a conftest), so the few helpers it shares
with ``conftest.py`` are copied here, not imported.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
NODE_IP = "127.0.0.1"  # Ray registers both nodes under the machine's own address all the same
# the same Ray Train settings the session cluster gives its clients (conftest.py says why)
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
# what a node must not inherit from the pytest process: it joins by --address, a worker writes to
# the store its command names, and a leftover torch.distributed rendezvous would mislead torch
NOT_INHERITED = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                 "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "CROSS_RANK", "CROSS_SIZE")
# the suite's process tally (tests/_tally) writes into this folder from every Python process,
# a worker node's included: it must be the same folder there
TALLY_ENV = "RAYDPO_SUITE_TALLY_DIR"
START_TIMEOUT_S = 120.0
JOINED = "Ray runtime started."  # `ray start` prints it once the node is registered with the GCS
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # any value for moto


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(group: int, leader: subprocess.Popen | None = None, grace_s: float = 5) -> None:
    """Stop what one `start_new_session` child started and nothing else: SIGTERM its process
    group, SIGKILL what is left after ``grace_s``, then SIGKILL whatever is still in its session
    (Ray gives each worker process a group of its own, in the node's session). ``leader``: the
    session's first process when it is our child, reaped here (a zombie still answers ``kill``)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        if _signal_and_wait(group, sig, wait_s, leader):
            break
    for pid in _session_pids(group):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _signal_and_wait(group: int, sig: int, wait_s: float, leader: subprocess.Popen | None) -> bool:
    """Whether the group is gone within ``wait_s`` of ``sig``."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if leader is not None:
            leader.poll()
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies left out: they are only waiting to be reaped)."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, timeout=30).stdout
    rows = [line.split() for line in out.splitlines()]
    return [int(r[0]) for r in rows if r[1] == str(sid) and not r[2].startswith("Z") and int(r[0]) != os.getpid()]


def group_processes(group: int) -> list[str]:
    """``ps`` lines (pid, pgid, sid, state, command) of every process in the group or the session
    ``group`` started: what a teardown must leave empty. Zombies are listed too (state Z)."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,sid=,stat=,args="], capture_output=True, text=True,
                         timeout=30).stdout
    return [line.strip() for line in out.splitlines()
            if str(group) in line.split()[1:3] and int(line.split()[0]) != os.getpid()]


def _environment(env: Mapping[str, str]) -> dict[str, str]:
    """This process's environment less what a node must not inherit, with ``env`` over it."""
    base = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    return {**base, **{k: v for k, v in env.items() if k != "RAY_ADDRESS"}}


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _wait_started(proc: subprocess.Popen, log: Path, what: str, timeout_s: float) -> None:
    """Until ``ray start --block`` says its node is up (it prints `JOINED` after asking the GCS for
    the node it registered); raises with the log's tail if it exits or the time is up."""
    deadline = time.monotonic() + timeout_s
    while JOINED not in _log_tail(log, 10**6):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}):\n{_log_tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not up within {timeout_s} s:\n{_log_tail(log)}")
        time.sleep(0.1)


# -- the head ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Head:
    address: str                # the GCS address clients join (RAY_ADDRESS)
    dashboard: str              # the job-submission address
    client_env: dict[str, str]  # what a driver, a `ray job submit` or a worker node needs
    temp_dir: str               # the head's Ray temp dir (short: Ray's unix sockets live there)
    proc: subprocess.Popen      # `ray start --head --block`: its daemons' process group leader
    log: Path                   # `ray start`'s output

    @property
    def group(self) -> int:
        return self.proc.pid


def start_head(token: str, tmp: Path, *, env: Mapping[str, str] | None = None,
               timeout_s: float = START_TIMEOUT_S) -> Head:
    """``ray start --head --num-cpus 0 --block``, every port its own (the session cluster holds
    Ray's defaults), in a session of its own; returns once the node is up. ``--block``: the
    ``ray start`` process stays, the group's leader, and its daemons die with it. ``env``: more
    for the head's processes (an `S3Server`'s: Ray Train's controller runs on the driver's node,
    the head, with the head's environment, and resolves ``s3://`` storage there)."""
    temp = tempfile.mkdtemp(prefix="rdph-", dir="/tmp")
    port, dash = free_port(), free_port()
    client_env = {"RAY_ADDRESS": f"{NODE_IP}:{port}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                  **TRAIN_ENV}
    cmd = [str(BIN / "ray"), "start", "--head", "--num-cpus", "0", "--block", "--port", str(port),
           "--temp-dir", temp, "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(free_port()),
           "--ray-client-server-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0",
           "--disable-usage-stats"]
    log = Path(tmp) / f"head-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=temp, env=_environment({**(env or {}), **client_env}),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(client_env["RAY_ADDRESS"], f"http://127.0.0.1:{dash}", client_env, temp, proc, log)
    try:
        _wait_started(proc, log, "ray start --head", timeout_s)
    except BaseException:
        stop_head(h)
        raise
    return h


def stop_head(h: Head) -> None:
    """The head's processes and temp dir, nothing else. A short grace: on SIGTERM a head's
    ``ray start`` spends 6 s and more stopping its daemons one by one (measured), and a test
    cluster keeps nothing worth a graceful stop."""
    stop_group(h.group, h.proc, grace_s=1)
    shutil.rmtree(h.temp_dir, ignore_errors=True)


@contextmanager
def head(token: str, tmp: Path, *, env: Mapping[str, str] | None = None,
         timeout_s: float = START_TIMEOUT_S) -> Iterator[Head]:
    """`start_head` ... `stop_head`."""
    h = start_head(token, tmp, env=env, timeout_s=timeout_s)
    try:
        yield h
    finally:
        stop_head(h)


# -- a worker node in its own mount namespace ----------------------------------------------------

def _mount_script(private: Sequence[Path], shared: Sequence[Path]) -> str:
    """The bash lines that give a fresh mount namespace its view: a private ``/tmp``, an empty
    tmpfs over each ``private`` folder, each ``shared`` folder the host's own. A shared folder
    under ``/tmp`` (or under a private one) is opened first, and bound back from that descriptor
    once the tmpfs is over its parent (``--no-canonicalize``: its path now names the empty copy).
    Parents are mounted before children, so a private folder inside a shared one (a checkout's run
    folder) is still hidden."""
    # private propagation first: no mount made here reaches the host (unshare's default too)
    lines = ["set -euo pipefail", "mount --make-rprivate /"]
    fds: dict[Path, str] = {}
    for i, s in enumerate(shared):
        fds[s] = f"fd{i}"
        lines.append(f"exec {{fd{i}}}<{shlex.quote(str(s))}")
    lines.append("mount -t tmpfs -o mode=1777 raydpo-node-tmp /tmp")
    for p in sorted([*private, *shared], key=lambda p: len(p.parts)):
        q = shlex.quote(str(p))
        if p in fds:
            lines.append(f'mkdir -p {q} && mount --no-canonicalize --bind "/proc/self/fd/${fds[p]}" {q}')
        else:
            lines.append(f"mkdir -p {q} && mount -t tmpfs -o mode=0755 raydpo-node-private {q}")
    lines += [f'exec {{{fd}}}<&-' for fd in fds.values()]
    return "\n".join(lines)


@dataclass
class WorkerNode:
    """A Ray node started by `start_worker_node`: one session, whose leader is ``ray start
    --block`` and whose process group holds the node's daemons (Ray puts each worker process in
    a group of its own, in that session: `stop_group` ends those too)."""
    proc: subprocess.Popen
    log: Path
    started_at: float                   # time.monotonic() at launch (before any delay)
    own_log: bool = False               # a log of our own naming: removed by `stop`
    joined_after_s: float | None = field(default=None)

    @property
    def group(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_joined(self, timeout_s: float = START_TIMEOUT_S) -> float:
        """Block until the node is registered with the GCS; returns the seconds since launch."""
        if self.joined_after_s is None:
            _wait_started(self.proc, self.log, "worker node", timeout_s)
            self.joined_after_s = time.monotonic() - self.started_at
        return self.joined_after_s

    def stop(self) -> None:
        """Its process group (its private /tmp goes with the last process of its namespace)."""
        stop_group(self.group, self.proc)
        if self.own_log:
            self.log.unlink(missing_ok=True)


def start_worker_node(address: str, env: Mapping[str, str], num_cpus: int, private: Sequence[Path | str] = (),
                      shared: Sequence[Path | str] = (), delay_s: float = 0, *, log_dir: Path | str | None = None,
                      extra_args: Sequence[str] = ()) -> WorkerNode:
    """``ray start --address ADDRESS --num-cpus N --block`` in a new mount namespace (see
    `_mount_script`), after ``delay_s`` seconds, in a session of its own; returns at once (see
    `WorkerNode.wait_joined`). ``env`` goes over this process's environment (a `Head`'s
    ``client_env``, plus e.g. an `S3Server`'s ``env``: a node's workers see the environment the
    node started with). The suite's tally folder, when set, is always shared. A ``private``
    folder that does not exist is made (on the host's disk, unless it is under /tmp); a
    ``shared`` one must exist. Ray keeps the node's session under the cluster's temp dir path,
    which is then in the node's own /tmp."""
    node_env = _environment(env)
    # the code it runs stays visible: the venv and the checkout (a CI clone may sit under /tmp)
    shared_paths = [Path(s).resolve() for s in shared] + [Path(sys.prefix).resolve(), REPO]
    if node_env.get(TALLY_ENV) and Path(node_env[TALLY_ENV]).is_dir():
        shared_paths.append(Path(node_env[TALLY_ENV]).resolve())
    missing = [str(s) for s in shared_paths if not s.is_dir()]
    if missing:
        raise FileNotFoundError(f"shared folders must exist: {missing}")
    private_paths = [Path(p).resolve() for p in private]
    ray_cmd = [str(BIN / "ray"), "start", "--address", address, "--num-cpus", str(num_cpus), "--block",
               "--dashboard-agent-listen-port", str(free_port()),
               "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats", *extra_args]
    script = "\n".join([f"sleep {float(delay_s)}" if delay_s > 0 else ":",
                        _mount_script(private_paths, list(dict.fromkeys(shared_paths))),
                        "cd /", "exec " + shlex.join(ray_cmd)])
    log = Path(log_dir or tempfile.gettempdir()) / f"raydpo-worker-node-{uuid.uuid4().hex[:8]}.log"
    with open(log, "w") as out:
        # unshare without --fork execs bash, which execs ray: the group leader is `ray start` itself
        proc = subprocess.Popen(["unshare", "--mount", "bash", "-c", script], env=node_env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return WorkerNode(proc, log, time.monotonic(), own_log=log_dir is None)


@contextmanager
def worker_node(address: str, env: Mapping[str, str], num_cpus: int, private: Sequence[Path | str] = (),
                shared: Sequence[Path | str] = (), delay_s: float = 0, *, log_dir: Path | str | None = None,
                join_timeout_s: float = START_TIMEOUT_S, extra_args: Sequence[str] = ()) -> Iterator[WorkerNode]:
    """`start_worker_node` ... `WorkerNode.stop`; without a delay it has joined when this yields,
    with one it is still starting (the test calls ``wait_joined`` when it wants to)."""
    node = start_worker_node(address, env, num_cpus, private, shared, delay_s, log_dir=log_dir,
                             extra_args=extra_args)
    try:
        if delay_s <= 0:
            node.wait_joined(join_timeout_s)
        yield node
    finally:
        node.stop()


# -- an S3-API server ----------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Server:
    env: dict[str, str]  # AWS_ENDPOINT_URL, keys, region: all pyarrow, Ray and boto3 need
    uri: str             # s3://<bucket>
    proc: subprocess.Popen
    log: Path

    @property
    def group(self) -> int:
        return self.proc.pid


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited ({proc.returncode}):\n{_log_tail(log)}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"moto server not up within {timeout_s} s:\n{_log_tail(log)}") from None
            time.sleep(0.1)


def _s3_client(env: Mapping[str, str]):
    import boto3  # moto[server] brings it; only the tests that use a bucket import it

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def start_s3_server(tmp: Path, bucket: str = "raydpo", *, timeout_s: float = 60) -> S3Server:
    """moto's server on a free 127.0.0.1 port, in a session of its own, with ``bucket`` made.
    Its ``env``: the endpoint with its ``http://`` scheme (pyarrow takes https without one), and
    keys (moto takes any; without them the SDK's unsigned upload is stored with its chunk framing)."""
    port = free_port()
    log = Path(tmp) / f"moto-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **S3_KEYS, "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}  # no instance-metadata probe for credentials or region
    try:
        _wait_http(f"{env['AWS_ENDPOINT_URL']}/moto-api/", timeout_s, proc, log)
        _s3_client(env).create_bucket(Bucket=bucket)
    except BaseException:
        stop_group(proc.pid, proc)
        raise
    return S3Server(env, f"s3://{bucket}", proc, log)


@contextmanager
def s3_server(tmp: Path, bucket: str = "raydpo", *, timeout_s: float = 60) -> Iterator[S3Server]:
    """`start_s3_server` ... its process group stopped (the bucket lives in its memory)."""
    server = start_s3_server(tmp, bucket, timeout_s=timeout_s)
    try:
        yield server
    finally:
        stop_group(server.group, server.proc)


def list_keys(env: Mapping[str, str], uri: str) -> list[str]:
    """Every object key under ``s3://bucket[/prefix]``, whole (bucket-relative), sorted."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    pages = _s3_client(env).get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix.rstrip("/") + "/" if prefix else "")
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
