"""Pure PyTorch reference backend with DeepEP v2's ``ElasticBuffer`` API."""

from deepep_ops.reference.elastic import EPHandle, ReferenceElasticBuffer, Transfer

__all__ = ["EPHandle", "ReferenceElasticBuffer", "Transfer"]
