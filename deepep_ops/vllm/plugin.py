"""The ``vllm.general_plugins`` entry point of deepep-ops.

vLLM calls :func:`register` in every process it starts (``load_general_plugins``),
before it builds models or compiles. It registers the ``deepep_ops::`` ops and
their fake kernels, and makes the combine-into pass reachable by name from a
JSON/CLI compilation config::

    {"inductor_passes": {"post_grad_custom_post_pass": "deepep_ops.vllm_combine_into_pass"}}

(vLLM resolves those names as ``__import__(module).__dict__[name]``, i.e. as an
attribute of the top-level package, hence the attribute on ``deepep_ops``; a
plain ``import deepep_ops.vllm`` sets it too.)

With ``DEEPEP_OPS_VLLM=1`` it installs the engine hooks
(:mod:`deepep_ops.vllm.engine`): vLLM's ``--all2all-backend deepep_v2`` runs
through our adapter, and each process that builds one logs one INFO line
saying so. Without it, where vLLM has no DeepEP v2 prepare/finalize of its own
(CPU, or CUDA without ``deep_ep``) the plugin gives that missing name a
stand-in whose error names the switch, instead of vLLM's ``NameError``;
nothing else changes. Idempotent: calling it again changes nothing.
"""

from __future__ import annotations

import os

#: The opt-in switch for the engine hooks.
ENV_ENGINE = "DEEPEP_OPS_VLLM"


def enabled() -> bool:
    """Whether ``DEEPEP_OPS_VLLM`` asks for the engine hooks."""
    return os.environ.get(ENV_ENGINE, "0").strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    import deepep_ops.vllm  # noqa: F401  (registers torch.ops.deepep_ops.* and deepep_ops.vllm_combine_into_pass)
    from deepep_ops.vllm import engine

    if enabled():
        # vLLM's deepep_v2 all2all backend through our adapter and buffer.
        engine.install()
    else:
        engine.install_hint()
