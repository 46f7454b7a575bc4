"""The allow-list: which upstream URL a request maps to, and which URLs may be fetched at all.

A server is never an open proxy. Only three kinds of URL are ever fetched:

* ``/{name}/{path}`` → ``{upstream[name].url}/{path}`` (the conda channel layout);
* ``/pixi/{version}/{archive}`` → ``{upstream["pixi"].url}/v{version}/{archive}``;
* ``/sha256/{hex}?url=U`` → ``U``, only when ``U`` lies under an upstream's URL
  or one of its aliases (then rewritten onto the upstream's URL).

Paths reaching this module were already split into safe segments by
:func:`pixicache.serve.http.split_path`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import quote, unquote, urlsplit

from pixicache.serve.config import Upstream
from pixicache.serve.http import SEGMENT_RE

MAX_URL = 2048


class UpstreamMap:
    """Looks upstreams up by name and checks absolute URLs against the allow-list."""

    def __init__(self, upstreams: Iterable[Upstream]) -> None:
        self._by_name = {u.name: u for u in upstreams}
        # (scheme, host:port, path prefix) -> (upstream, prefix as given)
        self._prefixes: list[tuple[tuple[str, str, str], Upstream]] = []
        for up in self._by_name.values():
            for prefix in (up.url, *up.aliases):
                self._prefixes.append((_key(prefix), up))
        # longest prefix first, so a more specific alias wins
        self._prefixes.sort(key=lambda item: -len(item[0][2]))

    @property
    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> Upstream | None:
        return self._by_name.get(name)

    def channel_url(self, name: str, segments: Sequence[str]) -> str | None:
        """``/{name}/{segments...}`` → the upstream URL, or ``None`` if no such upstream."""
        up = self._by_name.get(name)
        if up is None:
            return None
        return up.url + "/" + "/".join(quote(s, safe="!$&'()*+,;=:@~") for s in segments)

    def pixi_url(self, version: str, archive: str) -> str | None:
        """The release archive URL below the ``pixi`` upstream, or ``None``."""
        up = self._by_name.get("pixi")
        if up is None:
            return None
        return f"{up.url}/v{quote(version)}/{quote(archive)}"

    def may_redirect(self, name: str, target: str) -> bool:
        """Whether a redirect from upstream ``name`` may be followed to ``target``: a URL
        that passes :meth:`resolve`, or one on a host the upstream lists in ``redirects``
        (over https, without credentials)."""
        if self.resolve(target) is not None:
            return True
        up = self._by_name.get(name)
        if up is None or not up.redirects:
            return False
        try:
            parts = urlsplit(target)
            port = parts.port
        except ValueError:
            return False
        if parts.scheme != "https" or parts.username or parts.password or not parts.hostname:
            return False
        host = parts.hostname.lower() + (f":{port}" if port not in (None, 443) else "")
        return host in up.redirects

    def variants(self, url: str, name: str) -> list[str]:
        """``url`` (under upstream ``name``), then the same path under each of its
        aliases: the URLs a store may have recorded for the same file."""
        up = self._by_name.get(name)
        out = [url]
        if up is not None and url.startswith(up.url + "/"):
            rest = url[len(up.url) :]
            out += [alias + rest for alias in up.aliases]
        return out

    def mirror_path(self, url: str) -> str | None:
        """The root-relative path at which this mirror serves the upstream URL ``url``
        (``/{name}/{rest}``), or ``None`` when ``url`` is under no upstream."""
        target = self.resolve(url)
        if target is None:
            return None
        for (_, _, _), up in self._prefixes:
            if target.startswith(up.url + "/"):
                return f"/{quote(up.name)}/{target[len(up.url) + 1 :]}"
        return None

    def resolve(self, url: str) -> str | None:
        """The URL to fetch for a client-named ``url``, or ``None`` if it is not allow-listed.

        ``url`` must be an ``http(s)`` URL without credentials, query or
        fragment, whose path has only plain segments (no ``.``/``..``, no
        encoded slashes, backslashes or NULs) and lies strictly below an
        upstream URL or alias; an alias is rewritten onto its upstream's URL.
        """
        if len(url) > MAX_URL:
            return None
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a malformed port
        except ValueError:
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return None
        if parts.username or parts.password or "@" in parts.netloc:
            return None
        if parts.query or parts.fragment or "?" in url or "#" in url:
            return None
        raw_segments = parts.path.split("/")[1:]
        segments = [unquote(s) for s in raw_segments]
        if not segments or any(not SEGMENT_RE.match(s) or s in (".", "..") for s in segments):
            return None
        key = _key(url)
        for (scheme, netloc, prefix), up in self._prefixes:
            if key[0] != scheme or key[1] != netloc:
                continue
            if not key[2].startswith(prefix + "/"):
                continue
            rest = key[2][len(prefix) + 1 :]
            if not rest:
                continue
            return up.url + "/" + rest
        return None


def _key(url: str) -> tuple[str, str, str]:
    """(scheme, host[:port] without the default port, decoded path without trailing slash)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    default = {"http": 80, "https": 443}.get(scheme)
    netloc = host if port in (None, default) else f"{host}:{port}"
    path = "/".join(quote(unquote(s), safe="!$&'()*+,;=:@~") for s in parts.path.split("/"))
    return scheme, netloc, path.rstrip("/")
