"""``safesearch storage proxy``: one gRPC proxy in front of the database, for more workers than its
connections allow.

Workers then take ``--storage grpc://HOST:PORT``; the proxy alone connects to PostgreSQL, and sets the
heartbeat (interval and grace period) of every worker behind it. How it works and what it adds to
Optuna's proxy: :mod:`safesearch.proxy`.
"""

from __future__ import annotations

import click

STORAGE_HELP = "The database to serve (default: $SAFESEARCH_STORAGE): postgresql+psycopg://USER@HOST:PORT/DB."


@click.group("storage")
def storage_group() -> None:
    """The study storage: serve one database to many workers."""


@storage_group.command("proxy")
@click.option("--storage", "storage_url", default=None, metavar="URL", help=STORAGE_HELP)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (the proxy has no authentication: 0.0.0.0 opens it to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=13000, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--heartbeat", "heartbeat_s", type=click.IntRange(min=1), default=None, metavar="SECONDS",
              help="Heartbeat interval of every worker behind the proxy (default: 60).")
@click.option("--heartbeat-grace", "grace_s", type=click.IntRange(min=1), default=None, metavar="SECONDS",
              help="A trial without a heartbeat for this long is failed and retried (default: twice the interval).")
@click.option("--max-outage", "max_outage_s", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
              help="How long one call waits for the database to come back before its worker is told the storage "
                   "is away (and waits by its own --max-outage) (default: 10).")
def proxy(storage_url: str | None, host: str, port: int, heartbeat_s: int | None, grace_s: int | None,
          max_outage_s: float | None) -> None:
    """Serve the study database over gRPC until Ctrl-C; workers take --storage grpc://HOST:PORT."""
    from safesearch.proxy import PROXY_MAX_OUTAGE_S, serve

    serve(storage_url, host, port, heartbeat_s=heartbeat_s, grace_s=grace_s,
          max_outage_s=PROXY_MAX_OUTAGE_S if max_outage_s is None else max_outage_s)
