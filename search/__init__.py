"""Moment search over your own videos with a fine-tuned HERO VCMR model (issue 19).

``from search import MomentIndex, Moment`` (or ``from hero_search import ...``)::

    index = MomentIndex.load("my_index")
    for m in index.search("a man opens the door", top_k=10):
        print(m.rank, m.video, m.start, m.end, m.score, index.subtitles(m.video, m.start, m.end))

An index is built once with ``python scripts/build_index.py`` (see :mod:`search.build`); a query
then only encodes the query text and ranks the stored frame representations, with the same
full-corpus VCMR procedure as ``eval_vcmr.py`` (:mod:`eval.vcmr_ranking`, :mod:`eval.nms`).
"""
from search.index import Moment, MomentIndex, SearchIndexError

__all__ = ["Moment", "MomentIndex", "SearchIndexError"]
