"""A verified Pixi binary: fetched as a pinned artifact, unpacked, smoke-run.

:func:`obtain_pixi` is the whole path from the pin table to a runnable binary:

1. the pin for this platform (:func:`~pixicache.backends.pixi.pins.find_pin`; an
   unknown platform is a :class:`~pixicache.errors.ConfigError`);
2. the archive fetched through the ordinary source chain (node store →
   mirror → upstream) and verified against the pin's SHA-256 by the store; a
   wrong archive is a :class:`~pixicache.errors.PixiVerificationError` and
   nothing is unpacked;
3. the archive must hold exactly one regular file, ``pixi`` (no other member,
   no link, no absolute or ``..`` path); it is unpacked into a temporary
   directory beside its final place, made executable and smoke-run
   (``pixi --version`` must report the pinned version);
4. only then is the directory renamed into place, atomically::

       <store>/pixi/<version>/<target>/pixi          the binary (0755)
       <store>/pixi/<version>/<target>/record.json   what was verified

``record.json`` holds the SHA-256 of the *binary* extracted from the pinned
archive. It is what :func:`verify_pixi_executable` compares a Pixi found on
``PATH`` (or given by ``--pixi``) against: such a binary is used only if its
digest is that of a binary from a pinned archive — or if the user says
``--trust-pixi`` (logged as a warning). A record counts only while its
archive digest is still pinned, so removing a pin from the table revokes it.

Later calls find the binary in place and re-hash it (tens of milliseconds)
instead of running it again; a binary that no longer matches its record is
replaced.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from pixicache.backends.pixi.pins import PixiPin, find_pin, load_pins, this_target
from pixicache.errors import ConfigError, IntegrityError, PixiVerificationError
from pixicache.store import hash_file
from pixicache.store.locking import FileLock

if TYPE_CHECKING:
    import httpx

    from pixicache.sources.base import Source
    from pixicache.store import Store

__all__ = [
    "MAX_BINARY_BYTES",
    "VerifiedPixi",
    "binary_path",
    "find_pixi_on_path",
    "known_binaries",
    "locate_pixi",
    "obtain_pixi",
    "pixi_version_of",
    "verify_pixi_executable",
]

def _log() -> Any:
    import logging  # only when there is something to say (start-up time)

    return logging.getLogger("pixicache.backends.pixi")

MAX_BINARY_BYTES = 1 << 30
"""A ``pixi`` member larger than this (1 GiB) is refused (Pixi is ~50 MiB)."""

SMOKE_TIMEOUT = 60.0
"""Seconds ``pixi --version`` may take."""

_VERSION_RE = re.compile(r"\bpixi\s+v?(\d+(?:\.\d+)*(?:[-+.][0-9A-Za-z.+-]+)?)", re.IGNORECASE)
_RECORD = "record.json"


@dataclass(frozen=True)
class VerifiedPixi:
    """A Pixi executable that may be run.

    Attributes:
        path: the executable.
        version: the version it reports (and, for ``source="pin"``, the pinned one).
        sha256: the SHA-256 of the executable itself.
        source: ``"pin"`` (its digest is that of a binary from a pinned,
            verified archive) or ``"trusted"`` (``--trust-pixi``: not verified).
        archive_sha256: the pinned archive it came from (``None`` when trusted).
    """

    path: Path
    version: str
    sha256: str
    source: str
    archive_sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (used in the run report)."""
        return {
            "path": str(self.path),
            "version": self.version,
            "sha256": self.sha256,
            "source": self.source,
            "archive_sha256": self.archive_sha256,
        }


# -- locations ------------------------------------------------------------------------------


def _pixi_root(store: Store) -> Path:
    """Verified Pixi binaries: in this user's own area of a shared store (a binary
    another user unpacked is never run)."""
    return store.user_dir / "pixi"


def binary_path(store: Store, version: str, target: str) -> Path:
    """Where the verified binary of ``version`` for ``target`` lives in ``store``."""
    return _pixi_root(store) / version / target / "pixi"


def find_pixi_on_path() -> Path | None:
    """The ``pixi`` that ``PATH`` names, if any (not verified)."""
    found = shutil.which("pixi")
    return Path(found).absolute() if found else None


# -- records --------------------------------------------------------------------------------


