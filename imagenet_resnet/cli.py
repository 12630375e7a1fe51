"""Command-line plumbing shared by the entry points and data_prep's tools: parsers whose usage
names the command, `--config FILE key=value ...`, and clean errors. It imports nothing heavy:
data_prep's tools start without torch.

    def main(argv=None):
        args = parser(__spec__.name, "Train a model.").parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        ...
    if __name__ == "__main__":
        run_main(main)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from imagenet_resnet.errors import UserError


def positive_int(text: str) -> int:
    """argparse type for counts (workers, classes): the flag is named in argparse's error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def existing_file(text: str) -> Path:
    if Path(text).is_dir():
        inside = [str(Path(text) / name) for name in ("best.pt", "last.pt") if (Path(text) / name).is_file()]
        raise argparse.ArgumentTypeError(f"{text}: is a folder; expected a file"
                                         + (f", e.g. {' or '.join(inside)}" if inside else ""))
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return Path(text)


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Help text ends with the option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def command(module: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m <module>`: usage shows that command, option help ends with its default."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=description, formatter_class=DefaultsShown)


def parser(
    module: str, description: str, config_help: str = "YAML recipe from configs/ (defaults apply where it is silent)"
) -> argparse.ArgumentParser:
    """command() with `--config FILE` and `section.key=value` overrides."""
    p = command(module, description)
    p.add_argument("--config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. schedule.epochs=10")
    return p


def run_main(main: Callable[[], None]) -> None:
    """Run `main`; a UserError becomes `error: ...` on stderr and exit status 2, Ctrl-C a line
    (not a traceback) and status 130."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; run the same command again to continue", file=sys.stderr,
              flush=True)
        sys.exit(130)
