"""Default data files, shared by the CLI and the job functions.

A module of its own, without torch, so ``editcomp --help`` stays fast while both sides read
the same paths (relative to the repository root, where ``../shared`` sits beside the clone)."""

DEFAULT_TEXT = "../shared/data/wikitext-2/test.txt"    # perplexity
DEFAULT_CALIB = "../shared/data/wikitext-2/valid.txt"  # calibration, training, preservation
