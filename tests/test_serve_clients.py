"""Who a request is from: the peer, or the X-Forwarded-For client behind a trusted proxy."""

from __future__ import annotations

import pytest

from pixicache.errors import PixicacheError
from pixicache.serve.config import ServeConfig, load_config
from pixicache.serve.http import client_address, parse_networks

SQUID = parse_networks(["10.9.0.5", "192.168.0.0/16", "::1"])


@pytest.mark.parametrize(
    ("remote", "xff", "client"),
    [
        ("10.9.0.5", "172.16.1.1", "172.16.1.1"),  # through the cache
        ("10.9.0.5", "6.6.6.6, 172.16.1.1", "172.16.1.1"),  # a forged left entry is not reached
        ("10.9.0.5", "172.16.1.1, 192.168.3.4", "172.16.1.1"),  # two trusted hops
        ("10.9.0.5", "192.168.3.4", "192.168.3.4"),  # only trusted hops: the farthest
        ("10.9.0.5", "unknown", "10.9.0.5"),  # malformed: stop at the proxy
        ("10.9.0.5", "172.16.1.1, garbage", "10.9.0.5"),
        ("10.9.0.5", None, "10.9.0.5"),
        ("172.16.1.1", "1.2.3.4", "172.16.1.1"),  # not from a trusted proxy: header ignored
        ("::1", "2001:db8::7", "2001:db8::7"),
        (None, None, "?"),
    ],
)
def test_client_address(remote, xff, client):
    assert client_address(remote, xff, SQUID) == client


def test_without_trusted_proxies_the_header_is_ignored():
    assert client_address("127.0.0.1", "10.0.0.1", []) == "127.0.0.1"


def test_trusted_proxies_are_validated_and_read_from_the_config_file(tmp_path):
    with pytest.raises(PixicacheError, match="not an IP address or network"):
        ServeConfig(trusted_proxies=["squid.example.org"])
    conf = tmp_path / "serve.toml"
    conf.write_text('[serve]\ntrusted_proxies = ["10.0.0.0/8"]\n')
    assert load_config(conf, env={}).trusted_proxies == ["10.0.0.0/8"]
    conf.write_text('[serve]\ntrusted_proxies = "10.0.0.0/8"\n')
    with pytest.raises(PixicacheError, match="must be a list"):
        load_config(conf, env={})
