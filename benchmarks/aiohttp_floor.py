#!/usr/bin/env python3
"""The reference for pixicache's hits: the least an aiohttp server does to send a file.

``python benchmarks/aiohttp_floor.py ROOT PORT`` serves the files under ROOT on
127.0.0.1:PORT with aiohttp's low-level server (the one ``pixicache serve`` uses) and
a handler that opens the file, sends its headers and its body by ``sendfile(2)``: no
validation, no metrics, no ranges. ``benchmarks/serve.py`` measures it beside
pixicache and nginx, so the hits table shows how much of pixicache's distance to
nginx is the framework's and how much its own.
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web


async def _handler(request: web.BaseRequest) -> web.StreamResponse:
    path = os.path.join(ROOT, request.path.lstrip("/"))
    fd = os.open(path, os.O_RDONLY)
    with os.fdopen(fd, "rb", buffering=0) as fobj:
        size = os.fstat(fd).st_size
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        assert request.transport is not None
        await asyncio.get_running_loop().sendfile(request.transport, fobj, 0, size)
        return resp


async def _main(port: int) -> None:
    runner = web.ServerRunner(web.Server(_handler, access_log=None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print(f"listening on http://127.0.0.1:{port}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ROOT = sys.argv[1]
    asyncio.run(_main(int(sys.argv[2])))
