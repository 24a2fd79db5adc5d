"""ShapesWorld questions and answers: referring expressions, question templates per family, and the answer
to each, derived from the scene graph.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace
from itertools import combinations

from .world import COLOURS, FAMILIES, REGIONS, SHAPES, SIZES, Scene, SceneObject


@dataclass(frozen=True)
class Ref:
    """A referring expression: it denotes the objects whose attributes equal every non-None field."""

    shape: str | None = None
    """Required shape, or None for any."""
    colour: str | None = None
    """Required colour, or None for any."""
    size: str | None = None
    """Required size, or None for any."""
    region: str | None = None
    """Required region, or None for any."""

    def matches(self, obj: SceneObject) -> bool:
        return (
            (self.shape is None or obj.shape == self.shape)
            and (self.colour is None or obj.colour == self.colour)
            and (self.size is None or obj.size == self.size)
            and (self.region is None or obj.region == self.region)
        )

    def noun(self, plural: bool = False) -> str:
        """e.g. "large red circle", "red objects" (no article, no region)."""
        noun = self.shape or "object"
        if plural:
            noun = "crosses" if noun == "cross" else noun + "s"
        return " ".join(w for w in (self.size, self.colour, noun) if w)

    def definite(self) -> str:
        """e.g. "the large red circle on the left"."""
        return " ".join(["the", self.noun()] + ([_REGION_PHRASE[self.region]] if self.region else []))

    def indefinite(self) -> str:
        """e.g. "an orange circle" (regions are never used in indefinite references)."""
        noun = self.noun()
        return ("an " if noun[0] in "aeiou" else "a ") + noun


@dataclass(frozen=True)
class QuestionSpec:
    """A question, structured so that `answer` can derive its answer from any scene graph."""

    family: str
    """One of FAMILIES."""
    text: str
    """The question as asked."""
    ref: Ref | None = None
    """The object asked about (for count and existence: the set of objects counted or sought)."""
    ref2: Ref | None = None
    """relation only: the object `ref` is compared with."""
    relation: str | None = None
    """relation only: "left", "right", "above" or "below" (yes/no) or "left/right", "above/below" (which)."""


_TEMPLATES = {
    "colour": (
        "What colour is {ref}?",
        "What is the colour of {ref}?",
        "Which colour does {ref} have?",
        "Name the colour of {ref}.",
    ),
    "shape": (
        "What shape is {ref}?",
        "What is the shape of {ref}?",
        "Which shape does {ref} have?",
        "What kind of shape is {ref}?",
    ),
    "count": (
        "How many {np} are there?",
        "How many {np} are in the image?",
        "Count the {np}.",
        "What is the number of {np}?",
    ),
    "position": (
        "Where is {ref}?",
        "In which part of the image is {ref}?",
        "Where in the image is {ref}?",
        "Which region contains {ref}?",
    ),
    "relation": ("Is {ref} {rel} {ref2}?", "Is it true that {ref} is {rel} {ref2}?", "Does {ref} appear {rel} {ref2}?"),
    "relation_which": (
        "Is {ref} {choice} {ref2}?",
        "Relative to {ref2}, is {ref} {choice_alone}?",
        "Compared with {ref2}, is {ref} {choice_alone}?",
    ),
    "pattern": (
        "What pattern does {ref} have?",
        "What is the fill pattern of {ref}?",
        "How is {ref} filled?",
        "Which pattern is on {ref}?",
    ),
    "character": (
        "What character is printed on {ref}?",
        "Which letter or digit is written on {ref}?",
        "What is the character on {ref}?",
        "Read the character printed on {ref}.",
    ),
    "existence": (
        "Is there {ind} in the image?",
        "Does the image contain {ind}?",
        "Can you see {ind}?",
        "Is there {ind}?",
    ),
    "description": (
        "Describe the image.",
        "Describe every object in the image.",
        "List all the objects in the image.",
        "What objects are in this image? Describe each one.",
    ),
}
_REGION_PHRASE = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_RELATION_PHRASE = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_CHOICE_PHRASE = {"left/right": "to the left or to the right of", "above/below": "above or below"}
# The same choice where no object follows it ("Relative to the star, is the circle to the left or to the right?").
_CHOICE_ALONE = {"left/right": "to the left or to the right", "above/below": "above or below"}
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
# Attributes a referring expression may use, per family: never the attribute being asked about, never the
# region when the question is about positions, and never fine detail (pattern, character), so that only
# the fine-detail families need fine detail.
_REF_ATTRS = {
    "colour": ("shape", "size", "region"),
    "shape": ("colour", "size", "region"),
    "pattern": ("shape", "colour", "size", "region"),
    "character": ("shape", "colour", "size", "region"),
    "position": ("shape", "colour", "size"),
    "relation": ("shape", "colour", "size"),
}
_VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}


def _grid(obj: SceneObject) -> tuple[int, int]:
    """(row, column) of the object's region."""
    return divmod(REGIONS.index(obj.region), 3)


