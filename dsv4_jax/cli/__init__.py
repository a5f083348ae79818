"""`dsv4-jax` command line: one subcommand per module in this package (`generate`, `convert`, `info`).

Errors end a command with one line on stderr and an exit status that says what kind of problem it was (see
`errors.EPILOG`); the traceback is shown only with `--debug` (or `DSV4_JAX_DEBUG=1`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from dsv4_jax.cli.errors import EPILOG, describe
from dsv4_jax.cli.interrupt import ctrl_c_outside_gc

SUBCOMMANDS = ("generate", "convert", "info")


def _version() -> str:
    from dsv4_jax import __version__

    return f"dsv4-jax {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dsv4-jax", description="DeepSeek-V4 inference in JAX", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also DSV4_JAX_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"dsv4_jax.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dsv4_jax.cli.{name}":
                raise
            continue
        mod.add_parser(sub)
        p = sub.choices[name]
        p.epilog, p.formatter_class = EPILOG, argparse.RawDescriptionHelpFormatter
        # SUPPRESS: a default here would overwrite `dsv4-jax --debug CMD` (argparse applies subparser defaults last).
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an "
                       "error (also DSV4_JAX_DEBUG=1)")  # fmt: skip
    args = parser.parse_args(argv)
    debug = args.debug = args.debug or os.environ.get("DSV4_JAX_DEBUG", "") not in ("", "0")
    try:
        with ctrl_c_outside_gc():
            return int(args.run(args) or 0)
    except (Exception, KeyboardInterrupt) as e:
        code, message = describe(e)
        if debug:
            traceback.print_exc()
        sys.stdout.flush()
        print(f"dsv4-jax {args.command}: {message}", file=sys.stderr)
    if not debug:
        _collect_quietly()
    return code


def _collect_quietly() -> None:
    """Finalizes what the failed command left behind (Orbax's abandoned read coroutines) now, without their
    "Exception ignored in: <coroutine ...>" reports, which would otherwise be printed at exit after our one line."""
    import gc

    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


if __name__ == "__main__":
    sys.exit(main())
