"""Command-line configs from dataclasses: one flag per field, the field's one-line doc as its `--help`.

    @dataclass
    class Config:
        steps: int = arg(200, "PPO steps (one rollout and one update each)")

    parser = config_parser(Config, "what the script does")   # --steps STEPS  PPO steps (...) (default: 200)

`choices` lists, for a field whose value names an entry of a registry, each name with its one-line doc, so
that `--help` shows what the registry holds now (an entry registered by a fork shows up too).
Used by ppo.py and eval.py.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field


def arg(default, help: str):
    """A config field whose one-line help is the `--help` text."""
    return field(default=default, metadata={"help": help})


def config_parser(config_class, description: str, choices: dict[str, dict[str, str]] | None = None
                  ) -> argparse.ArgumentParser:
    """argparse built from a config dataclass (fields typed as strings, as `from __future__ import annotations`
    leaves them): bool fields become --x/--no-x, `int`/`float` (or `... | None`) are parsed as such, the rest are
    strings. `choices[field] = {name: doc}` appends "one of: name (doc); ..." to that field's help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(config_class):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"]
        if choices and f.name in choices:
            help_text += "; one of: " + "; ".join(f"{name} ({doc})" for name, doc in choices[f.name].items())
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(f.type.removesuffix(" | None"), str)
            parser.add_argument(flag, type=kind, default=f.default, help=help_text)
    return parser
