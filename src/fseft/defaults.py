"""Names the commands fall back to, importable without torch (so ``--help`` stays fast)."""

#: The model fseft uses when a command is given no ``--model`` (bundled with the package).
DEFAULT_MODEL = "unet-small.synth"
