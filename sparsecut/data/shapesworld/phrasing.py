"""ShapesWorld questions as people type them, and answers in the form they ask for.

The standard splits ask each question family in 3-4 fixed templates, and a model trained on them learns the
templates, not the questions ("How many shapes do you see?" got a shape name). This grammar builds a question
from parts: a frame per family, synonyms for the nouns ("object", "shape", "thing", ...) and for the picture
("image", "picture", ...), politeness, instructions ("Answer with one word.") and surface noise (lower case,
no question mark, contractions). The word "shape" can occur in every family, so no single word decides the
answer's type.

Every part is split in two pools: `train` builds training data, `heldout` is reserved for evaluation (the
held-out phrasing split) and never trained on. An answer comes in one of four forms:
  - short: the bare answer ("red", "3", "yes"), the default, also when asked "Answer with one word.";
  - sentence: a full sentence that contains it ("The large shape is red."), when asked for one;
  - reason: the answer, then the objects it rests on ("Yes: the circle is at the top left and ..."), when
    asked why or to explain;
  - prose: a description told as sentences instead of the canonical list ("in your own words").
`rephrase` turns a question chosen by `questions.make_question` into such a text and its answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from .questions import (
    _CHOICE_ALONE,
    _CHOICE_PHRASE,
    _REGION_PHRASE,
    _RELATION_PHRASE,
    QuestionSpec,
    Ref,
    answer,
    describe,
    describe_object,
    resolve,
)
from .world import COLOURS, PATTERNS, REGIONS, SHAPES, Scene, SceneObject

POOLS = ("train", "heldout")
FORMS = ("short", "sentence", "reason", "prose")

# Synonyms. A noun stands for "any object" when the question names no shape.
NOUNS = {"train": ("object", "shape", "thing"), "heldout": ("item", "figure")}
PICTURES = {"train": ("image", "picture", "scene"), "heldout": ("photo",)}
PREFIXES = {
    "train": ("", "", "", "", "Please tell me: ", "Quick question: ", "Hi! ", "Look at the {img}. "),
    "heldout": ("", "", "Hey, ", "I'd like to know: "),
}
# Instructions for each answer form. Short answers are the default: most questions carry no instruction.
INSTRUCTIONS = {
    "train": {
        "short": ("Answer with one word.", "One word, please.", "Answer briefly.", "Keep it short."),
        "short_number": ("Answer with a number.", "Give just the number.", "Reply with a number only."),
        "short_yes_no": ("Answer yes or no.", "Just yes or no, please.", "Reply with yes or no."),
        "sentence": (
            "Answer in a full sentence.",
            "Please answer with a complete sentence.",
            "Use a full sentence.",
            "Reply in one sentence.",
        ),
        "reason": ("Explain your answer.", "Why?", "Give a reason.", "Explain why."),
    },
    "heldout": {
        "short": ("Single word answer.", "Be brief."),
        "short_number": ("Just a number.",),
        "short_yes_no": ("Yes or no?",),
        "sentence": ("Respond with one full sentence.", "Give your answer as a sentence."),
        "reason": ("Justify your answer.", "Say how you know."),
    },
}
# Question frames per family and pool. Fields: {ref} the object asked about ("the large red shape"),
# {img} the picture, {np} a plural noun phrase, {ind} an indefinite one, {ref2}/{rel}/{choice}/{choice_alone}
# for relations, {opts} an option list with the answer among them.
FRAMES = {
    "colour": {
        "train": (
            "What colour is {ref}?",
            "What is the colour of {ref}?",
            "Which colour does {ref} have?",
            "Name the colour of {ref}.",
            "What color is {ref}?",
            "Tell me the colour of {ref}.",
            "Can you tell me what colour {ref} is?",
            "What colour has {ref} got?",
            "Is {ref} {opts}?",
            "In the {img}, what colour is {ref}?",
            "Which color is {ref}?",
            "{Ref}: what colour is it?",
        ),
        "heldout": (
            "What's the color of {ref} in the {img}?",
            "Do you know which colour {ref} is?",
            "{Ref} is painted in which colour?",
            "I see {ref}. What colour is it?",
        ),
    },
    "shape": {
        "train": (
            "What shape is {ref}?",
            "What is the shape of {ref}?",
            "Which shape does {ref} have?",
            "What kind of shape is {ref}?",
            "What is {ref}?",
            "Tell me the shape of {ref}.",
            "Can you tell me what shape {ref} is?",
            "Is {ref} {opts}?",
            "In the {img}, what shape is {ref}?",
            "What type of shape is {ref}?",
            "{Ref}: which shape is it?",
            "Name the shape of {ref}.",
        ),
        "heldout": (
            "What form does {ref} take?",
            "Do you know what shape {ref} has?",
            "Identify the shape of {ref}.",
            "I see {ref}. What shape is it?",
        ),
    },
    "count": {
        "train": (
            "How many {np} are there?",
            "How many {np} are in the {img}?",
            "Count the {np}.",
            "What is the number of {np}?",
            "How many {np} do you see?",
            "How many {np} can you see?",
            "Can you count the {np} in the {img}?",
            "How many {np} does the {img} have?",
            "Tell me how many {np} there are.",
            "Count the {np} in the {img}.",
            "What's the number of {np} in the {img}?",
            "How many {np} are shown?",
        ),
        "heldout": (
            "Could you count how many {np} there are?",
            "What is the total number of {np}?",
            "How many {np} appear in the {img}?",
            "Give me the count of {np}.",
        ),
    },
    "position": {
        "train": (
            "Where is {ref}?",
            "In which part of the {img} is {ref}?",
            "Where in the {img} is {ref}?",
            "Which region contains {ref}?",
            "Where can I find {ref}?",
            "Tell me where {ref} is.",
            "Where is {ref} located?",
            "Is {ref} {opts}?",
            "In what part of the {img} is {ref}?",
            "Where's {ref}?",
            "Where does {ref} sit in the {img}?",
            "Can you tell me where {ref} is?",
        ),
        "heldout": (
            "What is the location of {ref}?",
            "Point out where {ref} is.",
            "Whereabouts is {ref}?",
            "In which area of the {img} do you see {ref}?",
        ),
    },
    "relation": {
        "train": (
            "Is {ref} {rel} {ref2}?",
            "Is it true that {ref} is {rel} {ref2}?",
            "Does {ref} appear {rel} {ref2}?",
            "Is {ref} placed {rel} {ref2}?",
            "Would you say {ref} is {rel} {ref2}?",
            "In the {img}, is {ref} {rel} {ref2}?",
            "Can you see {ref} {rel} {ref2}?",
            "Tell me if {ref} is {rel} {ref2}.",
        ),
        "heldout": (
            "Is {ref} located {rel} {ref2}?",
            "Do you find {ref} {rel} {ref2}?",
            "Check whether {ref} is {rel} {ref2}.",
        ),
    },
    "relation_which": {
        "train": (
            "Is {ref} {choice} {ref2}?",
            "Relative to {ref2}, is {ref} {choice_alone}?",
            "Compared with {ref2}, is {ref} {choice_alone}?",
            "Which side of {ref2} is {ref} on, {choice}?",
            "Is {ref} found {choice} {ref2}?",
            "Looking at {ref2}, is {ref} {choice_alone}?",
        ),
        "heldout": ("With respect to {ref2}, is {ref} {choice_alone}?", "Does {ref} lie {choice} {ref2}?"),
    },
    "pattern": {
        "train": (
            "What pattern does {ref} have?",
            "What is the fill pattern of {ref}?",
            "How is {ref} filled?",
            "Which pattern is on {ref}?",
            "What texture does {ref} have?",
            "Is {ref} {opts}?",
            "What is the texture of {ref}?",
            "How is {ref} coloured in?",
            "Tell me the pattern of {ref}.",
            "What fill does {ref} have?",
            "Can you tell me how {ref} is filled?",
            "{Ref}: what pattern?",
        ),
        "heldout": (
            "What's the surface pattern of {ref}?",
            "Describe the fill of {ref}.",
            "Which texture is on {ref}?",
            "What kind of pattern covers {ref}?",
        ),
    },
    "character": {
        "train": (
            "What character is printed on {ref}?",
            "Which letter or digit is written on {ref}?",
            "What is the character on {ref}?",
            "Read the character printed on {ref}.",
            "What does it say on {ref}?",
            "What is written on {ref}?",
            "Which character is on {ref}?",
            "What letter or number is on {ref}?",
            "Can you read what is printed on {ref}?",
            "Tell me the character on {ref}.",
            "What's printed on {ref}?",
            "Read the label on {ref}.",
        ),
        "heldout": (
            "What symbol can you read on {ref}?",
            "Which glyph is on {ref}?",
            "What is the text on {ref}?",
            "Can you make out the character on {ref}?",
        ),
    },
    "existence": {
        "train": (
            "Is there {ind} in the {img}?",
            "Does the {img} contain {ind}?",
            "Can you see {ind}?",
            "Is there {ind}?",
            "Do you see {ind}?",
            "Does the {img} show {ind}?",
            "Is there {ind} anywhere in the {img}?",
            "Can you find {ind} in the {img}?",
            "Tell me if there is {ind}.",
            "Does {ind} appear in the {img}?",
            "Is {ind} present?",
            "Any {bare} in the {img}?",
        ),
        "heldout": (
            "Would I find {ind} in this {img}?",
            "Is there {ind} to be seen?",
            "Does this {img} include {ind}?",
            "Can {ind} be spotted here?",
        ),
    },
    "description": {
        "train": (
            "Describe the {img}.",
            "Describe every object in the {img}.",
            "List all the objects in the {img}.",
            "What objects are in this {img}? Describe each one.",
            "What is in this {img}?",
            "What do you see?",
            "List every {noun} you can see.",
            "What's in the {img}?",
            "Describe all the {noun}s.",
            "Give me a list of the {noun}s in the {img}.",
            "What {noun}s are there?",
            "Name everything in the {img}.",
        ),
        "heldout": (
            "What does this {img} show?",
            "Enumerate the {noun}s in the {img}.",
            "What can be seen here?",
            "Which {noun}s does the {img} contain?",
        ),
    },
    "description_prose": {
        "train": (
            "Tell me about this {img} in your own words.",
            "Describe the {img} in your own words.",
            "Tell me about this {img}.",
            "Can you describe this {img} in a few sentences?",
            "Write a short paragraph about the {img}.",
            "Describe the {img} in full sentences.",
        ),
        "heldout": ("Paint me a picture in words of this {img}.", "Talk me through this {img}."),
    },
}
# Things that are never in a ShapesWorld scene: asking for them has the answer "no" (or 0).
OUTSIDE_THINGS = {
    "train": ("person", "dog", "car", "tree", "cat", "house", "bird", "flower", "chair", "cup"),
    "heldout": ("horse", "bicycle", "man", "boat", "phone"),
}
# Where an option list comes from, per family (the answer and up to three others, shuffled).
_OPTIONS = {"colour": COLOURS, "shape": SHAPES, "pattern": PATTERNS, "position": REGIONS}
_NUMBER_FORMS = {"count": "short_number"}


@dataclass(frozen=True)
class Phrased:
    """A question in words and its answer in the form the question asks for."""

    text: str
    answer: str
    form: str
    """One of FORMS."""
    short: str
    """The bare answer, whatever the form (what a short-answer scorer compares against)."""
    question: QuestionSpec | None
    """What was asked, as `questions.answer` reads it (None for a thing that is never in a scene)."""


def _plural(noun: str) -> str:
    return "crosses" if noun == "cross" else noun + "s"


class _Words:
    """The synonyms drawn for one question (one noun and one picture word throughout)."""

    def __init__(self, rng: random.Random, pool: str):
        self.noun = rng.choice(NOUNS[pool])
        self.picture = rng.choice(PICTURES[pool])

    def noun_phrase(self, ref: Ref, plural: bool = False) -> str:
        noun = ref.shape or self.noun
        return " ".join(w for w in (ref.size, ref.colour, _plural(noun) if plural else noun) if w)

    def definite(self, ref: Ref) -> str:
        return " ".join(["the", self.noun_phrase(ref)] + ([_REGION_PHRASE[ref.region]] if ref.region else []))

    def indefinite(self, ref: Ref) -> str:
        phrase = self.noun_phrase(ref)
        return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _options(family: str, gold: str, rng: random.Random) -> str:
    others = [v for v in _OPTIONS[family] if v != gold]
    choices = rng.sample(others, min(3, len(others))) + [gold]
    rng.shuffle(choices)
    if family == "shape":
        choices = [("an " if c[0] in "aeiou" else "a ") + c for c in choices]
    if family == "position":
        choices = [_REGION_PHRASE[c] for c in choices]
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def _sentence_start(text: str) -> str:
    return text[0].upper() + text[1:]


def _place(obj: SceneObject) -> str:
    return _REGION_PHRASE[obj.region]


def _count_sentence(n: int, plural_np: str, singular_np: str) -> str:
    if n == 0:
        return f"There are 0 {plural_np}: I see none."
    return f"There is 1 {singular_np}." if n == 1 else f"There are {n} {plural_np}."


def _answers(scene: Scene, q: QuestionSpec, words: _Words, short: str) -> dict[str, str]:
    """The sentence and reason forms of the answer to `q` (its short form is `short`)."""
    family = q.family
    if family == "count":
        matches = [o for o in scene.objects if q.ref.matches(o)]
        sentence = _count_sentence(len(matches), words.noun_phrase(q.ref, plural=True), words.noun_phrase(q.ref))
        grounds = "; ".join(describe_object(o) for o in matches) or f"none of the {len(scene.objects)} objects matches"
        return {"sentence": sentence, "reason": f"{sentence[:-1]}: {grounds}."}
    if family == "existence":
        indefinite = words.indefinite(q.ref)
        match = next((o for o in scene.objects if q.ref.matches(o)), None)
        if match is not None:
            return {
                "sentence": f"Yes, there is {indefinite} in the {words.picture}.",
                "reason": f"Yes: there is {describe_object(match)}.",
            }
        return {
            "sentence": f"No, there is no {words.noun_phrase(q.ref)} in the {words.picture}.",
            "reason": f"No: none of the {len(scene.objects)} objects in the {words.picture} is {indefinite}.",
        }
    subject = words.definite(q.ref)
    obj = resolve(scene, q.ref)
    if family == "relation":
        other_ref = words.definite(q.ref2)
        other = resolve(scene, q.ref2)
        grounds = f"{subject} is {_place(obj)} and {other_ref} is {_place(other)}"
        if short in ("yes", "no"):
            relation = _RELATION_PHRASE[q.relation]
            claim = (
                f"{subject} is {relation} {other_ref}" if short == "yes" else f"{subject} is not {relation} {other_ref}"
            )
            return {
                "sentence": f"{_sentence_start(short)}, {claim}.",
                "reason": f"{_sentence_start(short)}: {grounds}.",
            }
        side = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[short]
        sentence = f"{_sentence_start(subject)} is {side} {other_ref}."
        return {"sentence": sentence, "reason": f"{sentence[:-1]}: {grounds}."}
    if family == "position":
        sentence = f"{_sentence_start(subject)} is {_REGION_PHRASE[short]}."
    elif family == "shape":
        sentence = f"{_sentence_start(subject)} is {'an' if short[0] in 'aeiou' else 'a'} {short}."
    elif family == "character":
        kind = "digit" if short.isdigit() else "letter"
        sentence = f"{_sentence_start(subject)} has the {kind} {short} printed on it."
    else:  # colour, pattern
        sentence = f"{_sentence_start(subject)} is {short}."
    return {"sentence": sentence, "reason": f"{sentence[:-1]}: it is {describe_object(obj)}."}


def describe_as_prose(scene: Scene, picture: str = "picture") -> str:
    """The description told as sentences, e.g. "The picture shows 2 shapes. There is a large red ...". Each
    object keeps its canonical words, so `evaluation.metrics.parse_description` reads prose and lists alike."""
    n = len(scene.objects)
    head = f"The {picture} shows {n} shape{'s' if n != 1 else ''} on a light background."
    return " ".join([head] + [f"There is {describe_object(o)}." for o in scene.objects])


def _noisy(text: str, rng: random.Random) -> str:
    """Surface variation: contractions, lower case, a missing question mark."""
    if rng.random() < 0.3:
        text = text.replace("What is", "What's").replace("what is", "what's").replace("Where is", "Where's")
    if rng.random() < 0.2:
        text = text.rstrip("?.")
    if rng.random() < 0.2:
        text = text.lower()
    return text


def _outside_question(family: str, rng: random.Random, words: _Words, pool: str) -> tuple[str, dict[str, str]]:
    """A question about something that is never in a ShapesWorld scene (a dog, a car, ...)."""
    thing = rng.choice(OUTSIDE_THINGS[pool])
    article = "an" if thing[0] in "aeiou" else "a"
    if family == "count":
        plural = {"person": "people", "man": "men"}.get(thing, thing + ("es" if thing.endswith("h") else "s"))
        text = rng.choice(
            (f"How many {plural} are there?", f"How many {plural} are in the {words.picture}?", f"Count the {plural}.")
        )
        return text, {
            "short": "0",
            "sentence": f"There are 0 {plural}: the {words.picture} shows only shapes.",
            "reason": f"There are 0 {plural}: the {words.picture} shows only simple coloured shapes.",
        }
    text = rng.choice(
        (
            f"Is there {article} {thing} in the {words.picture}?",
            f"Can you see {article} {thing}?",
            f"Does the {words.picture} show {article} {thing}?",
        )
    )
    return text, {
        "short": "no",
        "sentence": f"No, there is no {thing} in the {words.picture}.",
        "reason": f"No: the {words.picture} shows only simple coloured shapes, and no {thing}.",
    }


def rephrase(scene: Scene, q: QuestionSpec, rng: random.Random, pool: str = "train") -> Phrased:
    """`q` (from `questions.make_question`) asked in words drawn from `pool`, with its answer in the form
    the words ask for."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    words = _Words(rng, pool)
    fill = {"img": words.picture, "noun": words.noun}
    form = rng.choices(("short", "sentence", "reason"), weights=(0.7, 0.15, 0.15))[0]
    if q.family == "description":
        prose = rng.random() < 0.35
        frame = rng.choice(FRAMES["description_prose" if prose else "description"][pool])
        text = _noisy(rng.choice(PREFIXES[pool]).format(**fill) + frame.format(**fill), rng)
        body = describe_as_prose(scene, words.picture) if prose else describe(scene)
        return Phrased(text, body, "prose" if prose else "short", describe(scene), q)
    if q.family == "existence" and q.ref.colour and rng.random() < 0.25:
        # "Is there a red shape?": the noun stands for any object, so the answer is derived anew.
        q = replace(q, ref=Ref(colour=q.ref.colour, size=q.ref.size))
    asked = q
    if q.family in ("count", "existence") and rng.random() < 0.06:
        text, forms = _outside_question(q.family, rng, words, pool)
        asked = None
    else:
        short = answer(scene, q)
        forms = {"short": short, **_answers(scene, q, words, short)}
        frames = FRAMES["relation_which" if "/" in (q.relation or "") else q.family][pool]
        ref = words.definite(q.ref) if q.ref is not None else ""
        fields = dict(fill, ref=ref, Ref=_sentence_start(ref) if ref else "")
        if q.family == "count":
            fields["np"] = words.noun_phrase(q.ref, plural=True)
        if q.family == "existence":
            fields |= {"ind": words.indefinite(q.ref), "bare": words.noun_phrase(q.ref, plural=True)}
        if q.family == "relation":
            fields |= {
                "ref2": words.definite(q.ref2),
                "rel": _RELATION_PHRASE.get(q.relation, ""),
                "choice": _CHOICE_PHRASE.get(q.relation, ""),
                "choice_alone": _CHOICE_ALONE.get(q.relation, ""),
            }
        if q.family in _OPTIONS:
            fields["opts"] = _options(q.family, short, rng)
        text = _sentence_start(rng.choice(frames).format(**fields))
    if form == "short" and rng.random() < 0.3:
        kind = "short_yes_no" if forms["short"] in ("yes", "no") else _NUMBER_FORMS.get(q.family, "short")
        instruction = rng.choice(INSTRUCTIONS[pool][kind])
    elif form != "short":
        instruction = rng.choice(INSTRUCTIONS[pool][form])
    else:
        instruction = ""
    prefix = rng.choice(PREFIXES[pool]).format(**fill)
    text = _noisy(prefix + (text[0].lower() + text[1:] if prefix and not text.startswith("I ") else text), rng)
    text = f"{text} {instruction}".strip()
    return Phrased(text, forms[form], form, forms["short"], asked)
