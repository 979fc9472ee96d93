"""Fake (meta) kernels of the ``deepep::`` ops.

Importing this package registers them; ``import deepep_ops`` does so.
"""

from fake_impls import combine, dispatch  # noqa: F401  (registration side effects)
