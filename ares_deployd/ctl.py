"""``ares-deployctl``: the command-line client of the ares-deployd API."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ares_deployd import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ares-deployctl",
        description="Talk to the ares-deployd API: deploy, follow, list, inspect.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    parser.print_help()
    return 2
