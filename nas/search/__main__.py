"""``python -m nas.search +space=NAME trials=N``: the latency-constrained architecture search."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from nas.cli import CONF_DIR, launch, quiet_libraries, user_errors


@user_errors
def main(cfg: DictConfig) -> int:
    quiet_libraries()
    from nas.search.runner import run_search

    return run_search(cfg).exit_code


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> None:
    code = main(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    launch(app, "config")
