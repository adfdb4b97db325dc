"""Many workers on one database connection budget: Optuna's gRPC storage proxy, heartbeats included.

A worker that talks to PostgreSQL directly holds up to 4 connections (``storage.POOL_KWARGS``), so the
server's default ``max_connections = 100`` serves about 25 workers. ``safesearch storage proxy --storage
postgresql://...`` serves the database over gRPC instead, with Optuna's own servicer (what
``optuna.storages.run_grpc_proxy_server`` serves), and workers point at ``grpc://HOST:PORT``
(:class:`ProxyStorage`): only the proxy holds database connections (at most 4, one per server thread).

What Optuna's proxy does not carry, and how it is carried here:

- Heartbeats. ``GrpcStorageProxy`` is no ``BaseHeartbeat`` (Optuna's gRPC API has no heartbeat call):
  through it a trial never beats and ``fail_stale_trials`` does nothing, so a killed worker's trial would
  stay RUNNING for ever and the study would never end. The proxy serves a second gRPC service beside
  Optuna's, ``safesearch.Heartbeat`` (JSON messages: no generated code), with three calls: ``Config``
  (the interval and the grace period), ``Record`` (one beat) and ``Stale`` (a study's stale trials).
  :class:`ProxyStorage` is Optuna's ``GrpcStorageProxy`` plus ``BaseHeartbeat`` on those calls, so
  Optuna's ``fail_stale_trials`` and safesearch's ``next_trial``/``heartbeat`` work through it unchanged.
- Interval and grace period: settings of the RDBStorage inside the proxy (``--heartbeat``,
  ``--heartbeat-grace``). Staleness is judged there (RDBStorage compares each beat with the database's
  clock), and workers beat at the interval the proxy tells them (``Config``): one setting for every
  worker, so that no worker beats slower than the grace period allows. A worker's own ``--heartbeat``
  is refused with a grpc:// storage.
- Retries: Optuna runs the stale-trial callback in the process that calls ``fail_stale_trials``, on the
  callback of that process's storage; :class:`ProxyStorage` gives :class:`~safesearch.storage.RetryTrial`
  with the worker's spec's ``max_retries`` (as a direct worker's RDBStorage does), and the retry is
  created through the proxy.
- Trials that never beat (a worker killed between ``ask`` and its first beat; ``storage._fail_silent``
  finds them with SQL, which a worker behind the proxy has not): ``Stale`` also returns the RUNNING
  trials without any beat that the proxy has seen so for longer than the grace period, by its own clock.
- SQLite is refused: each client caches finished trials by study id, and SQLite gives a deleted study's
  id to the next study created (Optuna's documented caveat), which a study deleted after a failed set-up
  (``search.ensure_study``) and created again would hit. PostgreSQL never reuses an id.

Outages, on either side of the proxy:

- The proxy out of reach (stopped, restarted, the network): :class:`ProxyStorage` waits as a worker's
  database storage does (``safesearch.reconnect.OutageWatch``: back-off, one line lost and one back, then
  ``StorageOutage`` past ``--max-outage``), on a channel whose own reconnect back-off is capped at 5 s. So
  a proxy can be restarted under running workers.
- The proxy's database away: the proxy's storage waits for it too, at most ``--max-outage`` of the proxy
  (10 s) per call; then the call answers UNAVAILABLE and the worker waits on its side. Any other error of
  the proxy answers INTERNAL with one line (not gRPC's UNKNOWN with a traceback in it), which the worker
  raises as ``StorageFailure``: :func:`_one_line_errors`.

The proxy has no authentication and no TLS (Optuna's insecure channel): it listens on 127.0.0.1 unless
``--host`` says otherwise, and whoever reaches its port can read, change and delete every study.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import BaseStorage, GrpcStorageProxy, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat

from safesearch.errors import UserError
from safesearch.reconnect import (
    DEFAULT_MAX_OUTAGE_S,
    Backoff,
    OutageWatch,
    StorageFailure,
    StorageOutage,
    grace_period_s,
)
from safesearch.redact import mask_url
from safesearch.studyspec import DEFAULT_MAX_RETRIES

if TYPE_CHECKING:
    import grpc

SCHEME = "grpc"
DEFAULT_PORT = 13000
DEFAULT_HOST = "127.0.0.1"
# How long a command waits for the proxy to answer before it says it cannot be reached.
CONNECT_TIMEOUT_S = 5.0
SERVICE = "safesearch.Heartbeat"
_CALLS = ("Config", "Record", "Stale")
# Server threads: one database connection each, kept open (a pool of 4 without overflow: with a worker's
# 2 + 2, overflow connections closed when given back and a busy proxy opened 700-1,700 sessions a minute,
# twice the server CPU per trial; benchmarks/load.py).
SERVER_THREADS = 4
# How long one call waits inside the proxy for its database to come back before the worker is told
# UNAVAILABLE and waits on its own (by its --max-outage): a blip is ridden out where it happens, a long
# outage does not hold the proxy's few threads for minutes.
PROXY_MAX_OUTAGE_S = 10.0
# gRPC's channel tries to reconnect on its own back-off, which grows to 120 s by default: a proxy back after
# a long outage would then wait that long for a worker to notice. Capped at 5 s (the worker's own back-off
# between calls, safesearch.reconnect.Backoff, decides how often a call is tried).
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.initial_reconnect_backoff_ms", 500),
                    ("grpc.min_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000)]
_STOPPED = "the storage proxy stopped answering"


def is_proxy_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SCHEME}://")


def proxy_address(url: str) -> tuple[str, int]:
    """(host, port) of a ``grpc://HOST[:PORT]`` URL (port 13000 when not given, Optuna's default)."""
    where = f"storage {mask_url(url)}"
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        raise UserError(f"{where}: the port must be a number from 1 to 65535 (grpc://HOST:PORT)") from None
    if parts.username is not None or parts.password is not None:
        raise UserError(f"{where}: a grpc:// URL takes no user or password (the proxy holds the database's)")
    if not parts.hostname:
        raise UserError(f"{where}: no host (grpc://HOST:PORT)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise UserError(f"{where}: a grpc:// URL is grpc://HOST:PORT, nothing after the port")
    if port == 0:
        raise UserError(f"{where}: the port must be a number from 1 to 65535 (grpc://HOST:PORT)")
    return parts.hostname, port or DEFAULT_PORT


def _grpc() -> Any:
    """The grpc module, imported quiet: gRPC's core logs its own errors on stderr (a port it cannot bind,
    a connection refused) beside the one line the command prints. $GRPC_VERBOSITY, if set, wins; it is read
    when grpc is first imported, so every use here comes through this."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    import grpc

    return grpc


def _target_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address


def _stderr_line(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _dump(message: Any) -> bytes:
    return json.dumps(message).encode()


def _load(data: bytes) -> Any:
    return json.loads(data or b"{}")


# -- the client: what a worker's --storage grpc://HOST:PORT opens ----------------------------------------


class ProxyStorage(GrpcStorageProxy, BaseHeartbeat):
    """Optuna's gRPC client with the heartbeat of the proxy's ``safesearch.Heartbeat`` service.

    ``heartbeat``: this process beats for its trials and fails stale ones (workers); False for readers
    (``pareto``, the dashboard), which run no trial. ``max_retry``: retries per trial whose worker died
    (:class:`~safesearch.storage.RetryTrial`; None: without limit). ``url`` is kept for messages.
    """

    def __init__(self, url: str, *, heartbeat: bool = True, max_retry: int | None = DEFAULT_MAX_RETRIES,
                 max_outage_s: float = DEFAULT_MAX_OUTAGE_S) -> None:
        from safesearch.storage import RetryTrial

        host, port = proxy_address(url)
        _grpc()  # before GrpcStorageProxy opens its channel
        self.url = url
        self._heartbeat_on = heartbeat
        self._retry = RetryTrial(max_retry)
        self._interval: int | None = None
        self.grace_period: int | None = None  # the proxy's (Config)
        self.outages = _outage_watch(url, max_outage_s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # GrpcStorageProxy is experimental (4.2)
            super().__init__(host=_target_host(host), port=port)

    def _setup(self) -> None:
        from optuna.storages._grpc.auto_generated import api_pb2_grpc
        from optuna.storages._grpc.client import GrpcClientCache

        # GrpcStorageProxy._setup, with a channel that reconnects within seconds (_CHANNEL_OPTIONS).
        self._channel = _grpc().insecure_channel(f"{self._host}:{self._port}", options=_CHANNEL_OPTIONS)
        self._stub = api_pb2_grpc.StorageServiceStub(self._channel)
        self._cache = GrpcClientCache(self._stub)
        self._calls = {
            name: self._channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=_dump,
                                            response_deserializer=_load)
            for name in _CALLS
        }

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_calls"]
        watch = state.pop("outages")  # a lock and a thread-local: made anew on the other side
        state["_max_outage_s"] = watch.backoff.max_outage_s
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        max_outage_s = state.pop("_max_outage_s")
        self.outages = _outage_watch(state["url"], max_outage_s)
        super().__setstate__(state)

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> ProxyStorage:
        """Wait (at most ``timeout_s``) for the proxy and read its heartbeat; a one-line error when it does
        not answer, or when it is Optuna's bare proxy and this process needs heartbeats."""
        grpc = _grpc()

        where = f"storage {mask_url(self.url)}"
        try:
            self.wait_server_ready(timeout=timeout_s)
        except ConnectionError:
            self.close()
            raise UserError(f"{where}: no storage proxy answers at {self._host}:{self._port} within "
                            f"{timeout_s:g} s (is `safesearch storage proxy` running there?)") from None
        try:
            config = self._calls["Config"]({}, timeout=timeout_s)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                self.close()
                raise UserError(f"{where}: the storage proxy failed to answer ({_rpc_reason(e)})") from None
            if self._heartbeat_on:
                self.close()
                raise UserError(f"{where}: this proxy has no heartbeat service (Optuna's bare proxy?), so a dead "
                                "worker's trial would never be retried; serve the database with "
                                "`safesearch storage proxy` instead") from None
            return self
        self._interval = config.get("heartbeat_interval")
        self.grace_period = config.get("grace_period")
        return self

    # -- BaseHeartbeat, through the proxy's heartbeat service ------------------------------------------

    def record_heartbeat(self, trial_id: int) -> None:
        self._calls["Record"]({"trial_id": trial_id})

    def beat_once(self, trial_id: int) -> None:
        """One heartbeat, not waited for (:class:`~safesearch.reconnect.Heartbeat` tries again on its own
        schedule); a proxy out of reach raises :class:`~safesearch.reconnect.StorageOutage`."""
        try:
            self.outages.once(lambda: self._calls["Record"]({"trial_id": trial_id}), outage=_proxy_outage)
        except Exception as e:
            reason = _proxy_outage(e)
            if reason is None:
                raise
            raise self.out_of_reach(reason) from None

    def out_of_reach(self, reason: str) -> StorageOutage:
        """The error of a call tried once (a beat; ``reconnect.impatient``) that found the proxy away."""
        return StorageOutage(f"storage {mask_url(self.url)}: {_STOPPED} ({reason})")

    def _ask_stale(self, study_id: int) -> list[int]:
        return [int(t) for t in self._calls["Stale"]({"study_id": study_id})["trial_ids"]]

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """The proxy's stale trials (what Optuna's ``fail_stale_trials`` asks), none while this process is
        settling after losing the proxy: the beats it could not send were lost too
        (:meth:`~safesearch.reconnect.OutageWatch.settling`)."""
        stale = self._ask_stale(study_id)
        grace = grace_period_s(self)
        return [] if grace is not None and self.outages.settling(grace) else stale

    def get_heartbeat_interval(self) -> int | None:
        return self._interval if self._heartbeat_on else None

    def get_heartbeat_stale_trial_callback(self) -> Any:
        return self._retry if self._heartbeat_on and self._interval is not None else None


def _outage_watch(url: str, max_outage_s: float) -> OutageWatch:
    return OutageWatch(f"storage {mask_url(url)}", Backoff(max_outage_s), lost=_STOPPED)


def _proxy_outage(e: BaseException) -> str | None:
    """The one-line reason when ``e`` says the proxy is out of reach (gRPC's UNAVAILABLE: stopped,
    restarting, the network, or the proxy's own database away for longer than it waits), else None."""
    grpc = _grpc()
    if isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.UNAVAILABLE:
        return _rpc_reason(e)
    return None


def _through_the_proxy(name: str) -> Any:
    """``ProxyStorage.<name>``, riding out a proxy that stopped answering as a database storage rides out a
    lost connection (:class:`~safesearch.reconnect.OutageWatch`: back-off, one line each way, then
    :class:`~safesearch.reconnect.StorageOutage` after ``max_outage_s``; what ``give_up`` expects of a
    storage out of reach: the trial stays RUNNING and is retried once a proxy serves again). A call the
    proxy failed (its error, in one line: :func:`_one_line_errors`) raises :class:`StorageFailure`."""
    method = getattr(ProxyStorage, name)

    def call(self: ProxyStorage, *args: Any, **kwargs: Any) -> Any:
        grpc = _grpc()
        try:
            return self.outages.call(lambda: method(self, *args, **kwargs), outage=_proxy_outage)
        except grpc.RpcError as e:
            reason = _proxy_outage(e)
            if reason is not None:  # tried once (reconnect.impatient): out of reach all the same
                raise self.out_of_reach(reason) from None
            if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                raise StorageFailure(f"storage {mask_url(self.url)}: the storage proxy failed this call "
                                   f"({_rpc_reason(e)})") from None
            raise

    call.__name__ = name
    call.__doc__ = method.__doc__
    return call


# Every storage call of the client: Optuna's (the public methods of GrpcStorageProxy) and the heartbeat's.
_STORAGE_CALLS = [name for name, v in vars(GrpcStorageProxy).items()
                  if callable(v) and not name.startswith("_") and name not in ("close", "wait_server_ready")]
for _name in [*_STORAGE_CALLS, "record_heartbeat", "_ask_stale"]:
    setattr(ProxyStorage, _name, _through_the_proxy(_name))


def _rpc_reason(e: Any) -> str:
    details = e.details() if hasattr(e, "details") else None
    return f"{e.code().name}: {details}" if details else str(e.code().name)


def open_proxy(url: str, *, heartbeat: bool = True, max_retry: int | None = DEFAULT_MAX_RETRIES,
               max_outage_s: float = DEFAULT_MAX_OUTAGE_S) -> ProxyStorage:
    """The storage behind the proxy at ``url``, checked to answer within :data:`CONNECT_TIMEOUT_S`; once it
    has, a proxy that stops answering is waited for up to ``max_outage_s`` seconds."""
    if max_outage_s < 0:
        raise UserError(f"maximum outage {max_outage_s:g}: must be 0 or more seconds")
    return ProxyStorage(url, heartbeat=heartbeat, max_retry=max_retry, max_outage_s=max_outage_s).connect()


def probe_proxy(url: str) -> bool:
    """The proxy at ``url`` answers (one-line error otherwise); its database always holds Optuna's tables
    (the proxy made them when it started)."""
    ProxyStorage(url, heartbeat=False).connect().close()
    return True


# -- the server: `safesearch storage proxy` ------------------------------------------------------------


class HeartbeatService:
    """The ``safesearch.Heartbeat`` calls, on the proxy's storage (see the module docstring)."""

    def __init__(self, storage: BaseStorage, rdb: RDBStorage) -> None:
        assert rdb.heartbeat_interval is not None
        self.storage = storage  # Optuna's cache around ``rdb``: what the trial calls go through too
        self.rdb = rdb
        self.interval = rdb.heartbeat_interval
        self.grace = grace_period_s(rdb)
        # (study id, trial id) -> when the proxy first saw the trial RUNNING without a beat.
        self._silent_since: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()

    def config(self, request: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"heartbeat_interval": self.interval, "grace_period": self.grace}

    def record(self, request: dict[str, Any], context: Any) -> dict[str, Any]:
        self.storage.record_heartbeat(int(request["trial_id"]))
        return {}

    def stale(self, request: dict[str, Any], context: Any) -> dict[str, Any]:
        study_id = int(request["study_id"])
        stale = set(self.storage._get_stale_trial_ids(study_id)) | self._silent_past_grace(study_id)
        # None while the proxy's own database is settling after an outage: its workers' beats were lost.
        return {"trial_ids": [] if self.rdb.outages.settling(self.grace) else sorted(stale)}

    def _silent_past_grace(self, study_id: int) -> set[int]:
        """RUNNING trials without any beat, seen so by this proxy for longer than the grace period."""
        silent = self._never_beaten(study_id)
        now = time.monotonic()
        with self._lock:
            for key in [k for k in self._silent_since if k[0] == study_id and k[1] not in silent]:
                del self._silent_since[key]
            return {t for t in silent if now - self._silent_since.setdefault((study_id, t), now) > self.grace}

    def _never_beaten(self, study_id: int) -> set[int]:
        from safesearch.storage import never_beaten  # storage imports this module

        return never_beaten(self.rdb, study_id)

    def handler(self) -> grpc.GenericRpcHandler:
        grpc = _grpc()

        calls = {"Config": self.config, "Record": self.record, "Stale": self.stale}
        return grpc.method_handlers_generic_handler(SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=_load, response_serializer=_dump)
            for name, fn in calls.items()
        })


