"""``pixicache serve``: a pull-through, content-addressed conda mirror.

A facility runs it on a mirror host (or each node runs one as a node cache) so
that a thousand jobs cost conda-forge one download per package. Clients use
the conda channel layout (pixi's ``mirrors``, rattler's mirror middleware,
``pixicache --source mirror=URL``) or the digest endpoint ``/sha256/<hex>``.

Why aiohttp: its low-level server streams multi-GB bodies with flat memory
(``StreamResponse`` writes straight to the transport with backpressure), and
``loop.sendfile`` sends stored blobs zero-copy with ``sendfile(2)``, the way
nginx does; it is one mature asyncio stack for both the server and the
upstream client (no second HTTP stack), with keep-alive, header limits and
graceful shutdown built in. One event loop serves hundreds of connections;
the blocking store work (locks, writes, fsync, rename, gc) runs in a small
thread pool. Repeated plain hits, most of a mirror's requests, are answered on
a leaner front path in front of it (:mod:`~pixicache.serve.front`) with the same
answers; everything else reaches aiohttp unchanged.

Modules, one job each:

* :mod:`~pixicache.serve.config`: :class:`ServeConfig`, :class:`Upstream` (CLI/TOML);
* :mod:`~pixicache.serve.upstreams`: the allow-list and URL mapping;
* :mod:`~pixicache.serve.http`: safe paths, Range, validators, a file's answer, sendfile;
* :mod:`~pixicache.serve.blobs`: blobs opened and pinned for sending; the known hits;
* :mod:`~pixicache.serve.front`: every connection's first stop; plain hits answered there;
* :mod:`~pixicache.serve.writer`: a fill's partial file and commit;
* :mod:`~pixicache.serve.fill`: single-flight fills streamed to all waiters;
* :mod:`~pixicache.serve.repodata`: channel metadata with a TTL and revalidation;
* :mod:`~pixicache.serve.metrics`: Prometheus metrics;
* :mod:`~pixicache.serve.app`: the routes;
* :mod:`~pixicache.serve.runner`: foreground (SIGTERM) and background servers;
* :mod:`~pixicache.cli.serve`: the ``serve`` click command.

Deployment: a systemd unit (SIGTERM drains running responses, then exits)::

    # /etc/systemd/system/pixicache-serve.service
    [Unit]
    Description=pixicache serve: pull-through conda mirror
    After=network-online.target
    Wants=network-online.target

    [Service]
    User=pixicache
    EnvironmentFile=-/etc/pixicache/serve.env     # PIXICACHE_SERVE_TOKEN=...
    ExecStart=/opt/pixicache/bin/pixicache serve --host 0.0.0.0 --port 8080 \
        --cache-dir /srv/pixicache --max-size 500G --config /etc/pixicache/serve.toml
    KillSignal=SIGTERM
    TimeoutStopSec=60
    Restart=on-failure
    LimitNOFILE=65536

    [Install]
    WantedBy=multi-user.target

Library use::

    from pixicache.serve import ServeConfig, Upstream, start_background

    cfg = ServeConfig(cache_dir="/tmp/store", port=0,
                      upstreams=[Upstream.make("conda-forge", "http://127.0.0.1:9000/conda-forge")])
    with start_background(cfg) as srv:
        print(srv.url)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pixicache.serve.config import ServeConfig, Upstream, load_config

if TYPE_CHECKING:
    from pixicache.serve.runner import ServeHandle, ServeServer, run_server, start_background

_LAZY = frozenset({"ServeHandle", "ServeServer", "run_server", "start_background"})


def __getattr__(name: str) -> Any:
    # aiohttp (the optional ``serve`` extra) is imported only when a server is
    # started, so ``pixicache --help`` stays fast and works without it.
    if name in _LAZY:
        from pixicache.serve import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ServeConfig",
    "ServeHandle",
    "ServeServer",
    "Upstream",
    "load_config",
    "run_server",
    "start_background",
]
