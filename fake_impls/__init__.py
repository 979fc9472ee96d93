"""Fake (meta) kernels of the ``deepep_ops::`` ops.

Importing this package registers them; ``import deepep_ops`` does so.
"""

from fake_impls import bucket, combine, dispatch  # noqa: F401  (registration side effects)
