"""serve's upstream allow-list: --upstream adds to the defaults, so Pixi stays served."""

from __future__ import annotations

from pixicache.serve.config import load_config


def test_an_upstream_on_the_command_line_keeps_the_pixi_default():
    cfg = load_config(upstream_specs=["conda-forge=http://127.0.0.1:9/conda-forge"])
    by_name = {u.name: u for u in cfg.upstreams}
    assert by_name["conda-forge"].url == "http://127.0.0.1:9/conda-forge"
    assert by_name["pixi"].url == "https://github.com/prefix-dev/pixi/releases/download"


def test_only_upstreams_drops_the_defaults(tmp_path):
    cfg = load_config(upstream_specs=["bioconda=http://127.0.0.1:9/bioconda"], only_upstreams=True)
    assert [u.name for u in cfg.upstreams] == ["bioconda"]
    toml = tmp_path / "serve.toml"
    toml.write_text('[serve]\nonly_upstreams = true\n[serve.upstreams]\nx = "http://127.0.0.1:9/x"\n')
    assert [u.name for u in load_config(toml).upstreams] == ["x"]


def test_file_upstreams_are_added_to_the_defaults(tmp_path):
    toml = tmp_path / "serve.toml"
    toml.write_text('[serve.upstreams]\nbioconda = "http://127.0.0.1:9/bioconda"\n')
    assert {u.name for u in load_config(toml).upstreams} == {"conda-forge", "pixi", "bioconda"}
