"""The embedded toy world: a deterministic, procedural fine-grained dataset of industrial valves.

Why it exists
-------------
Every shipped config (the real-vs-generated classifier, the ITEM detector, the inpainting probe, the
fine-grained guidance generator and its subtype classifier) has to run on a fresh checkout with no network.
Instead of a download, the repo ships this generator: `ensure_toy_world()` writes the dataset under `data/`
the first time a config needs it and reuses it afterwards. Nothing here uses a global RNG: the same
`ToyWorldSpec` gives byte-identical PNGs with the same numpy/Pillow/zlib on the same kind of CPU (numpy's
SIMD maths may round a few pixels differently elsewhere, which is why the cache is keyed by the spec and
not by the content hash).

What is drawn
-------------
The six valve types of the fine-grained guidance paper (Sec. 4.1): ball, butterfly, check, control, gate
and plug, with four subtypes each (24 subclasses). Subtypes of one type differ in one or two SMALL
attributes (material/colour, bolt count 4/6/8, flange shape round/square/threaded, handle shape
lever/T-handle/handwheel/actuator box/diaphragm actuator, handle colour), so they are confusable the way
real valve subclasses are. `CATALOGUE` holds them as data; drawing code is per part type and per
attribute value, never per subtype.

A part is a list of polygons in object units, each with a shading model (cylinder, ellipsoid, ring,
tilted plane) lit by a Blinn-Phong light, drawn with PIL at `supersample` x the output size and
LANCZOS-downsampled (anti-aliasing). Each image varies the pose (rotation +-20 deg, scale, translation),
proportions (+-6 %), lever side, background (plain, gradient, concrete, wood planks, brushed metal),
light direction and gain, a drop shadow, vignetting and Gaussian sensor noise. Following the paper's
temporal and environmental variants (Sec. 3, Eq. 4-5), every scene also has a wear level (clean,
weathered, corroded: rust on steel and iron, green patina on brass and bronze) and a lighting condition
(normal, low light, overexposed, glare). A `Scene` is plain data: `dataclasses.replace(scene, wear=...)`
re-renders the SAME photograph aged or relit, which is exactly the (x, x') / (x, A_e(x)) pairs of Eq. 4-5.

Annotations, per image: a caption listing the subtype's distinguishing attributes (four templates, e.g.
"a ball valve with a brass body, a red lever handle and two threaded ends"), the subclass name
("ball/brass_red_lever") and integer id (alphabetical, so it equals torchvision ImageFolder's index of the
subclass folder), the part type, the attributes, and grounded part boxes with one noun phrase each
("ball valve", "brass body", "round flange", "bolt", "red lever handle", "bonnet", ...). Every phrase is a
substring of the caption (ITEM Sec. III grounds caption noun phrases to boxes). Boxes are [x0, y0, x1, y1]
pixel edges of the saved image (x1, y1 exclusive, as for `PIL.Image.crop`), computed from the transformed
polygons, so they are tight to what is drawn and clipped to the image.

Real and generated images
-------------------------
"real" images are the rendered photographs above. "generated" images come from two toy generators that
draw NEW scenes (their own seeds, same distribution of subtypes and captions) and leave the fingerprints
of the generator families they stand for, until the project's own diffusion generator replaces them.
All are 8-bit RGB PNGs of the same size, so a detector cannot separate them by size, mode or format.
The two toy generators, ``toy_gan`` and ``toy_ldm``, and the fingerprints they leave are described in
`common.data.toy_world.generators`; the layout on disk and the determinism guarantees in
`common.data.toy_world.writer` (see also the forgelab README).

Modules
-------
* `catalogue`: what exists, as data: materials, part types, the subtypes (`CATALOGUE`) and their captions.
* `geometry`: polygons in object units with their shading models, shape primitives, pose and tight boxes.
* `valves`: each valve type's body, ends, bolts and handle built from those shapes.
* `scenes`: `Scene`, everything that varies between photographs of one subclass, and `sample_scene`.
* `rendering`: a scene drawn as a photograph (`render_scene`, `render_part`) and its `scene_annotations`.
* `generators`: the toy GAN and latent-diffusion generators (`TOY_GENERATORS`, `render_toy_gan`, ...).
* `writer`: `ToyWorldSpec` and the world on disk: folders, manifests, file lock, atomic replacement,
  `generate_toy_world` and `ensure_toy_world`.
* `cli`: ``python -m common.data.toy_world`` (regenerate, print counts and time).

Everything public is re-exported here: import from ``common.data.toy_world``, not from the modules.
"""

from __future__ import annotations

from common.data.toy_world.catalogue import (
    ATTRIBUTE_NAMES as ATTRIBUTE_NAMES,
)
from common.data.toy_world.catalogue import (
    CATALOGUE,
    PART_TYPES,
    SUBCLASS_IDS,
    Material,
    PartType,
    Subtype,
    caption_for,
    get_subtype,
)
from common.data.toy_world.catalogue import (
    END_NOUNS as END_NOUNS,
)
from common.data.toy_world.catalogue import (
    HANDLE_COLOURS as HANDLE_COLOURS,
)
from common.data.toy_world.catalogue import (
    HANDLE_NOUNS as HANDLE_NOUNS,
)
from common.data.toy_world.catalogue import (
    MATERIALS as MATERIALS,
)
from common.data.toy_world.catalogue import (
    NUMBER_WORDS as NUMBER_WORDS,
)
from common.data.toy_world.catalogue import (
    RGB as RGB,
)
from common.data.toy_world.cli import main as main
from common.data.toy_world.generators import (
    GENERATOR_DESCRIPTIONS,
    TOY_GENERATORS,
    render_toy_gan,
    render_toy_ldm,
)
from common.data.toy_world.generators import (
    GeneratorFn as GeneratorFn,
)
from common.data.toy_world.geometry import Box as Box
from common.data.toy_world.rendering import render_part, render_scene, scene_annotations
from common.data.toy_world.scenes import Scene, sample_scene
from common.data.toy_world.writer import (
    CSV_HEADER as CSV_HEADER,
)
from common.data.toy_world.writer import (
    FAKE_DIR as FAKE_DIR,
)
from common.data.toy_world.writer import (
    FORMAT_VERSION as FORMAT_VERSION,
)
from common.data.toy_world.writer import (
    LOGGER as LOGGER,
)
from common.data.toy_world.writer import (
    META_FILE as META_FILE,
)
from common.data.toy_world.writer import (
    REAL_DIR as REAL_DIR,
)
from common.data.toy_world.writer import (
    SPLITS,
    ToyWorldSpec,
    ensure_toy_world,
    generate_toy_world,
)

__all__ = [
    "CATALOGUE",
    "GENERATOR_DESCRIPTIONS",
    "PART_TYPES",
    "SPLITS",
    "SUBCLASS_IDS",
    "TOY_GENERATORS",
    "Material",
    "PartType",
    "Scene",
    "Subtype",
    "ToyWorldSpec",
    "caption_for",
    "ensure_toy_world",
    "generate_toy_world",
    "get_subtype",
    "render_part",
    "render_scene",
    "render_toy_gan",
    "render_toy_ldm",
    "sample_scene",
    "scene_annotations",
]
