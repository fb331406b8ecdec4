"""Reading an HTTP answer's body, bounded: the API's and the Domain API's alike."""

from __future__ import annotations

import asyncio

import aiohttp

# An error entity or a Domain API answer is about 100 bytes, a proxy's error page a few
# kB. Past this the connection is closed unread, so an endpoint that streams without end
# (a misrouted base URL, a broken proxy) costs neither the request timeout nor memory.
MAX_ANSWER_BYTES = 64 * 1024


async def read_at_most(resp: aiohttp.ClientResponse, most: int = MAX_ANSWER_BYTES) -> bytes | None:
    """``resp``'s whole body; None, with the connection closed unread, past ``most`` bytes.

    Read to its end, the body frees the connection for the pool, even when empty.
    """
    length = resp.content_length
    # A compressed answer's Content-Length counts what comes over the wire, but aiohttp
    # hands over the body decompressed: only the bytes read can say how long it is.
    if "Content-Encoding" in resp.headers:
        length = None
    if length is not None and length <= most:
        return await resp.read()
    if length is None:
        try:
            await resp.content.readexactly(most + 1)
        except asyncio.IncompleteReadError as short:  # it ended within ``most``
            return short.partial
    resp.close()
    return None
