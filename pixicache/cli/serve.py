"""``pixicache serve``: the click command (registered by :mod:`pixicache.cli`)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pixicache.cli.common import missing_extra, require_extras
from pixicache.errors import PixicacheError

UPSTREAM_HELP = (
    "An allow-listed upstream: /NAME/... is fetched from URL/... (repeatable). It is added "
    "to the defaults, conda-forge=https://conda.anaconda.org/conda-forge and "
    "pixi=https://github.com/prefix-dev/pixi/releases/download (one of the same name "
    "replaces it); --only-upstreams drops the defaults."
)


def setup_logging(quiet: bool = False) -> None:
    """One line per request on stderr (``pixicache.serve.access``), plus server events."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name, level in (
        ("pixicache.serve", logging.INFO),
        ("pixicache.serve.access", logging.INFO),
    ):
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING if quiet and name.endswith("access") else level)
        if name == "pixicache.serve":
            logger.addHandler(handler)


@click.command("serve")
@click.option(
    "--host", default=None, help="Address to listen on (default 127.0.0.1; 0.0.0.0: all)."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=None, help="Port (default 8080; 0: any free)."
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The store to serve and fill (default: $PIXICACHE_CACHE_DIR, the config file, else the user cache dir).",
)
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME=URL", help=UPSTREAM_HELP)
@click.option(
    "--only-upstreams",
    is_flag=True,
    default=None,
    help="Serve only the --upstream (and config file) upstreams, without the defaults "
    "conda-forge and pixi.",
)
@click.option(
    "--max-size",
    default=None,
    metavar="SIZE",
    help="Disk budget for blobs, e.g. 500G (LRU eviction).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A TOML file with a [serve] table (see pixicache.serve.config).",
)
@click.option(
    "--token",
    envvar="PIXICACHE_SERVE_TOKEN",
    default=None,
    help="Bearer token for /admin/* and warm-up requests (or $PIXICACHE_SERVE_TOKEN).",
)
@click.option(
    "--repodata-ttl",
    type=float,
    default=None,
    help="Seconds repodata is served before revalidation (60).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=None,
    help="Server processes sharing the port (each takes a connection while it holds no "
    "more than any other) and the store (1; a mirror host of its own: its core count).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=None,
    help="Open connections allowed (1024).",
)
@click.option(
    "--per-client",
    type=click.IntRange(0),
    default=None,
    help="Concurrent requests per client address (256; 0: no cap).",
)
@click.option(
    "--trusted-proxy",
    "trusted_proxies",
    multiple=True,
    metavar="ADDR[/BITS]",
    help="An HTTP cache in front (squid, nginx): its requests count per X-Forwarded-For "
    "client for --per-client and the log. Repeatable.",
)
@click.option("--quiet", is_flag=True, help="Do not log one line per request.")
@click.option(
    "--no-fast-hits",
    "no_fast_hits",
    is_flag=True,
    help="Answer every request through aiohttp's handler (default: repeated plain hits are "
    "answered on a leaner front path, with the same answers).",
)
@click.option(
    "--agent",
    "agent_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Serve this single-file agent (pixicache bundle) at /agent/<file name> for bootstrap.sh.",
)
@click.pass_context
def serve_command(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    cache_dir: Path | None,
    upstreams: tuple[str, ...],
    only_upstreams: bool | None,
    max_size: str | None,
    config_file: Path | None,
    token: str | None,
    repodata_ttl: float | None,
    workers: int | None,
    max_connections: int | None,
    per_client: int | None,
    trusted_proxies: tuple[str, ...],
    quiet: bool,
    no_fast_hits: bool,
    agent_file: Path | None,
) -> None:
    """Run a pull-through, content-addressed conda and PyPI mirror (node cache or site mirror).

    \b
    Clients point a channel at it unchanged:
      pixi:     [mirrors] "https://conda.anaconda.org/conda-forge" = ["http://HOST:8080/conda-forge"]
      pixicache: --source mirror=http://HOST:8080
      pip, uv:  --index-url http://HOST:8080/pypi/   (with --upstream pypi=<index URL>
                and --upstream pypi-files=<file host URL>: no PyPI host is built in)
    Each package is fetched from upstream once, verified against the
    x-expected-sha256 the client sends, and streamed to every waiting client.
    SIGTERM stops it gracefully.
    """
    from pixicache.config import resolve_settings
    from pixicache.serve.config import load_config

    try:
        require_extras("aiohttp", "prometheus_client")
        from pixicache.serve.runner import run_server

        root_obj = ctx.find_root().obj or {}
        chosen_dir = cache_dir or root_obj.get("cache_dir")
        config = load_config(
            config_file,
            upstream_specs=upstreams,
            only_upstreams=only_upstreams,
            host=host,
            port=port,
            max_size=max_size,
            token=token,
            repodata_ttl=repodata_ttl,
            max_connections=max_connections,
            workers=workers,
            per_client=per_client,
            trusted_proxies=list(trusted_proxies) or None,
            log_requests=False if quiet else None,
            fast_hits=False if no_fast_hits else None,
            agent_file=agent_file.absolute() if agent_file else None,
        )
        if chosen_dir is not None:
            config.cache_dir = Path(chosen_dir).expanduser()
        elif config_file is None or "cache_dir" not in _file_keys(config_file):
            config.cache_dir = resolve_settings().cache_dir
        setup_logging(quiet)
        run_server(config)
    except PixicacheError as exc:
        click.echo(f"pixicache: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except ModuleNotFoundError as exc:
        extra = missing_extra(exc)
        if extra is None:
            raise
        click.echo(f"pixicache: error: {extra}", err=True)
        sys.exit(extra.exit_code)
    except OSError as exc:
        click.echo(f"pixicache: error: cannot serve: {exc}", err=True)
        sys.exit(9)


def _file_keys(path: Path) -> set[str]:
    from pixicache.serve.config import settings_from_toml

    return set(settings_from_toml(path))
