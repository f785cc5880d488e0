"""The toy world: synthetic clips of one coloured shape with one motion (`world.py`) and an analytic scorer that reads
colour, shape and motion back from a video (`scorer.py`). Small enough to train and evaluate a text-to-video model on a
CPU; see toy/world.py for the vocabulary and toy/scorer.py for the classifier interface used by evaluate.py."""
