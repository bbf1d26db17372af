"""The console: the run's own `[deca]` progress lines, third-party progress bars off.

transformers draws a "Loading weights" bar for every model load (every phase of
every node in a deployment), and the one-time GGUF conversion draws two more;
datasets draws one per `map`. They bury the lines a person reads. `verbose=true`
brings them back.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator

_state = {"verbose": False}


def note(message: str) -> None:
    """One progress line on stdout (flushed: Flower streams the node's output as it comes)."""
    print(f"[deca] {message}", file=sys.stdout, flush=True)


def set_verbose(verbose: bool) -> None:
    """Third-party bars on (verbose) or off, for this process."""
    import datasets
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    _state["verbose"] = verbose
    if verbose:
        hf_logging.enable_progress_bar()
        datasets.enable_progress_bars()
        hub_utils.enable_progress_bars()
    else:
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        hub_utils.disable_progress_bars()


@contextlib.contextmanager
def quiet_bars() -> Iterator[None]:
    """For libraries that draw tqdm bars without a switch (GGUF conversion): their bars
    go to stderr, so stderr is captured while they run. Logging handlers keep their
    own stream, so warnings still show."""
    if _state["verbose"]:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield
