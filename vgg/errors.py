"""One-line error reporting, shared by the command-line tools, the trainer, export and the service.

- :func:`one_line`: the first line of an exception's message, for a one-line CLI error, an HTTP
  error body or a log line (the exception's type name when the message is empty).
- :class:`OneLineArgumentParser`: argparse whose usage errors are one ``error: ...`` line on
  stderr and exit code 2.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["MESSAGE_LIMIT", "OneLineArgumentParser", "one_line"]

MESSAGE_LIMIT = 200  # characters of an exception's first line kept in a one-line message


def one_line(error: BaseException, *, limit: int = MESSAGE_LIMIT, with_type: bool = False) -> str:
    """The first non-blank line of ``str(error)``, cut to ``limit`` characters.

    An empty (or all-blank) message gives the exception's type name instead; ``with_type``
    puts the type name in front of a non-empty message (``"KeyError: 'arch'"``).
    """
    name = type(error).__name__
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    if not first:
        return name
    first = first[:limit]
    return f"{name}: {first}" if with_type else first


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one ``error: ...`` line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")
