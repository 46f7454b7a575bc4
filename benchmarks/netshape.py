"""A shaped link to an "upstream" host: a network namespace, a veth pair and ``tc tbf``.

::

    with ShapedLink("1gbit") as link:
        proc = link.popen(["nginx", "-c", conf])    # runs inside the upstream namespace
        url = f"http://{link.upstream_ip}:{port}/"  # reached from here through the link

The namespace and the pair are created with unique names and private addresses
(``10.213.<n>.1/30`` here, ``.2`` there) and removed on exit, whatever happened. The
token bucket shapes both directions of the pair (egress of each end), so the upstream's
sends are paced as a WAN link would pace them. netem is not in every kernel; tbf is.
Root only (``ip netns``, ``tc``).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = ["ShapedLink", "shaping_available"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def shaping_available() -> str | None:
    """``None`` when a shaped link can be made here, else why not."""
    if os.geteuid() != 0:
        return "shaping the link needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} is not installed (iproute2)"
    return None


class ShapedLink:
    """An upstream network namespace behind a ``rate``-shaped veth pair (see the module doc).

    Args:
        rate: a tc rate (``1gbit``, ``100mbit``).
        burst: the bucket size (default: 1/100 s of ``rate``, at least 64 KiB).
    """

    def __init__(self, rate: str, burst: str | None = None) -> None:
        self.rate = rate
        self.burst = burst or _burst_for(rate)
        n = os.getpid() % 250 + 1
        self.ns = f"pxc-up-{os.getpid()}"
        self.here, self.there = f"pxh{os.getpid() % 100000}", f"pxt{os.getpid() % 100000}"
        self.local_ip, self.upstream_ip = f"10.213.{n}.1", f"10.213.{n}.2"

    def __enter__(self) -> ShapedLink:
        try:
            _ip("netns", "add", self.ns)
            _ip("link", "add", self.here, "type", "veth", "peer", "name", self.there)
            _ip("link", "set", self.there, "netns", self.ns)
            _ip("addr", "add", f"{self.local_ip}/30", "dev", self.here)
            _ip("link", "set", self.here, "up")
            self.exec(["ip", "addr", "add", f"{self.upstream_ip}/30", "dev", self.there])
            self.exec(["ip", "link", "set", self.there, "up"])
            self.exec(["ip", "link", "set", "lo", "up"])
            tbf = ["root", "tbf", "rate", self.rate, "burst", self.burst, "latency", "50ms"]
            subprocess.run(["tc", "qdisc", "add", "dev", self.here, *tbf], check=True, capture_output=True)
            self.exec(["tc", "qdisc", "add", "dev", self.there, *tbf])
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        _ip("link", "del", self.here, check=False)
        _ip("netns", "del", self.ns, check=False)

    def exec(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], check=True, capture_output=True, text=True, **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kw)

    def run_inside(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a thread that joined the upstream namespace first (``setns``): a
        server it starts listens there, and keeps serving from its own threads."""
        import ctypes
        import threading

        box: dict[str, Any] = {}

        def body() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/var/run/netns/{self.ns}") as fh:
                    if libc.setns(fh.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                        raise OSError(ctypes.get_errno(), "setns into the upstream namespace")
                box["value"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc

        t = threading.Thread(target=body, name="netshape-inside")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["value"]


def _burst_for(rate: str) -> str:
    m = re.match(r"^(\d+(?:\.\d+)?)([kmg]?)bit$", rate.lower())
    if not m:
        return "1mb"
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]
    return f"{max(64 * 1024, int(bits / 8 / 100))}b"