def _read_record(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / _RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def known_binaries(store: Store, config: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Binary SHA-256 → record, for every binary this store unpacked from an
    archive that is pinned *now* (a record whose pin was removed does not count)."""
    pins, _ = load_pins(config)
    pinned = {(p.version, p.target): p.sha256 for p in pins}
    out: dict[str, dict[str, Any]] = {}
    root = _pixi_root(store)
    if not root.is_dir():
        return out
    for record_file in sorted(root.glob(f"*/*/{_RECORD}")):
        rec = _read_record(record_file.parent)
        if not rec:
            continue
        key = (str(rec.get("version")), str(rec.get("target")))
        if pinned.get(key) != rec.get("archive_sha256"):
            continue
        sha = str(rec.get("binary_sha256", ""))
        if sha:
            out[sha] = rec
    return out


# -- running --------------------------------------------------------------------------------


def pixi_version_of(path: str | os.PathLike[str]) -> str:
    """Run ``path --version`` and return the version it reports.

    Raises:
        PixiVerificationError: it cannot be run, fails, or prints no version.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXI_")}
    env["NO_COLOR"] = "1"
    try:
        proc = subprocess.run(
            [os.fspath(path), "--version"],
            capture_output=True,
            text=True,
            timeout=SMOKE_TIMEOUT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise PixiVerificationError(
            f"{path}: `pixi --version` did not finish in {SMOKE_TIMEOUT:g} s"
        ) from None
    except OSError as exc:
        raise PixiVerificationError(
            f"{path}: cannot run it ({exc.strerror or exc}); is it a Pixi build for this "
            f"machine ({this_target()})?"
        ) from None
    text = (proc.stdout or "") + "\n" + (proc.stderr or "")
    match = _VERSION_RE.search(proc.stdout or "") or _VERSION_RE.search(text)
    if proc.returncode != 0 or match is None:
        said = text.strip().splitlines()[:3]
        raise PixiVerificationError(
            f"{path}: `pixi --version` exited {proc.returncode} and printed "
            f"{' / '.join(said) or 'nothing'}; expected 'pixi X.Y.Z'"
        )
    return match.group(1)


# -- obtaining ------------------------------------------------------------------------------


def _pin_for(version: str | None, config: dict[str, Any] | None) -> PixiPin:
    target = this_target()  # ConfigError on a platform Pixi has no build for
    pin = find_pin(version, target, config=config)
    if pin is not None:
        return pin
    pins, default = load_pins(config)
    wanted = version or default
    here = sorted(p.version for p in pins if p.target == target)
    raise ConfigError(
        f"no Pixi pin for version {wanted} on {target} (pinned versions for this target: "
        f"{', '.join(here) or 'none'}); a site adds pins with a TOML file named by "
        "PIXICACHE_PIXI_PINS or [[pixi.pin]] entries in the config file "
        "(see `pixicache pixi pins`)"
    )


def _check_binary(directory: Path, pin: PixiPin) -> str | None:
    """The binary's digest if ``directory`` holds a good unpacking of ``pin``."""
    rec = _read_record(directory)
    binary = directory / "pixi"
    if not rec or rec.get("archive_sha256") != pin.sha256 or not binary.is_file():
        return None
    try:
        actual = hash_file(binary)
    except OSError:
        return None
    if actual != rec.get("binary_sha256") or not os.access(binary, os.X_OK):
        return None
    return actual


def _unpack(archive: Path, pin: PixiPin, dest_dir: Path) -> tuple[str, int]:
    """Extract the single ``pixi`` member of ``archive`` into ``dest_dir/pixi``.

    Returns the binary's SHA-256 and size. Raises :class:`PixiVerificationError`
    for anything but one regular file called ``pixi``.
    """
    import tarfile  # only when a Pixi archive is unpacked (start-up time)

    where = f"the pinned Pixi archive {pin.archive} (sha256 {pin.sha256})"
    try:
        tf = tarfile.open(archive, "r:*")  # noqa: SIM115 - closed by the `with` below
    except (tarfile.TarError, OSError) as exc:
        raise PixiVerificationError(f"{where} is not a readable tar archive: {exc}") from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise PixiVerificationError(f"{where} is corrupt: {exc}") from None
        names = [m.name for m in members]
        if len(members) != 1:
            raise PixiVerificationError(
                f"{where} must hold exactly one file, `pixi`; it holds {len(members)}: "
                f"{', '.join(names[:10]) or 'nothing'}"
            )
        member = members[0]
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise PixiVerificationError(f"{where}: refusing the unsafe member path {member.name!r}")
        if member.issym() or member.islnk():
            raise PixiVerificationError(f"{where}: refusing the link {member.name!r}")
        if not member.isreg():
            raise PixiVerificationError(f"{where}: {member.name!r} is not a regular file")
        if [p for p in path.parts if p != "."] != ["pixi"]:
            raise PixiVerificationError(f"{where}: expected the file `pixi`, found {member.name!r}")
        if member.size > MAX_BINARY_BYTES:
            raise PixiVerificationError(f"{where}: `pixi` is {member.size} bytes, too large")
        src = tf.extractfile(member)
        if src is None:  # pragma: no cover - isreg() members always have data
            raise PixiVerificationError(f"{where}: cannot read `pixi`")
        h = hashlib.sha256()
        size = 0
        out_path = dest_dir / "pixi"
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        with src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(out_path, 0o755)
    return h.hexdigest(), size


def obtain_pixi(
    store: Store,
    sources: list[Source],
    *,
    version: str | None = None,
    config: dict[str, Any] | None = None,
    client: httpx.Client | None = None,
) -> VerifiedPixi:
    """The pinned Pixi for this machine, verified and ready to run.

    Args:
        store: the node store (the archive goes into its CAS, the binary under
            ``<store>/pixi/<version>/<target>/``).
        sources: the source chain the archive is fetched through when the
            store does not have it.
        version: the Pixi version (default: the pin table's default version).
        config: the parsed pixicache config file (its ``[[pixi.pin]]`` entries).
        client: an httpx client for the fetch (one is made otherwise).

    Raises:
        ConfigError: no Pixi build is pinned for this platform / version.
        FetchError: the archive could not be fetched from any source.
        PixiVerificationError: the archive does not match its pin, does not
            hold exactly the file ``pixi``, or the binary does not report the
            pinned version.
    """
    from pixicache.fetch import Fetcher

    pin = _pin_for(version, config)
    final_dir = binary_path(store, pin.version, pin.target).parent
    binary_sha = _check_binary(final_dir, pin)
    if binary_sha is not None:
        return VerifiedPixi(final_dir / "pixi", pin.version, binary_sha, "pin", pin.sha256)

    try:
        Fetcher(store, sources, jobs=1, client=client).fetch_one(pin.artifact())
    except IntegrityError as exc:
        raise PixiVerificationError(
            f"the Pixi {pin.version} archive for {pin.target} does not match its pin "
            f"(expected sha256 {pin.sha256}): {exc}",
            expected=pin.sha256,
            actual=exc.actual,
        ) from exc

    final_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(store.lock_dir / f"pixi-{pin.version}-{pin.target}.lock"):
        binary_sha = _check_binary(final_dir, pin)  # another process may have finished
        if binary_sha is not None:
            return VerifiedPixi(final_dir / "pixi", pin.version, binary_sha, "pin", pin.sha256)
        import tempfile  # only when a Pixi is unpacked (start-up time)

        tmp = Path(tempfile.mkdtemp(prefix=f".{pin.target}.", dir=final_dir.parent))
        try:
            with store.pin(pin.sha256) as archive:
                binary_sha, size = _unpack(archive, pin, tmp)
            reported = pixi_version_of(tmp / "pixi")
            if reported != pin.version:
                raise PixiVerificationError(
                    f"the binary in the pinned archive {pin.archive} reports version "
                    f"{reported}, but the pin is for {pin.version}: the pin table is wrong "
                    "(fix the pin's version or sha256)",
                    expected=pin.version,
                    actual=reported,
                )
            record = {
                "version": pin.version,
                "target": pin.target,
                "archive_sha256": pin.sha256,
                "archive_url": pin.url,
                "binary_sha256": binary_sha,
                "binary_size": size,
                "verified_at": time.time(),
            }
            (tmp / _RECORD).write_text(json.dumps(record, indent=2) + "\n")
            os.chmod(tmp, 0o755)
            _replace_dir(tmp, final_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _log().info("verified pixi %s (%s) at %s", pin.version, binary_sha, final_dir / "pixi")
    return VerifiedPixi(final_dir / "pixi", pin.version, binary_sha, "pin", pin.sha256)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a stale ``final`` is moved aside first."""
    try:
        os.rename(tmp, final)
        return
    except OSError:
        if not final.exists():
            raise
    stale = final.with_name(f".{final.name}.stale.{os.getpid()}.{time.monotonic_ns()}")
    os.rename(final, stale)
    os.rename(tmp, final)
    shutil.rmtree(stale, ignore_errors=True)


# -- verifying a given binary -----------------------------------------------------------------


def verify_pixi_executable(
    path: str | os.PathLike[str],
    *,
    store: Store | None = None,
    trust: bool = False,
    sources: list[Source] | None = None,
    config: dict[str, Any] | None = None,
    client: httpx.Client | None = None,
) -> VerifiedPixi:
    """Check that ``path`` is a Pixi binary from a pinned archive.

    The executable's SHA-256 must equal the digest of a binary that
    :func:`obtain_pixi` unpacked from a pinned archive into ``store``. When no
    such record exists yet and ``sources`` is given, the default version's
    pinned archive is obtained first to learn it. The binary is not run before
    it matches.

    Args:
        path: the executable (from ``PATH`` or ``--pixi``).
        store: the node store holding the verified-binary records.
        trust: ``--trust-pixi``: accept it unverified (logged as a warning);
            it is then run once to learn its version.
        sources: where to fetch the pinned archive if no record is known.
        config: the parsed config file (extra pins).
        client: an httpx client for that fetch.

    Raises:
        PixiVerificationError: the digest matches no pinned binary (the
            message names the actual digest and the expected ones), or the
            file cannot be read.
    """
    exe = Path(path).expanduser().absolute()
    try:
        actual = hash_file(exe)
    except OSError as exc:
        raise PixiVerificationError(
            f"cannot read the Pixi executable {exe}: {exc.strerror}"
        ) from None
    if trust:
        version = pixi_version_of(exe)
        _log().warning(
            "using the UNVERIFIED Pixi %s at %s (sha256 %s) because --trust-pixi says so",
            version,
            exe,
            actual,
        )
        return VerifiedPixi(exe, version, actual, "trusted", None)
    if store is None:
        raise PixiVerificationError(
            f"cannot verify {exe} (sha256 {actual}) without a store of verified Pixi "
            "binaries; run `pixicache pixi fetch`, or pass --trust-pixi to use it unverified",
            actual=actual,
        )
    known = known_binaries(store, config)
    if actual not in known and sources is not None:
        # learn the default version's binary digest (a no-op when already unpacked)
        obtain_pixi(store, sources, config=config, client=client)
        known = known_binaries(store, config)
    rec = known.get(actual)
    if rec is None:
        expected = (
            "; ".join(
                f"{sha} (pixi {r['version']} {r['target']}, from archive {r['archive_sha256']})"
                for sha, r in sorted(known.items(), key=lambda kv: str(kv[1].get("version")))
            )
            or "none known yet: run `pixicache pixi fetch` to verify the pinned archive"
        )
        raise PixiVerificationError(
            f"the Pixi executable {exe} has SHA-256 {actual}, which is not the binary of any "
            f"pinned Pixi archive (expected one of: {expected}). Use the pinned Pixi "
            "(`pixicache pixi fetch`), add a pin for this build (`pixicache pixi pins`), or "
            "pass --trust-pixi PATH to use it unverified",
            expected=",".join(known),
            actual=actual,
        )
    return VerifiedPixi(exe, str(rec["version"]), actual, "pin", str(rec["archive_sha256"]))


def locate_pixi(
    store: Store,
    sources: list[Source] | None = None,
    *,
    pixi: str | os.PathLike[str] | None = None,
    trust_pixi: str | os.PathLike[str] | None = None,
    use_path: bool = True,
    fetch: bool = True,
    config: dict[str, Any] | None = None,
    client: httpx.Client | None = None,
) -> tuple[VerifiedPixi | None, str]:
    """Pick the Pixi to use, by the policy of the agent, and say why.

    In order: ``trust_pixi`` (unverified, a warning); ``pixi`` (must verify:
    a mismatch is a hard error); a ``pixi`` on ``PATH`` (used if it verifies,
    skipped with a note otherwise); the pinned binary fetched through
    ``sources`` (if ``fetch``). Returns ``(None, why)`` when none is available.

    Raises:
        PixiVerificationError: ``pixi`` was given and does not verify, or the
            pinned archive does not verify.
    """
    if trust_pixi is not None:
        v = verify_pixi_executable(trust_pixi, trust=True)
        return v, f"--trust-pixi {v.path} (unverified pixi {v.version})"
    if pixi is not None:
        v = verify_pixi_executable(pixi, store=store, sources=sources, config=config, client=client)
        return v, f"--pixi {v.path} (pixi {v.version}, sha256 matches the pin)"
    notes = []
    on_path = find_pixi_on_path() if use_path else None
    if on_path is not None:
        try:
            v = verify_pixi_executable(on_path, store=store, config=config)
            return v, f"pixi {v.version} on PATH at {v.path} (sha256 matches the pin)"
        except PixiVerificationError as exc:
            notes.append(
                f"the pixi on PATH ({on_path}) was not used: sha256 {exc.actual} is not pinned"
            )
    if fetch and sources is not None:
        try:
            v = obtain_pixi(store, sources, config=config, client=client)
        except ConfigError as exc:
            return None, "; ".join([*notes, str(exc)])
        return v, "; ".join([*notes, f"pinned pixi {v.version} from the store ({v.path})"])
    with contextlib.suppress(ConfigError):
        pin = _pin_for(None, config)
        directory = binary_path(store, pin.version, pin.target).parent
        sha = _check_binary(directory, pin)
        if sha is not None:
            v = VerifiedPixi(directory / "pixi", pin.version, sha, "pin", pin.sha256)
            return v, "; ".join([*notes, f"pinned pixi {v.version} from the store ({v.path})"])
    return None, "; ".join([*notes, "no verified Pixi binary is available"])
