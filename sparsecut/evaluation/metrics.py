"""Evaluation metrics: short-answer accuracy, POPE-style yes/no metrics and object-level description scores.

`score` takes records {"family", "prediction", "answer"} (the ShapesWorld families, or any others) and
returns per-family metrics plus an overall accuracy over the short-answer families; `to_markdown` renders
them as a table. Descriptions are compared object by object after parsing the canonical ShapesWorld form,
"a large red striped circle with the letter K at the top left; a small blue solid square at the center".
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import NamedTuple

from ..utils import markdown_table

_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        [
            "zero",
            "one",
            "two",
            "three",
            "four",
            "five",
            "six",
            "seven",
            "eight",
            "nine",
            "ten",
            "eleven",
            "twelve",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "twenty",
        ]
    )
}


def normalize_answer(text: str) -> str:
    """Lower-case; drop punctuation (but not the point of "3.5") and articles; number words to digits.

    An article is only dropped when another word follows it, because a lone "A" is the answer to "which
    letter is printed on it?", not an article.
    """
    text = re.sub(r"(?<!\d)\.|\.(?!\d)", " ", text.lower())
    text = re.sub(r"[^\w\s.]|_", " ", text)  # "top-left" -> "top left"
    words = [_NUMBER_WORDS.get(w, w) for w in text.split()]
    return " ".join(w for i, w in enumerate(words) if not (w in _ARTICLES and i + 1 < len(words)))


def exact_match(pred: str, gold: str) -> bool:
    """Whether the answers are equal after `normalize_answer`."""
    return normalize_answer(pred) == normalize_answer(gold)


def parse_yes_no(text: str) -> str | None:
    """ "yes" or "no" if the normalised answer starts with it (so "Yes, there is." counts), else None."""
    words = normalize_answer(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def _is_yes_no(gold: str) -> bool:
    return normalize_answer(gold) in ("yes", "no")


def is_correct(pred: str, gold: str) -> bool:
    """Yes/no questions are judged by `parse_yes_no`, all others by `exact_match`."""
    if _is_yes_no(gold):
        return parse_yes_no(pred) == normalize_answer(gold)
    return exact_match(pred, gold)


def _words(text: str) -> list[str]:
    """Lower-case words, number words as digits; articles kept (the letter "A" is a word here)."""
    return [_NUMBER_WORDS.get(w, w) for w in re.findall(r"[a-z0-9]+", text.lower())]


def states_answer(pred: str, short: str, form: str) -> bool:
    """Whether an answer in `form` (`sparsecut.data.shapesworld.phrasing.FORMS`) is right and in that form.

    short: `is_correct` (one word or number; "Yes, there is." counts for yes). sentence and reason: a sentence
    of at least three words, ending in a full stop, that starts with yes/no for a yes/no question, and else
    contains the short answer as whole words (a count of 0 may say "no"/"none"); a reason must also go on past
    its claim (a ":" or "because" then more words). prose: two sentences or more.
    """
    text = pred.strip()
    if form == "short":
        return is_correct(text, short)
    words = _words(text)
    if len(words) < 3 or not text.endswith("."):
        return False
    if form == "prose":
        return text.count(". ") >= 1
    if form == "reason" and not re.search(r"(:|\bbecause\b)\s*\w", text):
        return False
    if _is_yes_no(short):
        return parse_yes_no(text) == normalize_answer(short)
    gold = _words(short)
    if gold == ["0"] and ({"no", "none"} & set(words)):
        return True
    return any(words[i : i + len(gold)] == gold for i in range(len(words) - len(gold) + 1))


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def yes_no_metrics(preds: list[str], golds: list[str]) -> dict[str, float]:
    """POPE's metrics with "yes" as the positive class: accuracy, precision, recall, F1 and the yes ratio
    (the fraction of predictions that are "yes"). A prediction that is neither yes nor no is wrong, and
    counts as a negative."""
    parsed = [parse_yes_no(p) for p in preds]
    gold = [normalize_answer(g) for g in golds]
    tp = sum(p == "yes" and g == "yes" for p, g in zip(parsed, gold))
    fp = sum(p == "yes" and g == "no" for p, g in zip(parsed, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(parsed, gold))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "n": len(gold),
        "accuracy": _ratio(sum(p == g for p, g in zip(parsed, gold)), len(gold)),
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "yes_ratio": _ratio(sum(p == "yes" for p in parsed), len(parsed)),
    }


class DescribedObject(NamedTuple):
    """One object of a canonical description (all lower-case)."""

    size: str
    colour: str
    pattern: str
    shape: str
    char: str | None
    region: str

    def coarse(self) -> tuple[str, str, str, str]:
        """The attributes visible at low resolution: everything except pattern and character."""
        return self.size, self.colour, self.shape, self.region


_OBJECT = re.compile(
    r"an? (\w+) (\w+) (\w+) (\w+)"  # size, colour, pattern, shape
    r"(?: with the (?:letter|digit|character) (\w))?"
    r" at the (\w+(?: \w+)?)"
)  # region: one or two words


def parse_description(text: str) -> list[DescribedObject | None]:
    """Parse a canonical description, one entry per "; "-separated part, None for a part that does not
    parse. Case, extra whitespace and a final period are tolerated. Prose (sentences, no "; ") gives every
    object described in it in the canonical words (`sparsecut.data.shapesworld.phrasing.describe_as_prose`)."""
    text = " ".join(text.lower().split()).rstrip(". ")
    if ";" not in text and ". " in text:  # prose ("The picture shows 2 shapes. There is a ..."): every object found
        return [DescribedObject(*m.groups()) for m in _OBJECT.finditer(text)]
    parts = [p.strip() for p in text.split(";")]
    return [DescribedObject(*m.groups()) if (m := _OBJECT.fullmatch(p)) else None for p in parts if p]


def description_metrics(preds: list[str], golds: list[str]) -> dict[str, float]:
    """Object-level precision, recall and F1, micro-averaged over all descriptions.

    An object counts as found when the prediction has an object with exactly the same attributes (as a
    multiset, so a duplicated object is only found once); unparsable parts are wrong predictions. The
    "coarse_" scores ignore pattern and character, and "exact" is the fraction of descriptions whose
    objects all match.
    """
    totals = Counter()
    for pred, gold in zip(preds, golds):
        pred_objects, gold_objects = parse_description(pred), parse_description(gold)
        if None in gold_objects:
            raise ValueError(f"reference description does not parse: {gold!r}")
        found = [o for o in pred_objects if o is not None]
        totals["predicted"] += len(pred_objects)
        totals["gold"] += len(gold_objects)
        totals["hits"] += sum((Counter(found) & Counter(gold_objects)).values())
        coarse = Counter(o.coarse() for o in found) & Counter(o.coarse() for o in gold_objects)
        totals["coarse_hits"] += sum(coarse.values())
        totals["exact"] += Counter(pred_objects) == Counter(gold_objects)
    metrics: dict[str, float] = {"n": len(golds), "exact": _ratio(totals["exact"], len(golds))}
    for prefix, hits in (("", totals["hits"]), ("coarse_", totals["coarse_hits"])):
        precision, recall = _ratio(hits, totals["predicted"]), _ratio(hits, totals["gold"])
        metrics |= {f"{prefix}precision": precision, f"{prefix}recall": recall, f"{prefix}f1": _f1(precision, recall)}
    return metrics


def score(records: list[dict]) -> dict:
    """Per-family metrics and an overall accuracy over every family but "description".

    Each record has "family", "prediction" and "answer". Every short-answer family gets "n" and "accuracy";
    one with yes/no questions also gets `yes_no_metrics` over those questions ("precision", "recall", "f1",
    "yes_ratio"). The "description" family gets `description_metrics`. Records that ask for a sentence, a
    reason or prose (a "form", with the bare answer in "short": `sparsecut.data.shapesworld.phrasing`) are
    scored apart, per form, by `states_answer`; prose descriptions also count as descriptions.
    """
    formed = [r for r in records if r.get("form") in ("sentence", "reason", "prose")]
    records = [r for r in records if r.get("form") not in ("sentence", "reason")]  # prose: also a description
    by_family: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_family[r["family"]].append(r)
    families: dict[str, dict[str, float]] = {}
    correct = total = 0
    for family, rs in sorted(by_family.items()):
        preds, golds = [r["prediction"] for r in rs], [r["answer"] for r in rs]
        if family == "description":
            families[family] = description_metrics(preds, golds)
            continue
        hits = sum(is_correct(p, g) for p, g in zip(preds, golds))
        metrics: dict[str, float] = {"n": len(rs), "accuracy": hits / len(rs)}
        yes_no = [(p, g) for p, g in zip(preds, golds) if _is_yes_no(g)]
        if yes_no:
            pope = yes_no_metrics([p for p, _ in yes_no], [g for _, g in yes_no])
            metrics |= {k: pope[k] for k in ("precision", "recall", "f1", "yes_ratio")}
        families[family] = metrics
        correct, total = correct + hits, total + len(rs)
    scores = {"families": families, "overall": {"n": total, "accuracy": _ratio(correct, total)}}
    if formed:
        scores["forms"] = {}
        for form in sorted({r["form"] for r in formed}):
            rs = [r for r in formed if r["form"] == form]
            hits = sum(states_answer(r["prediction"], r["short"], form) for r in rs)
            scores["forms"][form] = {"n": len(rs), "accuracy": hits / len(rs)}
    return scores


def to_markdown(scores: dict) -> str:
    """Render `score` output as a markdown table (for descriptions, accuracy is "exact")."""
    columns = [
        ("n", "n"),
        ("accuracy", "accuracy"),
        ("precision", "precision"),
        ("recall", "recall"),
        ("f1", "F1"),
        ("yes_ratio", "yes ratio"),
        ("coarse_f1", "coarse F1"),
    ]

    def cell(metrics: dict[str, float], key: str) -> str:
        if key == "accuracy" and "exact" in metrics:
            key = "exact"
        if key not in metrics:
            return "–"
        return str(metrics[key]) if key == "n" else f"{metrics[key]:.3f}"

    rows = list(scores["families"].items())
    if scores["overall"]["n"]:  # no overall row when only descriptions were scored
        rows.append(("**overall**", scores["overall"]))
    header = ["family", *(title for _, title in columns)]
    table = markdown_table(header, [[name, *(cell(m, key) for key, _ in columns)] for name, m in rows])
    if scores.get("forms"):
        forms = [[form, m["n"], f"{m['accuracy']:.3f}"] for form, m in scores["forms"].items()]
        table += "\n\n" + markdown_table(["answer asked for", "n", "in that form and right"], forms)
    return table
