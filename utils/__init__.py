"""Shared pieces of the competition kit: one concept per module.

Model scripts (``train_*.py``, ``infer_*.py``) stay flat and readable; what two
of them need lives here once.
"""

__version__ = "0.1.0"
