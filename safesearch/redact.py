"""Credentials never reach a screen, a log, a study or an export.

A database or judge URL may carry a password (``postgresql://user:PASSWORD@host/db``, any characters
in it, ``/`` and ``@`` included, or ``?password=...``). :func:`mask_url` hides it in one URL;
:func:`mask_secrets` in any text (an error message that quotes a URL), so that the command line can mask
every line it prints whatever raised it.
"""

from __future__ import annotations

import re

MASK = "***"
# Query fields that carry a secret: libpq's password and sslpassword, and the usual token names.
_SECRET_FIELD = re.compile(
    r"(?i)([?&;](?:password|passwd|pwd|sslpassword|token|access_token|api_key|apikey|secret)=)[^&#\s'\"]*"
)
# A URL in free text: a scheme, "://", then everything up to white space or a quote.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+")


def mask_url(url: str) -> str:
    """``url`` with the password of its user info and any secret query field replaced by ``***``.

    The user info ends at the LAST ``@``: a password may hold ``@``, ``/``, ``?`` or ``:`` unescaped,
    and no host or database name holds ``@``. A user name alone is kept (it is not a secret).
    """
    url = _SECRET_FIELD.sub(rf"\1{MASK}", url)  # first: a query value may hold "@" too
    scheme, sep, rest = url.partition("://")
    if sep:
        at = rest.rfind("@")
        user, colon, _ = rest[: max(at, 0)].partition(":")
        if at != -1 and colon:
            url = f"{scheme}{sep}{user}:{MASK}{rest[at:]}"
    return url


def mask_secrets(text: str) -> str:
    """``text`` with every URL in it masked (see :func:`mask_url`)."""
    return _URL.sub(lambda m: mask_url(m.group(0)), text)
