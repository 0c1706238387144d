"""bench: hyperparameter search and benchmarking harness for deep-learning experiments."""

from __future__ import annotations

__version__ = "0.1.0"
