"""The ``pixi`` installer and the localhost store view it points Pixi at.

No real Pixi exists here: a stand-in ``pixi`` (a Python script) records the
command line, environment and mirror configuration it was given, downloads
packages through the mirror URLs exactly as Pixi's URL-prefix swap would, and
creates the prefix layout — so the test checks what Pixi would be told and
that the store view serves the verified bytes.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import httpx
import pytest

from pixicache.backends.pixi.binary import VerifiedPixi
from pixicache.backends.pixi.commands import pixi_environment, pixi_install_argv, pixi_run_argv
from pixicache.errors import InstallError
from pixicache.installers.base import Installer, InstallRequest
from pixicache.installers.pixi import PixiInstaller, mirror_config_toml
from pixicache.model.artifact import Artifact
from pixicache.model.lockfile import Lock
from pixicache.store import Store
from pixicache.store.view import StoreView, view_path
from pixicache.testing.locks import LockPackage, write_lock

CF = "https://conda.anaconda.org/conda-forge"
OTHER = "https://repo.example.org:8443/conda-forge"
# PyPI as a lock records it: an index URL, and files on another host (no real host named)
INDEX = "https://index.example.org/simple"
FILES = "https://files.example.net"
WHEEL_URL = f"{FILES}/packages/ab/cd/ef/wheelpkg-1.0-py3-none-any.whl"

STANDIN = r"""#!{python} -S
import hashlib, json, os, sys, tomllib, urllib.error, urllib.request
if sys.argv[1:] == ["--version"]:
    print("pixi 0.79.0")
    sys.exit(0)
argv = sys.argv[1:]
cfg_path = argv[argv.index("--config-file") + 1]
manifest = argv[argv.index("--manifest-path") + 1]
env_name = argv[argv.index("-e") + 1]
with open(cfg_path, "rb") as fh:
    config = tomllib.load(fh)
keep = ("PIXI_CACHE_DIR", "RATTLER_CACHE_DIR", "PIXI_NO_PROGRESS", "NO_PROXY", "no_proxy",
        "PIXI_FROZEN", "PIXI_LOCKED", "PIXI_CONFIG_FILE", "STANDIN_MARK")
record = {{"argv": sys.argv, "cwd": os.getcwd(), "config_text": open(cfg_path).read(),
          "env": {{k: os.environ[k] for k in keep if k in os.environ}}, "fetched": {{}}}}

def mirrored(url):
    for key, urls in config.get("mirrors", {{}}).items():
        if url.startswith(key):
            return urls[0] + url[len(key):]
    return url

for url in filter(None, os.environ.get("STANDIN_FETCH", "").split()):
    target = mirrored(url)
    try:
        with urllib.request.urlopen(target, timeout=10) as resp:
            record["fetched"][url] = [target, resp.status, hashlib.sha256(resp.read()).hexdigest()]
    except urllib.error.HTTPError as exc:
        record["fetched"][url] = [target, exc.code, None]
with open(os.environ["STANDIN_RECORD"], "a") as fh:
    fh.write(json.dumps(record) + "\n")
rc = int(os.environ.get("STANDIN_RC", "0"))
if rc:
    print("Error: x failed to download pkg-1.0-0.conda", file=sys.stderr)
    sys.exit(rc)
if os.environ.get("STANDIN_NO_PREFIX"):
    sys.exit(0)
meta = os.path.join(os.path.dirname(os.path.abspath(manifest)), ".pixi", "envs", env_name, "conda-meta")
os.makedirs(meta, exist_ok=True)
for name in os.environ.get("STANDIN_PACKAGES", "").split():
    path = os.path.join(meta, name + ".json")
    if not os.path.exists(path):
        with open(path, "w") as fh:
            fh.write("{{}}")