def check_served_url(url: str) -> str:
    """The database URL a proxy may serve (resolved), or a one-line error: not another proxy, not SQLite."""
    from safesearch.storage import is_sqlite, resolve_url

    url = resolve_url(url)
    if is_proxy_url(url):
        raise UserError(f"--storage {mask_url(url)}: a proxy cannot serve another proxy; give the database's URL "
                        "(postgresql+psycopg://USER@HOST:PORT/DB)")
    if is_sqlite(url):
        raise UserError(f"--storage {mask_url(url)}: the storage proxy serves PostgreSQL only (a SQLite file "
                        "serves one worker; give postgresql+psycopg://USER@HOST:PORT/DB)")
    return url


def _bind(server: grpc.Server, host: str, port: int) -> int:
    """Listen on ``host:port`` (0: a free port); the port bound, or a one-line error."""
    try:
        bound = server.add_insecure_port(f"{_target_host(host)}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise UserError(f"--port {port}: cannot listen on {host}:{port} (the port is in use, or --host {host} is "
                        "not an address of this machine)")
    return bound


def _one_line_errors(report: Any) -> grpc.ServerInterceptor:
    """A server interceptor for the errors the servicers do not answer themselves. Optuna's servicer turns
    the errors its client expects into status codes (NOT_FOUND for KeyError, ...); anything else reached the
    worker as gRPC's UNKNOWN with the proxy's traceback in it ("Exception calling application: ..."). Here
    the proxy's database away past the proxy's wait (:class:`~safesearch.reconnect.StorageOutage`) answers
    UNAVAILABLE, which workers wait out as a proxy out of reach (the outage has its two lines on the
    proxy's stderr already), and any other error INTERNAL with its one line, also printed on the proxy's
    stderr (``report``): the worker stops in one line (:class:`~safesearch.reconnect.StorageFailure`)."""
    grpc = _grpc()
    from safesearch.reconnect import driver_message

    class OneLineErrors(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            handler = continuation(details)
            if handler is None or handler.unary_unary is None:  # every call here is unary-unary
                return handler
            inner, method = handler.unary_unary, details.method.rsplit("/", 1)[-1]

            def behaviour(request: Any, context: Any) -> Any:
                try:
                    return inner(request, context)
                except Exception as e:
                    if context.code() is not None:  # the servicer's own answer (context.abort)
                        raise
                    if isinstance(e, StorageOutage):  # the proxy's storage has said so already, once
                        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
                    line = f"{type(e).__name__}: {driver_message(e)}"
                    report(f"{method} failed: {line}")
                    context.abort(grpc.StatusCode.INTERNAL, line)

            return grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)

    return OneLineErrors()


class ProxyServer:
    """The gRPC server of ``safesearch storage proxy``: Optuna's storage servicer and the heartbeat
    service on one port. Built as ``optuna.storages.run_grpc_proxy_server`` builds its own (its
    ``make_server``), with port sharing off (gRPC turns SO_REUSEPORT on: a second proxy on a taken port
    would start and silently share it) and with the heartbeat service added."""

    def __init__(self, url: str | None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                 heartbeat_s: int | None = None, grace_s: int | None = None,
                 max_outage_s: float = PROXY_MAX_OUTAGE_S) -> None:
        grpc = _grpc()
        from optuna.storages._grpc.auto_generated import api_pb2_grpc
        from optuna.storages._grpc.servicer import OptunaStorageProxyService

        from safesearch.storage import DEFAULT_HEARTBEAT_INTERVAL, open_storage

        self.url = check_served_url(url)
        self.host = host
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=SERVER_THREADS, thread_name_prefix="storage-proxy"),
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", -1)],
            interceptors=[_one_line_errors(_stderr_line)],
        )
        try:
            # The port first: a port that is taken leaves the database untouched.
            self.port = _bind(self.server, host, port)
            self.rdb = open_storage(self.url, heartbeat_interval=heartbeat_s or DEFAULT_HEARTBEAT_INTERVAL,
                                    grace_period=grace_s, max_retry=None, connections=SERVER_THREADS,
                                    max_outage_s=max_outage_s)
        except BaseException:
            self.server.stop(None)
            raise
        self.rdb.outages.gives_up = ("the proxy answers UNAVAILABLE until it is back, and its workers wait by their "
                                     "own --max-outage")
        storage = optuna.storages.get_storage(self.rdb)  # Optuna's cache of finished trials, as its docs advise
        self.heartbeats = HeartbeatService(storage, self.rdb)
        api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), self.server)
        self.server.add_generic_rpc_handlers((self.heartbeats.handler(),))

    @property
    def address(self) -> str:
        return f"{SCHEME}://{_target_host(self.host)}:{self.port}"

    @property
    def workers_url(self) -> str:
        """What workers give as --storage: on every address (0.0.0.0), this machine's name."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{SCHEME}://{_target_host(host)}:{self.port}"

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        """Stop answering (calls in progress are cut) and close the database connections."""
        self.server.stop(None).wait(5)
        self.rdb.engine.dispose()


def serve(url: str | None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, heartbeat_s: int | None = None,
          grace_s: int | None = None, max_outage_s: float = PROXY_MAX_OUTAGE_S) -> None:
    """Run the proxy until Ctrl-C or SIGTERM (then ``KeyboardInterrupt``, which the command line turns into
    its one line and exit 130). One line on stderr says where it serves, once it does."""
    from safesearch import interrupts

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per study created through it
    proxy = ProxyServer(url, host, port, heartbeat_s=heartbeat_s, grace_s=grace_s, max_outage_s=max_outage_s)
    try:
        proxy.start()
        h = proxy.heartbeats
        # Flushed at once: a caller (or a test) waits for this line to know the port.
        print(f"storage proxy on {proxy.address} for {mask_url(proxy.url)} (heartbeat {h.interval} s, grace "
              f"{h.grace} s): workers take --storage {proxy.workers_url}; Ctrl-C to stop", file=sys.stderr, flush=True)
        proxy.server.wait_for_termination()
    finally:
        with interrupts.deferred():
            proxy.stop()
