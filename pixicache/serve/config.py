"""What a ``pixicache serve`` instance is told: :class:`ServeConfig` and its upstreams.

Settings come from, in increasing precedence: the defaults below, a TOML file
(``--config FILE``), the environment (``PIXICACHE_SERVE_TOKEN``) and the
command line. The TOML file holds a ``[serve]`` table (or the same keys at top
level)::

    [serve]
    host = "0.0.0.0"
    port = 8080
    cache_dir = "/srv/pixicache"
    max_size = "500G"          # disk budget; LRU eviction above it
    repodata_ttl = 60          # seconds repodata is served without revalidation
    max_connections = 2048
    per_client = 64            # concurrent requests per client address (0: no cap)
    fast_hits = true           # repeated hits answered without aiohttp (false: all through it)
    trusted_proxies = ["10.1.2.3", "192.168.7.0/24"]   # squid/nginx in front: cap per X-Forwarded-For
    token_file = "/etc/pixicache/token"   # or token = "..."

    only_upstreams = false     # true: serve only the upstreams below, not the defaults

    [serve.upstreams]           # added to the defaults (conda-forge, pixi); same name replaces
    conda-forge = "https://conda.anaconda.org/conda-forge"
    bioconda = { url = "http://site-mirror:8080/bioconda",
                 aliases = ["https://conda.anaconda.org/bioconda"] }

An upstream ``NAME=URL`` serves ``/{NAME}/...`` from ``URL/...``. Its
``aliases`` are public URL prefixes it stands in for: a ``/sha256/{hex}?url=``
request naming a URL under an alias is fetched from the upstream instead
(that is how a node cache whose ``conda-forge`` upstream is a site mirror still
accepts the agent's ``https://conda.anaconda.org/conda-forge/...`` URLs). The
well-known names ``conda-forge`` and ``pixi`` get their public URL as an alias
automatically when pointed elsewhere.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pixicache.config import default_cache_dir, parse_size
from pixicache.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

WELL_KNOWN_UPSTREAMS: dict[str, str] = {
    "conda-forge": "https://conda.anaconda.org/conda-forge",
    "pixi": "https://github.com/prefix-dev/pixi/releases/download",
}
"""The upstreams a serve has when none is configured, by name."""

WELL_KNOWN_REDIRECTS: dict[str, tuple[str, ...]] = {
    # GitHub answers a release download with a redirect to its object store
    "pixi": ("objects.githubusercontent.com", "release-assets.githubusercontent.com"),
}
"""Where the well-known upstreams redirect to (kept only with their default URL)."""

RESERVED_NAMES = frozenset({"sha256", "healthz", "metrics", "admin", "favicon.ico"})
"""First path components the server routes itself: no upstream may be called so."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_url(url: str, origin: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{origin}: {url!r} is not an http(s) URL")
    if parts.username or parts.password or "@" in parts.netloc:
        raise ConfigError(f"{origin}: {url!r}: credentials in upstream URLs are not supported")
    if parts.query or parts.fragment:
        raise ConfigError(f"{origin}: {url!r}: an upstream URL takes no query or fragment")
    return url.rstrip("/")


