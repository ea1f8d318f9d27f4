"""Where the MLflow store is, whether it is usable, and the one way to talk to it.

* `resolve_tracking_uri` picks the store (config, else ``$MLFLOW_TRACKING_URI``, else a sqlite
  file in the cwd) and spells a sqlite path absolutely; `artifact_root` and `ui_command` say
  where its artifacts live and how to look at it.
* `check_store` is the cheap preflight, bounded in time (MLflow's own client retries for
  minutes): an http(s) store gets a plain GET, a sqlite or file store a look at its folder.
* `_client` is the only door to MLflow: an ``MlflowClient`` bound to one store, never the fluent
  API (``mlflow.set_tracking_uri`` also exports ``$MLFLOW_TRACKING_URI`` and its restoring helper
  unsets it in MLflow 3.17).
* `_fail_fast_http_env` makes this process's MLflow http requests fail in seconds, not minutes.

Artifacts of a sqlite store live next to the database, in ``<db dir>/mlartifacts/<experiment>/
<run id>/artifacts``. MLflow's own default for a sqlite store is ``./mlruns`` relative to the
*current directory of whichever process creates the experiment*, which scatters artifacts
(Ray workers do not share the driver's cwd). An http store keeps MLflow's choice (the server's
``--default-artifact-root`` / ``--artifacts-destination``).
"""

from __future__ import annotations

import os
import re
import shlex
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

ARTIFACTS_DIR = "mlartifacts"

HTTP_MAX_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"  # read by mlflow per request (3.17)
HTTP_TIMEOUT_ENV = "MLFLOW_HTTP_REQUEST_TIMEOUT"  # idem, seconds (int)
FAIL_FAST_MAX_RETRIES = 0
FAIL_FAST_TIMEOUT_S = 5


# -- where the store is ------------------------------------------------------------------

def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute, resolved against the cwd), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve()


def _absolute(uri: str) -> str:
    # A relative sqlite path names a different file in every process whose cwd differs (Ray
    # workers): spell the same database absolutely so the driver and workers share it.
    p = _sqlite_path(uri)
    if p is None:
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else ""
    return f"sqlite:///{p}" + (f"?{query}" if query else "")


def resolve_tracking_uri(cfg_tracking: Any, cwd: str | None = None) -> str:
    """The MLflow store to use: ``tracking.tracking_uri`` from the config if set, else
    ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.

    An explicit config value wins over the environment because it was written for this job; the
    environment wins over the default so a shared server set for a shell is honoured. Relative
    sqlite paths are made absolute (same database, but valid from any worker's cwd).
    """
    uri = getattr(cfg_tracking, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return _absolute(uri)
    return f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'mlflow.db'}"


def artifact_root(uri: str) -> Path | None:
    """Where a sqlite store's artifacts go (next to the database); None for other stores."""
    p = _sqlite_path(uri)
    return None if p is None else p.parent / ARTIFACTS_DIR


def ui_command(uri: str) -> str:
    """How to look at the store: ``mlflow ui ...`` for a local store, the URL itself for a
    tracking server."""
    if uri.startswith(("http://", "https://")):
        return uri
    cmd = f"mlflow ui --backend-store-uri {shlex.quote(uri)}"
    root = artifact_root(uri)
    if root is not None:  # for experiments created from the UI; ours carry their own location
        cmd += f" --default-artifact-root {shlex.quote(str(root))}"
    return cmd


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# -- is it usable: the preflight check ----------------------------------------------------

def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _unreachable(uri: str, why: str) -> str:
    return f"MLflow tracking store {uri} is unreachable ({why}); start it or set tracking.tracking_uri"


def _unusable(uri: str, why: str) -> str:
    return f"MLflow tracking store {uri} is not usable ({why}); fix it or set tracking.tracking_uri"


