"""The conventions of CompBench's official evaluation that several modules share (no heavy imports)."""

TASKS = ("add", "remove", "replace")  # CompBench's local-editing tasks
EVAL_SIZE = 512  # the official script resizes every image to 512 × 512 before scoring
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"  # the CLIP of the official LC-T / LC-I

__all__ = ["DEFAULT_CLIP_MODEL", "EVAL_SIZE", "TASKS"]