@dataclass(frozen=True)
class Upstream:
    """One allow-listed upstream.

    Attributes:
        name: the first path component clients use (``conda-forge``).
        url: where ``/{name}/...`` is fetched from (no trailing slash).
        aliases: public URL prefixes this upstream stands in for (see the module doc).
        kind: ``conda`` (a channel, or any host of immutable files) or ``pypi`` (a
            PEP 503/691 simple index: ``/{name}/{project}/`` are its project pages).
        redirects: hosts (``host`` or ``host:port``) a redirect from this upstream may
            go to, besides URLs under an upstream (GitHub's release downloads redirect).
    """

    name: str
    url: str
    aliases: tuple[str, ...] = ()
    kind: str = "conda"
    redirects: tuple[str, ...] = ()  # hosts a redirect of this upstream may lead to

    @classmethod
    def make(
        cls,
        name: str,
        url: str,
        aliases: Iterable[str] = (),
        origin: str = "",
        kind: str | None = None,
        redirects: Iterable[str] = (),
    ) -> Upstream:
        """Validate and build an upstream; raises :class:`ConfigError`.

        The kind is ``pypi`` for the name ``pypi``, for a URL written ``pypi+https://...``
        or when ``kind`` says so; else ``conda``.
        """
        where = origin or f"upstream {name!r}"
        if url.startswith("pypi+"):
            url, kind = url[len("pypi+") :], "pypi"
        kind = kind or ("pypi" if name == "pypi" else "conda")
        if kind not in ("conda", "pypi"):
            raise ConfigError(f"{where}: kind must be 'conda' or 'pypi', not {kind!r}")
        if not _NAME_RE.match(name) or name.lower() in RESERVED_NAMES:
            raise ConfigError(
                f"{where}: {name!r} cannot name an upstream (letters, digits, '.', '_', '-'; "
                f"not one of {', '.join(sorted(RESERVED_NAMES))})"
            )
        url = _check_url(url, where)
        alias_list = [_check_url(a, where) for a in aliases]
        known = WELL_KNOWN_UPSTREAMS.get(name)
        if known and known != url and known not in alias_list:
            alias_list.append(known)
        hosts = [h.strip().lower() for h in redirects]
        if any(not re.match(r"^[a-z0-9.-]+(:[0-9]{1,5})?$", h) for h in hosts):
            raise ConfigError(f"{where}: redirects must be host names (host or host:port)")
        hosts += [h for h in WELL_KNOWN_REDIRECTS.get(name, ()) if h not in hosts and known == url]
        return cls(name, url, tuple(alias_list), kind, tuple(hosts))

    @classmethod
    def parse(cls, spec: str) -> Upstream:
        """``NAME=URL`` (the ``--upstream`` syntax) → :class:`Upstream`."""
        name, sep, url = spec.partition("=")
        if not sep or not name.strip() or not url.strip():
            raise ConfigError(
                f"--upstream {spec!r}: expected NAME=URL, e.g. "
                "conda-forge=https://conda.anaconda.org/conda-forge"
            )
        return cls.make(name.strip(), url.strip(), origin=f"--upstream {spec}")


def default_upstreams() -> list[Upstream]:
    """``conda-forge`` and ``pixi`` at their public URLs."""
    return [Upstream.make(n, u) for n, u in WELL_KNOWN_UPSTREAMS.items()]


def merge_upstreams(base: Iterable[Upstream], added: Iterable[Upstream]) -> list[Upstream]:
    """``base`` with ``added`` on top: an added upstream replaces one of the same name."""
    out = {u.name: u for u in base}
    for u in added:
        out[u.name] = u
    return list(out.values())


