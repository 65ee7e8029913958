"""Wall-clock time in milliseconds since the Unix epoch: the unit of every ``*_ms`` field of the protocol.

Node and coordinator stamp and check requests with it, so both import it from here.

>>> now_ms() > 1_700_000_000_000
True
"""

import time


def now_ms() -> int:
    """Milliseconds since the Unix epoch, as the ``*_ms`` fields of the protocol carry them."""
    return int(time.time() * 1000)
