"""``spr dlq list | redrive``: inspect dead letters, and send them back once."""

from __future__ import annotations

import argparse

from spr.classify import ErrorClass
from spr.cli.options import add_verbose_option, require_kafka
from spr.config.defaults import default_bootstrap
from spr.dlq import format_summary, redrive, summarize
from spr.errors import ConfigError


# ---------------------------------------------------------------------------- command
def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``spr dlq list|redrive``."""
    dlq = subparsers.add_parser(
        "dlq",
        help="inspect dead letters and redrive them",
        description="Inspect a topic's dead letters (list), or send them back to it (redrive).",
    )
    actions = dlq.add_subparsers(dest="dlq_action", metavar="ACTION", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--topic", required=True, metavar="T", help="the source topic")
        parser.add_argument(
            "--dlq-topic",
            default=None,
            metavar="T",
            help="the dead-letter topic (default <topic>.dlq)",
        )
        parser.add_argument(
            "--bootstrap",
            default=None,
            metavar="B",
            help="Kafka bootstrap servers (default $SPR_BOOTSTRAP or 127.0.0.1:9092)",
        )
        add_verbose_option(parser)

    listing = actions.add_parser("list", help="summarise the dead letters of a topic")
    common(listing)
    listing.add_argument(
        "--samples",
        type=int,
        default=3,
        metavar="N",
        help="how many dead letters to show (default 3)",
    )
    listing.set_defaults(func=_list_main)

    again = actions.add_parser(
        "redrive", help="re-produce dead letters to their source topic, once"
    )
    common(again)
    again.add_argument(
        "--group",
        default=None,
        metavar="G",
        help="consumer group recording progress (default spr-redrive.<topic>)",
    )
    again.add_argument(
        "--error-class",
        choices=[c.value for c in ErrorClass],
        default=None,
        help="redrive only dead letters of this class (default: every class)",
    )
    again.set_defaults(func=_redrive_main)


def _bootstrap(args: argparse.Namespace) -> str:
    """The bootstrap servers, once Kafka answered there (one sentence otherwise, in well
    under a second when the connection is refused)."""
    bootstrap: str = args.bootstrap or default_bootstrap()
    if not args.topic:
        raise ConfigError("--topic must not be empty")
    require_kafka(bootstrap)
    return bootstrap


def _list_main(args: argparse.Namespace) -> int:
    if args.samples < 0:
        raise ConfigError(f"--samples must be 0 or more, got {args.samples}")
    summary = summarize(
        bootstrap=_bootstrap(args),
        source_topic=args.topic,
        dlq_topic=args.dlq_topic,
        samples=args.samples,
    )
    print(format_summary(summary))
    return 0


def _redrive_main(args: argparse.Namespace) -> int:
    report = redrive(
        bootstrap=_bootstrap(args),
        source_topic=args.topic,
        dlq_topic=args.dlq_topic,
        group=args.group,
        error_class=args.error_class,
    )
    print(
        f"redrove {report.redriven} dead letter(s) from '{report.dlq_topic}' to "
        f"'{report.source_topic}' (skipped {report.skipped}; progress in group '{report.group}')"
    )
    return 0
