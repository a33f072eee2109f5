"""The one exception type whose message is shown to the user as is.

Raise `LmforgeError` for anything caused by the user's input or environment (a missing file, a bad hash, an
unknown name): the CLI prints its message on one line and exits non-zero, without a traceback. Bugs in lmforge
itself stay ordinary exceptions so that their tracebacks reach us.
"""

from __future__ import annotations


class LmforgeError(Exception):
    """A problem the user can fix; the message says what, where, and what to do."""

