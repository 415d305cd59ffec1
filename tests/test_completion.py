"""Shell completion through the real bpexp-train console script, as bash calls it at each TAB."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, make_config
from hydra.errors import MissingConfigException

from bpexp.completion import value_names
from bpexp.config import Activation

SCRIPT = Path(sys.executable).parent / "bpexp-train"  # installed by `pip install -e .`


def tab(line: str) -> list[str]:
    """The choices bash gets for the last word of `line`."""
    env = {**cli_env(), "COMP_LINE": line, "COMP_POINT": str(len(line))}
    done = subprocess.run(
        [str(SCRIPT), "-sc", "query=bash"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.slow
def test_enum_keys_offer_every_value_by_name():
    assert tab("bpexp-train model.activation=") == sorted(f"model.activation={a.name}" for a in Activation)
    assert tab("bpexp-train model.depth=8 model.activation=s") == [
        "model.activation=selu",
        "model.activation=sigmoid",
        "model.activation=softplus",
    ]
    assert tab("bpexp-train model.residual=") == ["model.residual=false", "model.residual=true"]


@pytest.mark.slow
def test_groups_and_keys_come_from_the_config_files_without_the_schemas():
    top = tab("bpexp-train ")
    assert {"model=", "optim=", "model.", "seed="} <= set(top)
    assert tab("bpexp-train model=") == ["model=mlp"]
    assert "optim=sgd" in tab("bpexp-train optim=")
    assert "hydra/launcher=joblib" in tab("bpexp-train hydra/launcher=")
    assert "model.activation=" in tab("bpexp-train model.")
    assert not [c for c in top + tab("bpexp-train optim=") if "base_" in c]


def test_the_schemas_are_not_options_of_their_groups():
    with pytest.raises(MissingConfigException, match="Available options in 'model'"):
        make_config("model=base_model")
    assert make_config("model=mlp").model.init.name == "kaiming_normal"  # the YAML still extends the schema


def test_value_names_come_from_the_schema_types():
    assert value_names("model.init") is not None and "lecun_normal" in value_names("model.init")
    assert value_names("device") == ["auto", "cpu", "cuda"]
    assert value_names("model.depth") is None and value_names("model.nope") is None
    assert value_names("nope.activation") is None
