"""Loaded at start-up by every Python process the suite starts (this folder leads $PYTHONPATH,
set by tests/conftest.py): counts what the process pays for (`raydpo_suite_tally`), then runs
the sitecustomize this one shadows (Debian's, for one), so the process is otherwise unchanged."""

import importlib.util
import os
import sys

import raydpo_suite_tally

if os.environ.get(raydpo_suite_tally.ENV):
    raydpo_suite_tally.install()

_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _candidate = os.path.join(_entry or os.getcwd(), "sitecustomize.py")
    if os.path.abspath(os.path.dirname(_candidate)) != _here and os.path.isfile(_candidate):
        _spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", _candidate)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
