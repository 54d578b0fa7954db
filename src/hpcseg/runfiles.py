"""Where a training run keeps its checkpoints inside its run folder: `train` writes them, the job runner resumes
from `LAST`, `test`, `predict` and `collect` take `BEST`."""

LAST = "checkpoints/last.pt"  # the state to resume from (every epoch, and on a scheduler's warning)
BEST = "checkpoints/best.pt"  # the weights with the best validation Dice
