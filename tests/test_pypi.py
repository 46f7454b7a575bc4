"""Every entry of a pixi.lock through the cache: PyPI wheels, sdists, paths, md5-only conda.

The packages are real (:mod:`pixicache.testing.mixed`): a venv-style ``python`` over
the test interpreter (so wheels really install into the environment's own
``site-packages``), a conda package, one pinned by md5 alone, a wheel with a console
script, an sdist whose build backend comes from the index, and a project directory.
The index and its file host are two local servers, as PyPI's are; the mirror is a real
``pixicache serve`` in front of them; pip and uv are real clients.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pixicache.serve import ServeConfig, Upstream, start_background
from pixicache.serve.pypi import (
    PEP691_JSON,
    is_distribution,
    parse_html,
    parse_json,
    render_html,
    render_json,
    wants_json,
)
from pixicache.serve.upstreams import UpstreamMap
from pixicache.store import Store
from pixicache.testing import UpstreamServer, current_subdir
from pixicache.testing.locks import LockPackage
from pixicache.testing.mixed import MixedUpstream, build_mixed_upstream

from .helpers import run_pixicache

pytestmark = [
    pytest.mark.skipif(current_subdir() != "linux-64", reason="the channel is built for linux-64"),
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> MixedUpstream:
    return build_mixed_upstream(tmp_path_factory.mktemp("mixed"))


class Upstreams:
    """The conda channel, the PyPI index and its file host, each on its own server."""

    def __init__(self, mixed: MixedUpstream) -> None:
        self.mixed = mixed
        self.conda = UpstreamServer(mixed.channel.root).start()
        self.index = UpstreamServer(mixed.index.root).start()
        self.files = UpstreamServer(mixed.index.root).start()
        mixed.index.set_file_base(self.files.url)

    @property
    def index_url(self) -> str:
        return self.index.url + "/simple"

    def serve_upstreams(self) -> list[Upstream]:
        return [
            Upstream.make("conda-forge", self.conda.channel_url()),
            Upstream.make("pypi", self.index_url),
            Upstream.make("pypi-files", self.files.url + "/packages"),
        ]

    def workspace(self, path: Path, **kw) -> Path:
        self.mixed.write_workspace(
            path,
            index_url=self.index_url,
            files_base=self.files.url,
            conda_base=self.conda.channel_url(),
            **kw,
        )
        return path

    def upstream_requests(self) -> int:
        return sum(s.count() for s in (self.conda, self.index, self.files))

    def upstream_bytes(self) -> int:
        return sum(r.bytes_sent for s in (self.conda, self.index, self.files) for r in s.requests)

    def stop(self) -> None:
        for s in (self.conda, self.index, self.files):
            s.stop()


@pytest.fixture
def ups(mixed):
    u = Upstreams(mixed)
    yield u
    u.stop()


@pytest.fixture
def mirror(ups, tmp_path):
    cfg = ServeConfig(cache_dir=tmp_path / "mirror-store", port=0, upstreams=ups.serve_upstreams())
    with start_background(cfg) as srv:
        yield srv


# -- pages: parsing and rendering (no network) --------------------------------------------


def test_json_and_html_pages_read_the_same_files(mixed, tmp_path):
    mixed.index.set_file_base("http://files.test:81")
    page_url = "http://index.test/simple/hello-wheel/"
    root = mixed.index.root / "simple" / "hello-wheel"
    from_json = parse_json((root / "index.json").read_bytes(), page_url, "hello-wheel")
    from_html = parse_html((root / "index.html").read_bytes(), page_url, "hello-wheel")
    key = [(f.filename, f.url, f.sha256, f.requires_python) for f in from_json.files]
    assert key == [(f.filename, f.url, f.sha256, f.requires_python) for f in from_html.files]
    (f,) = from_json.files
    assert f.url.startswith("http://files.test:81/packages/") and f.sha256 == mixed.files["hello-wheel"].sha256
    # relative links resolve against the page, as clients resolve them
    mixed.index.set_file_base(None)
    rel = parse_html((root / "index.html").read_bytes(), page_url, "hello-wheel")
    assert rel.files[0].url.startswith("http://index.test/packages/")


def test_rendered_pages_point_at_the_mirror_only_for_allow_listed_files():
    ups = UpstreamMap([Upstream.make("pypi-files", "https://files.test/packages")])
    page = parse_json(
        json.dumps(
            {
                "meta": {"api-version": "1.1"},
                "name": "x",
                "files": [
                    {"filename": "x-1-py3-none-any.whl", "url": "https://files.test/packages/a/x-1-py3-none-any.whl",
                     "hashes": {"sha256": "ab" * 32}, "requires-python": ">=3.9", "core-metadata": {"sha256": "cd" * 32}},
                    {"filename": "x-0.tar.gz", "url": "https://elsewhere.test/x-0.tar.gz", "hashes": {}, "yanked": "bad"},
                ],
            }
        ).encode(),
        "https://index.test/simple/x/",
        "x",
    )  # fmt: skip
    body, unmirrored = render_json(page, ups)
    doc = json.loads(body)
    assert unmirrored == 1 and doc["meta"]["api-version"] == "1.1"
    assert doc["files"][0]["url"] == "/pypi-files/a/x-1-py3-none-any.whl"
    assert doc["files"][0]["core-metadata"] == {"sha256": "cd" * 32}
    assert doc["files"][1]["url"] == "https://elsewhere.test/x-0.tar.gz" and doc["files"][1]["yanked"] == "bad"
    html_body, _ = render_html(page, ups)
    text = html_body.decode()
    assert f'href="/pypi-files/a/x-1-py3-none-any.whl#sha256={"ab" * 32}"' in text
    assert 'data-requires-python="&gt;=3.9"' in text and 'data-yanked="bad"' in text


def test_hostile_pages_are_escaped_or_refused():
    ups = UpstreamMap([])
    evil = b'<a href="https://e.test/x-1.tar.gz" data-requires-python="\\"><script>">x-1.tar.gz<script>alert(1)</script></a>'
    page = parse_html(evil, "https://i.test/simple/x/", "x")
    out = render_html(page, ups)[0].decode()
    assert "<script>" not in out
    for bad in (b"[]", b'{"files": 3}', b'{"files": [{"url": "u"}]}', b"{not json"):
        with pytest.raises(ValueError):
            parse_json(bad, "https://i.test/simple/x/", "x")


def test_content_negotiation_follows_pep_691():
    assert wants_json(PEP691_JSON)
    assert wants_json(f"{PEP691_JSON}, text/html;q=0.1")
    assert not wants_json(f"{PEP691_JSON};q=0.1, text/html")
    assert not wants_json(None) and not wants_json("*/*") and not wants_json("text/html")
    assert is_distribution("x-1.0-py3-none-any.whl") and is_distribution("x-1.0.tar.gz")
    assert is_distribution("x-1.0-py3-none-any.whl.metadata") and not is_distribution("index.html")


# -- the mirror ----------------------------------------------------------------------------


def test_the_mirror_serves_project_pages_once_per_ttl_with_links_to_itself(ups, mirror):
    url = f"{mirror.url}/pypi/hello-wheel/"
    as_json = httpx.get(url, headers={"Accept": PEP691_JSON})
    as_html = httpx.get(url, headers={"Accept": "text/html"})
    assert as_json.status_code == as_html.status_code == 200
    assert as_json.headers["content-type"] == PEP691_JSON and "Accept" in as_json.headers["vary"]
    assert as_html.headers["content-type"].startswith("text/html")
    (f,) = as_json.json()["files"]
    assert f["url"].startswith("/pypi-files/") and f["hashes"]["sha256"] == ups.mixed.files["hello-wheel"].sha256
    assert f'href="{f["url"]}#sha256=' in as_html.text
    assert ups.index.count("/simple/hello-wheel/") == 1  # both formats from one upstream page
    # the link works, from the store the second time
    first = httpx.get(mirror.url + f["url"])
    mirror.wait_idle()  # committed (the last byte can reach the client first)
    again = httpx.get(mirror.url + f["url"])
    assert hashlib.sha256(first.content).hexdigest() == f["hashes"]["sha256"] == hashlib.sha256(again.content).hexdigest()
    assert again.headers["x-pixicache-cache"] == "hit" and ups.files.count() == 1
    # PEP 503 names: the normalized page is the one URL
    moved = httpx.get(f"{mirror.url}/pypi/Hello_Wheel/", follow_redirects=False)
    assert moved.status_code == 301 and moved.headers["location"] == "/pypi/hello-wheel/"
    assert httpx.get(f"{mirror.url}/pypi/no-such-project/").status_code == 404


def test_a_file_that_contradicts_its_index_page_is_never_stored_or_served(
    ups, mirror, tmp_path, monkeypatch
):
    page = httpx.get(f"{mirror.url}/pypi/hello-wheel/", headers={"Accept": PEP691_JSON}).json()
    link = page["files"][0]["url"]
    served = ups.mixed.index.root / ups.mixed.files["hello-wheel"].path.lstrip("/")
    good = served.read_bytes()
    bad = good[:-20] + bytes(20)
    try:
        served.write_bytes(bad)
        # no x-expected-sha256: the page's digest decides. The fill streams to the client
        # and withholds the end when the digest is wrong (the transfer is cut short);
        # a second try is a second fill (a fault may be transient)
        for _ in range(2):
            try:
                resp = httpx.get(mirror.url + link)
                assert resp.status_code == 502 and resp.headers["x-pixicache-error"] == "digest"
            except httpx.RemoteProtocolError as exc:
                assert "without sending complete message body" in str(exc)
    finally:
        served.write_bytes(good)
    store = Store(tmp_path / "mirror-store")
    assert not store.has(hashlib.sha256(bad).hexdigest())
    assert ups.files.count(ups.mixed.files["hello-wheel"].path) == 2
    # wrong twice in a row: asked again at once, the refusal is said plainly, and
    # upstream is not asked again
    again = httpx.get(mirror.url + link)
    assert again.status_code == 502 and again.headers["x-pixicache-error"] == "digest"
    assert ups.files.count(ups.mixed.files["hello-wheel"].path) == 2
    # once that is forgotten, the right bytes (upstream has them again)
    import pixicache.serve.fill as fill

    monkeypatch.setattr(fill, "MISMATCH_MEMORY", 0.0)
    fixed = httpx.get(mirror.url + link)
    assert fixed.status_code == 200 and fixed.content == good


def test_pip_downloads_and_builds_through_the_mirror(ups, mirror, tmp_path):
    """pip (PEP 503 HTML) fetches the wheel and the sdist, and the sdist's build backend
    as a build requirement, all through the mirror."""
    out = tmp_path / "dl"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--isolated",
         "-d", str(out), "--index-url", f"{mirror.url}/pypi/", "hello-wheel", "hello-sdist"],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        ups.mixed.files["hello-sdist"].filename,
        ups.mixed.files["hello-wheel"].filename,
    ]
    assert ups.files.count(ups.mixed.files["tinybuild"].path) == 1  # the backend, for the build


def test_uv_installs_through_the_mirror(ups, mirror, tmp_path):
    """uv (PEP 691 JSON) resolves and installs from the mirror's pages and files."""
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not os.access(uv, os.X_OK):
        pytest.skip("uv is not installed (it comes with the test extra)")
    target = tmp_path / "t"
    proc = subprocess.run(
        [uv, "pip", "install", "--no-cache", "--target", str(target), "--python", sys.executable,
         "--index-url", f"{mirror.url}/pypi/", "hello-wheel"],
        capture_output=True, text=True, timeout=300,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("UV_")}, "UV_NO_CONFIG": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (target / "hello_wheel" / "__init__.py").is_file()
    json_requests = [r for r in ups.index.requests if r.path == "/simple/hello-wheel/"]
    assert len(json_requests) == 1


