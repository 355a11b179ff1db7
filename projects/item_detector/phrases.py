"""Noun phrases of a caption, for grounding its objects (ITEM Eq. 5: "each semantic object described in the
caption").

GLIP, which the paper uses, finds noun phrases with NLTK's tagger; spaCy or NLTK models cannot be installed
here (they are separate downloads), so this is a small deterministic chunker instead. Captioners write short,
regular English ("a red car parked on a street next to a tall building"), which a stop-word chunker handles:

1. lower-case and split into words (hyphenated words stay whole) and punctuation;
2. cut the sentence at punctuation, prepositions, conjunctions, pronouns, auxiliaries and verbs (a fixed list,
   plus any word ending in -ing that is not a known -ing noun such as "building" or "fitting");
3. drop leading and trailing articles, determiners and number words from each piece ("two round flanges
   each" -> "round flanges": the crop shows one object);
4. drop pieces about the picture rather than its content ("a close-up photo of ...");
5. re-join colour lists split by a conjunction ("red and white sign").

Without a part-of-speech tagger, a predicate adjective after a verb ("the door is open") becomes a phrase of
its own and a verb missing from the list stays inside a phrase; the detector then simply finds nothing for it.
The output is deterministic and ordered as in the caption, without repeats.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+(?:['\-][a-z0-9]+)*|[^\sa-z0-9]")


def _vocabulary(text: str) -> frozenset[str]:
    return frozenset(text.split())


_PREPOSITIONS = _vocabulary(
    "about above across after against along alongside amid among around as at atop before behind below beneath "
    "beside besides between beyond by despite down during except for from in inside into like near next of off "
    "on onto opposite out outside over past per since than through throughout to toward towards under "
    "underneath unlike until up upon via with within without"
)
_CONJUNCTIONS = _vocabulary("and or but nor so yet while whereas although though because if then")
_PRONOUNS = _vocabulary(
    "it its it's they them their theirs he him his she her hers we us our you your i me my this that these "
    "those there here who whom whose which what where when why how one ones itself themselves"
)
_VERBS = _vocabulary(
    "is are was were be been being am has have had do does did can could will would shall should may might must "
    "shows show shown sits sit stands stand lies lie holds hold contains contain looks look appears appear seems "
    "seem features feature displays display depicts depict includes include made seen taken used placed parked "
    "filled covered attached mounted installed connected located set laid hung kept left built"
)
_DETERMINERS = _vocabulary(
    "a an the some any each every either neither no another other such both all several many few more most "
    "much lots lot plenty couple pair single various multiple"
)
_NUMBERS = _vocabulary(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "twenty thirty forty fifty hundred thousand dozen dozens"
)
_ING_NOUNS = _vocabulary(
    "building buildings ceiling clothing painting paintings ring rings string strings thing things bearing "
    "bearings fitting fittings housing housings coupling couplings railing railings wing wings "
    "spring springs king morning evening wedding pudding dumpling stuffing frosting icing topping toppings "
    "lighting wiring piping tubing casing casings opening openings sibling siblings earring earrings "
    "stocking stockings sterling swing swings awning awnings landing parking seating bedding packaging "
    "coating coatings mounting mountings ending"
)
_META = _vocabulary(
    "photo photos photograph image images picture pictures pic close-up closeup view shot snapshot illustration "
    "rendering render screenshot frame drawing sketch image's"
)
_COLOURS = _vocabulary(
    "red orange yellow green blue purple pink brown black white grey gray silver gold golden beige tan navy "
    "teal maroon dark light bright pale"
)
_BREAKS = _PREPOSITIONS | _CONJUNCTIONS | _PRONOUNS | _VERBS


def _is_break(word: str) -> bool:
    if not word[0].isalnum():
        return True  # punctuation
    if word in _BREAKS:
        return True
    return word.endswith("ing") and word not in _ING_NOUNS and len(word) > 4


def _is_quantity(word: str) -> bool:
    return word in _DETERMINERS or word in _NUMBERS or word.isdigit()


def _trim(chunk: list[str]) -> list[str]:
    """Drop leading and trailing determiners and number words ("two bolts each" -> "bolts")."""
    start, end = 0, len(chunk)
    while start < end and _is_quantity(chunk[start]):
        start += 1
    while end > start and _is_quantity(chunk[end - 1]):
        end -= 1
    return chunk[start:end]


def noun_phrases(caption: str, max_phrases: int | None = None) -> list[str]:
    """The noun phrases of `caption` in order of appearance, without repeats (see module docstring).

    >>> noun_phrases("a close-up photo of a red car parked next to two tall buildings")
    ['red car', 'tall buildings']
    """
    words = _WORD.findall(" ".join(caption.lower().split()))
    pieces: list[tuple[list[str], str | None]] = []  # (words, the break word that ended the piece)
    current: list[str] = []
    for word in words:
        if _is_break(word):
            pieces.append((current, word))
            current = []
        else:
            current.append(word)
    pieces.append((current, None))

    phrases: list[str] = []
    carry: list[str] = []  # a colour list waiting for its noun: "red and" + "white sign"
    for piece, ended_by in pieces:
        chunk = _trim(piece)
        if carry:  # the colours join the next phrase, or stand alone when nothing follows
            chunk = carry + chunk if chunk else carry[:-1]
            carry = []
        if not chunk:
            continue
        if ended_by in ("and", "or") and all(w in _COLOURS for w in chunk):
            carry = [*chunk, ended_by]
            continue
        if chunk[-1] in _META:
            continue
        phrase = " ".join(chunk)
        if phrase not in phrases:
            phrases.append(phrase)
    return phrases[:max_phrases] if max_phrases is not None else phrases
