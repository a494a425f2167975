"""The one base class of the errors a user can act on (issue 13).

An error derived from :class:`HeroError` carries a message that names the culprit (file, key,
flag, update) and says what to do, so an entry script prints that message alone (no traceback on
the console; the traceback still goes to ``log/log.txt``) and exits non-zero. Any other
exception is a bug and is shown with its full traceback.
"""
from __future__ import annotations

import logging
import sys


class HeroError(Exception):
    """An error whose message is complete for the user: culprit named, remedy given."""


def run_main(main, argv=None) -> None:
    """An entry script's ``__main__``: ``main(argv)``, and on a :class:`HeroError` (or a
    missing file, whose message names it) the message alone on the console and a non-zero exit
    (``exc.exit_code`` where the error has one, e.g. 143 after SIGTERM, else 1)."""
    code = None
    try:
        main(argv)
    except (HeroError, FileNotFoundError) as exc:
        if not getattr(exc, "logged", False):  # e.g. RunStopped: logged by the engine
            logging.getLogger("hero").error("%s", exc)
        code = getattr(exc, "exit_code", 1)
    if code is not None:  # outside the handler: the traceback (and what it holds) is freed
        sys.exit(code)