@dataclass
class ServeConfig:
    """Everything one server instance needs (see the module doc for the file format).

    Attributes:
        cache_dir: the store root (blobs under ``sha256/``, repodata under ``repodata/``).
        host, port: where to listen (port 0: an ephemeral port).
        upstreams: the allow-list; nothing outside it is ever fetched.
        max_size: disk budget in bytes for blobs (``None``: unbounded).
        token: bearer token for ``/admin/*`` and warm-up requests (``None``:
            admin only from loopback, warm-ups from anyone).
        repodata_ttl: seconds a cached repodata file is served without revalidation.
        max_connections: open client connections beyond which new ones get a 503.
        per_client: concurrent requests per client address beyond which a 429
            is answered (0: no cap).
        trusted_proxies: addresses or networks (``10.0.0.5``, ``10.0.0.0/8``) of
            HTTP caches in front of the server: for a request from one of them
            the client is the last untrusted address in ``X-Forwarded-For``
            (for the per-client cap and the log), not the cache itself.
        header_timeout: seconds a connection may take to deliver a complete
            request (from connect, or from the end of the previous response).
        send_timeout: seconds a client may accept nothing of a response (of a
            file's body; of each 4 MiB chunk over TLS) before it is dropped.
        upstream_connect_timeout, upstream_read_timeout: per upstream request;
            the read timeout applies between two reads of the body.
        upstream_connections: concurrent connections to all upstreams together.
        shutdown_timeout: seconds a graceful shutdown waits for running responses.
        workers: server processes, each with its own event loop, on one listening
            socket (each accepts while it holds no more connections than any other:
            :mod:`pixicache.serve.balance`) and one store (its ``flock`` locks keep
            fills single-flight across them). Default 1; on a mirror host of its
            own, the number of cores. ``max_connections`` is per worker.
        max_path: longest request target accepted (longer: 414).
        max_header_size: longest request header line accepted (longer: 400).
        log_requests: log one line per request on ``pixicache.serve.access``.
        fast_hits: answer repeated plain hits on the front path, without aiohttp
            (:mod:`pixicache.serve.front`; the same answers, less CPU per request);
            off: every request goes through aiohttp's handler.
        agent_file: a single-file agent (``pixicache bundle``) served at
            ``/agent/<its file name>``, where ``bootstrap.sh`` fetches it from.
        trust_env: honour ``HTTP(S)_PROXY``/``NO_PROXY`` for upstream requests.
    """

    cache_dir: Path = field(default_factory=default_cache_dir)
    host: str = "127.0.0.1"
    port: int = 8080
    upstreams: list[Upstream] = field(default_factory=default_upstreams)
    max_size: int | None = None
    token: str | None = field(default=None, repr=False)
    repodata_ttl: float = 60.0
    max_connections: int = 1024
    per_client: int = 256
    trusted_proxies: list[str] = field(default_factory=list)
    header_timeout: float = 15.0
    send_timeout: float = 60.0
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 60.0
    upstream_connections: int = 64
    max_artifact_size: int = 64 << 30  # a body of unknown size is cut off beyond this
    shutdown_timeout: float = 30.0
    workers: int = 1  # server processes sharing the listening socket and the store
    max_path: int = 1024
    max_header_size: int = 8190
    log_requests: bool = True
    fast_hits: bool = True
    trust_env: bool = True
    agent_file: Path | None = None

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir).expanduser()
        names = [u.name for u in self.upstreams]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"upstream {', '.join(dupes)} is configured more than once")
        if self.max_size is not None and self.max_size < 0:
            raise ConfigError("max_size must be positive")
        for name in ("max_connections", "max_path", "max_header_size", "upstream_connections", "workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.per_client < 0:
            raise ConfigError("per_client must be >= 0 (0: no cap)")
        if self.token is not None and not self.token.strip():
            raise ConfigError(
                "the admin token is empty (--token, token, token_file or "
                "PIXICACHE_SERVE_TOKEN): an empty token would let anyone in; give a real one "
                "(e.g. `openssl rand -hex 32`) or none (admin then from loopback only)"
            )
        for net in self.trusted_proxies:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(
                    f"trusted proxy {net!r} is not an IP address or network (e.g. 10.0.0.0/8)"
                ) from None

    def replace(self, **changes: Any) -> ServeConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


_INT_KEYS = (
    "port",
    "workers",
    "max_connections",
    "per_client",
    "max_path",
    "max_header_size",
    "upstream_connections",
)
_FLOAT_KEYS = (
    "repodata_ttl",
    "header_timeout",
    "send_timeout",
    "upstream_connect_timeout",
    "upstream_read_timeout",
    "shutdown_timeout",
)


def _upstreams_from_table(table: Any, origin: str) -> list[Upstream]:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{origin}: [serve.upstreams] must be a table of NAME = URL")
    out = []
    for name, value in table.items():
        if isinstance(value, str):
            out.append(Upstream.make(str(name), value, origin=f"{origin}: upstream {name}"))
        elif isinstance(value, Mapping) and isinstance(value.get("url"), str):
            aliases = value.get("aliases", [])
            if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
                raise ConfigError(f"{origin}: upstream {name}: aliases must be a list of URLs")
            kind = value.get("kind")
            if kind is not None and not isinstance(kind, str):
                raise ConfigError(f"{origin}: upstream {name}: kind must be 'conda' or 'pypi'")
            redirects = value.get("redirects", [])
            if not isinstance(redirects, list) or not all(isinstance(r, str) for r in redirects):
                raise ConfigError(f"{origin}: upstream {name}: redirects must be a list of hosts")
            out.append(
                Upstream.make(
                    str(name), value["url"], aliases, origin=f"{origin}: upstream {name}",
                    kind=kind, redirects=redirects,
                )
            )
        else:
            raise ConfigError(
                f"{origin}: upstream {name} must be a URL or {{ url = ..., aliases = [...], kind = ... }}"
            )
    return out


def settings_from_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``ServeConfig`` keyword arguments a TOML file sets (see the module doc)."""
    origin = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{origin}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{origin}: cannot read: {exc.strerror}") from exc
    table = data.get("serve", data)
    if not isinstance(table, Mapping):
        raise ConfigError(f"{origin}: [serve] must be a table")
    out: dict[str, Any] = {}
    known = (
        set(_INT_KEYS)
        | set(_FLOAT_KEYS)
        | {
            "host",
            "cache_dir",
            "max_size",
            "token",
            "token_file",
            "upstreams",
            "log_requests",
            "fast_hits",
            "trust_env",
            "trusted_proxies",
            "only_upstreams",
        }
    )
    unknown = sorted(k for k in table if k not in known and not isinstance(table[k], Mapping))
    if unknown and "serve" in data:
        raise ConfigError(f"{origin}: unknown [serve] setting(s): {', '.join(unknown)}")
    try:
        for key in _INT_KEYS:
            if key in table:
                out[key] = int(table[key])
        for key in _FLOAT_KEYS:
            if key in table:
                out[key] = float(table[key])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    for key in ("host", "token"):
        if key in table:
            out[key] = str(table[key])
    for key in ("log_requests", "fast_hits", "trust_env", "only_upstreams"):
        if key in table:
            out[key] = bool(table[key])
    if "cache_dir" in table:
        out["cache_dir"] = Path(str(table["cache_dir"])).expanduser()
    if "max_size" in table:
        out["max_size"] = parse_size(str(table["max_size"]))
    if "token_file" in table:
        try:
            out["token"] = Path(str(table["token_file"])).expanduser().read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{origin}: token_file: {exc}") from exc
    if "upstreams" in table:
        out["upstreams"] = _upstreams_from_table(table["upstreams"], origin)
    if "trusted_proxies" in table:
        nets = table["trusted_proxies"]
        if not isinstance(nets, list) or not all(isinstance(n, str) for n in nets):
            raise ConfigError(f"{origin}: trusted_proxies must be a list of addresses or networks")
        out["trusted_proxies"] = list(nets)
    return out


def load_config(
    config_file: str | os.PathLike[str] | None = None,
    *,
    upstream_specs: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> ServeConfig:
    """Build a :class:`ServeConfig`: defaults < file < environment < ``overrides``.

    Args:
        config_file: a TOML file (see the module doc), or ``None``.
        upstream_specs: ``NAME=URL`` strings. They and the file's upstreams are
            added to the defaults (``conda-forge`` and ``pixi``), replacing a
            default of the same name, so a mirror for a channel still serves Pixi
            releases; ``only_upstreams=True`` (``--only-upstreams``, ``only_upstreams
            = true`` in the file) drops the defaults.
        env: the environment (default ``os.environ``): ``PIXICACHE_SERVE_TOKEN``.
        **overrides: ``ServeConfig`` fields; ``None`` values are ignored.
    """
    env = os.environ if env is None else env
    settings: dict[str, Any] = {}
    if config_file is not None:
        settings.update(settings_from_toml(config_file))
    if env.get("PIXICACHE_SERVE_TOKEN"):
        settings["token"] = env["PIXICACHE_SERVE_TOKEN"]
    only = settings.pop("only_upstreams", False) or bool(overrides.pop("only_upstreams", False))
    named = list(settings.get("upstreams") or []) + [Upstream.parse(s) for s in upstream_specs]
    if named or only:
        settings["upstreams"] = merge_upstreams([] if only else default_upstreams(), named)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if isinstance(settings.get("max_size"), str):
        settings["max_size"] = parse_size(settings["max_size"])
    return ServeConfig(**settings)