# -- the agent, end to end -----------------------------------------------------------------


def _run(ws: Path, store: Path, *sources: str, task: str = "check") -> subprocess.CompletedProcess[str]:
    args = ["run", "--installer", "rattler", "--manifest", str(ws / "pixi.toml"), "--cache-dir", str(store)]
    for s in sources:
        args += ["--source", s]
    return run_pixicache(*args, task, cwd=ws)


def _site(ws: Path) -> Path:
    v = sys.version_info
    return ws / ".pixi" / "envs" / "default" / "lib" / f"python{v.major}.{v.minor}" / "site-packages"


def _report(ws: Path) -> dict:
    return json.loads((ws / "pixicache-report.json").read_text())


def test_a_mixed_lock_installs_through_a_cold_mirror_and_a_second_workspace_costs_nothing(
    ups, mirror, tmp_path
):
    store = tmp_path / "node-store"
    ws = ups.workspace(tmp_path / "ws1", editable=True)
    first = _run(ws, store, f"mirror={mirror.url}")
    assert first.returncode == 0, first.stderr
    # the task imported the wheel from the environment's own site-packages
    assert str(_site(ws) / "hello_wheel" / "__init__.py") in first.stdout
    site = _site(ws)
    for dist in ("hello_wheel-1.0", "hello_sdist-2.0", "local_pkg-0.1"):
        assert (site / f"{dist}.dist-info" / "INSTALLER").read_bytes() == b"uv-pixi"
        assert (site / f"{dist}.dist-info" / "REQUESTED").exists()
    assert not (site / "hello_wheel-1.0.dist-info" / "direct_url.json").exists()  # an index wheel
    direct = json.loads((site / "local_pkg-0.1.dist-info" / "direct_url.json").read_text())
    assert direct == {"url": (ws / "local-pkg").resolve().as_uri(), "dir_info": {"editable": True}}
    script = ws / ".pixi" / "envs" / "default" / "bin" / "hello-wheel"
    assert script.read_text().startswith(f"#!{ws / '.pixi' / 'envs' / 'default' / 'bin' / 'python'}\n")
    assert "hello from a wheel" in subprocess.run([str(script)], capture_output=True, text=True).stdout
    assert not list(site.rglob("*.pyc"))  # Pixi compiles no bytecode either
    assert (ws / ".pixi/envs/default/share/legacy-data/README").is_file()  # the md5-only package
    conda_requests = ups.conda.count()
    assert ups.files.count(ups.mixed.files["hello-wheel"].path) == 1
    assert ups.files.count(ups.mixed.files["tinybuild"].path) == 1  # the sdist's build backend

    # the same lock again: a no-op, nothing asked of anyone
    before = ups.upstream_requests()
    again = run_pixicache("install", "--installer", "rattler", "--manifest", str(ws / "pixi.toml"),
                          "--cache-dir", str(store), "--source", f"mirror={mirror.url}", cwd=ws)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "already up to date" in again.stderr or "no-op" in json.dumps(_report(ws))

    # a second workspace on the node: every archive and the built sdist from the store
    ws2 = ups.workspace(tmp_path / "ws2")
    second = _run(ws2, store, f"mirror={mirror.url}")
    assert second.returncode == 0, second.stderr
    assert ups.upstream_requests() == before and ups.conda.count() == conda_requests
    report = json.dumps(_report(ws2))
    # the wheel built from hello-sdist for ws1 was reused; only the project directory
    # (a path entry of this workspace) was built
    assert "1 built from sdists (local-pkg)" in report
    assert (_site(ws2) / "hello_sdist" / "__init__.py").is_file()


