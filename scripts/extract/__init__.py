"""Feature extraction from video files into HERO's per-clip ``.npz`` layout (issue 8).

``recipe`` holds every preprocessing constant with its reason, ``video_io`` decodes videos with
PyAV into per-row frames, ``resnet`` / ``slowfast`` are the two networks (state-dict keys of
torchvision / pytorchvideo, so the official checkpoints load by flag), ``weights`` loads those
checkpoints, ``pipeline`` runs the batched, resumable extraction and ``--check_against``, and
``bench`` is the ``scripts/benchmark.py extract`` sub-command. The CLI is
``scripts/extract_features.py``.
"""
