"""Stage 2, models: slice classifiers (torchvision backbones + the LightningModule), losses, checkpoints.

Owns :mod:`~.backbones` (name -> torchvision network, ImageNet weights), :mod:`~.classifier` (the
LightningModule: slice logits, optimiser, slice metrics), :mod:`~.losses` (focal and cross-entropy) and
:mod:`~.checkpoint` (reading checkpoints safely). May import :mod:`covidct.data` (the preprocessing
settings a checkpoint carries) and the top-level helpers; never patients, training, predict or report
(two type hints name the vote callback's and the best-epoch callback's records, under TYPE_CHECKING only).
"""