def _url_error_reason(e: BaseException) -> str:
    import socket
    import ssl
    import urllib.error

    inner = e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused"
    if isinstance(inner, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(inner, socket.gaierror):
        return f"cannot resolve host: {_short(inner)}"
    if isinstance(inner, ssl.SSLError):
        return f"TLS error: {_short(inner)}"
    if isinstance(inner, ConnectionResetError):
        return "connection reset"
    return _short(inner)


def _check_http(uri: str, deadline: float) -> str | None:
    import ssl
    import urllib.error
    import urllib.request

    ctx = None
    if uri.startswith("https://"):
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true", "yes"):
            ctx = ssl._create_unverified_context()
        elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            ctx = ssl.create_default_context(cafile=os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"])
    base = uri.rstrip("/")
    status = None
    for suffix in ("/health", "/api/2.0/mlflow/experiments/search?max_results=1"):
        left = deadline - time.monotonic()
        if left <= 0:
            return _unreachable(uri, "timed out")
        try:
            with urllib.request.urlopen(urllib.request.Request(base + suffix), timeout=left, context=ctx) as r:
                r.read(64)
            return None
        except urllib.error.HTTPError as e:
            status = e.code
            if e.code in (401, 403):
                return None  # it answered; credentials are MLflow's business (not sent here)
            if e.code == 404:
                continue  # no /health (an old or proxied server): try the REST API
            return _unreachable(uri, f"HTTP {e.code} from {suffix.split('?')[0]}")
        except Exception as e:  # URLError, timeouts, resets
            return _unreachable(uri, _url_error_reason(e))
    return _unusable(uri, f"HTTP {status}: does not look like an MLflow tracking server")


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_folder(uri: str, folder: Path) -> str | None:
    if folder.exists():
        if not folder.is_dir():
            return _unusable(uri, f"{folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            return _unusable(uri, f"folder {folder} is not writable")
        return None
    base = _nearest_existing(folder)
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        return _unusable(uri, f"folder {folder} does not exist and cannot be created under {base}")
    return None


def _check_sqlite(uri: str, db: Path, deadline: float) -> str | None:
    import sqlite3

    reason = _check_folder(uri, db.parent)
    if reason is not None or not db.exists():
        return reason
    if not db.is_file():
        return _unusable(uri, f"{db} is not a file")
    if not os.access(db, os.R_OK | os.W_OK):
        return _unusable(uri, f"database {db} is not readable and writable")
    try:
        con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=max(0.1, deadline - time.monotonic()))
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the header
        finally:
            con.close()
    except sqlite3.Error as e:
        return _unusable(uri, f"sqlite: {_short(e)}")
    return None


def _file_store_path(uri: str) -> Path | None:
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    if uri.startswith("file:"):
        return Path(url2pathname(urlparse(uri).path)).expanduser().resolve()
    if "://" in uri or re.match(r"^[A-Za-z][\w+.-]*:", uri):
        return None  # another scheme (databricks, postgresql, ...)
    return Path(uri).expanduser().resolve()


def local_store_folder(uri: str) -> Path | None:
    """The local folder a store lives in (a sqlite database's, a file store's), None for a
    server: the folder every node that logs must see (`raydpo.orchestration.nodes`)."""
    db = _sqlite_path(uri)
    if db is not None:
        return db.parent
    return None if _is_http(uri) else _file_store_path(uri)


def check_store(uri: str, timeout_s: float = 5.0) -> str | None:
    """None when the MLflow store at ``uri`` looks usable, else a one-line reason naming it.

    Finishes within ``timeout_s`` even for a blackholed host: an http(s) store gets a plain GET of
    ``<uri>/health`` (``/api/2.0/mlflow/experiments/search`` where that 404s) in a daemon thread,
    not ``MlflowClient`` (whose requests retry for minutes). A sqlite store needs a writable (or
    creatable) folder and, when the database exists, a readable/writable sqlite file; a file store
    a writable folder. Other schemes (databricks, SQL servers, ...) are not checked (None)."""
    deadline = time.monotonic() + timeout_s
    if _is_http(uri):
        out: list[str | None] = []

        def probe() -> None:
            try:
                out.append(_check_http(uri, deadline))
            except Exception as e:  # noqa: BLE001 -- a check must not raise
                out.append(_unreachable(uri, _short(e)))

        t = threading.Thread(target=probe, name="raydpo-check-store", daemon=True)
        t.start()
        t.join(max(0.0, deadline - time.monotonic()) + 0.05)  # DNS is not bound by urlopen's timeout
        return out[0] if out else _unreachable(uri, f"no answer within {timeout_s:g} s")
    try:
        if uri.startswith("sqlite:"):
            db = _sqlite_path(uri)
            return None if db is None else _check_sqlite(uri, db, deadline)
        folder = _file_store_path(uri)
        return None if folder is None else _check_folder(uri, folder)
    except OSError as e:
        return _unusable(uri, _short(e))


def _fail_fast_http_env() -> None:
    """Make this process's MLflow http requests fail fast (no retries, 5 s timeout): mlflow
    3.17 reads both variables on every request. Values already stricter are kept."""
    for name, cap in ((HTTP_MAX_RETRIES_ENV, FAIL_FAST_MAX_RETRIES), (HTTP_TIMEOUT_ENV, FAIL_FAST_TIMEOUT_S)):
        try:
            cur = int(os.environ[name])
            keep = cur <= cap and (cur > 0 or name != HTTP_TIMEOUT_ENV)
        except (KeyError, ValueError):
            keep = False
        if not keep:
            os.environ[name] = str(cap)
