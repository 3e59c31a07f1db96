"""Synthetic coloured-shape images and their captions in several languages.

The embedded demo (sample WARC + loopback image server) and the tiny CLIP
model that the demo scores with are both built from this vocabulary, so that
the CLIP stage really discriminates matching from mismatching alt texts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

#: name -> RGB; kept to colours a tiny model tells apart reliably
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "black": (15, 15, 15),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle")

#: language -> colour word per colour (adjective as used before/after a noun)
_COLOUR_WORDS: dict[str, dict[str, str]] = {
    "en": {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "black": "black", "purple": "purple"},
    "de": {"red": "Rot", "green": "Grün", "blue": "Blau", "yellow": "Gelb", "black": "Schwarz", "purple": "Violett"},
    "fr": {"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune", "black": "noir", "purple": "violet"},
    "es": {"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo", "black": "negro", "purple": "morado"},
}
_SHAPE_WORDS: dict[str, dict[str, str]] = {
    "en": {"circle": "circle", "square": "square", "triangle": "triangle"},
    "de": {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck"},
    "fr": {"circle": "cercle", "square": "carré", "triangle": "triangle"},
    "es": {"circle": "círculo", "square": "cuadrado", "triangle": "triángulo"},
}
#: templates per language; {c} colour word, {s} shape word
TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": (
        "a photo of a {c} {s} drawn on a sheet of white paper",
        "this picture shows a {c} {s} in the middle of the image",
        "a simple {c} {s} shape, drawn with a thick brush on white paper",
    ),
    "de": (
        "ein {s} in {c} auf weißem Hintergrund",
        "Foto: ein {s} in der Farbe {c}, gezeichnet auf weißem Papier",
    ),
    "fr": (
        "un {s} {c} sur un fond blanc",
        "photo d'un {s} {c} dessiné sur du papier blanc",
    ),
    "es": (
        "un {s} {c} sobre un fondo blanco",
        "foto de un {s} {c} dibujado en papel blanco",
    ),
}
#: language-free captions (routed to nolang): colour emoji + geometric symbols
_EMOJI: dict[str, str] = {
    "red": "🔴", "green": "🟢", "blue": "🔵", "yellow": "🟡", "black": "⚫", "purple": "🟣",
}
_SYMBOL: dict[str, str] = {"circle": "●", "square": "■", "triangle": "▲"}
LANGUAGES = ("en", "de", "fr", "es")


@dataclass(frozen=True)
class ShapeSpec:
    colour: str
    shape: str


def caption(spec: ShapeSpec, language: str, variant: int = 0) -> str:
    """A caption of ``spec`` in ``language`` (``nolang`` gives an emoji caption)."""
    if language == "nolang":
        e, s = _EMOJI[spec.colour], _SYMBOL[spec.shape]
        return [f"{e}{e} {s}{s}", f"{e} {s} {e} {s}", f"{s}{e}{s}{e}"][variant % 3]
    templates = TEMPLATES[language]
    return templates[variant % len(templates)].format(
        c=_COLOUR_WORDS[language][spec.colour], s=_SHAPE_WORDS[language][spec.shape]
    )


def all_captions(spec: ShapeSpec) -> list[str]:
    out = []
    for lang in LANGUAGES:
        out += [caption(spec, lang, v) for v in range(len(TEMPLATES[lang]))]
    out += [caption(spec, "nolang", v) for v in range(3)]
    return out


def render(spec: ShapeSpec, size: int = 256, seed: int = 0, width: int | None = None) -> Image.Image:
    """Draw ``spec`` on a light background with a little jitter (position, scale, tint)."""
    rng = random.Random(seed)
    w, h = (width or size), size
    bg = tuple(min(255, 235 + rng.randint(0, 20)) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    base = COLOURS[spec.colour]
    colour = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in base)
    side = min(w, h)
    r = side * rng.uniform(0.28, 0.42)
    cx = w / 2 + rng.uniform(-0.1, 0.1) * side
    cy = h / 2 + rng.uniform(-0.1, 0.1) * side
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif spec.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.9), (cx + r, cy + r * 0.9)], fill=colour)
    return img


def all_specs() -> list[ShapeSpec]:
    return [ShapeSpec(c, s) for c in COLOURS for s in SHAPES]
