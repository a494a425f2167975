"""HERO data: LMDB readers, video item assembly, per-task datasets and collates, loaders.

Names, constructors and attributes follow upstream (shared/spec/interface.md) so code written
against upstream's ``data`` package keeps working.
"""
from data.data import (
    VideoFeatDataset,
    VideoFeatSubTokDataset,
    load_video_only_dataset,
    load_video_sub_dataset,
    txt_input_collate,
    video_collate,
)
from data.fom import FomDataset, FomEvalDataset, fom_collate, fom_eval_collate
from data.loader import MetaLoader, PrefetchLoader, build_dataloader
from data.mfm import MfmDataset, mfm_collate
from data.mlm import VideoMlmDataset, mlm_collate
from data.tvc import TvcEvalDataset, TvcTrainDataset, TvcValDataset
from data.txt_db import (
    CaptionTokLmdb,
    MsrvttQueryTokLmdb,
    QaQueryTokLmdb,
    QueryTokLmdb,
    SubTokLmdb,
    TxtTokLmdb,
    VrQueryTokLmdb,
    VrSubTokLmdb,
)
from data.vcmr import (
    VcmrDataset,
    VcmrEvalDataset,
    VcmrFullEvalDataset,
    VcmrVideoOnlyDataset,
    VcmrVideoOnlyEvalDataset,
    VcmrVideoOnlyFullEvalDataset,
    VideoCorpusDataset,
    vcmr_collate,
    vcmr_eval_collate,
    vcmr_full_eval_collate,
    video_corpus_collate,
)
from data.video_db import VideoFeatLmdb
from data.videoQA import (
    VideoQaDataset,
    VideoQaEvalDataset,
    video_qa_collate,
    video_qa_eval_collate,
)
from data.violin import ViolinDataset, ViolinEvalDataset, violin_collate, violin_eval_collate
from data.vr import (
    VrDataset,
    VrEvalDataset,
    VrFullEvalDataset,
    VrVideoOnlyDataset,
    VrVideoOnlyEvalDataset,
    VrVideoOnlyFullEvalDataset,
    vr_collate,
    vr_eval_collate,
    vr_full_eval_collate,
)
from data.vsm import VsmDataset, vsm_collate

__all__ = [
    "VideoFeatDataset", "VideoFeatSubTokDataset", "load_video_only_dataset",
    "load_video_sub_dataset", "txt_input_collate", "video_collate", "CaptionTokLmdb",
    "MsrvttQueryTokLmdb", "QaQueryTokLmdb", "QueryTokLmdb", "SubTokLmdb", "TxtTokLmdb",
    "VrQueryTokLmdb", "VrSubTokLmdb", "VcmrDataset", "VcmrEvalDataset", "VcmrFullEvalDataset",
    "VcmrVideoOnlyDataset", "VcmrVideoOnlyEvalDataset", "VcmrVideoOnlyFullEvalDataset",
    "VideoCorpusDataset", "vcmr_collate", "vcmr_eval_collate", "vcmr_full_eval_collate",
    "video_corpus_collate", "VideoQaDataset", "VideoQaEvalDataset", "video_qa_collate",
    "video_qa_eval_collate", "VrDataset", "VrEvalDataset", "VrFullEvalDataset",
    "VrVideoOnlyDataset", "VrVideoOnlyEvalDataset", "VrVideoOnlyFullEvalDataset", "vr_collate",
    "vr_eval_collate", "vr_full_eval_collate", "FomDataset", "FomEvalDataset", "fom_collate",
    "fom_eval_collate", "MetaLoader", "PrefetchLoader", "build_dataloader", "MfmDataset",
    "mfm_collate", "VideoMlmDataset", "mlm_collate", "TvcEvalDataset", "TvcTrainDataset",
    "TvcValDataset", "VideoFeatLmdb", "ViolinDataset", "ViolinEvalDataset", "violin_collate",
    "violin_eval_collate", "VsmDataset", "vsm_collate",
]