def resolve(scene: Scene, ref: Ref) -> SceneObject:
    """The one object `ref` denotes; ValueError if it denotes none or several."""
    found = [o for o in scene.objects if ref.matches(o)]
    if len(found) != 1:
        raise ValueError(f"{ref} denotes {len(found)} objects, not exactly one")
    return found[0]


def describe_object(obj: SceneObject) -> str:
    """Canonical description of one object, e.g. "a large red striped circle with the letter K at the top"."""
    text = f"a {obj.size} {obj.colour} {obj.pattern} {obj.shape}"
    if obj.char is not None:
        text += f" with the {'digit' if obj.char.isdigit() else 'letter'} {obj.char}"
    return f"{text} at the {obj.region}"


def describe(scene: Scene) -> str:
    """Canonical description of a scene: every object, in reading order, separated by "; "."""
    return "; ".join(describe_object(o) for o in scene.objects)


def answer(scene: Scene, q: QuestionSpec) -> str:
    """The answer to `q`, derived from the scene graph alone."""
    if q.family == "description":
        return describe(scene)
    if q.family == "count":
        return str(sum(q.ref.matches(o) for o in scene.objects))
    if q.family == "existence":
        return "yes" if any(q.ref.matches(o) for o in scene.objects) else "no"
    obj = resolve(scene, q.ref)
    if q.family == "relation":
        (row, col), (row2, col2) = _grid(obj), _grid(resolve(scene, q.ref2))
        if q.relation == "left/right" and col != col2:
            return "left" if col < col2 else "right"
        if q.relation == "above/below" and row != row2:
            return "above" if row < row2 else "below"
        holds = {"left": col < col2, "right": col > col2, "above": row < row2, "below": row > row2}
        if q.relation not in holds:
            raise ValueError(f"cannot answer {q.relation!r} for objects on the same line")
        return "yes" if holds[q.relation] else "no"
    attribute = {"colour": "colour", "shape": "shape", "position": "region", "pattern": "pattern", "character": "char"}[
        q.family
    ]
    value = getattr(obj, attribute)
    if value is None:
        raise ValueError(f"{q.ref} carries no character")
    return value


def _unique_ref(scene: Scene, obj: SceneObject, attrs: tuple[str, ...], rng: random.Random) -> Ref | None:
    """A referring expression that denotes `obj` and nothing else, using only `attrs`; None if none exists.

    Uses a smallest distinguishing set of attributes, sometimes plus one redundant attribute (people do
    say "the red circle" when there is only one circle), which keeps it unambiguous.
    """
    for k in range(len(attrs) + 1):
        subsets = list(combinations(attrs, k))
        rng.shuffle(subsets)
        for subset in subsets:
            ref = Ref(**{a: getattr(obj, a) for a in subset})
            if sum(ref.matches(o) for o in scene.objects) == 1:
                spare = [a for a in attrs if a not in subset and a != "region"]
                if spare and rng.random() < 0.5:
                    extra = rng.choice(spare)
                    ref = Ref(**{a: getattr(obj, a) for a in (*subset, extra)})
                return ref
    return None


def _about_one_object(scene: Scene, family: str, rng: random.Random) -> QuestionSpec | None:
    candidates = [o for o in scene.objects if family != "character" or o.char is not None]
    rng.shuffle(candidates)
    for obj in candidates:
        ref = _unique_ref(scene, obj, _REF_ATTRS[family], rng)
        if ref is not None:
            text = rng.choice(_TEMPLATES[family]).format(ref=ref.definite())
            return QuestionSpec(family=family, text=_capitalise(text), ref=ref)
    return None


