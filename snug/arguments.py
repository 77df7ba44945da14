"""Command-line pieces that several sub-commands share: argparse only, imported before torch."""

from __future__ import annotations

import argparse

# What `snug train` passes on to torchrun for several nodes (the usual rendezvous arguments).
LAUNCH_FLAGS = ("nnodes", "node_rank", "master_addr", "master_port")


def config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """CONFIG (optional for `snug plan`) and the section.key=value overrides after it."""
    parser.add_argument(
        "config", nargs=None if required else "?", help="YAML config file (see examples/)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override one config key, e.g. train.lr=1e-4",
    )