@pytest.mark.parametrize("chain", ["mirror,upstream", "mirror"])
def test_a_tampered_wheel_is_refused_with_exit_4_and_never_installed(ups, mirror, tmp_path, chain):
    """Through the mirror (which refuses upstream's bytes) and then upstream itself, or
    through the mirror alone (the mirror says so once upstream was wrong twice)."""
    ws = ups.workspace(tmp_path / "ws", with_sdist=False)
    served = ups.mixed.index.root / ups.mixed.files["hello-wheel"].path.lstrip("/")
    good = served.read_bytes()
    served.write_bytes(good[:-20] + bytes(20))
    try:
        sources = [f"mirror={mirror.url}"] + (["upstream"] if "upstream" in chain else [])
        proc = _run(ws, tmp_path / "store", *sources)
    finally:
        served.write_bytes(good)
    assert proc.returncode == 4, proc.stderr
    assert "hello_wheel" in proc.stderr or "hello-wheel" in proc.stderr
    assert not (_site(ws) / "hello_wheel").exists()
    assert "Traceback" not in proc.stderr


def test_a_tampered_md5_only_package_is_refused_with_exit_4(ups, tmp_path):
    ws = ups.workspace(tmp_path / "ws", with_sdist=False)
    pkg = ups.mixed.channel.package("legacy-data")
    good = pkg.path.read_bytes()
    pkg.path.write_bytes(good[:-64] + bytes(64))
    try:
        proc = _run(ws, tmp_path / "store", "upstream")
    finally:
        pkg.path.write_bytes(good)
    assert proc.returncode == 4, proc.stderr
    assert "md5" in proc.stderr and pkg.filename in proc.stderr
    assert not (ws / ".pixi/envs/default/share/legacy-data").exists()


