"""ShapesWorld: a seeded synthetic world of 32×32 images with one or two shapes, their slot descriptions,
questions, answers in two equal-length styles, and preference pairs.

Small enough to train a base LM, an LVLM and a text RM from scratch on a CPU in minutes, and structured so
that merging has something to transfer (see ``../shared/SHAPESWORLD-SPIKE.md``): the text RM learns what a
good answer looks like from a text *description*; the LVLM learns to put an image where that description
sits. Everything here is pure Python + PIL, deterministic per seed.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

WORLD_VERSION = 3  # bump when scenes, texts or the chat template change: trained models are cached by it
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
    "yellow": (230, 210, 40), "purple": (160, 60, 200), "white": (235, 235, 235),
}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
NUMBERS = ("zero", "one", "two")
IMAGE_SIZE = 32
SLOT_WORDS = 4  # a description is left-colour left-shape right-colour right-shape ("none none": empty side)

# Answer styles of equal token length: the preference data favours GOOD; a likelihood judge can't win on length.
GOOD = ("the", "answer", "is", "{x}", ".")
BAD = ("uh", ",", "maybe", "{x}", "?")
STYLES = {"good": GOOD, "bad": BAD}

QUESTION_KINDS = ("colour", "kind", "count", "side")
CATEGORY_OF_KIND = {"colour": "hallucination", "kind": "hallucination", "count": "reasoning", "side": "reasoning"}
DESCRIBE = "describe the image ."
NOTHING = "no shape there"  # as long as "a red circle": no pair can be told apart by length

WORDS = (
    *COLOURS, *SHAPES, *SIDES, *NUMBERS, "none", "a", "what", "colour", "is", "the", "which", "shape",
    "how", "many", "shapes", "are", "there", "on", "describe", "image", "answer", "uh", "maybe", "yes", "no",
    "of", "same", "different", "so", "both", "and", "?", ".", ",",
)


@dataclass(frozen=True)
class Obj:
    """One shape: its colour word and shape word."""

    colour: str
    shape: str

    @property
    def words(self) -> str:
        return f"a {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """What is on the left and on the right (``None`` for an empty side), plus drawing jitter."""

    left: Obj | None
    right: Obj | None
    jitter: tuple[int, ...] = field(default=(), compare=False)

    @property
    def objects(self) -> list[Obj]:
        return [o for o in (self.left, self.right) if o is not None]

    def side(self, s: str) -> Obj | None:
        return self.left if s == "left" else self.right

    @property
    def description(self) -> str:
        """The four-word slot description the text models read in place of the image."""
        def slot(o: Obj | None) -> str:
            return f"{o.colour} {o.shape}" if o else "none none"
        return f"{slot(self.left)} {slot(self.right)}"

    @property
    def combos(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}


def answer(x: str, style: str) -> str:
    """An answer ``x`` in a style ("good" is the preferred one)."""
    return " ".join(STYLES[style]).replace("{x}", x)


def unseen_combos(seed: int, n: int = 3) -> frozenset[tuple[str, str]]:
    """(colour, shape) combinations held out of all training data for a seed: one per shape, distinct colours."""
    rng = random.Random(f"unseen:{seed}")
    colours = rng.sample(list(COLOURS), n)
    return frozenset((c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(colours))


def sample_scene(rng: random.Random, allowed=None) -> Scene:
    """A random scene: 35% one shape (left or right), 65% two with distinct colours and shapes.

    ``allowed(colour, shape) -> bool`` filters combinations (to hold some out of training)."""
    ok = allowed or (lambda c, s: True)
    while True:
        two = rng.random() < 0.65
        a = Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if two:
            b = Obj(rng.choice([c for c in COLOURS if c != a.colour]), rng.choice([s for s in SHAPES if s != a.shape]))
            left, right = a, b
        else:
            left, right = (a, None) if rng.random() < 0.5 else (None, a)
        scene = Scene(left, right, tuple(rng.randint(-4, 4) for _ in range(8)))
        if all(ok(o.colour, o.shape) for o in scene.objects):
            return scene


def draw(scene: Scene, seed: int) -> Image.Image:
    """Render a scene: dark noisy background, each shape in its half, with colour/size/position jitter."""
    rng = random.Random(f"draw:{seed}")
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))
    px = img.load()
    for y in range(IMAGE_SIZE):
        for x in range(IMAGE_SIZE):
            v = rng.randint(0, 40)
            px[x, y] = (v, v, v + rng.randint(0, 10))
    d = ImageDraw.Draw(img)
    for i, (s, o) in enumerate(zip(SIDES, (scene.left, scene.right), strict=True)):
        if o is None:
            continue
        r = rng.randint(4, 6)
        cx = (8 if s == "left" else 24) + rng.randint(-1, 1)
        cy = 16 + max(-4, min(4, scene.jitter[i] if scene.jitter else 0))
        fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[o.colour])
        box = (cx - r, cy - r, cx + r, cy + r)
        if o.shape == "circle":
            d.ellipse(box, fill=fill)
        elif o.shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


@dataclass(frozen=True)
class QA:
    """A question about a scene, its correct answer, and the wrong answers that contradict the scene."""

    kind: str
    question: str
    gold: str
    wrong: tuple[str, ...]


def questions(scene: Scene) -> list[QA]:
    """Every question the world asks about a scene, with gold and wrong (absent-attribute) answers."""
    out = []
    present_c = {o.colour for o in scene.objects}
    present_s = {o.shape for o in scene.objects}
    for o in scene.objects:
        out.append(QA("colour", f"what colour is the {o.shape} ?", o.colour,
                      tuple(c for c in COLOURS if c not in present_c)))
        out.append(QA("kind", f"which shape is {o.colour} ?", o.shape, tuple(s for s in SHAPES if s not in present_s)))
    n = len(scene.objects)
    out.append(QA("count", "how many shapes are there ?", NUMBERS[n], tuple(w for w in NUMBERS[1:] if w != NUMBERS[n])))
    for s in SIDES:
        o = scene.side(s)
        gold = o.words if o else NOTHING
        wrong = {x.words for x in scene.objects if x != o}  # the other side's object: a position error
        wrong |= {NOTHING} - {gold}
        wrong |= {Obj(c, sh).words for c in COLOURS for sh in SHAPES if c not in present_c and sh not in present_s}
        out.append(QA("side", f"what is on the {s} ?", gold, tuple(sorted(wrong))))
    return out


@dataclass(frozen=True)
class Pair:
    """A preference pair: prompt (question), chosen and rejected answers, and its category."""

    scene_index: int
    question: str
    chosen: str
    rejected: str
    category: str
    kind: str


def make_pair(qa: QA, rng: random.Random, *, kind: str, scene_index: int = -1) -> Pair:
    """``kind`` "correct": same style, wrong vs right; "style": both right, preferred vs dispreferred style."""
    if kind == "style":
        return Pair(scene_index, qa.question, answer(qa.gold, "good"), answer(qa.gold, "bad"), "general", qa.kind)
    style = rng.choice(("good", "bad"))
    return Pair(scene_index, qa.question, answer(qa.gold, style), answer(rng.choice(qa.wrong), style),
                CATEGORY_OF_KIND[qa.kind], qa.kind)


@dataclass
class Split:
    """Scenes of one split with their images (drawn lazily, cached)."""

    name: str
    seed: int
    scenes: list[Scene]
    _images: dict[int, Image.Image] = field(default_factory=dict, repr=False)

    def image(self, i: int) -> Image.Image:
        if i not in self._images:
            self._images[i] = draw(self.scenes[i], zlib.crc32(f"{self.name}:{self.seed}:{i}".encode()))
        return self._images[i]


class World:
    """The seeded world: train/val/test scene pools and the held-out colour/shape combinations.

    Train scenes never contain an unseen combination; val and test scenes are fresh draws, and test also
    gets ``test_unseen``: scenes that each contain at least one unseen combination.
    """

    def __init__(self, seed: int = 0, n_train: int = 4000, n_val: int = 300, n_test: int = 600, n_unseen: int = 200):
        self.seed = seed
        self.unseen = unseen_combos(seed)
        seen = lambda c, s: (c, s) not in self.unseen  # noqa: E731
        self.train = self._split("train", n_train, seen)
        self.val = self._split("val", n_val, seen)
        self.test = self._split("test", n_test, seen)
        self.test_unseen = self._split("test_unseen", n_unseen, None, need_unseen=True)

    def _split(self, name: str, n: int, allowed, need_unseen: bool = False) -> Split:
        rng = random.Random(f"{name}:{self.seed}")
        scenes = []
        while len(scenes) < n:
            s = sample_scene(rng, allowed)
            if need_unseen and not (s.combos & self.unseen):
                continue
            scenes.append(s)
        return Split(name, self.seed, scenes)

    def pairs(self, split: Split, per_category: int, seed: int) -> list[Pair]:
        """Balanced held-out preference pairs: ``per_category`` each of hallucination, general and reasoning."""
        rng = random.Random(f"pairs:{split.name}:{seed}")
        want = {"hallucination": ("colour", "kind"), "general": QUESTION_KINDS, "reasoning": ("count", "side")}
        out = []
        for cat, kinds in want.items():
            for _ in range(per_category):
                i = rng.randrange(len(split.scenes))
                qas = [q for q in questions(split.scenes[i]) if q.kind in kinds]
                qa = rng.choice(qas)
                out.append(make_pair(qa, rng, kind="style" if cat == "general" else "correct", scene_index=i))
        return out

    def qa_stream(self, split: Split, seed: int) -> Iterator[tuple[int, QA]]:
        """Endless (scene index, question) draws from a split, for training."""
        rng = random.Random(f"qa:{split.name}:{seed}")
        while True:
            i = rng.randrange(len(split.scenes))
            yield i, rng.choice(questions(split.scenes[i]))


def parse_answer(text: str) -> tuple[str | None, str | None]:
    """(style, content) of a generated answer, or (None, None) when it fits neither style."""
    words = text.replace("<eos>", " ").split()
    for style, tpl in STYLES.items():
        if len(words) >= len(tpl) and tuple(words[:3]) == tpl[:3] and words[-1] == tpl[-1]:
            return style, " ".join(words[3:-1])
    return None, None
