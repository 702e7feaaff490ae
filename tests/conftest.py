"""Test setup: make `tests/` importable (shared reference helpers) and keep JAX on the CPU in float32."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