def test_sha256_can_be_required(ups, tmp_path):
    ws = ups.workspace(tmp_path / "ws", with_sdist=False)
    plan = run_pixicache("plan", str(ws / "pixi.lock"), "--no-store")
    assert plan.returncode == 0 and "1 pinned by md5 alone" in plan.stdout
    strict = run_pixicache("plan", "--require-sha256", str(ws / "pixi.lock"), "--no-store")
    assert strict.returncode == 2 and "legacy-data" in strict.stderr and "md5 alone" in strict.stderr
    env = run_pixicache("plan", str(ws / "pixi.lock"), "--no-store", env={"PIXICACHE_REQUIRE_SHA256": "1"})
    assert env.returncode == 2


def test_git_entries_are_refused_by_name_with_the_fix(ups, tmp_path):
    git = "git+https://git.example.org/lab/tool.git?rev=main#5f9c5cbd1fd0b1d7e8e1f2a3b4c5d6e7f8091a2b"
    tool = LockPackage(kind="pypi", url=git, sha256=None, name="tool", version="1.2.0")
    ws = ups.workspace(tmp_path / "ws", with_sdist=False, extra=[tool])
    proc = _run(ws, tmp_path / "store", "upstream")
    assert proc.returncode == 5, proc.stderr
    assert "tool" in proc.stderr and "git" in proc.stderr and "wheel" in proc.stderr


def test_prefetch_warms_pypi_files_and_md5_only_packages_on_the_mirror(ups, mirror, tmp_path):
    ws = ups.workspace(tmp_path / "ws")
    warm = run_pixicache("prefetch", "--to", mirror.url, str(ws / "pixi.lock"))
    assert warm.returncode == 0, warm.stderr
    wheel, sdist = (ups.mixed.files[n] for n in ("hello-wheel", "hello-sdist"))
    assert ups.files.count(wheel.path) == ups.files.count(sdist.path) == 1
    legacy = ups.mixed.channel.package("legacy-data")
    assert ups.conda.count(f"/conda-forge/{legacy.subdir}/{legacy.filename}") == 1
    # a job now costs upstream nothing for any of them
    before = ups.upstream_requests()
    proc = run_pixicache(
        "prefetch", "--cache-dir", str(tmp_path / "node"), "--source", f"mirror={mirror.url}",
        str(ws / "pixi.lock"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert ups.upstream_requests() == before
