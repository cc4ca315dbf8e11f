"""Templates of the cards dinoforge writes, and the rule for how a card names models and datasets.

The templates are Jinja markdown files rendered by `huggingface_hub` (`ModelCard.from_template`,
`DatasetCard.from_template`); they ship inside this package and are read with `importlib.resources`, so an
installed (non-editable) dinoforge can write cards. Cards are public: they never show a local path.
"""

from __future__ import annotations

import os
import re
from importlib.resources import files
from pathlib import Path

MODEL_CARD = "model_card.md"
DATASET_CARD = "dataset_card.md"


def load_template(name: str) -> str:
    """The text of template `name` (e.g. `MODEL_CARD`) from the installed package."""
    resource = files(__name__).joinpath(name)
    if not resource.is_file():
        raise FileNotFoundError(f"no card template {name!r} in the model_cards package (reinstall dinoforge)")
    return resource.read_text(encoding="utf-8")


def is_hub_id(name: str | os.PathLike | None) -> bool:
    """True for `owner/name` references that are not local paths: the only form a card may link on the Hub."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = str(name or "")
    if text.count("/") != 1 or text.startswith(("/", ".", "~")) or "\\" in text:
        return False
    if Path(text).expanduser().exists():  # `runs/backbone` next to the caller is a folder, not a repo
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def public_name(name: str | os.PathLike | None, default: str = "a local folder") -> str:
    """How a card names a model or dataset: a Hub id as is, a local path by its last component only."""
    text = str(name or "").strip()
    if not text:
        return default
    if is_hub_id(text):
        return text
    last = re.split(r"[\\/]", text.rstrip("/\\"))[-1]  # either separator: a card may describe a Windows path
    return last or default
