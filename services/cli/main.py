"""The `mycelium` command: runs a node, or acts on a key file or a running node."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from common.identity import DEFAULT_KEY_FILE, IdentityError

from . import client, launcher, message_client, proxy_client
from .inspect_key import inspect
from .options import OptionError, add_node_options, resolve


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _add_key_option(p: argparse.ArgumentParser, default: object) -> None:
    p.add_argument("-k", "--key-file", default=default, help=f"node secret key file (default: {DEFAULT_KEY_FILE})")


def build_parser(prog: str = "mycelium") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="End-to-end encrypted IPv6 overlay network node.")
    _add_key_option(parser, DEFAULT_KEY_FILE)
    add_node_options(parser)
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="write node.json and supervisord.conf into the run directory and exit (for a system supervisord)",
    )
    parser.add_argument(
        "--crypto-workers",
        type=int,
        default=1,
        metavar="N",
        help="tund processes sharing the TUN and the encryption, one flow per worker (default 1)",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    p_inspect = sub.add_parser("inspect", help="print a public key and its overlay address")
    p_inspect.add_argument("pubkey", nargs="?", help="64 hex characters; default: the node's own key")
    p_inspect.add_argument("--json", action="store_true", help="print JSON")
    _add_key_option(p_inspect, argparse.SUPPRESS)
    client.add_commands(sub)  # peers, routes, stats: clients of a running node's HTTP API
    message_client.add_message_commands(sub, client.client_parent(), {})
    proxy_client.add_proxy_commands(sub, client.client_parent(), {})
    return parser


def main_private(argv: Sequence[str] | None = None) -> int:
    """`mycelium-private`: the reference's private-network binary (the same
    node; --network-name / --network-key-file are what it is for)."""
    return main(argv, prog="mycelium-private")


def main(argv: Sequence[str] | None = None, prog: str = "mycelium") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        if args.command == "inspect":
            print(inspect(args.pubkey, args.key_file, args.json))
            return 0
        if getattr(args, "client_handler", None) is not None:
            return client.run(args)
        cfg = resolve(
            args,
            warn=lambda text: print(f"mycelium: warning: {text}", file=sys.stderr),
            check_ports=not args.prepare_only,
        )
        if not cfg.no_tun:
            problem = None if args.prepare_only else launcher.tun_problem()
            if problem:
                raise OptionError(f"{problem}; run as root, or with --no-tun to run unprivileged without a TUN")
        if not 1 <= args.crypto_workers <= launcher.MAX_CRYPTO_WORKERS:
            raise OptionError(f"--crypto-workers must be 1-{launcher.MAX_CRYPTO_WORKERS}")
        if args.prepare_only:
            launcher.prepare(cfg, log_to_stdout=False, crypto_workers=args.crypto_workers)
            return 0
        return launcher.run(cfg, crypto_workers=args.crypto_workers)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (IdentityError, OptionError, launcher.LaunchError, client.ClientError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
