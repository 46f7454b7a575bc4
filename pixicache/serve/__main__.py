"""``python -m pixicache.serve [OPTIONS]``: the ``pixicache serve`` command on its own."""

from __future__ import annotations

from pixicache.cli.serve import serve_command

if __name__ == "__main__":  # pragma: no cover
    serve_command(prog_name="pixicache serve")
