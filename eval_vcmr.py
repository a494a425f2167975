"""Full-corpus VCMR / SVMR / VR evaluation of a trained TVR, How2R or DiDeMo model.

Usage (from the repository root)::

    python eval_vcmr.py --query_txt_db /txt/tvr_val.db --split val --vfeat_db /video/tv \
        --sub_txt_db /txt/tv_subtitles.db --output_dir /storage/tvr_default \
        --checkpoint 4800 --full_eval_tasks VCMR SVMR VR [--fp16] [--config FILE]

Multi-GPU: ``torchrun --nproc_per_node N eval_vcmr.py ...`` (queries are sharded when the run's
hps.json has ``distributed_eval``). Writes
``{output_dir}/results_{split}/results_{checkpoint}_all.json`` (training.md §5.5) and
``metrics_{checkpoint}_all.json`` beside it. See :mod:`eval.retrieval` for the decisions taken.
"""
from __future__ import annotations

from eval.retrieval import validate_full_vcmr  # noqa: F401 - upstream's import location
from eval.retrieval_cli import run
from utils.errors import run_main


def main(argv=None):
    return run("vcmr", argv)


if __name__ == "__main__":
    run_main(main)
