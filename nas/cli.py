"""What every ``python -m nas.*`` entry point shares: the config folder and clean error exits."""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from nas.errors import NasError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
EXIT_USER_ERROR = 2


def default_tracking_uri() -> str:
    """``mlflow.tracking_uri`` of conf/mlflow/default.yaml: where commands record, and nas.load looks."""
    from omegaconf import OmegaConf

    return str(OmegaConf.load(Path(CONF_DIR) / "mlflow" / "default.yaml").tracking_uri)


def quiet_libraries() -> None:
    """Lightning's and MLflow's info banners drown the one line per trial that matters."""
    # Both configure their loggers on import: set levels after that.
    import lightning.pytorch  # noqa: F401
    import mlflow  # noqa: F401
    import optuna

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars from every artifact download
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported by us, without tracebacks
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "mlflow", "alembic", "onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # nas.retrain logs models as pickle on purpose (pt2 fixes the batch size); MLflow warns about that each time.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="No complete tensor found in the group")
    # MLflow reads type hints on predict as a schema; the serving model states its signature instead.
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")
    # The served model's predict takes images of several kinds, which MLflow's type-hint schema cannot say.
    warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`NasError` into one line on stderr and exit status 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NasError as exc:
            sys.stderr.write(f"error: {exc}\n")  # one write: DDP ranks share the stream, lines must not interleave
            sys.stderr.flush()
            sys.exit(EXIT_USER_ERROR)

    return wrapper


# Command-line words the pre-check leaves to Hydra itself (its own flags and settings, e.g. hydra.searchpath).
HYDRA_OWN = re.compile(r"^(-|hydra\.|\+hydra\.|hydra/)")
ADDED_KEYS = ("space",)  # keys the commands read that no config file defines (+space=NAME)


def _keys(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            yield key
            yield from _keys(v, key)


def _did_you_mean(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    return f"did you mean {' or '.join(close)}?" if close else "it is not a key of the configuration"


def check_overrides(config_name: str, overrides: list[str]) -> None:
    """Compose the configuration the way Hydra will, and turn what Hydra would report as a raw composition
    error into one line with the fix: an unknown key with the closest existing ones, an unknown option of a
    config group with the options there are, and a ``+key`` that adds a key nothing reads but that looks like
    an existing one (Hydra's own advice for a misspelt key, which would silently run with the default)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf import OmegaConf

    if any(HYDRA_OWN.match(o) for o in overrides):
        return
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            groups = [o for o in overrides if "=" in o and "/" in o.split("=", 1)[0]]
            defaults = list(_keys(OmegaConf.to_container(compose(config_name, overrides=groups))))
            compose(config_name, overrides=overrides)
    except MissingConfigException as exc:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        raise NasError(
            f"{group}={option} is not one of {', '.join(exc.options or [])}; add a file {group}/{option}.yaml to a "
            f"config folder (hydra.searchpath) to make it one"
        ) from None
    except OverrideParseException as exc:
        raise NasError(f"cannot read the command line: {str(exc).splitlines()[0]}") from None
    except ConfigCompositionException as exc:
        found = re.search(r"Could not override '([^']+)'", str(exc))
        if found is None:
            raise NasError(f"cannot compose the configuration: {str(exc).splitlines()[0]}") from None
        key = found[1]
        raise NasError(f"unknown key {key!r}: {_did_you_mean(key, defaults)}") from None
    for o in overrides:
        key = o.split("=", 1)[0]
        if key.startswith("+") and not key.startswith("++") and key[1:] not in defaults + list(ADDED_KEYS):
            close = difflib.get_close_matches(key[1:], defaults, n=1, cutoff=0.75)
            if close:
                raise NasError(f"{key} adds a key that nothing reads: did you mean {close[0]}={o.split('=', 1)[1]}?")


def launch(app: Callable[[], Any], config_name: str) -> None:
    """Hydra's app, once the command line's overrides have been checked (one line and exit 2 when not)."""
    try:
        check_overrides(config_name, sys.argv[1:])
    except NasError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(EXIT_USER_ERROR)
    app()
