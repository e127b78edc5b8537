"""Configuration files: a YAML or JSON file read into a dict of :class:`RunConfig` fields.

Config files may spell keys with dashes, as the flags do (``batch-size`` is ``batch_size``).
YAML files are read with YAML 1.2's scalars: ``1e-5`` is a number, only ``true``/``false`` are
booleans (``yes``/``no``/``on``/``off`` are strings, so a boolean field refuses them), dates
are strings, and a key given twice is an error. The values are checked by
:func:`~robustft.recipes.resolve`, not here.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustft._checks import DuplicateKeyError, describe, unique_keys
from robustft.recipes._config_rules import _show

__all__ = ["load_config_file", "text_lines"]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON configuration file into a dict of fields.

    Keys may be written as the fields (``batch_size``) or as the flags (``batch-size``); both
    come back as the field's name. Values are returned as read: :func:`resolve` checks them.
    YAML is read with YAML 1.2's scalars (``1e-5`` is a number; only ``true``/``false`` are
    booleans; dates are strings) and a safe loader (no tags that build objects).

    Args:
        path: the file.

    Returns:
        ``{field: value}`` as written in the file.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: in one line naming the file: a directory or other non-regular file, a
            suffix other than ``.json``/``.yaml``/``.yml``, an unreadable or non-UTF-8 file,
            malformed YAML or JSON (with the line and column), a key given twice (also once
            with dashes and once with underscores), a key that is not text, or a top level
            that is not a mapping.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "run.json"
        >>> _ = p.write_text('{"method": "clipood", "lr": 1e-05, "batch-size": 32}')
        >>> load_config_file(p)
        {'method': 'clipood', 'lr': 1e-05, 'batch_size': 32}
    """
    fn = "load_config_file"
    p = Path(path)
    where = f"{fn}: config file {str(p)!r}"
    if not p.exists():
        raise FileNotFoundError(f"{where} does not exist")
    if p.is_dir():
        raise ValueError(f"{where} is a directory; give a .yaml, .yml or .json file")
    if not p.is_file():
        raise ValueError(f"{where} is not a regular file; give a .yaml, .yml or .json file")
    if p.suffix not in (".json", ".yaml", ".yml"):
        raise ValueError(f"{fn}: config file must end in .json, .yaml or .yml, got {str(p)!r}")
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ValueError(f"{where} cannot be read: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{where} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it "
            "as UTF-8"
        ) from None
    data = _parse_yaml(where, text) if p.suffix != ".json" else _parse_json(where, text)
    if not isinstance(data, dict):
        got = "an empty file" if data is None else describe(data)
        raise ValueError(f"{where} must hold a mapping of fields (key: value), got {got}")
    return _field_keys(where, data)


def _parse_json(where: str, text: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{where} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except DuplicateKeyError as err:
        raise ValueError(
            f"{where} has the key {err.args[0]!r} twice in one object; keep one"
        ) from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a configuration") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ValueError(
            f"{where} is not a usable JSON file: {' '.join(str(err).split())}"
        ) from None


def _parse_yaml(where: str, text: str) -> Any:
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader subclass: no objects
    except yaml.YAMLError as err:
        raise ValueError(f"{where} is not valid YAML: {_yaml_problem(err, text)}") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a configuration") from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise ValueError(
            f"{where} is not a usable YAML file: {' '.join(str(err).split())}"
        ) from None


def _yaml_problem(err: Exception, text: str) -> str:
    """``line L, column C: problem (context)`` of a PyYAML error, in one line."""
    import yaml

    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        column = err.position - text.rfind("\n", 0, err.position)
        return f"line {line}, column {column}: {err.reason} (character #x{err.character:04x})"
    assert isinstance(err, yaml.MarkedYAMLError)  # the loader's other errors
    mark = err.problem_mark or err.context_mark
    problem = err.problem or err.context or "malformed"
    context = f" ({err.context})" if err.context and err.problem else ""
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return " ".join(f"{at}{problem}{context}".split())


@functools.cache
def _yaml_loader() -> type[Any]:
    """PyYAML's SafeLoader with YAML 1.2's booleans and floats, no timestamps, unique keys."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # unhashable: SafeLoader refuses it with its own mark
                    continue
                if seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first on line {first[key]})",
                        key_node.start_mark,
                    )  # fmt: skip
                first[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    replaced = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")
    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag not in replaced]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    float_re = re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", float_re, list("-+0123456789."))
    return Loader


def _field_keys(where: str, data: Mapping[Any, Any]) -> dict[str, Any]:
    """The file's keys as field names (``batch-size`` -> ``batch_size``); unknown keys stay."""
    from robustft.recipes._config import _FIELDS  # here: _config imports this module

    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ValueError(
                f"{where} has a key that is not text, {_show(key)}; the keys are field names "
                "such as batch_size"
            )
        name = key.replace("-", "_")
        name = name if name in _FIELDS else key
        if name in out:
            raise ValueError(
                f"{where} sets {name} twice, as {spelled[name]!r} and {key!r}; keep one"
            )
        out[name], spelled[name] = value, key
    return out


def text_lines(path: Path, name: str, where: str) -> list[str]:
    """The lines of the UTF-8 text file ``path`` (given as ``name``), or an error naming ``where``.

    The one reader of the recipes' line-per-item text files (templates, vocabulary texts).

    Raises:
        ValueError: the file cannot be read or is not UTF-8 text.
    """
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: cannot read {name!r} as UTF-8 text: {err}") from err
