"""Draw synthetic scenes with Pillow, each with a true caption in en/de/fr/es.

A scene is a coloured object (shape) on a background that is either a coloured texture (plain,
striped, dotted, checkered) or a named scene (beach, grass, snow, night sky). The vocabulary is
small on purpose: a tiny CLIP learns it on a CPU in minutes, yet captions are varied enough
("a red circle on a striped blue background", "ein grünes Auto am Strand") that a mismatched
caption usually differs in more than one attribute. All geometry is relative to the image size,
so a 96 px training image and a 640 px demo image look the same to a 64 px model.

The demo CLIP learns ``COLOURS`` x ``SHAPES`` from :func:`random_scene`. ``RARE_COLOURS`` and
``RARE_SHAPES`` are the web's long tail: only the demo corpus draws them (:func:`rare_scene`),
so the model meets them for the first time there, as a web-trained CLIP meets rare concepts.
Nothing added for the corpus (rare concepts, :func:`draw_text`, counted captions) changes what
the training draws produce.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "COLOURS",
    "SHAPES",
    "RARE_COLOURS",
    "RARE_SHAPES",
    "TEXTURES",
    "SCENES",
    "LANGUAGES",
    "Scene",
    "random_scene",
    "rare_scene",
    "near_miss",
    "all_scenes",
    "caption",
    "draw_scene",
    "draw_text",
    "encode_image",
]

# colour name -> RGB; distinct hues so a 64 px model can tell them apart
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 35),
    "purple": (135, 45, 170),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "car", "house")
# the long tail: never in the training draws (see the module docstring)
RARE_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (250, 140, 190),
    "brown": (130, 80, 40),
    "grey": (128, 128, 128),
    "teal": (0, 128, 128),
}
RARE_SHAPES = ("heart", "cross", "diamond", "hexagon", "ring", "arrow")
_RGB = {**COLOURS, **RARE_COLOURS}
TEXTURES = ("plain", "striped", "dotted", "checkered")
SCENES = ("beach", "grass", "snow", "night")
LANGUAGES = ("en", "de", "fr", "es")

# --- translations -------------------------------------------------------------------------------
# German: gender per noun, adjective after "ein" (nom.) and without article (dat., "auf blauem ...")
_DE_NOUN = {
    "circle": ("Kreis", "m"),
    "square": ("Quadrat", "n"),
    "triangle": ("Dreieck", "n"),
    "star": ("Stern", "m"),
    "car": ("Auto", "n"),
    "house": ("Haus", "n"),
    "heart": ("Herz", "n"),
    "cross": ("Kreuz", "n"),
    "diamond": ("Raute", "f"),
    "hexagon": ("Sechseck", "n"),
    "ring": ("Ring", "m"),
    "arrow": ("Pfeil", "m"),
}
_DE_COLOUR = {
    "red": "rot",
    "green": "grün",
    "blue": "blau",
    "yellow": "gelb",
    "purple": "lila",
    "orange": "orange",
    "white": "weiß",
    "black": "schwarz",
    "pink": "rosa",
    "brown": "braun",
    "grey": "grau",
    "teal": "türkis",
}
_DE_UNDECLINED = ("lila", "orange", "rosa", "türkis")
_DE_TEXTURE = {"striped": "gestreift", "dotted": "gepunktet", "checkered": "kariert"}
_DE_SCENE = {
    "beach": "am Strand",
    "grass": "auf einer Wiese",
    "snow": "im Schnee",
    "night": "am Nachthimmel",
}
_FR_NOUN = {
    "circle": ("cercle", "m"),
    "square": ("carré", "m"),
    "triangle": ("triangle", "m"),
    "star": ("étoile", "f"),
    "car": ("voiture", "f"),
    "house": ("maison", "f"),
    "heart": ("cœur", "m"),
    "cross": ("croix", "f"),
    "diamond": ("losange", "m"),
    "hexagon": ("hexagone", "m"),
    "ring": ("anneau", "m"),
    "arrow": ("flèche", "f"),
}
_FR_COLOUR = {  # (masculine, feminine)
    "red": ("rouge", "rouge"),
    "green": ("vert", "verte"),
    "blue": ("bleu", "bleue"),
    "yellow": ("jaune", "jaune"),
    "purple": ("violet", "violette"),
    "orange": ("orange", "orange"),
    "white": ("blanc", "blanche"),
    "black": ("noir", "noire"),
    "pink": ("rose", "rose"),
    "brown": ("marron", "marron"),
    "grey": ("gris", "grise"),
    "teal": ("turquoise", "turquoise"),
}
_FR_TEXTURE = {"striped": "rayé", "dotted": "à pois", "checkered": "à carreaux"}
_FR_SCENE = {
    "beach": "sur une plage",
    "grass": "dans l'herbe",
    "snow": "dans la neige",
    "night": "dans le ciel nocturne",
}
_ES_NOUN = {
    "circle": ("círculo", "m"),
    "square": ("cuadrado", "m"),
    "triangle": ("triángulo", "m"),
    "star": ("estrella", "f"),
    "car": ("coche", "m"),
    "house": ("casa", "f"),
    "heart": ("corazón", "m"),
    "cross": ("cruz", "f"),
    "diamond": ("rombo", "m"),
    "hexagon": ("hexágono", "m"),
    "ring": ("anillo", "m"),
    "arrow": ("flecha", "f"),
}
_ES_COLOUR = {
    "red": ("rojo", "roja"),
    "green": ("verde", "verde"),
    "blue": ("azul", "azul"),
    "yellow": ("amarillo", "amarilla"),
    "purple": ("morado", "morada"),
    "orange": ("naranja", "naranja"),
    "white": ("blanco", "blanca"),
    "black": ("negro", "negra"),
    "pink": ("rosa", "rosa"),
    "brown": ("marrón", "marrón"),
    "grey": ("gris", "gris"),
    "teal": ("turquesa", "turquesa"),
}
_ES_TEXTURE = {"striped": "a rayas", "dotted": "de lunares", "checkered": "a cuadros"}
_ES_SCENE = {
    "beach": "en una playa",
    "grass": "en la hierba",
    "snow": "en la nieve",
    "night": "en el cielo nocturno",
}
_EN_TEXTURE = {"striped": "striped", "dotted": "dotted", "checkered": "checkered"}
_EN_SCENE = {
    "beach": "on a beach",
    "grass": "on grass",
    "snow": "in the snow",
    "night": "in the night sky",
}
_DE_ENDING = {"m": "er", "n": "es", "f": "e"}
_DE_ARTICLE = {"m": "ein", "n": "ein", "f": "eine"}

# caption templates per language; {obj} = "a red circle", {where} = "on a blue background"
TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("{obj} {where}", "a photo of {obj} {where}", "{obj} {where}, illustration"),
    "de": ("{obj} {where}", "Foto: {obj} {where}", "{obj} {where}, Illustration"),
    "fr": ("{obj} {where}", "photo d'{obj} {where}", "{obj} {where}, illustration"),
    "es": ("{obj} {where}", "foto de {obj} {where}", "{obj} {where}, ilustración"),
}


@dataclass(frozen=True)
class Scene:
    """What an image shows: ``colour`` ``shape`` on ``background`` (a texture or a scene)."""

    colour: str
    shape: str
    #: a texture name (with ``bg_colour``) or a scene name (``bg_colour`` is None)
    background: str
    bg_colour: str | None = None

    @property
    def key(self) -> str:
        """Canonical English caption: equal keys mean the same true caption."""
        return caption(self, "en", 0)


def all_scenes(*, rare: bool = False) -> list[Scene]:
    """Every valid scene of the vocabulary, in a fixed order; ``rare`` adds the long tail's
    (objects in ``RARE_COLOURS`` or ``RARE_SHAPES``; backgrounds stay common)."""
    out = []
    colours, shapes = (_RGB, SHAPES + RARE_SHAPES) if rare else (COLOURS, SHAPES)
    for colour in colours:
        for shape in shapes:
            for bg in TEXTURES:
                for bgc in COLOURS:
                    if bgc != colour:
                        out.append(Scene(colour, shape, bg, bgc))
            for sc in SCENES:
                if not _clashes(colour, sc):
                    out.append(Scene(colour, shape, sc, None))
    return out


def _clashes(colour: str, scene: str) -> bool:
    # an object must stay visible against the scene's dominant colour
    return (colour, scene) in {("white", "snow"), ("black", "night"), ("green", "grass")}


def random_scene(rng: random.Random, scene_share: float = 0.3) -> Scene:
    """Draw a valid scene uniformly over attributes (scenes for ``scene_share`` of them)."""
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    if rng.random() < scene_share:
        scene = rng.choice([s for s in SCENES if not _clashes(colour, s)])
        return Scene(colour, shape, scene, None)
    bgc = rng.choice([c for c in COLOURS if c != colour])
    return Scene(colour, shape, rng.choice(TEXTURES), bgc)


def rare_scene(rng: random.Random) -> Scene:
    """A scene whose object has a rare shape, a rare colour or both (the corpus's long tail)."""
    base = random_scene(rng)
    # half of them unfamiliar in both: those are the true pairs a threshold loses first
    which = rng.choice(("shape", "colour", "both", "both"))
    shape = base.shape if which == "colour" else rng.choice(RARE_SHAPES)
    colour = base.colour if which == "shape" else rng.choice(list(RARE_COLOURS))
    return Scene(colour, shape, base.background, base.bg_colour)


def near_miss(scene: Scene, rng: random.Random, attribute: str | None = None) -> Scene:
    """``scene`` with one attribute (object ``colour``, ``shape`` or ``background``) changed,
    ``attribute`` or one drawn at random."""
    which = attribute or rng.choice(("colour", "shape", "background"))
    if which == "colour":
        taken = {scene.bg_colour, scene.colour}
        options = [c for c in COLOURS if c not in taken and not _clashes(c, scene.background)]
        return Scene(rng.choice(options), scene.shape, scene.background, scene.bg_colour)
    if which == "shape":
        shapes = [s for s in SHAPES if s != scene.shape]
        return Scene(scene.colour, rng.choice(shapes), scene.background, scene.bg_colour)
    if scene.bg_colour is not None:
        if rng.random() < 0.5:
            options = [c for c in COLOURS if c not in (scene.colour, scene.bg_colour)]
            return Scene(scene.colour, scene.shape, scene.background, rng.choice(options))
        textures = [t for t in TEXTURES if t != scene.background]
        return Scene(scene.colour, scene.shape, rng.choice(textures), scene.bg_colour)
    scenes = [s for s in SCENES if s != scene.background and not _clashes(scene.colour, s)]
    return Scene(scene.colour, scene.shape, rng.choice(scenes), None)


def _article_en(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}


def caption(scene: Scene, language: str = "en", template: int = 0, count: int = 1) -> str:
    """The true caption of ``scene`` in ``language`` (en, de, fr, es) with template ``template``.

    ``count`` 2-5 (English only) names that many objects ("three red circles on ..."): the
    caption of a picture with that many, a partly right one of a picture with one.
    """
    c, s, bg, bgc = scene.colour, scene.shape, scene.background, scene.bg_colour
    if count != 1 and (language != "en" or count not in _NUMBERS):
        raise ValueError(f"count must be 1, or 2-5 in English; got {count} in {language!r}")
    if language == "en":
        plural = s + ("es" if s.endswith(("s", "x", "ch", "sh")) else "s")
        obj = f"{_article_en(c)} {c} {s}" if count == 1 else f"{_NUMBERS[count]} {c} {plural}"
        if bgc is None:
            where = _EN_SCENE[bg]
        else:
            tex = "" if bg == "plain" else _EN_TEXTURE[bg] + " "
            where = f"on a {tex}{bgc} background"
    elif language == "de":
        noun, g = _DE_NOUN[s]
        adj = _DE_COLOUR[c]
        adj = adj if adj in _DE_UNDECLINED else adj + _DE_ENDING[g]
        obj = f"{_DE_ARTICLE[g]} {adj} {noun}"
        if bgc is None:
            where = _DE_SCENE[bg]
        else:
            col = _DE_COLOUR[bgc]
            col = col if col in _DE_UNDECLINED else col + "em"
            tex = "" if bg == "plain" else _DE_TEXTURE[bg] + "em "
            where = f"auf {tex}{col} Hintergrund"
    elif language == "fr":
        noun, g = _FR_NOUN[s]
        adj = _FR_COLOUR[c][g == "f"]
        obj = f"{'une' if g == 'f' else 'un'} {noun} {adj}"
        if bgc is None:
            where = _FR_SCENE[bg]
        else:
            tex = "" if bg == "plain" else " " + _FR_TEXTURE[bg]
            where = f"sur fond {_FR_COLOUR[bgc][0]}{tex}"
    elif language == "es":
        noun, g = _ES_NOUN[s]
        adj = _ES_COLOUR[c][g == "f"]
        obj = f"{'una' if g == 'f' else 'un'} {noun} {adj}"
        if bgc is None:
            where = _ES_SCENE[bg]
        else:
            tex = "" if bg == "plain" else " " + _ES_TEXTURE[bg]
            where = f"sobre fondo {_ES_COLOUR[bgc][0]}{tex}"
    else:
        raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")
    templates = TEMPLATES[language]
    text = templates[template % len(templates)].format(obj=obj, where=where)
    return text[0].upper() + text[1:] if template % len(templates) == 2 else text


# --- drawing ------------------------------------------------------------------------------------
def _tint(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second colour of a texture: lighter for dark colours, darker for light ones."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    target = 0 if lum > 170 else 255
    return tuple(int(v + (target - v) * 0.55) for v in rgb)  # type: ignore[return-value]


def _jitter(
    rgb: tuple[int, int, int], rng: random.Random, amount: int = 12
) -> tuple[int, int, int]:
    return tuple(max(0, min(255, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


def _draw_background(
    draw: ImageDraw.ImageDraw, w: int, h: int, scene: Scene, rng: random.Random
) -> None:
    unit = min(w, h)
    if scene.bg_colour is not None:
        base = _jitter(_RGB[scene.bg_colour], rng)
        alt = _tint(base)
        draw.rectangle([0, 0, w, h], fill=base)
        step = max(4, int(unit * rng.uniform(0.08, 0.14)))
        if scene.background == "striped":
            vertical = rng.random() < 0.5
            for k in range(0, (w if vertical else h) + step, 2 * step):
                box = [k, 0, k + step - 1, h] if vertical else [0, k, w, k + step - 1]
                draw.rectangle(box, fill=alt)
        elif scene.background == "dotted":
            r = max(2, step // 3)
            for y in range(step // 2, h + step, step):
                for x in range(step // 2, w + step, step):
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=alt)
        elif scene.background == "checkered":
            for yi, y in enumerate(range(0, h, step)):
                for xi, x in enumerate(range(0, w, step)):
                    if (xi + yi) % 2:
                        draw.rectangle([x, y, x + step - 1, y + step - 1], fill=alt)
        return
    horizon = int(h * rng.uniform(0.4, 0.6))
    if scene.background == "beach":
        draw.rectangle([0, 0, w, horizon], fill=_jitter((120, 190, 240), rng))
        draw.rectangle([0, horizon, w, horizon + h // 8], fill=_jitter((30, 110, 170), rng))
        draw.rectangle([0, horizon + h // 8, w, h], fill=_jitter((230, 205, 150), rng))
    elif scene.background == "grass":
        draw.rectangle([0, 0, w, horizon], fill=_jitter((150, 200, 245), rng))
        draw.rectangle([0, horizon, w, h], fill=_jitter((70, 150, 50), rng))
        for _ in range(40):
            x, y = rng.randrange(w), rng.randrange(horizon, h)
            draw.line([x, y, x + rng.randint(-3, 3), y - unit // 25], fill=(40, 110, 30), width=2)
    elif scene.background == "snow":
        draw.rectangle([0, 0, w, horizon], fill=_jitter((185, 195, 210), rng))
        draw.rectangle([0, horizon, w, h], fill=_jitter((240, 244, 250), rng, 5))
    else:  # night
        draw.rectangle([0, 0, w, h], fill=_jitter((15, 20, 60), rng, 8))
        for _ in range(60):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.choice((1, 1, 2))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(250, 250, 220))


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else r * 0.45
        a = rot + k * math.pi / 5 - math.pi / 2
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_object(
    draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, scene: Scene, rng: random.Random
) -> None:
    fill = _jitter(_RGB[scene.colour], rng)
    outline = _tint(fill)
    dark = tuple(int(v * 0.6) for v in fill)
    s = scene.shape
    if s == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=2)
    elif s == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=2)
    elif s == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)], fill=fill)
    elif s == "star":
        draw.polygon(_star(cx, cy, r * 1.15, rng.uniform(-0.2, 0.2)), fill=fill)
    elif s == "car":
        wheel = (90, 90, 90) if scene.colour == "black" else (25, 25, 25)
        draw.rectangle([cx - r, cy - r * 0.15, cx + r, cy + r * 0.4], fill=fill)
        draw.polygon(
            [
                (cx - r * 0.55, cy - r * 0.15),
                (cx - r * 0.3, cy - r * 0.6),
                (cx + r * 0.35, cy - r * 0.6),
                (cx + r * 0.6, cy - r * 0.15),
            ],
            fill=fill,
        )
        draw.rectangle([cx - r * 0.25, cy - r * 0.5, cx + r * 0.25, cy - r * 0.2], fill=outline)
        for wx in (cx - r * 0.55, cx + r * 0.55):
            draw.ellipse([wx - r * 0.25, cy + r * 0.2, wx + r * 0.25, cy + r * 0.7], fill=wheel)
    elif s in RARE_SHAPES:
        _draw_rare_object(draw, cx, cy, r, s, fill)
    else:  # house
        draw.rectangle([cx - r * 0.8, cy - r * 0.1, cx + r * 0.8, cy + r * 0.9], fill=fill)
        draw.polygon([(cx - r, cy - r * 0.1), (cx, cy - r), (cx + r, cy - r * 0.1)], fill=dark)
        draw.rectangle([cx - r * 0.2, cy + r * 0.35, cx + r * 0.2, cy + r * 0.9], fill=outline)


def _draw_rare_object(
    draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, shape: str, fill: Any
) -> None:
    if shape == "heart":
        draw.ellipse([cx - r, cy - r * 0.8, cx, cy + r * 0.1], fill=fill)
        draw.ellipse([cx, cy - r * 0.8, cx + r, cy + r * 0.1], fill=fill)
        draw.polygon(
            [(cx - r * 0.97, cy - r * 0.2), (cx + r * 0.97, cy - r * 0.2), (cx, cy + r)], fill=fill
        )
    elif shape == "cross":
        draw.rectangle([cx - r * 0.3, cy - r, cx + r * 0.3, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - r * 0.3, cx + r, cy + r * 0.3], fill=fill)
    elif shape == "diamond":
        draw.polygon(
            [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)], fill=fill
        )
    elif shape == "hexagon":
        draw.regular_polygon((cx, cy, r), 6, fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(3, int(r * 0.3)))
    else:  # arrow
        draw.rectangle([cx - r, cy - r * 0.2, cx + r * 0.2, cy + r * 0.2], fill=fill)
        draw.polygon(
            [(cx + r * 0.2, cy - r * 0.6), (cx + r, cy), (cx + r * 0.2, cy + r * 0.6)], fill=fill
        )


def draw_scene(scene: Scene, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``size`` (width, height).

    The object sits inside the central square, so a centre crop (as CLIP processors do) keeps it.
    """
    w, h = size
    img = Image.new("RGB", (w, h))
    draw = ImageDraw.Draw(img)
    _draw_background(draw, w, h, scene, rng)
    unit = min(w, h)
    r = unit * rng.uniform(0.22, 0.34)
    slack = unit / 2 - r
    cx = w / 2 + rng.uniform(-slack, slack) * 0.6
    cy = h / 2 + rng.uniform(-slack, slack) * 0.6
    _draw_object(draw, cx, cy, r, scene, rng)
    return img


def draw_text(img: Image.Image, text: str, rng: random.Random) -> Image.Image:
    """A copy of ``img`` with ``text`` drawn on it, as shops and memes do: on a banner across
    the top or bottom, or stamped large over the picture in a contrasting colour."""
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    font = ImageFont.load_default(size=max(10, int(h * rng.uniform(0.16, 0.28))))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = rng.uniform(0, max(0.0, w - (right - left))) - left
    ink = rng.choice(((220, 20, 20), (20, 20, 20), (250, 250, 250), (250, 210, 0)))
    if rng.random() < 0.4:  # banner
        band = (bottom - top) * 1.5
        y0 = rng.choice((0.0, h - band))
        draw.rectangle(
            [0, y0, w, y0 + band], fill=(250, 250, 250) if sum(ink) < 600 else (20, 20, 20)
        )
        draw.text((x, y0 + (band - (bottom - top)) / 2 - top), text, fill=ink, font=font)
    else:  # stamped over the middle, where the object is
        y = h / 2 + rng.uniform(-0.2, 0.2) * h - (bottom + top) / 2
        draw.text((x, y), text, fill=ink, font=font, stroke_width=2, stroke_fill=_tint(ink))
    return out


def encode_image(img: Image.Image, fmt: str, quality: int = 88) -> bytes:
    """Encode ``img`` as ``JPEG``, ``PNG``, ``WEBP`` or ``GIF`` bytes (deterministic settings)."""
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=quality, method=2)
    elif fmt == "PNG":
        img.save(buf, "PNG", compress_level=3)
    elif fmt == "GIF":
        img.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(buf, "GIF")
    else:
        raise ValueError(f"unsupported format {fmt!r}")
    return buf.getvalue()
