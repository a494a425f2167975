"""Top-level name of the moment-search API: ``from hero_search import MomentIndex`` (issue 19).

The code lives in the :mod:`search` package; this shim only re-exports it so the short import
documented in the README works from the repository root.
"""
from search import Moment, MomentIndex

__all__ = ["Moment", "MomentIndex"]
