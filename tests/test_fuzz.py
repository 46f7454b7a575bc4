"""Bounded fuzzing of every reader of untrusted input (hypothesis).

Each reader gets a few hundred generated inputs (``EXAMPLES`` per test, a fixed seed
set by the derandomized profile, so a CI run is reproducible) built around real
documents: a real pixi.lock and manifest with values replaced at random places by
hostile ones (huge, negative, non-finite and mistyped numbers, deep nesting, odd
strings), plus raw byte soup. The property is the same everywhere: the reader either
accepts the input or raises its one documented error — never anything else.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pixicache.errors import LockError, TaskError
from pixicache.httputil import content_range_start, parse_range
from pixicache.model.lockfile import Lock
from pixicache.model.manifest import Manifest
from pixicache.serve.http import HTTPProblem, split_path
from pixicache.serve.pypi import parse_html, parse_json, wants_json

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = 300
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LOCK_DOC = yaml.safe_load((REPO / "tests" / "data" / "locks" / "v6-source-and-local.lock").read_text())
MANIFEST_TEXT = (REPO / "pixi.toml").read_text()

hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.lists(st.integers(), max_size=4),
    st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
    st.just("9" * 40),
    st.just("../../etc/passwd"),
    st.just("\x00\x01\ufffd"),
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _replaced(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if not isinstance(doc, (dict, list)):
        return doc  # an earlier edit replaced what this path went through
    if isinstance(doc, dict):
        return {k: (_replaced(v, rest, value) if k == head else v) for k, v in doc.items()}
    return [(_replaced(v, rest, value) if i == head else v) for i, v in enumerate(doc)]


LOCK_PATHS = _paths(LOCK_DOC)


def _exercise_lock(lock: Lock) -> None:
    for env in lock.environments():
        for plat in lock.platforms(env):
            lock.packages(env, plat)
            lock.artifacts(env, plat)
    lock.artifacts(env=None)


@fuzz
@given(st.lists(st.tuples(st.sampled_from(LOCK_PATHS), hostile), min_size=1, max_size=3))
def test_the_lock_reader_accepts_or_says_why(edits):
    doc = LOCK_DOC
    for path, value in edits:
        doc = _replaced(doc, path, value)
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    try:
        _exercise_lock(Lock.parse(text, "fuzz.lock"))
    except LockError as exc:
        assert str(exc).startswith("fuzz.lock: ")


@fuzz
@given(st.binary(max_size=2000))
def test_the_lock_reader_survives_byte_soup(data):
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    with contextlib.suppress(LockError):
        _exercise_lock(Lock.parse("version: 6\n" + text, "soup.lock"))


def _toml_lines(text: str) -> list[str]:
    return text.splitlines()


MANIFEST_LINES = _toml_lines(MANIFEST_TEXT)
toml_values = st.sampled_from(
    ['"x"', "1", "-1", "1e999", "nan", "inf", "true", "[]", "{}", '["a", 1]', "{ cmd = 3 }",
     '{ depends-on = ["train"] }', "9" * 5000, '"' + "\\u0000" + '"', "1979-05-27T07:32:00Z"]
)  # fmt: skip


@fuzz
@given(st.lists(st.tuples(st.integers(0, len(MANIFEST_LINES) - 1), toml_values), min_size=1, max_size=3))
def test_the_manifest_reader_accepts_or_says_why(edits):
    lines = list(MANIFEST_LINES)
    for index, value in edits:
        key, sep, _ = lines[index].partition("=")
        if sep:
            lines[index] = f"{key}= {value}"
    text = "\n".join(lines) + "\n"
    try:
        m = Manifest.parse(text, "/tmp/fuzz/pixi.toml")
        for env in ["default", *m.environments]:
            for name in m.tasks_for(env):
                with contextlib.suppress(TaskError):
                    m.execution_plan(name, [], env, "linux-64", supported_only=False)
            m.dependencies(env, "linux-64")
            m.system_requirement_tables(env, "linux-64")
    except LockError as exc:
        assert str(exc).startswith("/tmp/fuzz/pixi.toml: ")


@fuzz
@given(st.text(max_size=60), st.integers(0, 10**12))
def test_range_headers_never_raise_and_stay_in_bounds(header, size):
    span = parse_range(header, size)
    if isinstance(span, tuple):
        assert 0 <= span[0] <= span[1] < size
    content_range_start(header)


@fuzz
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=120))
def test_request_paths_are_split_or_refused(target):
    try:
        segments, _ = split_path("/" + target)
    except HTTPProblem as exc:
        assert exc.status in (400, 414)
        return
    assert all(s not in (".", "..") and "/" not in s and "\x00" not in s for s in segments)


@fuzz
@given(st.binary(max_size=3000))
def test_pypi_pages_are_parsed_or_refused(data):
    for parse in (parse_json, parse_html):
        try:
            page = parse(data, "https://index.test/simple/x/", "x")
        except (ValueError, RecursionError):
            continue
        for f in page.files:
            assert isinstance(f.filename, str) and isinstance(f.url, str)


@fuzz
@given(
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20,
    )
)
def test_pep_691_documents_of_any_shape_are_parsed_or_refused(doc):
    for wrapped in (doc, {"files": doc}, {"files": [doc]}, {"files": [{"filename": "x.whl", "url": doc}]}):
        with contextlib.suppress(ValueError):
            parse_json(json.dumps(wrapped).encode(), "https://index.test/simple/x/", "x")
    wants_json(str(doc))
