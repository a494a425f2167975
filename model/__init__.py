"""HERO models: the hierarchical trunk and every task model (importable from the package)."""
from model.model import HeroModel
from model.pretrain import HeroForPretraining
from model.tvc import HeroForTvc
from model.vcmr import HeroForVcmr
from model.videoQA import HeroForVideoQA
from model.violin import HeroForViolin
from model.vr import HeroForVr

__all__ = ["HeroModel", "HeroForPretraining", "HeroForVcmr", "HeroForVr", "HeroForVideoQA",
           "HeroForViolin", "HeroForTvc"]
