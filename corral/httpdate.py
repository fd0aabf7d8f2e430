"""The HTTP Date header value (RFC 9110 5.6.7), formatted once a second:
the front puts it on every response, and a worker on each response whose
HTTP head it writes itself (see FRAME_PARAM in corral.worker)."""

import time
from email.utils import formatdate

_cache = [0, b""]


def http_date() -> bytes:
    now = time.time()
    if int(now) != _cache[0]:
        _cache[0] = int(now)
        _cache[1] = formatdate(now, usegmt=True).encode()
    return _cache[1]
