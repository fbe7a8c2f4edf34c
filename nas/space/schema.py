"""Search spaces as data: load, validate and describe a space YAML file.

Every value in a space file is either fixed (a scalar) or a list of choices.
Validation happens once, at load time, so a bad file fails before any trial
runs, with a message naming the file, the key and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from nas.errors import NasError
from nas.space.arch import ACTIVATIONS, KERNELS, STRIDES
from nas.space.references import REFERENCE_NAMES

Choices = tuple[Any, ...]


class SpaceError(NasError, ValueError):
    """A search space that cannot be used; the message says where and how to fix it."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


# key -> (check, description of what is allowed)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "channels": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "depth": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "stride": (lambda v: v in STRIDES and _is_int(v), f"one of {', '.join(map(str, STRIDES))}"),
    "kernel": (lambda v: _is_int(v) and v in KERNELS, f"a depthwise kernel size in {{{', '.join(map(str, KERNELS))}}}"),
    "expansion": (lambda v: _is_num(v) and v >= 1, "a number >= 1 (expanded/input channels)"),
    "se": (lambda v: isinstance(v, bool), "true or false"),
    "activation": (lambda v: v in ACTIVATIONS, f"one of {', '.join(ACTIVATIONS)}"),
    "resolution": (lambda v: _is_int(v) and v >= 8, "an integer >= 8 (input pixels)"),
    "width": (lambda v: _is_num(v) and 0 < v <= 4, "a number in (0, 4] (width multiplier)"),
}

_BLOCK_KEYS = ("kernel", "expansion", "se", "activation")
_STAGE_KEYS = ("channels", "stride", "depth", *_BLOCK_KEYS)
_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "stem": ("channels", "stride", "activation"),
    "block": _BLOCK_KEYS,
    "head": ("channels", "activation"),
    "classifier": ("channels",),
}
_TOP_KEYS = ("description", "resolution", "width", "stem", "block", "stages", "head", "classifier", "references")
# No head: pool the last block (MobileNetV1); no classifier: one linear layer on the head (MobileNetV2).
_REQUIRED_TOP = ("resolution", "width", "stem", "stages")
_REFERENCE_KEYS = ("name", "stem_stride", "first_stride2_as_1")


@dataclass(frozen=True)
class StageSpace:
    channels: Choices
    stride: Choices
    depth: Choices
    kernel: Choices
    expansion: Choices
    se: Choices
    activation: Choices


@dataclass(frozen=True)
class ReferenceSpec:
    name: str
    stem_stride: int
    first_stride2_as_1: int


