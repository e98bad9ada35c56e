"""The paper's published CIFAR-10 numbers, to print beside ours (Frankle, Schwab & Morcos, ICLR 2021,
"Training BatchNorm and Only BatchNorm", arXiv:2003.00152).

Each entry says where the figure comes from and whether it was checked against the paper's text
(only its abstract was: "sufficiently deep ResNets reach 82% (CIFAR-10) ... BatchNorm ... learning
to disable around a third of the random features"). Values marked ``confirmed=False`` are read
off the paper's figures; treat them as approximate until checked against the PDF.
"""

from typing import Dict, NamedTuple, Optional


class PaperResult(NamedTuple):
    bn_only: Optional[float]  # test accuracy (%) training only γ and β
    full: Optional[float]  # test accuracy (%) training everything
    source: str
    confirmed: bool


PAPER = "Frankle, Schwab & Morcos, ICLR 2021 (arXiv:2003.00152)"

CIFAR10_RESNET: Dict[str, PaperResult] = {
    "resnet14": PaperResult(48.0, 91.0, f"{PAPER}, Fig. 2 (read off the figure)", False),
    "resnet110": PaperResult(69.5, 93.3, f"{PAPER}, Fig. 2 (read off the figure)", False),
    "resnet866": PaperResult(82.0, 93.0, f"{PAPER}: abstract gives 82% BN-only; full ~93% read off Fig. 2",
                             True),
}

# "BatchNorm ... learning to disable around a third of the random features" (abstract). We call a
# feature disabled when |γ| < DISABLED_THRESHOLD; 0.01 is our reading of the paper's Section 5 and
# is NOT confirmed against its text (the searchable excerpts stop at the introduction).
DISABLED_THRESHOLD = 0.01
PAPER_DISABLED_FRACTION = (1 / 3, f"{PAPER}, abstract: 'around a third' (BN-only, deep ResNets)")


def paper_result(model: str, width: int = 1) -> Optional[PaperResult]:
    return CIFAR10_RESNET.get(model) if width == 1 else None
