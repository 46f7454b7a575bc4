"""One upstream GET, the way every fetch of the server makes it: redirects checked per hop,
no encoding but identity, a bounded body.

* **Redirects** are never followed blindly (aiohttp would: to any host). Each
  ``Location`` must itself pass the allow-list (:meth:`UpstreamMap.resolve`) or name a
  host the upstream is configured to redirect to (``redirects``: GitHub's release
  downloads go to ``objects.githubusercontent.com``); at most :data:`MAX_HOPS`.
* **Content-Encoding**: the request asks for ``identity``; an answer in another
  encoding is refused (:class:`UpstreamRefused`): its bytes are not the file's.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from urllib.parse import urljoin, urlsplit

import aiohttp

__all__ = ["MAX_HOPS", "UpstreamRefused", "upstream_get"]

MAX_HOPS = 5
REDIRECTS = (301, 302, 303, 307, 308)


class UpstreamRefused(Exception):
    """An upstream answer the server will not use (a redirect off the allow-list, a body
    in an encoding that is not identity); ``reason`` labels the metric."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@contextlib.asynccontextmanager
async def upstream_get(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    may_follow: Callable[[str], bool],
) -> AsyncIterator[aiohttp.ClientResponse]:
    """``GET url`` following only redirects ``may_follow`` accepts (see the module doc).

    Raises:
        UpstreamRefused: a redirect that may not be followed, too many, or a body that
            is not in identity encoding.
        aiohttp.ClientError, asyncio.TimeoutError: as the request raises.
    """
    current = url
    for _hop in range(MAX_HOPS + 1):
        resp = await session.get(current, headers=headers, allow_redirects=False)
        if resp.status in REDIRECTS and resp.headers.get("Location"):
            target = urljoin(current, resp.headers["Location"])
            resp.release()
            if urlsplit(target).scheme not in ("http", "https") or not may_follow(target):
                raise UpstreamRefused(
                    f"upstream redirected {url} to {target[:200]}, which is not under an "
                    "allow-listed upstream (nor a host this upstream may redirect to): "
                    "nothing was fetched from there",
                    "redirect",
                )
            current = target
            continue
        try:
            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity") and resp.status in (200, 206):
                raise UpstreamRefused(
                    f"upstream sent {url} with Content-Encoding {encoding[:40]} although "
                    "identity was asked for: its bytes are not the file's; refused",
                    "encoding",
                )
            yield resp
        finally:
            resp.release()
        return
    raise UpstreamRefused(f"upstream redirected {url} more than {MAX_HOPS} times", "redirect")