"""


def blob(name: str) -> bytes:
    return f"package {name}\n".encode() * 100


class Workspace:
    """A workspace whose lock points at conda-forge (and a second host), with every
    artifact already verified in the node store."""

    def __init__(self, tmp: Path, *, pypi: bool = False) -> None:
        self.tmp = tmp
        self.ws = tmp / "ws"
        self.ws.mkdir()
        self.store = Store(tmp / "store")
        self.pkgs: dict[str, bytes] = {}
        lock_pkgs = []
        for name, base, subdir in (
            ("alpha", CF, "linux-64"),
            ("beta", CF, "noarch"),
            ("gamma", OTHER, "linux-64"),
        ):
            data = blob(name)
            url = f"{base}/{subdir}/{name}-1.0-h0_0.conda"
            self.pkgs[url] = data
            lock_pkgs.append(
                LockPackage(
                    "conda",
                    url,
                    hashlib.sha256(data).hexdigest(),
                    name,
                    "1.0",
                    build="h0_0",
                    size=len(data),
                )
            )
        if pypi:
            data = blob("wheelpkg")
            self.pkgs[WHEEL_URL] = data
            lock_pkgs.append(
                LockPackage("pypi", WHEEL_URL, hashlib.sha256(data).hexdigest(), "wheelpkg", "1.0")
            )
        write_lock(
            self.ws / "pixi.lock",
            {"default": {"linux-64": lock_pkgs}},
            channels=[CF + "/", OTHER + "/"],
            indexes=[INDEX] if pypi else None,
        )
        (self.ws / "pixi.toml").write_text(
            '[workspace]\nname = "t"\nchannels = ["conda-forge"]\nplatforms = ["linux-64"]\n'
        )
        self.lock = Lock.load(self.ws / "pixi.lock")
        for art in self.lock.artifacts("default", "linux-64"):
            src = tmp / art.filename
            src.write_bytes(self.pkgs[art.url])
            self.store.add_file(src, art)
        self.pixi = tmp / "bin" / "pixi"
        self.pixi.parent.mkdir()
        self.pixi.write_text(STANDIN.format(python=sys.executable))
        self.pixi.chmod(0o755)
        self.record = tmp / "record.jsonl"

    def request(self, **kw) -> InstallRequest:
        args = {
            "workspace": self.ws,
            "manifest": self.ws / "pixi.toml",
            "lock": self.lock,
            "environment": "default",
            "platform": "linux-64",
            "prefix": self.ws / ".pixi" / "envs" / "default",
            "store": self.store,
            "package_cache": self.tmp / "pkgs",
            "pixi": self.pixi,
        }
        args.update(kw)
        return InstallRequest(**args)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.record.read_text().splitlines()]


@pytest.fixture
def ws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    w = Workspace(tmp_path)
    monkeypatch.setenv("STANDIN_RECORD", str(w.record))
    monkeypatch.setenv("STANDIN_FETCH", " ".join([*w.pkgs, f"{CF}/noarch/repodata.json"]))
    monkeypatch.setenv("STANDIN_PACKAGES", "alpha-1.0-h0_0 beta-1.0-h0_0 gamma-1.0-h0_0")
    monkeypatch.setenv("PIXI_FROZEN", "false")  # the caller's settings must not leak in
    monkeypatch.setenv("PIXI_LOCKED", "true")
    monkeypatch.setenv("NO_PROXY", "proxy-exempt.example.org")
    monkeypatch.setenv("STANDIN_MARK", "kept")
    return w


def test_pixi_installer_follows_the_protocol():
    assert isinstance(PixiInstaller(), Installer)
    assert PixiInstaller.name == "pixi"


def test_install_runs_pixi_frozen_with_every_channel_mirrored_to_the_store_view(ws):
    result = PixiInstaller().install(ws.request())

    (rec,) = ws.records()
    config_file = rec["argv"][rec["argv"].index("--config-file") + 1]
    assert rec["argv"] == [
        str(ws.pixi),
        "install",
        "--frozen",
        "--manifest-path",
        str(ws.ws / "pixi.toml"),
        "-e",
        "default",
        "--config-file",
        config_file,
    ]
    assert rec["cwd"] == str(ws.ws)
    assert not Path(config_file).exists()  # the temporary config is removed afterwards
    env = rec["env"]
    # Pixi appends pkgs/ itself: it and the rattler installer share <cache>/pkgs
    assert env["PIXI_CACHE_DIR"] == env["RATTLER_CACHE_DIR"] == str(ws.tmp)
    assert env["PIXI_NO_PROGRESS"] == "1"
    assert env["NO_PROXY"] == "proxy-exempt.example.org,127.0.0.1,localhost"
    assert "PIXI_FROZEN" not in env and "PIXI_LOCKED" not in env
    assert env["STANDIN_MARK"] == "kept"

    import tomllib

    mirrors = tomllib.loads(rec["config_text"])["mirrors"]
    assert set(mirrors) == {CF, OTHER}
    view = mirrors[CF][0].rsplit("/conda.anaconda.org/", 1)[0]
    assert view.startswith("http://127.0.0.1:")
    assert mirrors == {
        CF: [f"{view}/conda.anaconda.org/conda-forge"],
        OTHER: [f"{view}/repo.example.org:8443/conda-forge"],
    }
    # every package came from the store view, verified bytes; repodata is not served
    for url, data in ws.pkgs.items():
        target, status, sha = rec["fetched"][url]
        assert target.startswith(view) and status == 200
        assert sha == hashlib.sha256(data).hexdigest()
    assert rec["fetched"][f"{CF}/noarch/repodata.json"][1] == 404

    assert result.installer == "pixi" and result.changed and result.packages == 3
    assert result.prefix == ws.ws / ".pixi" / "envs" / "default"
    assert (result.prefix / "conda-meta" / "alpha-1.0-h0_0.json").exists()
    assert any("404" in n for n in result.notes)  # the repodata request


def test_pypi_index_and_file_host_of_the_lock_are_mirrored_to_the_store_view(
    tmp_path, monkeypatch
):
    """Both PyPI URLs Pixi's configuration reference names (the simple index and the
    file host) are mapped, taken from the lock; the view answers the index's project
    page with the locked file, and the file itself from the store."""
    w = Workspace(tmp_path, pypi=True)
    monkeypatch.setenv("STANDIN_RECORD", str(w.record))
    monkeypatch.setenv("STANDIN_FETCH", f"{WHEEL_URL} {INDEX}/wheelpkg/ {INDEX}/other/")
    monkeypatch.setenv("STANDIN_PACKAGES", "alpha-1.0-h0_0 beta-1.0-h0_0 gamma-1.0-h0_0")
    result = PixiInstaller().install(w.request())
    import tomllib

    (rec,) = w.records()
    mirrors = tomllib.loads(rec["config_text"])["mirrors"]
    assert set(mirrors) == {CF, OTHER, INDEX, FILES}
    view = mirrors[CF][0].rsplit("/conda.anaconda.org/", 1)[0]
    assert mirrors[INDEX] == [f"{view}/index.example.org/simple"]
    assert mirrors[FILES] == [f"{view}/files.example.net"]
    target, status, sha = rec["fetched"][WHEEL_URL]
    assert target == f"{view}/files.example.net/packages/ab/cd/ef/wheelpkg-1.0-py3-none-any.whl"
    assert status == 200 and sha == hashlib.sha256(w.pkgs[WHEEL_URL]).hexdigest()
    page_url, status, _ = rec["fetched"][f"{INDEX}/wheelpkg/"]
    assert page_url == f"{view}/index.example.org/simple/wheelpkg/" and status == 200
    assert rec["fetched"][f"{INDEX}/other/"][1] == 404  # not in the lock: not in the view
    with StoreView(w.store, w.lock.artifacts("default", "linux-64"), indexes=[INDEX]) as v:
        text = httpx.get(f"{v.url}/index.example.org/simple/wheelpkg/").text
        assert f'href="{v.url}/files.example.net/packages/ab/cd/ef/wheelpkg-1.0-py3-none-any.whl#sha256=' in text
        assert httpx.get(f"{v.url}/index.example.org/simple/other/").status_code == 404
    assert any("PyPI mirrored to the node store" in n and FILES in n for n in result.notes)


def test_second_install_of_an_unchanged_lock_reports_no_change(ws, monkeypatch):
    PixiInstaller().install(ws.request())
    monkeypatch.setenv("STANDIN_FETCH", "")
    again = PixiInstaller().install(ws.request())
    assert again.changed is False
    assert again.notes == []


def test_a_failing_pixi_is_an_install_error_with_its_output(ws, monkeypatch):
    monkeypatch.setenv("STANDIN_RC", "3")
    with pytest.raises(InstallError) as err:
        PixiInstaller().install(ws.request())
    text = str(err.value)
    assert "exit code 3" in text and "install --frozen" in text
    assert "failed to download pkg-1.0-0.conda" in text
    assert "repodata.json" in text  # what the store view could not serve
    assert err.value.exit_code == 5


def test_pixi_that_leaves_no_prefix_is_an_install_error(ws, monkeypatch):
    monkeypatch.setenv("STANDIN_NO_PREFIX", "1")
    with pytest.raises(InstallError, match="left no environment"):
        PixiInstaller().install(ws.request())


def test_availability(ws):
    assert PixiInstaller.available(ws.request())[0] is True
    ok, why = PixiInstaller.available(ws.request(pixi=None))
    assert not ok and "pixicache pixi fetch" in why
    ok, why = PixiInstaller.available(ws.request(prefix=ws.tmp / "elsewhere"))
    assert not ok and ".pixi/envs/default" in why
    with pytest.raises(InstallError, match="cannot run"):
        PixiInstaller().install(ws.request(pixi=None))


def test_local_workspace_mirrors_are_reported(ws):
    (ws.ws / ".pixi").mkdir()
    (ws.ws / ".pixi" / "config.toml").write_text('[mirrors]\n"https://x" = ["https://y"]\n')
    result = PixiInstaller().install(ws.request())
    assert any("merges over" in n for n in result.notes)


def test_command_builders():
    v = VerifiedPixi(Path("/s/pixi/0.79.0/t/pixi"), "0.79.0", "a" * 64, "pin", "b" * 64)
    assert pixi_run_argv(v, Path("/w/pixi.toml"), "cuda", "train", ["--epochs", "3"]) == [
        "/s/pixi/0.79.0/t/pixi",
        "run",
        "--frozen",
        "--no-install",
        "--manifest-path",
        "/w/pixi.toml",
        "-e",
        "cuda",
        "train",
        "--epochs",
        "3",
    ]
    assert pixi_install_argv("/p/pixi", "/w/pixi.toml", "default", "/t/c.toml")[1:4] == [
        "install",
        "--frozen",
        "--manifest-path",
    ]
    env = pixi_environment("/cache", {"PIXI_NO_CONFIG": "1", "no_proxy": "127.0.0.1"})
    assert "PIXI_NO_CONFIG" not in env and env["no_proxy"] == "127.0.0.1,localhost"
    text = mirror_config_toml({'https://h/"odd"': ["http://127.0.0.1:1/h/x"]})
    import tomllib

    assert tomllib.loads(text)["mirrors"] == {'https://h/"odd"': ["http://127.0.0.1:1/h/x"]}


# -- the store view on its own -----------------------------------------------------------------


def test_store_view_serves_only_the_given_artifacts_from_the_store(tmp_path):
    store = Store(tmp_path / "store")
    data = b"x" * 5000
    url = f"{CF}/linux-64/pkg-1.0-0.conda"
    art = Artifact(
        url,
        hashlib.sha256(data).hexdigest(),
        len(data),
        "pkg-1.0-0.conda",
        channel=CF,
        subdir="linux-64",
    )
    absent = Artifact(f"{CF}/linux-64/gone-1-0.conda", "0" * 64, 1, "gone-1-0.conda")
    (tmp_path / "f").write_bytes(data)
    store.add_file(tmp_path / "f", art)

    with StoreView(store, [art, absent]) as view:
        base = view.mirrors([CF + "/"])[CF][0]
        assert base == view.url + "/conda.anaconda.org/conda-forge"
        assert view_path(url) == "/conda.anaconda.org/conda-forge/linux-64/pkg-1.0-0.conda"
        with httpx.Client() as c:
            r = c.get(view.url_for(art))
            assert r.status_code == 200 and r.content == data
            assert r.headers["etag"] == f'"{art.sha256}"'
            h = c.head(view.url_for(art))
            assert h.status_code == 200 and h.headers["content-length"] == str(len(data))
            # a client joining URLs differently still finds a unique file name
            assert c.get(f"{view.url}/conda.anaconda.org/linux-64/pkg-1.0-0.conda").content == data
            assert c.get(f"{base}/linux-64/repodata.json").status_code == 404
            assert c.get(f"{base}/linux-64/other-1-0.conda").status_code == 404
            assert c.get(view.url_for(absent)).status_code == 404  # in the lock, not in the store
            wrong = c.get(view.url_for(art), headers={"x-expected-sha256": "f" * 64})
            assert wrong.status_code == 404
            assert c.get(view.url + "/healthz").text == "ok\n"
        assert view.bytes_served == 2 * len(data)
        reasons = [m.reason for m in view.misses]
        assert any("no repodata" in r for r in reasons)
        assert any("not in the store" in r for r in reasons)
        assert any("x-expected-sha256" in r for r in reasons)
    with pytest.raises(RuntimeError):
        _ = view.url
