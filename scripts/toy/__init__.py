"""Synthetic toy TV corpus in upstream's raw formats (see ``scripts/make_toy_corpus.py``)."""
