"""`dsv4-jax` command line: one subcommand per module in this package (`generate`, `convert`, `info`)."""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("generate", "convert", "info")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4-jax", description="DeepSeek-V4 inference in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"dsv4_jax.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dsv4_jax.cli.{name}":
                raise
            continue
        mod.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, OSError) as e:  # user-facing errors: say what is wrong, exit non-zero, no traceback
        print(f"dsv4-jax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
