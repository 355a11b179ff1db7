"""What exists in the toy world, as data: materials, part types, the subtypes and their captions.

The six valve types of the fine-grained guidance paper (Sec. 4.1) with four subtypes each (24 subclasses).
Subtypes of one type differ in one or two SMALL attributes (material/colour, bolt count, flange shape,
handle shape, handle colour). `CATALOGUE` holds them sorted by name, so a subclass's index is its
`subclass_id` (= torchvision ImageFolder's index of the subclass folder). `caption_for` writes the attribute
caption that lists every distinguishing attribute.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Material:
    """How a surface looks: albedo, gloss, grain, and what corrosion does to it over time."""

    phrase: str  # words used in captions
    rgb: RGB
    specular: float
    shininess: float
    roughness: float  # std of per-pixel albedo noise: cast iron is grainy, PVC is smooth
    corrosion: str  # "rust", "patina" or "none": what the "corroded" wear level draws


MATERIALS: dict[str, Material] = {
    "brass": Material("brass", (0.80, 0.62, 0.25), 0.55, 28.0, 0.03, "patina"),
    "bronze": Material("bronze", (0.58, 0.38, 0.20), 0.35, 18.0, 0.04, "patina"),
    "stainless": Material("stainless steel", (0.70, 0.72, 0.74), 0.65, 40.0, 0.02, "none"),
    "cast_iron": Material("cast iron", (0.29, 0.29, 0.30), 0.14, 8.0, 0.09, "rust"),
    "pvc": Material("white PVC", (0.88, 0.88, 0.85), 0.22, 14.0, 0.01, "none"),
    "steel_red": Material("red-painted carbon steel", (0.62, 0.12, 0.09), 0.25, 12.0, 0.03, "rust"),
    "steel_grey": Material("grey-painted carbon steel", (0.45, 0.47, 0.47), 0.20, 10.0, 0.03, "rust"),
}
# Surfaces of the parts every valve shares (bolts, stems) and of painted handles (colour set per shape).
_STEEL = Material("zinc-plated steel", (0.64, 0.65, 0.66), 0.6, 30.0, 0.03, "rust")
_PAINT = Material("paint", (0.5, 0.5, 0.5), 0.35, 20.0, 0.015, "none")

HANDLE_COLOURS: dict[str, RGB] = {
    "red": (0.80, 0.09, 0.07),
    "blue": (0.10, 0.24, 0.68),
    "yellow": (0.93, 0.74, 0.10),
    "black": (0.10, 0.10, 0.11),
}
HANDLE_NOUNS = {
    "lever": "lever handle",
    "tee": "T-handle",
    "handwheel": "handwheel",
    "actuator": "actuator box",
    "diaphragm": "diaphragm actuator",
    "none": "",
}
END_NOUNS = {"round": "round flange", "square": "square flange", "threaded": "threaded end"}
NUMBER_WORDS = {0: "no", 4: "four", 6: "six", 8: "eight"}
ATTRIBUTE_NAMES = ("material", "flange", "bolts", "handle", "handle_colour")


@dataclass(frozen=True)
class PartType:
    """A valve type: its name and the type-specific part the caption mentions (if any)."""

    name: str
    extra_phrase: str = ""  # grounded phrase of the type's characteristic part, e.g. "bonnet"
    extra_clause: str = ""  # how captions mention it; must contain extra_phrase


PART_TYPES: dict[str, PartType] = {
    p.name: p
    for p in (
        PartType("ball"),
        PartType("butterfly"),
        PartType("check", "domed cover", "a domed cover"),
        PartType("control", "yoke", "an open yoke"),
        PartType("gate", "bonnet", "a tall bonnet"),
        PartType("plug"),
    )
}


@dataclass(frozen=True)
class Subtype:
    """One fine-grained subclass: a part type plus the small attributes that tell it from its siblings."""

    part_type: str
    name: str
    material: str  # key of MATERIALS
    flange: str  # "round", "square" or "threaded" (threaded ends carry no bolts)
    bolts: int  # visible bolts on each flange
    handle: str  # key of HANDLE_NOUNS
    handle_colour: str  # key of HANDLE_COLOURS, or "none" without a handle

    @property
    def subclass(self) -> str:
        return f"{self.part_type}/{self.name}"

    @property
    def subclass_dir(self) -> str:
        """Folder name: one level (ImageFolder-friendly), no dots (extension parsers split on them)."""
        return f"{self.part_type}__{self.name}"

    def attributes(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ATTRIBUTE_NAMES}


def _catalogue() -> tuple[Subtype, ...]:
    # Per type: a base subtype and variants one or two attribute changes away (star or 2x2 factorial),
    # so every pair within a type differs in 1-2 attributes. Materials, bolt counts, flange shapes and
    # handle shapes all vary somewhere; the classifier has to look at the small parts.
    rows = [
        # type, name, material, flange, bolts, handle, handle colour
        ("ball", "brass_red_lever", "brass", "threaded", 0, "lever", "red"),
        ("ball", "brass_blue_lever", "brass", "threaded", 0, "lever", "blue"),
        ("ball", "pvc_red_lever", "pvc", "threaded", 0, "lever", "red"),
        ("ball", "brass_red_tee", "brass", "threaded", 0, "tee", "red"),
        ("butterfly", "iron_lever_4bolt", "cast_iron", "round", 4, "lever", "blue"),
        ("butterfly", "iron_lever_8bolt", "cast_iron", "round", 8, "lever", "blue"),
        ("butterfly", "iron_handwheel_4bolt", "cast_iron", "round", 4, "handwheel", "blue"),
        ("butterfly", "iron_actuator_4bolt", "cast_iron", "round", 4, "actuator", "blue"),
        ("check", "grey_steel_4bolt", "steel_grey", "round", 4, "none", "none"),
        ("check", "grey_steel_6bolt", "steel_grey", "round", 6, "none", "none"),
        ("check", "bronze_4bolt", "bronze", "round", 4, "none", "none"),
        ("check", "bronze_6bolt", "bronze", "round", 6, "none", "none"),
        ("control", "blue_diaphragm_6bolt", "stainless", "round", 6, "diaphragm", "blue"),
        ("control", "blue_diaphragm_8bolt", "stainless", "round", 8, "diaphragm", "blue"),
        ("control", "yellow_diaphragm_6bolt", "stainless", "round", 6, "diaphragm", "yellow"),
        ("control", "yellow_diaphragm_8bolt", "stainless", "round", 8, "diaphragm", "yellow"),
        ("gate", "round_4bolt", "cast_iron", "round", 4, "handwheel", "red"),
        ("gate", "round_8bolt", "cast_iron", "round", 8, "handwheel", "red"),
        ("gate", "square_4bolt", "cast_iron", "square", 4, "handwheel", "red"),
        ("gate", "square_8bolt", "cast_iron", "square", 8, "handwheel", "red"),
        ("plug", "red_steel_tee", "steel_red", "square", 4, "tee", "black"),
        ("plug", "red_steel_lever", "steel_red", "square", 4, "lever", "black"),
        ("plug", "iron_tee", "cast_iron", "square", 4, "tee", "black"),
        ("plug", "iron_lever", "cast_iron", "square", 4, "lever", "black"),
    ]
    return tuple(sorted((Subtype(*row) for row in rows), key=lambda s: s.subclass))


#: All subclasses, sorted by name; a subclass's index here is its `subclass_id`.
CATALOGUE: tuple[Subtype, ...] = _catalogue()
SUBCLASS_IDS: dict[str, int] = {s.subclass: i for i, s in enumerate(CATALOGUE)}


def get_subtype(subclass: str) -> Subtype:
    """The catalogue entry named "type/name" (raises KeyError with the known names otherwise)."""
    try:
        return CATALOGUE[SUBCLASS_IDS[subclass]]
    except KeyError:
        raise KeyError(f"unknown subclass {subclass!r}; known: {sorted(SUBCLASS_IDS)}") from None


# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------

# (prefix, handle before ends?) — varied a little, always listing every distinguishing attribute.
_TEMPLATES = (
    ("a {t} valve with ", False),
    ("photo of a {t} valve showing ", True),
    ("{t} valve: ", False),
    ("close-up of a {t} valve with ", True),
)


def _article(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption_for(subtype: Subtype, template: int = 0, wear: str = "clean") -> str:
    """The attribute caption: type, material, ends with bolt count, handle shape and colour, extra part."""
    mat = MATERIALS[subtype.material]
    body = _article(f"{mat.phrase} body")
    if subtype.flange == "threaded":
        ends = "two threaded ends"
    else:
        ends = f"two {subtype.flange} flanges with {NUMBER_WORDS[subtype.bolts]} bolts each"
    rest = []
    if subtype.handle != "none":
        rest.append(_article(f"{subtype.handle_colour} {HANDLE_NOUNS[subtype.handle]}"))
    extra = PART_TYPES[subtype.part_type].extra_clause
    if extra:
        rest.append(extra)
    prefix, handle_first = _TEMPLATES[template % len(_TEMPLATES)]
    items = [body, *rest, ends] if handle_first else [body, ends, *rest]
    text = prefix.format(t=subtype.part_type) + _join(items)
    if wear == "weathered":
        text += ", weathered and dusty"
    elif wear == "corroded":
        text += ", with green patina spots" if mat.corrosion == "patina" else ", with rust spots"
    return text
