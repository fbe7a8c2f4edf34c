"""The command line itself: what a misspelt key, an unknown option or a missing setting gets (issue 32, item 5)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from nas.cli import check_overrides
from nas.errors import NasError
from nas.search.runner import run_search
from tests.conftest import HANG_S, compose_cfg, subprocess_env


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ("config", ["trails=8"], "unknown key 'trails': did you mean trials?"),
        ("config", ["+space=mbv3", "train.epoch=1"], "unknown key 'train.epoch': did you mean train.epochs?"),
        ("config", ["data=imagefolder", "data.roots=/x"], "unknown key 'data.roots': did you mean data.root?"),
        ("config", ["+trails=8"], "+trails adds a key that nothing reads: did you mean trials=8?"),
        ("config", ["search/sampler=cmaes"], "search/sampler=cmaes is not one of gp, nsga2, random, tpe; add a file "
         "search/sampler/cmaes.yaml to a config folder (hydra.searchpath) to make it one"),
        ("config", ["data=imagenet"], "data=imagenet is not one of cifar10, cifar100, digits, fashion_mnist, "
         "imagefolder, mnist, svhn"),
        ("retrain_app", ["selct=best"], "unknown key 'selct': did you mean select?"),
        ("config", ["zzz=1"], "unknown key 'zzz': it is not a key of the configuration"),
    ],
)  # fmt: skip
def test_a_bad_override_is_one_line_naming_the_closest_keys_or_options(config, overrides, message):
    with pytest.raises(NasError, match=re.escape(message)):
        check_overrides(config, overrides)


def test_good_overrides_and_hydras_own_settings_pass():
    check_overrides("config", ["+space=mbv3", "trials=3", "search/sampler=gp", "search.sampler=random",
                               "++search.hparams={train.dropout: {type: categorical, choices: [0.1]}}",
                               "+search.inject_faults={0: oom}", "data=imagefolder", "data.root=/x"])  # fmt: skip
    check_overrides("config", ["hydra.searchpath=[file:///elsewhere]", "search/sampler=qmc"])  # left to Hydra


def test_the_command_refuses_a_misspelt_key_before_anything_runs(tmp_path):
    """Through the command itself: exit 2, one line, and no search started with the default 20 trials."""
    proc = subprocess.run([sys.executable, "-m", "nas.search", "+space=mbv3", "trails=8"], capture_output=True,
                          text=True, cwd=tmp_path, env=subprocess_env(), timeout=HANG_S)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "error: unknown key 'trails': did you mean trials?\n" and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no outputs/, no Hydra run folder


def test_an_image_folder_without_its_root_is_one_line(in_tmp, tiny_space):
    with pytest.raises(NasError, match=re.escape("data=imagefolder needs the folder of images: add data.root=DIR")):
        run_search(compose_cfg(f"+space={tiny_space}", "data=imagefolder", "trials=1"))
    assert not (in_tmp / "outputs").exists()
