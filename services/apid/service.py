"""apid: serves the HTTP API with waitress (a production WSGI server)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import zmq
from waitress import create_server

from common.identity import Identity, load_key_file
from common.lifecycle import die_with_parent
from common.logs import setup as setup_logs
from common.nodeconfig import NodeConfig
from services.cli.options import OptionError, parse_socket_addr

from .app import StatsCollector, create_app

log = logging.getLogger("apid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.apid")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    cfg = NodeConfig.load_or_exit(args.run_dir)
    setup_logs("apid", cfg.log_level)
    logging.getLogger("waitress").setLevel(logging.WARNING)
    identity = Identity.from_secret(load_key_file(cfg.key_file))
    ctx = zmq.Context()
    stats = StatsCollector(ctx, cfg.run_dir)
    stats.start()
    app = create_app(cfg, identity, ctx, stats)
    try:
        host, port = parse_socket_addr("api address", cfg.api_addr)
        server = create_server(app, host=host, port=port, threads=8, channel_timeout=30, ident="mycelium")
    except (OptionError, OSError) as exc:
        # the reference logs and keeps the node running without an HTTP API
        log.error("cannot serve the HTTP API on %s: %s", cfg.api_addr, exc)
        return 0 if isinstance(exc, OSError) else 1
    log.info("HTTP API on http://%s", cfg.api_addr)

    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
