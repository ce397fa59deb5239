"""Indirect object identification (Wang et al., 2022, https://arxiv.org/abs/2211.00593).

"When Mary and John went to the store, John gave a drink to" -> " Mary". The metric is the logit
difference between the indirect object (IO, the answer) and the subject (S, the distractor) at
the final position. Templates and name lists ship with the package; prompts are generated
offline for any tokenizer, keeping names, places and objects that are a single token.
"""

from __future__ import annotations

NAMES = (
    "Mary John Tom James Dan Sid Alan Paul Kate Amy Lisa Anna Sarah Rose Emma Jack Ben Sam "
    "Max Adam Luke Mark Eric Ryan Kevin Laura Claire Grace Alice Jane"
).split()
PLACES = "store garden restaurant school hospital office station house park beach".split()
OBJECTS = "drink ring kiss bone basketball computer necklace snack apple book".split()
TEMPLATES = (
    "When {A} and {B} went to the {PLACE} , {B} gave a {OBJECT} to",
    "When {A} and {B} got a {OBJECT} at the {PLACE} , {B} decided to give it to",
    "After {A} and {B} went to the {PLACE} , {B} gave a {OBJECT} to",
    "While {A} and {B} were working at the {PLACE} , {B} gave a {OBJECT} to",
    "Then , {A} and {B} had a long argument , and afterwards {B} said to",
)


def word_vocabulary() -> list[str]:
    """Every word the templates can produce (for building a word-level test tokenizer)."""
    words: list[str] = []
    for template in TEMPLATES:
        words += [w for w in template.split() if not w.startswith("{")]
    words += NAMES + PLACES + OBJECTS
    return list(dict.fromkeys(words))
