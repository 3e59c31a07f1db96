"""Connect the driver to Ray: join the running cluster, or start a local instance.

Which Ray the run uses, in this order:

1. an explicit address (``--address`` on the command line, or ``ray.address`` in
   the config): it wins over ``RAY_ADDRESS``, as in ``ray.init(address=...)``;
2. ``RAY_ADDRESS`` (set by Ray for the driver of ``ray job submit`` / a KubeRay
   ``RayJob``, or by the user);
3. the cluster that ``ray start`` runs on this machine (Ray's ``auto``
   resolution: the address ``ray start`` records in ``<ray temp dir>/ray_current_cluster``),
   which is what ``ray exec`` and a shell on the head node see;
4. otherwise a new local Ray instance bound to 127.0.0.1, without dashboard.

``local=True`` (``--local``) skips 1-3 and always starts a local instance.
A connection to a loopback address stays on loopback (Ray would otherwise rewrite
it to the machine's outward IP).

Token authentication: in case 3 Ray's own discovery runs (``ray.init()`` without an
address). Ray turns token authentication on by itself only there, and whenever a token
exists on the machine, whether the cluster uses it or not; a driver whose mode differs
from the cluster's connects but loses its actors. So before joining, the cluster's GCS
is asked once, without a token, whether it wants one (one gRPC call), and, unless
``RAY_AUTH_MODE`` is set, the driver's mode is set to match: ``token`` with the token
from wherever Ray looks for it (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``), else ``disabled``. Every failure to join is a
:class:`~laionbuild.errors.ClusterJoinError` naming the address, the cause and the fix
(the CLI prints it as one line, exit 2).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import ClusterJoinError, SetupError

log = logging.getLogger(__name__)

#: seconds the GCS port of a cluster address has to take a TCP connection before joining is
#: given up as unreachable (Ray itself retries for minutes)
REACHABLE_TIMEOUT_S = 5.0
#: Ray's authentication settings, in the order Ray reads the token
AUTH_MODE_VAR, TOKEN_VAR, TOKEN_PATH_VAR = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
#: a GCS method any client may call first; the answer says whether the cluster wants a token
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"
#: what Ray's client prints or raises when the cluster refuses its token (or the lack of one)
AUTH_FAILURE_MARKERS = ("InvalidAuthToken", "Unauthenticated", "AuthenticationError",
                        "authentication token", "Token authentication is enabled")
VERSION_FAILURE_MARKERS = ("Version mismatch",)

#: how the address was chosen, reported in the summary ("connected": this process already was)
MODES = ("explicit", "env", "auto", "local", "connected")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_host(address: str) -> str:
    """The host part of ``[scheme://]host[:port]``."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    return rest.rsplit(":", 1)[0] if rest.count(":") == 1 else rest


def running_cluster_address() -> str | None:
    """The address of the cluster ``ray start`` runs on this machine, if any.

    Ray records it in ``<ray temp dir>/ray_current_cluster`` and ``ray stop``
    removes the file; read here without importing Ray (Ray reads some settings at
    import, which must be set first).
    """
    base = os.environ.get("RAY_TMPDIR")
    if not base:
        base = os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None
        base = base or ("/tmp" if os.name == "posix" else tempfile.gettempdir())
    path = os.path.join(base, "ray", "ray_current_cluster")
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def choose_address(address: str | None, *, local: bool) -> tuple[str, str | None]:
    """``(mode, address)``: which Ray to use (see the module docstring); address None = start local."""
    if local:
        return "local", None
    if address:
        return _ray_keyword("explicit", address.strip())
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return _ray_keyword("env", env)
    found = running_cluster_address()
    if found:
        if _accepts_connections(found):
            return "auto", found
        log.warning("the Ray cluster recorded at %s is not running (stale address file); starting a local one",
                    found)
    return "local", None


def _ray_keyword(mode: str, address: str) -> tuple[str, str | None]:
    """Ray's address keywords: ``local`` starts a local instance, ``auto`` is the cluster that
    ``ray start`` runs on this machine (an error when there is none, as in ``ray.init``). A
    ``ray://`` (Ray Client) address is refused: Ray Data's streaming execution needs a driver
    that is part of the cluster."""
    if address == "local":
        return "local", None
    given = "RAY_ADDRESS" if mode == "env" else "--address"
    if address.lower().startswith("ray://"):
        raise ClusterJoinError(
            f"cannot run through Ray Client ({given} {address}): Ray Data's streaming execution needs a driver "
            "that is part of the cluster. Fix: run the command on the head node (no address there, or "
            "HEAD_IP:6379), or submit it: ray job submit --address http://HEAD_IP:8265 -- laionbuild run ...")
    if address.lower().startswith(("http://", "https://")):
        raise ClusterJoinError(
            f"cannot join the Ray cluster at {address} ({given}): that is a dashboard / job-submission address. "
            "Fix: give the cluster's GCS address HOST:PORT (6379 by default), or submit the command with "
            f"ray job submit --address {address} -- laionbuild run ...")
    if address != "auto":
        host, sep, port = address.rpartition(":")
        v6 = ":" in host
        if (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536
                or (v6 and not (host.startswith("[") and host.endswith("]")))):
            raise ClusterJoinError(
                f"cannot join the Ray cluster at {address!r} ({given}): not a HOST:PORT address. Fix: give the "
                "cluster's GCS address, e.g. HEAD_IP:6379 (what `ray start --head` prints; an IPv6 address in "
                "brackets, [::1]:6379), or `auto`")
        return mode, _same_cluster_on_this_machine(address)
    found = running_cluster_address()
    if found and _accepts_connections(found):
        return "auto", found
    raise ClusterJoinError(
        f"cannot join the Ray cluster at 'auto' ({'RAY_ADDRESS' if mode == 'env' else '--address'}): no Ray "
        "cluster runs on this machine (`ray start` records one in the Ray temp folder). Fix: start one with "
        "`ray start --head`, or give its HOST:PORT")


def _same_cluster_on_this_machine(address: str) -> str:
    """``address`` as the cluster ``ray start`` runs on this machine records itself, when it is
    that cluster reached on loopback. ``ray start --head --node-ip-address=127.0.0.1`` is moved by
    Ray onto the machine's own address; a driver told to stay on 127.0.0.1 would wait a minute for
    a node there and fail."""
    host, _, port = address.rpartition(":")
    if not is_loopback(host.strip("[]")):
        return address
    found = running_cluster_address()
    if not found:
        return address
    found_host, _, found_port = found.rpartition(":")
    if found_port != port or is_loopback(found_host.strip("[]")):
        return address
    log.info("the Ray cluster at %s runs on this machine as %s: joining it there", address, found)
    return found


def _accepts_connections(address: str, timeout_s: float = 2.0) -> bool:
    """Whether the GCS port of ``[scheme://]host:port`` takes TCP connections."""
    import socket

    host, _, port = address.split("://", 1)[-1].split("/", 1)[0].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


#: the start of Ray's notice that a worker process died (sent to the driver by a node's raylet)
_WORKER_DIED_NOTICE = "a worker died or was killed"
#: Ray's notice that a task failed and runs again ("infinite": a stage actor's call, whose actor
#: bounds the runs itself, see :class:`.adapter.ProcessDeaths`)
_RETRY_NOTICE = re.compile(r"There are (\d+|infinite) retries remaining")


def route_engine_notices() -> bool:
    """Ray prints the notices a node's raylet sends the driver (a worker process that died, a
    task killed for memory) to standard output, as many lines of engine detail. Without ``-v``
    they go to this module's log instead: one warning line each, the whole text at debug level.
    True when the hook is in place (it is Ray's private printer, replaced at most once)."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:  # pragma: no cover - another Ray layout: its own printing stays
        return False
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None:  # pragma: no cover
        return False
    if getattr(printer, "_laionbuild_original", None) is not None:
        return True

    retries = _Throttled(log.info, "Ray runs a failed task again (%s%s)")
    deaths = _Throttled(log.warning, "a worker process died; Ray runs its work again, at most "
                                     "ray.max_task_retries times%s%s (-v shows Ray's report)")

    def to_log(data, *args, **kwargs):
        if not isinstance(data, dict) or data.get("pid") != "raylet":
            return printer(data, *args, **kwargs)
        for line in data.get("lines") or ():
            text = " ".join(str(line).split())
            if not text:
                continue
            log.debug("Ray: %s", text)
            retried = _RETRY_NOTICE.search(text)
            if text.lower().startswith(_WORKER_DIED_NOTICE):
                deaths.note("")
            elif retried:
                left = retried.group(1)
                retries.note(f"{left} more tries left" if left.isdigit() else
                             "the work of a lost node or of a worker whose process died")
            else:
                log.warning("Ray: %s (-v shows the whole report)", _first_sentence(text))
        return None

    to_log._laionbuild_original = printer
    ray_worker.print_to_stdstream = to_log
    return True


class _Throttled:
    """One line for a burst of the same notice (a lost node makes Ray retry every task it ran at
    once: 50 lines in 3 s): the first at once, then at most one every ``every_s`` seconds, which
    says how many came meanwhile."""

    def __init__(self, emit, template: str, every_s: float = 10.0, clock=time.monotonic):
        self.emit, self.template, self.every_s, self.clock = emit, template, every_s, clock
        self.last = None
        self.held = 0

    def note(self, detail: str) -> None:
        now = self.clock()
        if self.last is not None and now - self.last < self.every_s:
            self.held += 1
            return
        more = f"; {self.held} more such notices in the last {now - self.last:.0f} s" if self.held else ""
        self.emit(self.template, detail, more)
        self.last, self.held = now, 0


def _first_sentence(text: str, limit: int = 200) -> str:
    end = text.find(". ")
    text = text if end < 0 else text[:end + 1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _captured_stderr(echo: bool):
    """Catch the process's stderr (file descriptor 2) while Ray's engine starts: it announces its
    log level there, and says there (only) why a cluster refused the connection. Yields a list
    that holds the captured text afterwards; ``echo`` writes it back to stderr too (``-v``)."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        try:
            os.dup2(buf.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            captured.append(buf.read().decode(errors="replace"))
            if echo and captured[0]:
                sys.stderr.write(captured[0])


def token_source() -> str | None:
    """Where Ray would take the authentication token from on this machine, if anywhere."""
    if os.environ.get(TOKEN_VAR, "").strip():
        return TOKEN_VAR
    path = os.environ.get(TOKEN_PATH_VAR, "").strip()
    if path:
        return f"{TOKEN_PATH_VAR} ({path})" if Path(path).expanduser().is_file() else None
    default = Path.home() / ".ray" / "auth_token"
    return str(default) if default.is_file() else None


def read_token() -> str | None:
    """The authentication token, read where Ray reads it (see :func:`token_source`)."""
    value = os.environ.get(TOKEN_VAR, "").strip()
    if value:
        return value
    path = os.environ.get(TOKEN_PATH_VAR, "").strip()
    target = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
    try:
        return target.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def probe_authentication(address: str, token: str | None = None,
                         timeout_s: float = REACHABLE_TIMEOUT_S) -> str:
    """Ask the GCS at ``host:port`` one question, with ``token`` or without: ``"accepted"``,
    ``"refused"`` (it wants a (valid) token) or ``"unknown"`` (no answer, or not a Ray GCS)."""
    try:
        import grpc
    except ImportError:
        return "unknown"
    target = address.split("://", 1)[-1].split("/", 1)[0]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
        try:
            channel.unary_unary(GCS_PROBE_METHOD)(b"", timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            return "refused" if exc.code() == grpc.StatusCode.UNAUTHENTICATED else "unknown"
    return "accepted"


def set_auth_mode(mode: str) -> None:
    """This process's (and its children's) Ray authentication mode; Ray reads it again if loaded."""
    os.environ[AUTH_MODE_VAR] = mode
    if "ray._raylet" in sys.modules:  # Ray already read its settings: read them again
        from ray._raylet import Config

        Config.initialize("")


def match_authentication(address: str) -> None:
    """Set this driver's token authentication to what the cluster at ``address`` uses (unless
    ``RAY_AUTH_MODE`` is set); a missing or refused token is a :class:`ClusterJoinError` now,
    not after Ray's minute of retries."""
    if address.startswith("ray://"):
        return  # Ray Client: the client server, not the GCS, answers on that port
    answer = probe_authentication(address)
    if answer == "unknown":
        return  # no answer to go by: Ray decides
    wants_token = answer == "refused"
    mode = os.environ.get(AUTH_MODE_VAR)
    if mode is not None and mode.strip().lower() != ("token" if wants_token else "disabled"):
        if wants_token:
            raise auth_failure(address, f"RAY_AUTH_MODE={mode} sends no token")
        raise ClusterJoinError(
            f"cannot join the Ray cluster at {address}: authentication mismatch (the cluster uses no token "
            f"authentication, this process has RAY_AUTH_MODE={mode}; Ray's workers could not answer it). "
            f"Fix: unset RAY_AUTH_MODE, or start the cluster with RAY_AUTH_MODE={mode}")
    if not wants_token:
        if mode is None:
            set_auth_mode("disabled")
        return
    token = read_token()
    if token is None:
        named = os.environ.get(TOKEN_PATH_VAR, "").strip()
        raise auth_failure(address, "the cluster uses token authentication and " + (
            f"{TOKEN_PATH_VAR} names {named}, which is no file" if named
            else "this machine has no token"))
    if probe_authentication(address, token) == "refused":
        raise auth_failure(address, f"the cluster refused the token from {token_source()}")
    if mode is None:
        set_auth_mode("token")


def auth_failure(address: str, why: str) -> ClusterJoinError:
    return ClusterJoinError(
        f"cannot join the Ray cluster at {address}: authentication failed ({why}). Fix: put the cluster's "
        "token (`ray get-auth-token` on the head) in ~/.ray/auth_token on this machine, or set "
        "RAY_AUTH_TOKEN to it or RAY_AUTH_TOKEN_PATH to its file, and leave RAY_AUTH_MODE unset")


def join_failure(address: str, exc: BaseException | None, output: str = "") -> ClusterJoinError:
    """One line naming the address, why joining failed and what to do about it."""
    text = f"{type(exc).__name__}: {exc}\n{output}" if exc is not None else output
    chain = (exc.__cause__ or exc.__context__) if exc is not None else None
    if chain is not None:
        text += f"\n{type(chain).__name__}: {chain}"
    where = f"cannot join the Ray cluster at {address}"
    if exc is None:
        return ClusterJoinError(
            f"{where}: unreachable (nothing accepts connections on that port from this machine). Fix: check "
            "the address (`ray start --head` prints it; `ray status` on the head), that the head is running "
            "and that its port is open to this machine; or leave out the address to start a local Ray")
    if any(m in text for m in VERSION_FAILURE_MARKERS):
        versions = " ".join(line.strip() for line in text.splitlines()
                            if line.strip().startswith(("Ray:", "Python:", "The cluster", "This process")))
        return ClusterJoinError(
            f"{where}: version mismatch between the cluster and this machine ({versions or exc}). Fix: install "
            "the cluster's versions here (pip install -c configs/cluster/constraints.txt -e '.[cluster]', "
            "the constraints file the cluster was set up with)")
    if any(m in text for m in AUTH_FAILURE_MARKERS):
        source = token_source()
        why = (f"the cluster refused the token from {source}" if source and
               os.environ.get(AUTH_MODE_VAR, "").lower() == "token" else
               "the cluster uses token authentication and this machine has no token" if not source else
               f"RAY_AUTH_MODE={os.environ.get(AUTH_MODE_VAR)} sends no token")
        return auth_failure(address, why)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ClusterJoinError(
        f"{where}: {type(exc).__name__}: {first}. Fix: check that the address names a running Ray "
        "cluster of the same Ray version (`ray status --address ADDRESS` from this machine)")


def _join(ray: Any, mode: str, target: str, kwargs: dict[str, Any], verbose: bool) -> None:
    """``ray.init`` to an existing cluster; every failure becomes one :class:`ClusterJoinError`."""
    if not _accepts_connections(target, REACHABLE_TIMEOUT_S):
        raise join_failure(target, None)
    match_authentication(target)
    # "auto": Ray's own discovery of the cluster `ray start` runs here
    address = None if mode == "auto" else target
    output: list[str] = []
    try:
        with _captured_stderr(echo=verbose) as output:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - every cause of a failed join is reported as one line
        with contextlib.suppress(Exception):
            ray.shutdown()
        raise join_failure(target, exc, "".join(output)) from None


def cluster_summary() -> dict[str, Any]:
    """Alive nodes, CPUs and GPUs of the connected cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    resources = ray.cluster_resources()
    return {
        "nodes": len(nodes),
        "cpus": float(resources.get("CPU", 0.0)),
        "gpus": float(resources.get("GPU", 0.0)),
        "node_ids": sorted(n["NodeID"] for n in nodes),
    }


def _gcs_address(ray: Any) -> str | None:
    """The head's GCS as this driver reaches it ("ip:port", names resolved by Ray), or None."""
    try:
        return ray.get_runtime_context().gcs_address or None
    except Exception:  # noqa: BLE001 - a client (ray://) connection has none to give
        return None


def _keep_python_handler(signum: int, handler: Any) -> None:
    """``ray.init`` installs a native crash handler for SIGTERM in the driver (it prints a stack
    dump and ends the process): give the signal back to the Python handler set before it."""
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signum, handler)


#: Ray ends a driver whose cluster head (GCS) has not answered for this many seconds, with exit
#: status 1 and no word of ours (``RAY_gcs_rpc_server_reconnect_timeout_s``, Ray's default 60)
RAY_GCS_TIMEOUT_VAR = "RAY_gcs_rpc_server_reconnect_timeout_s"
RAY_GCS_TIMEOUT_S = 60.0
#: the head watch stops the run this many seconds before Ray would end the process
HEAD_WATCH_MARGIN_S = 15.0
#: exit status of a run stopped because the head went away (the CLI's status for a one-line error)
HEAD_LOST_EXIT = 2


def ray_gcs_timeout_s() -> float:
    """Seconds Ray gives a lost head before it ends the driver (the variable, else Ray's default)."""
    try:
        value = float(os.environ.get(RAY_GCS_TIMEOUT_VAR, RAY_GCS_TIMEOUT_S))
    except ValueError:
        return RAY_GCS_TIMEOUT_S
    return value if value > 0 else RAY_GCS_TIMEOUT_S


class HeadWatch:
    """Stops the run with one line when the cluster's head (its GCS) is gone, before Ray does.

    Ray ends a driver whose GCS has not answered for ``RAY_gcs_rpc_server_reconnect_timeout_s``
    (60 s) with ``quick_exit``: status 1, nothing said, no cleanup. While a run holds its output,
    this thread opens a TCP connection to the GCS port every ``interval_s``; once none was taken
    for ``give_up_s`` (Ray's timeout less :data:`HEAD_WATCH_MARGIN_S`), it releases the run's
    lease (``cleanup``, given ``cleanup_timeout_s``), writes one line on stderr and ends the process with
    :data:`HEAD_LOST_EXIT`. A head that comes back sooner (a restarted GCS with fault tolerance)
    resets the count and the run goes on. Work committed so far is kept; the same command
    resumes once the cluster is back. The driver does one connection per interval, whatever the
    cluster's size.

    ``start(address)`` begins watching (a driver joined to a cluster by address; nothing for a
    local instance or a ``ray://`` client); ``stop()`` ends it. ``probe``, ``clock``, ``exit``
    and ``stream`` are the test's seams.
    """

    def __init__(self, *, cleanup=None, interval_s: float = 2.0, give_up_s: float | None = None,
                 probe=None, clock=time.monotonic, exit=os._exit, stream=None, cleanup_timeout_s: float = 5.0):
        self.cleanup = cleanup
        self.cleanup_timeout_s = cleanup_timeout_s
        self.interval_s = interval_s
        self.give_up_s = give_up_s if give_up_s is not None else max(5.0, ray_gcs_timeout_s() - HEAD_WATCH_MARGIN_S)
        self.probe = probe or (lambda address: _accepts_connections(address, timeout_s=min(2.0, max(0.2, interval_s))))
        self.clock = clock
        self.exit = exit
        self.stream = stream
        self.address: str | None = None
        #: when the head stopped answering (None: it answers)
        self.down_since: float | None = None
        #: probes that found the head unreachable, and whether the watch gave up
        self.misses = 0
        self.gave_up = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "HeadWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, address: str | None) -> bool:
        """Watch the GCS at ``address`` ("host:port"); False when there is nothing to watch."""
        if not address or "://" in address or ":" not in address or self._thread is not None:
            return False
        self.address = address
        self._thread = threading.Thread(target=self._loop, name="laionbuild-head-watch", daemon=True)
        self._thread.start()
        log.debug("watching the cluster head at %s (the run stops %.0f s after it stops answering)",
                  address, self.give_up_s)
        return True

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.step():
                return

    def step(self) -> bool:
        """One probe; True once the watch gave up (the process is then ending)."""
        if self.gave_up or self.address is None:
            return self.gave_up
        up = self.probe(self.address)
        if self._stop.is_set():
            return False
        now = self.clock()
        if up:
            if self.down_since is not None:
                log.info("the cluster head at %s answers again after %.0f s", self.address, now - self.down_since)
            self.down_since = None
            return False
        self.misses += 1
        if self.down_since is None:
            self.down_since = now
            log.warning("the cluster head at %s does not answer; the run stops if it stays away %.0f s",
                        self.address, self.give_up_s)
            return False
        if now - self.down_since < self.give_up_s:
            return False
        self.gave_up = True
        self._give_up(now - self.down_since)
        return True

    def _give_up(self, waited_s: float) -> None:
        if self.cleanup is not None:  # the lease: a rerun need not wait for it to expire
            done = threading.Thread(target=self._cleanup_quietly, daemon=True)
            done.start()
            done.join(timeout=self.cleanup_timeout_s)
        line = (f"laionbuild: error: the Ray cluster's head at {self.address} has not answered for "
                f"{waited_s:.0f} s (Ray ends its drivers at {ray_gcs_timeout_s():.0f} s): the run stops; the work "
                "committed so far is kept: once the cluster is back, rerun the same command to resume\n")
        stream = self.stream or sys.stderr
        with contextlib.suppress(Exception):
            stream.write(line)
            stream.flush()
        with contextlib.suppress(Exception):
            logging.shutdown()
        self.exit(HEAD_LOST_EXIT)

    def _cleanup_quietly(self) -> None:
        try:
            self.cleanup()
        except Exception as exc:  # noqa: BLE001 - the process is ending; a lease left behind expires
            log.debug("releasing the lease after the head was lost: %s", exc)


def connect(address: str | None = None, *, local: bool = False, num_cpus: int = 0,
            verbose: bool = False) -> dict[str, Any]:
    """Connect this process to Ray (see the module docstring); returns the cluster summary.

    ``num_cpus`` sizes a local instance only (0 = every CPU of the machine).
    Already connected: nothing changes and the summary of that connection is returned.
    """
    mode, target = choose_address(address, local=local)
    loopback = target is None or is_loopback(address_host(target))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet = logging.ERROR if not verbose else logging.INFO
    if not verbose:
        # a clean console: our progress and summary, not Ray's notices a user cannot act on
        # (token authentication, disabled progress bars, actor constructor arguments), nor its
        # report of an error that stops a dataset: that stops the run, and the command reports it
        # in one line; -v shows them all
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "CRITICAL")
        # the driver's own engine log (e.g. "constructor arguments in the object store" for every
        # actor pool); the workers' logs stay in Ray's session folder instead of the console
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    if loopback:
        # Ray rewrites a loopback cluster address to the machine's outward IP unless told
        # that this is a single-machine cluster; keep every connection on loopback
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    sigterm_before = signal.getsignal(signal.SIGTERM)
    if callable(sigterm_before) and threading.current_thread() is threading.main_thread():
        # the driver's core worker would install a native crash handler that takes SIGTERM (a
        # stack dump, status 15), at times after ray.init has returned: the command handles
        # SIGTERM itself. Read by this process only; workers keep Ray's handler.
        from ray._private import ray_constants

        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    if ray.is_initialized():
        mode, target = "connected", ray.get_runtime_context().gcs_address
    else:
        kwargs: dict[str, Any] = {"logging_level": quiet, "log_to_driver": verbose}
        if target is not None:
            log.info("connecting to the Ray cluster at %s (%s)", target,
                     {"explicit": "--address / ray.address", "env": "RAY_ADDRESS",
                      "auto": "started on this machine with ray start"}[mode])
            if loopback and not target.startswith("ray://"):
                # the driver attaches to the node on that loopback address (a head started
                # with --node-ip-address=127.0.0.x), not to the machine's outward IP
                host = address_host(target)
                kwargs["_node_ip_address"] = "127.0.0.1" if host == "localhost" else host
            _join(ray, mode, target, kwargs, verbose)
        else:
            n = num_cpus or os.cpu_count() or 1
            log.info("starting a local Ray instance with %d CPUs%s", n,
                     " (--local)" if local else " (no running cluster found)")
            # "local" never reads RAY_ADDRESS; the instance stays on loopback, without dashboard
            try:
                with _captured_stderr(echo=verbose):
                    ray.init(address="local", num_cpus=n, include_dashboard=False, _node_ip_address="127.0.0.1",
                             **kwargs)
            except Exception as exc:  # noqa: BLE001 - Ray's processes did not come up: one line
                with contextlib.suppress(Exception):
                    ray.shutdown()
                text = " ".join(str(exc).split())[:300]
                raise SetupError(f"a local Ray instance did not start ({type(exc).__name__}: {text}); on a busy "
                                 "machine rerun the same command, work committed so far is kept") from None
    _keep_python_handler(signal.SIGTERM, sigterm_before)
    logging.getLogger("ray").setLevel(quiet)
    logging.getLogger("ray.data").setLevel(quiet if verbose else logging.CRITICAL)
    if not verbose:
        route_engine_notices()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False
    summary = {"mode": mode, "address": target or "local", "gcs_address": _gcs_address(ray), **cluster_summary()}
    log.info("Ray cluster: %d node(s), %g CPUs, %g GPUs", summary["nodes"], summary["cpus"], summary["gpus"])
    return summary


__all__ = ["HEAD_LOST_EXIT", "HeadWatch", "MODES", "choose_address",
           "cluster_summary", "connect", "join_failure", "running_cluster_address",
           "match_authentication", "probe_authentication", "read_token", "route_engine_notices", "token_source"]
