"""The YAML reader of :mod:`pixicache.model.lockfile`: PyYAML's safe loader, made strict.

Imported only when a lock is parsed (a warm job reads its parsed lock from the
cache of :meth:`pixicache.model.lockfile.Lock.load_cached` and never imports PyYAML).
"""

from __future__ import annotations

from typing import Any

import yaml

from pixicache.errors import LockError

__all__ = ["load_document"]


def load_document(text: str, path: str) -> Any:
    """The YAML document in ``text`` (``path`` names it in messages).

    Raises:
        LockError: malformed YAML, an alias, a duplicate key or a huge integer.
    """
    try:
        return yaml.load(text, Loader=_LockLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "invalid YAML"
        raise LockError(f"{path}: malformed YAML{where}: {what}") from exc
    except yaml.YAMLError as exc:
        raise LockError(f"{path}: malformed YAML: {exc}") from exc


_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _LockLoader(_BaseLoader):
    """The safe loader (libyaml-backed when available), minus float and date typing,
    and stricter than YAML where a lock must be: no duplicate keys in a mapping (YAML
    would keep the last one silently; rattler refuses them), no aliases (Pixi never
    writes one, and they let a small file stand for a huge document), integers of at
    most 30 digits.

    An unquoted ``version: 1.10`` or ``2024-01-01`` stays the string it is, as
    rattler (which reads into typed string fields) sees it.
    """

    def construct_document(self, node: Any) -> Any:
        seen: set[int] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if id(n) in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, "an alias (*name): pixi locks have none", n.start_mark
                )
            seen.add(id(n))
            if isinstance(n, yaml.MappingNode):
                keys = set()
                for k, v in n.value:
                    if isinstance(k, yaml.ScalarNode):
                        if k.value in keys:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"the key {k.value[:80]!r} appears twice", k.start_mark
                            )
                        keys.add(k.value)
                    stack += [k, v]
            elif isinstance(n, yaml.SequenceNode):
                stack += n.value
        return super().construct_document(node)

    def construct_yaml_int(self, node: Any) -> Any:
        digits = node.value.lstrip("+-").replace("_", "")
        if len(digits) > 30:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(digits)} digits", node.start_mark
            )
        return super().construct_yaml_int(node)

    yaml_implicit_resolvers = {
        first: [
            (tag, regexp)
            for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")
        ]
        for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
    }


_LockLoader.add_constructor("tag:yaml.org,2002:int", _LockLoader.construct_yaml_int)
