"""Build or extend a moment-search index over your own videos (issue 19).

Usage (from the repository root)::

    python scripts/build_index.py --videos DIR [--subtitles DIR_OF_SRT] \
        --model_dir RUN --ckpt STEP --out INDEX \
        --resnet_ckpt resnet152-b121ed2d.pth --slowfast_ckpt SLOWFAST_8x8_R50.pyth
    python scripts/build_index.py --video_db video_db/tv [--sub_txt_db txt_db/tv_subtitles.db] \
        --model_dir RUN --ckpt STEP --out INDEX

Then ``python search_moments.py --index INDEX "a man opens the door"``. See search/build.py.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from search.build import main  # noqa: E402
from utils.errors import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
