"""editcomp: edit what a language model knows, then compress it, keeping the edits."""

__version__ = "0.1.0"
