"""Fake (meta) kernels of the ``deepep_ops::`` ops.

:func:`register` attaches them to the ops (``import deepep_ops`` calls it once
the ops are defined); importing this package registers nothing by itself.
"""

from __future__ import annotations

import functools

import torch

from deepep_ops._torch_compat import install_compile_hooks

from fake_impls.asynchrony import (
    combine_start_fake,
    combine_wait_fake,
    dispatch_exact_start_fake,
    dispatch_exact_wait_fake,
    dispatch_start_fake,
    dispatch_wait_fake,
)
from fake_impls.bucket import token_bucket_fake
from fake_impls.combine import combine_fake, combine_into_fake
from fake_impls.dispatch import dispatch_exact_fake, dispatch_fake
from fake_impls.reduce import weight_and_reduce_fake
from fake_impls.training import cached_dispatch_fake, combine_with_weights_fake

#: op name -> fake kernel.
FAKES = {
    "dispatch": dispatch_fake,
    "dispatch_exact": dispatch_exact_fake,
    "combine": combine_fake,
    "combine_into": combine_into_fake,
    "token_bucket": token_bucket_fake,
    "cached_dispatch": cached_dispatch_fake,
    "combine_with_weights": combine_with_weights_fake,
    "weight_and_reduce": weight_and_reduce_fake,
    "dispatch_start": dispatch_start_fake,
    "dispatch_wait": dispatch_wait_fake,
    "dispatch_exact_start": dispatch_exact_start_fake,
    "dispatch_exact_wait": dispatch_exact_wait_fake,
    "combine_start": combine_start_fake,
    "combine_wait": combine_wait_fake,
}


def _installing_compile_hooks(fake):
    """``fake``, first installing the compile hooks for graphs that hold an EPOpsBuffer
    (:func:`deepep_ops._torch_compat.install_compile_hooks`): a fake kernel runs
    when Dynamo traces, before the graph's cache keys are computed."""

    @functools.wraps(fake)
    def traced(*args, **kwargs):
        install_compile_hooks()
        return fake(*args, **kwargs)

    return traced


def register(lib: torch.library.Library) -> None:
    """Register every fake kernel on ``lib`` (the library that defines the ops)."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"{lib.ns}::{name}", _installing_compile_hooks(fake), lib=lib)
