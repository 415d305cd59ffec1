"""The bpexp-train console script: shell completion answered without importing torch or MLflow.

At every TAB, bash runs `bpexp-train -sc query=bash` with the command line in $COMP_LINE. Through
bpexp.train that costs its imports (torch, MLflow: about 4 s); here it costs Hydra and the schemas. The
answer is Hydra's own bash completion over the same config files, except for keys whose schema type is an
enum or a bool: those are offered by value name (`model.activation=tanh`, all nine), where Hydra offers
only the current value as Python prints it (`model.activation=Activation.relu`). Every other command,
`-sc install=bash` included, goes on to bpexp.train.cli.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path

CONF = str(Path(__file__).resolve().parents[1] / "conf")  # the config_path of bpexp.train.main


def main() -> None:
    if is_bash_query(sys.argv[1:]):
        print(" ".join(complete(os.environ.get("COMP_LINE", ""))))
        return
    from bpexp.train import cli

    cli()


def is_bash_query(args: list[str]) -> bool:
    return bool({"-sc", "--shell-completion"} & set(args)) and "query=bash" in args


def complete(line: str) -> list[str]:
    """What bash may offer for the last word of `line` (a whole command line: `bpexp-train model.de`)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.bash_completion import BashCompletion
    from hydra._internal.utils import create_config_search_path

    import bpexp.config  # noqa: F401  (registers the schemas the YAML files extend)

    args = BashCompletion.strip_python_or_app_name(line)
    word = "" if not args or args[-1] == " " else args.split()[-1]
    key, equals, typed = word.lstrip("+~").partition("=")
    values = value_names(key) if equals else None
    if values is not None:
        return sorted(f"{word[: len(word) - len(typed)]}{v}" for v in values if v.startswith(typed))
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(f"file://{CONF}"))
    return BashCompletion(loader)._query(config_name="train", line=args)


def value_names(key: str) -> list[str] | None:
    """The values a dotted key of the schema can take when they form a closed set (enum, bool), else None."""
    from bpexp.config import schema_keys

    kind = schema_keys().get(key)
    if isinstance(kind, type) and issubclass(kind, Enum):
        return [member.name for member in kind]
    if kind is bool:
        return ["true", "false"]
    return None
