"""What every ``python -m nas.*`` entry point shares: the config folder and clean error exits."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable
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

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failed trials are reported by us, without tracebacks
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "mlflow", "alembic", "onnx_ir", "onnxscript"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # nas.retrain logs models as pickle on purpose (pt2 fixes the batch size); MLflow warns about that each time.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="No complete tensor found in the group")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*treespec, LeafSpec.*")


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
