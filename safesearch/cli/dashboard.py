"""``safesearch dashboard [--storage URL] [--port P] [--artifacts DIR]``: optuna-dashboard on loopback.

Serves the studies of the storage (SQLite default, PostgreSQL by URL) with the artifact store the
workers write to, so that each trial's responses open from the trial's page. It binds 127.0.0.1 only:
the dashboard has no authentication and can delete studies; reach it from elsewhere through an SSH
tunnel (``ssh -L P:127.0.0.1:P host``).
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import click

from safesearch.errors import UserError

HOST = "127.0.0.1"


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per request is noise here
        pass


def make_dashboard_server(url: str | None, port: int, artifacts: str | Path | None = None) -> WSGIServer:
    """A threaded WSGI server of optuna-dashboard on 127.0.0.1:``port`` (0 picks a free port).

    Raises :class:`UserError` for a storage that holds no studies (nothing is created), one that cannot be
    opened, an artifact store that is a file, or a port that is taken.
    """
    from optuna_dashboard import wsgi

    from safesearch.dashboard import feasible_front_patch
    from safesearch.storage import artifact_store_for, open_storage, resolve_url

    url = resolve_url(url)
    feasible_front_patch()  # best trials = the feasible front, as `safesearch pareto` has it
    # The dashboard runs no trial (no heartbeat) and creates nothing: a storage without studies is an error.
    storage = open_storage(url, heartbeat_interval=None, create=False)
    store = artifact_store_for(url, artifacts, create=False)
    app = wsgi(storage, artifact_store=store)
    try:
        return make_server(HOST, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port}: already in use on {HOST} (choose another port)") from None
        raise UserError(f"--port {port}: cannot listen on {HOST} ({e.strerror})") from None


@click.command("dashboard")
@click.option("--storage", "storage_url", default=None, metavar="URL",
              help="Study storage (default: $SAFESEARCH_STORAGE or sqlite:///storage/safesearch.db).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port on 127.0.0.1 (0: any free port).")
@click.option("--artifacts", type=click.Path(path_type=Path), default=None, metavar="DIR",
              help="Artifact store (default: $SAFESEARCH_ARTIFACTS, else artifacts/ next to a SQLite file, "
                   "else storage/artifacts).")
def dashboard(storage_url: str | None, port: int, artifacts: Path | None) -> None:
    """Serve optuna-dashboard for the studies in the storage, with each trial's artifacts."""
    from safesearch.storage import artifact_root, mask_url, resolve_url

    url = resolve_url(storage_url)
    server = make_dashboard_server(url, port, artifacts)
    bound = server.server_address[1]
    # Flushed at once: a caller (or a test) waits for this line to know the port.
    print(f"optuna-dashboard on http://{HOST}:{bound}/dashboard  (storage {mask_url(url)}, "
          f"artifacts {artifact_root(url, artifacts)}); Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
