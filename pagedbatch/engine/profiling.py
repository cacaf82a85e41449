"""Named profiler ranges around the parts of a step, for `pagedbatch bench --profile`."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

FORWARD = "pagedbatch::forward"  # one model forward (ModelRunner.forward)
ATTENTION = "pagedbatch::attention"  # one layer's paged attention: store, then attend


def marked(label: str) -> AbstractContextManager:
    """A profiler range named `label` while torch.profiler records, else nothing: the
    check costs well under a microsecond, a range several (30 layers a step)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(label)
    return contextlib.nullcontext()
