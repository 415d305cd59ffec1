"""Shared fixtures: the real composed config (shrunk per test) and a fresh SQLite store under tmp_path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from bpexp.config import Config, to_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


@pytest.fixture(autouse=True)
def no_user_store(monkeypatch):
    """Tests never write to a store named by the caller's environment."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def make_config(*overrides: str) -> Config:
    """The real train.yaml, composed with Hydra, shrunk to a few steps unless the overrides say otherwise."""
    small = ["train.steps=6", "probes.every=2", "train.eval_every=3", "model.depth=3", "model.width=16"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_config(compose("train", overrides=[*small, *overrides]))


def cli(*args: str) -> list[str]:
    """The command line a user types: python -m bpexp.train ..."""
    return [sys.executable, "-m", "bpexp.train", *args]


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, "PYTHONUNBUFFERED": "1"}