def _capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def _count_question(scene: Scene, rng: random.Random) -> QuestionSpec:
    attrs = rng.choice(((), ("colour",), ("shape",), ("size",), ("colour", "shape"), ("size", "shape")))
    # Mostly count something that is there; sometimes something random, which may well be absent (answer 0).
    if rng.random() < 0.75:
        source = rng.choice(scene.objects)
        ref = Ref(**{a: getattr(source, a) for a in attrs})
    else:
        ref = Ref(**{a: rng.choice(_VALUES[a]) for a in attrs})
    text = rng.choice(_TEMPLATES["count"]).format(np=ref.noun(plural=True))
    return QuestionSpec(family="count", text=text, ref=ref)


def _existence_question(scene: Scene, rng: random.Random) -> QuestionSpec | None:
    """POPE-style: half the questions ask about an absent object. Negatives are adversarial: a present object
    with one attribute changed, or the attributes of two present objects recombined, so they are plausible."""
    want_present = rng.random() < 0.5
    for _ in range(20):
        attrs = rng.choice((("shape",), ("colour", "shape"), ("colour", "shape"), ("size", "colour", "shape")))
        source = rng.choice(scene.objects)
        values = {a: getattr(source, a) for a in attrs}
        if not want_present:
            changed = rng.choice(attrs)
            other = rng.choice(scene.objects)
            use_other = other is not source and getattr(other, changed) != values[changed] and rng.random() < 0.5
            values[changed] = getattr(other, changed) if use_other else rng.choice(_VALUES[changed])
        ref = Ref(**values)
        if any(ref.matches(o) for o in scene.objects) == want_present:
            text = rng.choice(_TEMPLATES["existence"]).format(ind=ref.indefinite())
            return QuestionSpec(family="existence", text=text, ref=ref)
    return None


def _relation_question(scene: Scene, rng: random.Random) -> QuestionSpec | None:
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
    rng.shuffle(pairs)
    for a, b in pairs[:12]:
        ref, ref2 = (_unique_ref(scene, o, _REF_ATTRS["relation"], rng) for o in (a, b))
        if ref is None or ref2 is None:
            continue
        (row, col), (row2, col2) = _grid(a), _grid(b)
        axes = [ax for ax, differs in (("horizontal", col != col2), ("vertical", row != row2)) if differs]
        axis = rng.choice(axes)
        if rng.random() < 0.5:
            relation = "left/right" if axis == "horizontal" else "above/below"
            text = rng.choice(_TEMPLATES["relation_which"]).format(
                ref=ref.definite(),
                ref2=ref2.definite(),
                choice=_CHOICE_PHRASE[relation],
                choice_alone=_CHOICE_ALONE[relation],
            )
        else:
            true_relation = (
                ("left" if col < col2 else "right") if axis == "horizontal" else ("above" if row < row2 else "below")
            )
            # Ask about the true relation or its opposite with equal odds, so yes and no are balanced.
            relation = true_relation if rng.random() < 0.5 else _OPPOSITE[true_relation]
            text = rng.choice(_TEMPLATES["relation"]).format(
                ref=ref.definite(), ref2=ref2.definite(), rel=_RELATION_PHRASE[relation]
            )
        return QuestionSpec(family="relation", text=_capitalise(text), ref=ref, ref2=ref2, relation=relation)
    return None


def make_question(scene: Scene, family: str, rng: random.Random) -> QuestionSpec | None:
    """A random question of `family` about `scene`, or None if the scene offers none (e.g. no characters)."""
    if family == "description":
        return QuestionSpec(family=family, text=rng.choice(_TEMPLATES["description"]))
    if family == "count":
        return _count_question(scene, rng)
    if family == "existence":
        return _existence_question(scene, rng)
    if family == "relation":
        return _relation_question(scene, rng) if len(scene.objects) > 1 else None
    return _about_one_object(scene, family, rng)


def make_questions(scene: Scene, n: int, rng: random.Random, asked: Counter | None = None) -> list[QuestionSpec]:
    """Up to `n` different questions about `scene`.

    Families are balanced across a dataset through `asked` (family -> number asked so far, updated in
    place): each question takes the least-asked family that the scene supports.
    """
    asked = Counter() if asked is None else asked
    questions: list[QuestionSpec] = []
    for _ in range(n):
        for family in sorted(FAMILIES, key=lambda f: asked[f]):
            q = make_question(scene, family, rng)
            # Phrasing aside, never ask the same thing twice about one image.
            if q is not None and all(replace(q, text="") != replace(p, text="") for p in questions):
                questions.append(q)
                asked[family] += 1
                break
    return questions
