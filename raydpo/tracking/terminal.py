"""Where raydpo's own lines go (``[stage] ...``, ``warning: ...``, ``error: ...``): the driver's
console when one is active (`raydpo.orchestration.console`), else plain stdout / stderr."""

from __future__ import annotations

import sys
from typing import Callable

Sink = Callable[[str, bool], None]
_sink: Sink | None = None


def echo(line: str, err: bool = False) -> None:
    """Print one of raydpo's own lines (to stderr with ``err``)."""
    if _sink is not None:
        _sink(line, err)
    else:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def set_sink(sink: Sink | None) -> Sink | None:
    """Send `echo` to ``sink`` (None: back to stdout / stderr); returns the one it replaces."""
    global _sink
    previous, _sink = _sink, sink
    return previous
