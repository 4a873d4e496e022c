"""Shared CLI plumbing: every bad input ends as one `<program>: error: <reason>` line, exit status 2."""

import sys
from collections.abc import Callable

from draccus.utils import ParsingError


def root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def run(main: Callable[[], int], program: str) -> None:
    """Run a `@parser.wrap()` main; draccus reports a bad flag value (e.g. an unknown task, which the
    env config rejects in `__post_init__`) as a ParsingError whose cause holds the real reason."""
    try:
        status = main()
    except ParsingError as error:
        print(f"{program}: error: {root_cause(error)}", file=sys.stderr)
        status = 2
    sys.exit(status)
