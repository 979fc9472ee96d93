"""The ``vllm.general_plugins`` entry point of deepep-ops.

vLLM calls :func:`register` in every process it starts (``load_general_plugins``),
before it builds models or compiles. It registers the ``deepep_ops::`` ops and
their fake kernels, and makes the combine-into pass reachable by name from a
JSON/CLI compilation config::

    {"inductor_passes": {"post_grad_custom_post_pass": "deepep_ops.vllm_combine_into_pass"}}

(vLLM resolves those names as ``__import__(module).__dict__[name]``, i.e. as an
attribute of the top-level package, hence the attribute on ``deepep_ops``.)
Idempotent: calling it again changes nothing.
"""

from __future__ import annotations

import os


def register() -> None:
    import deepep_ops  # registers torch.ops.deepep_ops.* and the fake kernels
    from deepep_ops.vllm.passes import combine_into_pass

    deepep_ops.vllm_combine_into_pass = combine_into_pass
    # Engine hooks, opt-in (deepep_ops/vllm/engine.py): vLLM's deepep_v2 all2all
    # backend through our adapter and buffer.
    if os.environ.get("DEEPEP_OPS_VLLM", "0").strip().lower() in ("1", "true", "yes", "on"):
        from deepep_ops.vllm.engine import install

        install()
