"""What every command of the project shares at its edge: Hydra's own errors as one line and exit status 2.

Imported by every stage's commands (preprocess, pipeline, train); preprocess is the package they all build on.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from hydra.errors import HydraException

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT
PLUGIN_EXTRAS = {"hydra/sweeper/optuna": "optuna", "hydra/launcher/submitit": "slurm"}  # pyproject's extras
HYDRA_FUNCTION = re.compile(r"^\w+\(")
UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'\.\s+To append to your config use \+")


def one_line(err: BaseException) -> str:
    """An exception and its cause as one line (Hydra's and OmegaConf's messages span several)."""
    text = " ".join(str(err).split()).split(" Config search path:")[0]
    cause = err.__cause__
    if cause is not None and str(cause):
        text += f" ({str(cause).strip().splitlines()[0]})"
    return text


def quote_paths(argv: Sequence[str], keys: Sequence[str]) -> list[str]:
    """The values of ``keys`` quoted for Hydra, so that a path arrives as typed: Hydra's override grammar would read
    ``out=256`` as a number, ``out=true`` as a boolean, an unquoted comma as a sweep, and stops at ``=``, quotes,
    brackets or spaces (train.main's own run folders, ``<key>=<value>,<key>=<value>``, have commas and ``=``).
    Interpolations still work (``hydra.run.dir=runs/${now:%H-%M}``, ``out=${oc.env:SHARDS}``). A value already in
    Hydra's syntax (quoted, a list, ``choice(...)``) is left alone."""
    quoted = []
    for arg in argv:
        key, _, value = arg.partition("=")
        grammar = value.startswith(("'", '"', "[")) or HYDRA_FUNCTION.match(value)
        quoted.append(f"{key}={hydra_quoted(value)}" if key in keys and not grammar else arg)
    return quoted


def hydra_quoted(text: str) -> str:
    """``text`` as a single-quoted Hydra string with the same value: quotes escaped, and the backslashes before them
    (or at the end) doubled, as Hydra's grammar reads an escaped backslash there."""
    text = re.sub(r"(\\+)(?='|$)", r"\1\1", text)
    return "'" + text.replace("'", "\\'") + "'"


def unknown_key_line(key: str) -> str:
    return f"unknown key '{key}': --help lists the keys this command takes"


def hydra_error_line(err: BaseException) -> str:
    """Hydra's error as one line; for an unknown key, that (Hydra advises ``+key=``, which only adds a key that
    nothing reads)."""
    unknown = UNKNOWN_KEY.match(str(err))
    if unknown:
        return unknown_key_line(unknown[1])
    plugin = next((extra for name, extra in PLUGIN_EXTRAS.items() if f"Could not load '{name}" in str(err)), None)
    if plugin:
        return f"{one_line(err).rstrip('.')}: a plugin that is not installed; pip install -e '.[{plugin}]'"
    return one_line(err)


def run_cli(hydra_main: Callable[[], Any], path_keys: Sequence[str] = (), appends: bool = False) -> None:
    """Run a ``@hydra.main`` function so that Hydra's own errors (unknown key, bad override) are one line, exit 2,
    and a Ctrl-C that the command does not handle itself is one line, exit 130. The values of ``path_keys`` are
    taken as typed (``quote_paths``). ``+key=value`` is refused unless ``appends`` (train.main's ``+experiment=``):
    the tools' keys are all in their configs, so an added one is a typo."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # makes Hydra raise them instead of printing a stack
    sys.argv[1:] = quote_paths(sys.argv[1:], path_keys)
    added = [arg[1:].partition("=")[0] for arg in sys.argv[1:] if arg[:1] == "+" and arg[:2] != "++"]  # ++: override
    if added and not appends:
        print(f"error: {unknown_key_line(added[0])}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        hydra_main()
    except HydraException as err:
        print(f"error: {hydra_error_line(err)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
