"""Does the lock still satisfy the manifest? A cheap check that warns, never fails.

A job runs what ``pixi.lock`` pins: the manifest's dependencies are not solved
again on a worker. When someone adds a dependency (or tightens a version) in
``pixi.toml`` and forgets to re-lock, the job would silently run the old
environment; :func:`unsatisfied` finds that case and says what to do.

It checks, for one environment and platform, every conda and PyPI dependency the
manifest asks for (the environment's features and matching targets included):

* the package is in the lock (by name; PyPI names normalized as PEP 503 does);
* for a plain version spec (``>=2.7.1,<3``, ``12.9.*``, ``==1.0``, ``!=1.1``,
  alternatives with ``|``), the locked version matches it. Conda version order is
  approximated (numbers compared as numbers, other segments as text); a spec it
  cannot read is not judged, so the check never warns about something it does
  not understand.

Path, git and URL dependencies are checked by name only; virtual packages
(``__cuda``) are the preflight's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pixicache.model.lockfile import Lock
from pixicache.model.manifest import Manifest

__all__ = ["normalize_pypi", "unsatisfied", "version_matches"]

_OP_RE = re.compile(r"^(==|!=|>=|<=|~=|>|<|=)?\s*(.+)$")
_SEG_RE = re.compile(r"\d+|[a-zA-Z]+")


def normalize_pypi(name: str) -> str:
    """PEP 503: lower case, runs of ``-_.`` become ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _key(version: str) -> list[list[Any]] | None:
    """A version's parts (split on ``.``, ``_``, ``-``), each a list of number and
    text runs, as conda's ``VersionOrder`` splits it; ``None`` if it is not a version."""
    v = version.strip().lower()
    if "!" in v:
        epoch, _, v = v.partition("!")
        if not epoch.isdigit():
            return None
    v = v.split("+", 1)[0]
    if not v or not re.match(r"^[0-9a-z._-]+$", v):
        return None
    parts: list[list[Any]] = []
    for part in re.split(r"[._-]", v):
        runs: list[Any] = [int(r) if r.isdigit() else r for r in _SEG_RE.findall(part)]
        parts.append(runs or [0])
    return parts


def _run_order(x: Any) -> tuple[int, Any]:
    """Conda's order of runs: ``dev`` < other text (``a``, ``b``, ``rc``) < numbers < ``post``."""
    if isinstance(x, int):
        return (2, x)
    return {"dev": (0, ""), "post": (3, "")}.get(x, (1, x))


def _cmp(a: list[list[Any]], b: list[list[Any]], prefix: bool = False) -> int:
    """-1, 0 or 1; missing parts and runs count as 0 (so ``1.0 == 1``). With ``prefix``,
    only ``b``'s parts are compared (``1.2.3`` starts with ``1.2``)."""
    n = len(b) if prefix else max(len(a), len(b))
    for i in range(n):
        pa, pb = (a[i] if i < len(a) else [0]), (b[i] if i < len(b) else [0])
        for j in range(max(len(pa), len(pb))):
            ra = _run_order(pa[j] if j < len(pa) else 0)
            rb = _run_order(pb[j] if j < len(pb) else 0)
            if ra != rb:
                return -1 if ra < rb else 1
    return 0


def _clause(version: str, clause: str) -> bool | None:
    """One comparison (``>=1.2``, ``1.2.*``); ``None`` when it cannot be judged."""
    clause = clause.strip()
    if clause in ("", "*"):
        return True
    m = _OP_RE.match(clause)
    if m is None:
        return None
    op, target = m.group(1) or "", m.group(2).strip()
    if target.endswith((".*", "*")):
        if op not in ("", "=", "=="):
            return None
        prefix = _key(target.rstrip("*").rstrip("."))
        have = _key(version)
        if prefix is None or have is None:
            return None
        return _cmp(have, prefix, prefix=True) == 0
    have, want = _key(version), _key(target)
    if have is None or want is None:
        return None
    if op in ("", "="):  # conda's fuzzy "=1.2" and a bare "1.2": 1.2 or 1.2.x
        return _cmp(have, want, prefix=True) == 0
    c = _cmp(have, want)
    if op == "~=":
        return c >= 0 and _cmp(have, want[:-1] if len(want) > 1 else want, prefix=True) == 0
    return {"==": c == 0, "!=": c != 0, ">=": c >= 0, "<=": c <= 0, ">": c > 0, "<": c < 0}[op]


def version_matches(version: str, spec: str) -> bool | None:
    """Whether ``version`` satisfies ``spec`` (``|`` of ``,``-joined clauses);
    ``None`` when the spec is not a plain version spec.

    >>> version_matches("2.7.1", ">=2.7.1,<3")
    True
    >>> version_matches("12.8", "12.9.*")
    False
    >>> version_matches("1.0", "some weird spec") is None
    True
    """
    results = []
    for alternative in spec.split("|"):
        verdicts = [_clause(version, c) for c in alternative.split(",")]
        if any(v is None for v in verdicts):
            return None
        results.append(all(verdicts))
    return any(results)


def _spec_of(value: Any) -> tuple[str | None, bool]:
    """(the version spec, whether only the name can be checked) of a manifest value."""
    if isinstance(value, str):
        return value, False
    if isinstance(value, dict):
        if any(k in value for k in ("path", "git", "url")):
            return None, True
        v = value.get("version")
        return (str(v) if v is not None else "*"), False
    return None, True


def _check(
    kind: str, wanted: dict[str, Any], locked: dict[str, str], where: str
) -> Iterable[str]:
    for name, value in wanted.items():
        key = normalize_pypi(name) if kind == "pypi" else name.lower()
        if key.startswith("__"):
            continue
        spec, name_only = _spec_of(value)
        have = locked.get(key)
        if have is None:
            yield f"the manifest asks for {kind} package {name} ({where}), which the lock does not have"
        elif not name_only and spec is not None and version_matches(have, spec) is False:
            yield (
                f"the manifest asks for {kind} package {name} {spec} ({where}), "
                f"but the lock has {name} {have}"
            )


def unsatisfied(manifest: Manifest, lock: Lock, environment: str, platform: str) -> list[str]:
    """One sentence per dependency of the manifest the lock does not satisfy (see the
    module doc); empty when the lock is in step with the manifest."""
    conda, pypi = manifest.dependencies(environment, platform)
    packages = lock.packages(environment, platform)
    locked_conda = {p.name.lower(): p.version for p in packages if p.kind == "conda"}
    locked_pypi = {normalize_pypi(p.name): p.version for p in packages if p.kind == "pypi" and p.name}
    where = f"environment '{environment}', {platform}"
    return [*_check("conda", conda, locked_conda, where), *_check("pypi", pypi, locked_pypi, where)]
