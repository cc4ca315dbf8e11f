"""Captions from class names, so a labelled image set (e.g. the bundled `sample` set) trains a text tower offline.

A caption is a template filled with the class's name (or one of its synonyms), one of a few attributes of that
class, and — from the image itself — whether it is a black-and-white or a colour picture. The choice is drawn from
the sample's seed, so it depends only on (config seed, epoch, sample index) and a resumed run sees the same
captions. `caption_corpus` enumerates every caption that can be drawn, the text a tokenizer is built from.

These templates are deliberately not CLIP's zero-shot prompts (`training.evaluation.zero_shot.CLIP_TEMPLATES`): a
zero-shot score measures a text tower that reads class names in sentences it was not trained on.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence

__all__ = ["CAPTION_TEMPLATES", "CLASS_DESCRIPTIONS", "caption_corpus", "caption_for", "class_phrase"]

# {name}: the class (or a synonym); {attribute}: a property of that class; {tone}: "black and white" / "colour".
CAPTION_TEMPLATES = (
    "a {tone} photo showing a {attribute} {name}.",
    "a {attribute} {name}.",
    "{name}, {attribute}, in {tone}.",
    "a cropped {tone} image of the {name}.",
    "close-up of a {attribute} {name}.",
    "this picture shows the {name}.",
    "the {name} seen up close, {attribute}.",
    "part of a {tone} picture of a {name}.",
)
_TONES = {True: "black and white", False: "colour"}

# Synonyms and attributes of the classes of the `sample` set (training.sample_data.SAMPLE_CLASSES): the photo a
# crop was cut from. The class name itself is always one of the names.
CLASS_DESCRIPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "astronaut": {"names": ("astronaut", "spacewoman"), "attributes": ("smiling", "suited", "official")},
    "camera": {"names": ("camera", "cameraman"), "attributes": ("vintage", "tripod", "grassy")},
    "cat": {"names": ("cat", "kitten"), "attributes": ("tabby", "furry", "orange")},
    "coffee": {"names": ("coffee", "coffee cup"), "attributes": ("hot", "saucer", "dark")},
    "coins": {"names": ("coins", "old coins"), "attributes": ("metal", "round", "scattered")},
    "gravel": {"names": ("gravel", "pebbles"), "attributes": ("rough", "stony", "textured")},
    "hubble": {"names": ("hubble", "deep field"), "attributes": ("starry", "galactic", "distant")},
    "immunohistochemistry": {"names": ("immunohistochemistry", "stained tissue"),
                             "attributes": ("microscopic", "stained", "cellular")},
    "moon": {"names": ("moon", "lunar surface"), "attributes": ("cratered", "grey", "lunar")},
    "motorcycle": {"names": ("motorcycle", "motorbike"), "attributes": ("parked", "shiny", "red")},
    "retina": {"names": ("retina", "eye fundus"), "attributes": ("veined", "medical", "orange")},
    "rocket": {"names": ("rocket", "space launch"), "attributes": ("launching", "tall", "white")},
}
_DEFAULT_ATTRIBUTES = ("typical", "small", "large")


def class_phrase(label_name: str) -> str:
    """A class label as words: `"golden_retriever"` → `"golden retriever"`."""
    return label_name.replace("_", " ").strip()


def _description(label_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    entry = CLASS_DESCRIPTIONS.get(label_name)
    if entry is None:
        return (class_phrase(label_name),), _DEFAULT_ATTRIBUTES
    return entry["names"], entry["attributes"]


def caption_for(label_name: str, seed: int, grayscale: bool | None = None) -> str:
    """One caption of class `label_name`, drawn with `seed` (the sample's seed: deterministic per sample and
    epoch). `grayscale`: whether the image is black and white (None: say nothing of the tone)."""
    rng = random.Random(seed)
    names, attributes = _description(label_name)
    template = rng.choice(CAPTION_TEMPLATES)
    name, attribute = rng.choice(names), rng.choice(attributes)
    if grayscale is None:
        template = template.replace("{tone} ", "").replace(", in {tone}", "").replace("{tone}", "")
        return template.format(name=name, attribute=attribute)
    return template.format(name=name, attribute=attribute, tone=_TONES[bool(grayscale)])


def caption_corpus(label_names: Sequence[str]) -> Iterator[str]:
    """Every caption `caption_for` can produce for these classes (the text a tokenizer is built from)."""
    for label_name in label_names:
        names, attributes = _description(label_name)
        for template, name, attribute, tone in itertools.product(CAPTION_TEMPLATES, names, attributes, _TONES.values()):
            yield template.format(name=name, attribute=attribute, tone=tone)
