"""What every command of the project shares at its edge: Hydra's own errors as one line and exit status 2.

Imported by every stage's commands (preprocess, pipeline, train); preprocess is the package they all build on.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import HydraException

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT


def one_line(err: BaseException) -> str:
    """An exception and its cause as one line (Hydra's and OmegaConf's messages span several)."""
    text = " ".join(str(err).split(" Config search path:")[0].split())
    cause = err.__cause__
    if cause is not None and str(cause):
        text += f" ({str(cause).strip().splitlines()[0]})"
    return text


def run_cli(hydra_main: Callable[[], Any]) -> None:
    """Run a ``@hydra.main`` function so that Hydra's own errors (unknown key, bad override) are one line, exit 2,
    and a Ctrl-C that the command does not handle itself is one line, exit 130."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # makes Hydra raise them instead of printing a stack
    try:
        hydra_main()
    except HydraException as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