@dataclass(frozen=True)
class Space:
    """A validated search space. ``sample`` lives in :mod:`nas.space.sampling`."""

    name: str
    path: Path | None
    description: str
    resolution: Choices
    width: Choices
    stem_channels: Choices
    stem_stride: Choices
    stem_activation: Choices
    stages: tuple[StageSpace, ...]
    head_channels: Choices
    head_activation: Choices
    classifier_channels: Choices
    references: tuple[ReferenceSpec, ...]

    def sample(self, source: Any) -> Any:
        from nas.space.sampling import sample

        return sample(self, source)

    def extreme(self, which: str = "min") -> Any:
        from nas.space.sampling import extreme

        return extreme(self, which)

    def reference_archs(self) -> dict[str, Any]:
        from nas.space.sampling import reference_archs

        return reference_archs(self)

    @property
    def max_blocks(self) -> int:
        return sum(max(s.depth) for s in self.stages)

    def fingerprint(self) -> str:
        """What the space can produce, whatever its file is called: a study and a latency calibration belong to
        this, not to a name a user may reuse for an edited file."""
        fields = asdict(self)
        for key in ("path", "name", "description"):
            fields.pop(key, None)
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Loader:
    """Validation with a file name and key path in every message."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> SpaceError:
        return SpaceError(f"{self.source}: {key}: {problem}")

    def mapping(self, value: Any, key: str, allowed: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping with keys {', '.join(allowed)}, got {value!r}")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}" if key else str(k), f"unknown key; allowed keys are {', '.join(allowed)}")
        return value

    def choices(self, value: Any, key: str, rule: str) -> Choices:
        check, allowed = _RULES[rule]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise self.fail(key, f"empty choice list; give at least one value ({allowed})")
        for v in values:
            if not check(v):
                raise self.fail(key, f"{v!r} is not allowed; expected {allowed}")
        if len(set(values)) != len(values):
            raise self.fail(key, f"duplicate choices in {values!r}")
        return tuple(float(v) if rule in ("expansion", "width") else v for v in values)

    def required(self, section: Mapping[str, Any], key: str, name: str, path: str) -> Any:
        if name not in section:
            raise self.fail(f"{path}.{name}" if path else name, "missing required key")
        return section[name]

    def section(self, raw: Mapping[str, Any], name: str, required: Sequence[str]) -> dict[str, Choices]:
        sec = self.mapping(raw.get(name, {}), name, _SECTION_KEYS[name])
        out = {}
        for k in _SECTION_KEYS[name]:
            if k in sec:
                out[k] = self.choices(sec[k], f"{name}.{k}", k)
            elif k in required:
                raise self.fail(f"{name}.{k}", "missing required key")
        return out

    def stage(self, raw: Any, index: int, block_defaults: dict[str, Choices]) -> StageSpace:
        key = f"stages[{index}]"
        st = self.mapping(raw, key, _STAGE_KEYS)
        values: dict[str, Choices] = {}
        for k in _STAGE_KEYS:
            if k in st:
                values[k] = self.choices(st[k], f"{key}.{k}", k)
            elif k in block_defaults:
                values[k] = block_defaults[k]
            elif k == "stride":
                values[k] = (1,)
            else:
                where = " (or in the top-level 'block' defaults)" if k in _BLOCK_KEYS else ""
                raise self.fail(f"{key}.{k}", f"missing required key{where}")
        return StageSpace(**values)

    def references(self, raw: Any) -> tuple[ReferenceSpec, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            raise self.fail("references", "expected a list of {name: ..., stem_stride: ..., first_stride2_as_1: ...}")
        refs = []
        for i, item in enumerate(raw):
            key = f"references[{i}]"
            if isinstance(item, str):
                item = {"name": item}
            ref = self.mapping(item, key, _REFERENCE_KEYS)
            name = self.required(ref, key, "name", key)
            if name not in REFERENCE_NAMES:
                raise self.fail(f"{key}.name", f"unknown reference {name!r}; known: {', '.join(REFERENCE_NAMES)}")
            stem_stride = ref.get("stem_stride", 2)
            if stem_stride not in STRIDES or not _is_int(stem_stride):
                raise self.fail(f"{key}.stem_stride", f"{stem_stride!r} is not allowed; expected 1 or 2")
            relax = ref.get("first_stride2_as_1", 0)
            if not _is_int(relax) or relax < 0:
                raise self.fail(f"{key}.first_stride2_as_1", f"{relax!r} is not allowed; expected an integer >= 0")
            refs.append(ReferenceSpec(name=name, stem_stride=stem_stride, first_stride2_as_1=relax))
        return tuple(refs)

    def space(self, raw: Any, name: str, path: Path | None) -> Space:
        top = self.mapping(raw, "", _TOP_KEYS)
        for k in _REQUIRED_TOP:
            if k not in top:
                raise self.fail(k, f"missing required key (a space needs {', '.join(_REQUIRED_TOP)})")
        stem = self.section(top, "stem", ("channels",))
        block_defaults = self.section(top, "block", ()) if "block" in top else {}
        head = self.section(top, "head", ("channels",)) if "head" in top else {}
        classifier = self.section(top, "classifier", ("channels",)) if "classifier" in top else {}
        if classifier and not head:
            raise self.fail(
                "classifier", "a hidden classifier layer needs a head conv: add a 'head' section or drop this one"
            )
        stages_raw = top["stages"]
        if not isinstance(stages_raw, list) or not stages_raw:
            raise self.fail("stages", "expected a non-empty list of stages")
        description = top.get("description", "")
        if not isinstance(description, str):
            raise self.fail("description", "expected a string")
        return Space(
            name=name,
            path=path,
            description=description.strip(),
            resolution=self.choices(top["resolution"], "resolution", "resolution"),
            width=self.choices(top["width"], "width", "width"),
            stem_channels=stem["channels"],
            stem_stride=stem.get("stride", (2,)),
            stem_activation=stem.get("activation", ("hswish",)),
            stages=tuple(self.stage(s, i, block_defaults) for i, s in enumerate(stages_raw)),
            head_channels=head.get("channels", (None,)),
            head_activation=head.get("activation", ("hswish",)) if head else (None,),
            classifier_channels=classifier.get("channels", (None,)),
            references=self.references(top.get("references")),
        )


def space_from_dict(raw: Any, name: str, source: str = "<space>", path: Path | None = None) -> Space:
    """Validate an already-parsed space (e.g. from a config object)."""
    return _Loader(source).space(raw, name, path)


def search_dirs() -> list[Path]:
    """Where named spaces are looked up: $NAS_SPACES_DIR (os.pathsep-separated), ./search_spaces, the project's."""
    dirs = [Path(p) for p in os.environ.get("NAS_SPACES_DIR", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "search_spaces")
    dirs.append(Path(__file__).resolve().parents[2] / "search_spaces")
    seen, unique = set(), []
    for d in dirs:
        r = d.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(d)
    return unique


def list_spaces() -> dict[str, Path]:
    """Every named space that can be loaded, first directory wins."""
    found: dict[str, Path] = {}
    for d in search_dirs():
        if d.is_dir():
            for f in sorted(d.glob("*.yaml")):
                found.setdefault(f.stem, f)
    return found


def resolve_space_path(name_or_path: str | os.PathLike[str]) -> Path:
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise SpaceError(f"space file {text} does not exist")
        return path
    spaces = list_spaces()
    if text not in spaces:
        known = ", ".join(sorted(spaces)) or "none"
        dirs = ", ".join(str(d) for d in search_dirs())
        raise SpaceError(
            f"unknown search space {text!r}; available: {known} (looked in {dirs}). "
            f"Pick one with +space=NAME, or add search_spaces/{text}.yaml"
        )
    return spaces[text]


def load_space(name_or_path: str | os.PathLike[str]) -> Space:
    """Load and validate a space by name (``mbv3``) or by path to a YAML file."""
    path = resolve_space_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpaceError(f"{path}: malformed YAML{where}: {problem}") from None
    except OSError as exc:
        raise SpaceError(f"{path}: cannot read space file: {exc.strerror}") from None
    return space_from_dict(raw, path.stem, str(path), path)


def require_space(cfg: Any) -> Space:
    """The space a command was given with ``+space=NAME``; without one, the message lists what exists."""
    if "space" not in cfg or not cfg.space:
        names = ", ".join(sorted(list_spaces())) or "none found"
        raise SpaceError(f"choose a search space with +space=NAME; available in search_spaces/: {names}")
    return load_space(cfg.space)
