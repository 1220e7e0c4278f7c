#!/usr/bin/env python
"""Regenerate ``data/xtail_mini/``: the embedded X-TAIL-style stream and its alignment set.

Everything is derived from permissively licensed sources that ship as Debian packages or
with scikit-learn (see ``data/README.md`` for provenance and licences):

- Fashion-MNIST (Debian ``dataset-fashion-mnist``, MIT);
- scikit-learn's ``load_digits`` (the UCI optdigits 8x8 test set, BSD / CC BY 4.0);
- OpenClipart (Debian ``openclipart-png``, public domain);
- Noto Color Emoji (Debian ``fonts-noto-color-emoji``, OFL 1.1) rendered with Pillow,
  named and grouped by ``emoji-test.txt`` (Debian ``unicode-data``, Unicode licence).

Outputs (all images uint8; the stream presents every image at 64x64 RGB):

- ``<domain>.npz`` per stream domain: ``train_images``, ``train_labels`` (the few-shot
  *pool*), ``test_images``, ``test_labels``, ``classnames``, ``train_sources`` and
  ``test_sources`` (where each image came from). Clip-art and emoji images are stored at
  64x64x3; Fashion-MNIST at its native 28x28 and sklearn digits as the original 8x8 ink
  counts (0..16): ``moram_bench.streams.xtail_mini`` upsamples / renders those two at load
  time, which keeps the committed files ~10x smaller;
- ``align.npz``: 64x64 RGB images palette-encoded (``indices`` (N, 64, 64) into per-image
  ``palettes`` (N, 64, 3)), ``captions`` and ``sources``: image-caption pairs for aligning
  the ``mini-clip`` backbone, disjoint from every stream domain;
- ``manifest.json``: counts, sha256 of every file, and the build settings.

The build is deterministic (sorted file lists, fixed seeds). Run from the repository root:

    python data/build_xtail_mini.py            # writes data/xtail_mini/
    python data/build_xtail_mini.py --check    # rebuild in memory, compare with the files
    python data/build_xtail_mini.py --align-only  # only align.npz (the domains take minutes)
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIZE = 64  # stored image side length
SEED = 20240531  # base seed of every random choice in this script

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CLIPART_DIR = Path("/usr/share/openclipart/png")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")

FASHION_CLASSES = ["T-shirt/top", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot"]
DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# clip-art stream domains: class name -> OpenClipart folders (relative to CLIPART_DIR,
# each including its sub-folders)
CLIPART_NATURE = {
    "mammal": ["animals/mammals"],
    "insect": ["animals/bugs"],
    "bird": ["animals/birds"],
    "fish": ["animals/fish"],
    "dinosaur": ["animals/dinosaurs"],
    "flower": ["plants/flowers"],
    "tree": ["plants/trees"],
}
CLIPART_FOOD = {
    "fruit": ["food/fruit"],
    "dessert": ["food/desserts"],
    "beverage": ["food/beverages"],
    "meat or eggs": ["food/meats_and_eggs"],
    "bread": ["food/breads_and_carbs"],
    "vegetable": ["food/vegetables"],
}
# files of those folders that are not an instance of their folder's class (tools in the
# tree folder, flower pots among beverages, pies among fruit, ...): never used anywhere
CLIPART_DROP = {
    # "Linked Image Not Found" placeholders
    "animals/birds/duck_yellow_ii_kurt_cagl_.png", "animals/birds/penguin/tux_didier_fabert_01.png",
    # not an instance of the class
    "animals/birds/contour_bat.png", "animals/birds/manager_mimooh_01.png",
    "animals/birds/turkey_on_platter_01.png", "food/meats_and_eggs/turkey_on_platter_01.png",
    "animals/fish/crawfish1_bw_ganson.png", "animals/fish/crawfish1_ganson.png",
    "animals/fish/crawfish2_bw_ganson.png", "animals/fish/crawfish2_ganson.png",
    "animals/fish/kallisti-grenade_1_nurbl_01.png", "animals/fish/paesaggio_marino_archite_01.png",
    "animals/bugs/lumaca_architetto_france_01.png", "animals/bugs/lumaca_turbo_architetto__01.png",
    "animals/bugs/virus_andreas_nilsson_01.png", "animals/bugs/mostriciattolo2_architet_01.png",
    "animals/bugs/mostriciattolo_architett_01.png", "animals/bugs/spider.png",
    "animals/bugs/ragnetto_incazzato_archi_01.png", "animals/bugs/ragno_figo_architetto_fr_01.png",
    "animals/mammals/emule_icon_emule.org_01.png",
    "plants/flowers/cartoon_tree_01.png", "plants/flowers/cactus_linda_kim_01.png",
    "plants/trees/bowsaw_benji_park_01.png", "plants/trees/bypasspruner_benji_park_01.png",
    "plants/trees/christmas_balls_mo_01.png", "plants/trees/fern_mo_01.png",
    "plants/trees/fall_coloured_leaf_geral_01.png", "plants/trees/fall_coloured_leaf_geral_02.png",
    "food/fruit/apple_juice_box.png", "food/fruit/apple_juice_box_bw.png",
    "food/fruit/juice_glass_andremarcel._01.png", "food/fruit/champignon_01.png",
    "food/fruit/straw_tote_linda_kim_01.png", "food/fruit/kallisti-grenade_1_nurbl_01.png",
    "food/fruit/pie_apple.png", "food/fruit/pie_apple_bw.png", "food/fruit/pie_cherry.png",
    "food/fruit/pie_cherry_bw.png", "food/fruit/turkey_platter_01_with_fruit_and_vegitables_01.png",
    "food/beverages/flower-pot_01.png", "food/beverages/flower-pot_02.png",
    "food/beverages/ice_cube_jarno_vasamaa_.png", "food/beverages/icecube_benji_park_.png",
    "food/beverages/alcohol/wooden_barrel_petri_lumm_01.png", "food/beverages/alcohol/wine_corks_ganson.png",
    "food/meats_and_eggs/frying_pan_padella_in_i_03.png",
    "food/meats_and_eggs/fuoco_da_campeggio_archi_01.png", "food/meats_and_eggs/mcoon_01.png",
    "food/breads_and_carbs/potato_chips.png", "food/breads_and_carbs/potato_chips_bw.png",
    "food/breads_and_carbs/potato_nicu_buculei_.png", "food/breads_and_carbs/potato_nicu_buculei_01.png",
    "food/breads_and_carbs/hash_browns.png", "food/breads_and_carbs/hash_browns_bw.png",
}
# emoji stream domain: class name -> emoji-test.txt subgroup
EMOJI_THINGS = {
    "land vehicle": "transport-ground",
    "building": "place-building",
    "weather or sky": "sky & weather",
    "clock": "time",
    "tool": "tool",
    "household object": "household",
    "office supply": "office",
}
# members of those subgroups that are clearly not an instance of the class name we give
# them; they are dropped from the stream AND kept out of the alignment set
EMOJI_THINGS_DROP = {
    "transport-ground": {"station", "bus stop", "motorway", "railway track", "oil drum",
                         "fuel pump", "wheel", "police car light", "horizontal traffic light",
                         "vertical traffic light", "stop sign", "construction"},
    "place-building": {"brick", "rock", "wood", "wedding"},
    "sky & weather": {"fire", "high voltage", "water wave"},
    "tool": {"dagger", "crossed swords", "bomb", "shield", "bow and arrow"},
}

# ---- alignment set -------------------------------------------------------------------
# Rules (checked by tests/test_xtail_mini.py): no stream image or source file, no caption
# containing a word of a stream class name, and nothing of the same domain AND concept as
# a stream class: no emoji of the stream's emoji subgroups (nor pens/pencils, which would
# be office supplies), no clip art of animals, plants or food. Emoji of animals and food
# ARE used: they teach concepts across domains, as web-scale pretraining would, without
# naming a stream class (emoji named "bird", "fish", "bread", "palm tree"... are dropped).
ALIGN_EMOJI_EXCLUDED_GROUPS = {"Component"}
ALIGN_EMOJI_EXCLUDED_SUBGROUPS = set(EMOJI_THINGS.values()) | {
    "clothing",  # Fashion-MNIST classes (t-shirt, dress, coat, sandal, boot, handbag...)
    "keycap", "alphanum",  # digits / numbers
    "writing",  # pens and pencils (office supplies, emoji domain)
}
# OpenClipart folders used for alignment: folder -> caption category. Folders whose
# content overlaps a stream class (animals, plants, food, buildings, clocks, weather,
# astronomy, stars, tools, office, vehicles, clothing, containers/bags, playing cards and
# LED digits) are not listed.
ALIGN_CLIPART = {
    "computer/hardware": "computer",
    "computer/icons": "computer icon",
    "computer/buttons": "web button",
    "computer/connectors": "cable connector",
    "computer/games": "video game",
    "electronics": "electronic device",
    "electronics/bulb": "light bulb",
    "electronics/battery": "battery",
    "education/books": "book",
    "geography": "map",
    "people": "person",
    "people/bodypart": "body part",
    "people/smilies": "smiley face",
    "people/stickmen": "stick figure",
    "recreation/music": "musical instrument",
    "recreation/sports": "sports equipment",
    "recreation/toys": "toy",
    "recreation/party": "party decoration",
    "recreation/holiday": "holiday decoration",
    "recreation/religion": "religious symbol",
    "recreation/games/chess": "chess piece",
    "science": "science equipment",
    "shapes/arrows": "arrow",
    "shapes/callouts": "speech bubble",
    "shapes/flowchart": "flowchart symbol",
    "shapes/jigsaw": "jigsaw puzzle piece",
    "signs_and_symbols/flags": "flag",
    "signs_and_symbols/map_symbols": "map symbol",
    "signs_and_symbols/hazard": "hazard sign",
    "signs_and_symbols/money": "money",
    "special/patterns": "pattern",
    "transportation/boating": "boat",
    "decorations": "ornament",
}
# folders listed above whose sub-folders belong to another category or are excluded
# (geography/astronomy and science/astronomy: planets and stars are "weather or sky")
ALIGN_CLIPART_NO_RECURSE = {"computer/hardware", "electronics", "people", "geography", "science"}
ALIGN_CLIPART_CAP = 90  # at most this many images per caption category
ALIGN_COLOURS = 64  # alignment images are stored palette-indexed with this many colours
ALIGN_EMOJI_CAP = 1500  # at most this many emoji
# words of the stream's class names: no alignment caption may contain one
CLASS_WORDS = {w for name in (FASHION_CLASSES + DIGIT_CLASSES + list(CLIPART_NATURE) + list(CLIPART_FOOD)
                              + list(EMOJI_THINGS)) for w in re.split(r"[^a-z]+", name.lower())} - {"", "or", "a"}
# words (in clip-art file names) that name a stream class or a typical member of one:
# such clip art is dropped from the alignment set (folders are noisy: a dog among the
# holiday drawings would be a same-domain instance of "mammal")
STREAM_WORDS = """
shirt tshirt t-shirt top trouser trousers pants jeans pullover sweater dress coat jacket
sandal sandals shirt sneaker sneakers shoe shoes boot boots bag bags handbag purse
zero one two three four five six seven eight nine number numbers digit digits keycap
mammal mammals dog dogs cat cats horse horses cow pig bear bears lion tiger mouse rabbit
sheep monkey elephant squirrel deer fawn bat bats fox wolf giraffe zebra whale dolphin
insect insects bug bugs bee butterfly ant spider ladybug beetle fly mosquito
bird birds duck penguin owl eagle chicken parrot swan dove rooster turkey
fish dinosaur dinosaurs dino rex sauropod
flower flowers rose tulip blossom sunflower daisy tree trees palm cactus evergreen leaf
leaves plant plants sapin sakura holly wreath
fruit fruits apple banana grapes orange pear cherry cherries strawberry lemon melon
dessert desserts cake cupcake pie cookie candy chocolate icecream ice cream lollipop
beverage beverages drink coffee tea wine beer juice milk cocktail soda bottle
meat meats egg eggs bacon ham sausage steak chicken bread breads baguette croissant
pizza burger sandwich vegetable vegetables carrot tomato potato corn pepper salad food
vehicle vehicles car cars bus truck train tram taxi bicycle bike motorcycle tractor
ambulance scooter skateboard
building buildings house houses home castle church school hospital tower hotel factory
stadium hut
weather sky sun sunny moon cloud clouds cloudy rain rainy snow snowman snowflake
lightning storm tornado rainbow umbrella star stars comet planet thermometer
clock clocks watch stopwatch hourglass timer alarm
tool tools hammer wrench screwdriver saw axe pick gear toolbox ladder magnet chains
household door window mirror bed couch chair toilet bathtub shower broom basket bucket
soap toothbrush sponge razor
office briefcase folder calendar clipboard pushpin paperclip ruler scissors notepad
pen pencil crayon
""".split()


@dataclass
class Domain:
    """One stream domain as stored: a pool for few-shot sampling and a test split."""

    name: str
    classnames: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    train_sources: list[str] = field(default_factory=list)
    test_sources: list[str] = field(default_factory=list)


# ---- image helpers ---------------------------------------------------------------------
def to_square(rgba: Image.Image, size: int = SIZE, margin: float = 0.04) -> np.ndarray:
    """Composite an RGBA image on white, crop it to its content, pad it to a centred square
    (with a small white margin) and resize it to ``size`` (Lanczos). Returns (H, W, 3)."""
    rgba = rgba.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"))
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    arr = np.asarray(rgb)
    content = (alpha > 8) & (arr.min(axis=2) < 250)  # visible and not white
    if content.any():
        ys, xs = np.nonzero(content)
        rgb = rgb.crop((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1))
    w, h = rgb.size
    side = int(round(max(w, h) * (1 + 2 * margin)))
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(rgb, ((side - w) // 2, (side - h) // 2))
    return np.asarray(canvas.resize((size, size), Image.LANCZOS, reducing_gap=3.0))


def load_clipart(path: Path) -> np.ndarray | None:
    """One OpenClipart PNG as a (SIZE, SIZE, 3) array, or None for undecodable files."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_square(im)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        print(f"  skip {path}: {e}", file=sys.stderr)
        return None


def image_key(arr: np.ndarray) -> str:
    """Content hash used to find exact duplicates."""
    return hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()


def name_stem(path_or_name) -> str:
    """A file name without extension, black-and-white markers and trailing numbering,
    cut to 10 characters (Debian truncated long names at different points)."""
    stem = Path(str(path_or_name)).stem.lower()
    stem = re.sub(r"(^|[_\-. ])(b_?w|colou?r)(?=[_\-. ]|$)", "", stem)  # "_bw", "b_w_", "color_"
    stem = re.sub(r"[_\-. \d]+$", "", stem).lstrip("_-. ")
    return stem[:10]


def thumbnails(images: list[np.ndarray]) -> np.ndarray:
    """16x16 grey thumbnails, standardised per image: colour and b/w versions of one
    drawing come out nearly equal."""
    t = np.stack([np.asarray(Image.fromarray(x).convert("L").resize((16, 16), Image.BOX), dtype=np.float32)
                  for x in images])
    return (t - t.mean((1, 2), keepdims=True)) / (t.std((1, 2), keepdims=True) + 1e-3)


def variant_groups(names: list[str], images: list[np.ndarray], same_name_dist: float = 0.35,
                   any_name_dist: float = 0.1) -> list[int]:
    """Group near-duplicates of ONE class (colour/b&w versions, recoloured copies): two
    images are variants if their thumbnails differ by less than ``any_name_dist``, or by
    less than ``same_name_dist`` when their file names share a stem. Returns a group id
    per image (union-find over those pairs), so a split keeps variants together."""
    n = len(names)
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    th = thumbnails(images)
    stems = [name_stem(x) for x in names]
    for i in range(n):
        dist = np.abs(th[i + 1:] - th[i]).mean((1, 2))
        for j in np.flatnonzero(dist < same_name_dist) + i + 1:
            if dist[j - i - 1] < any_name_dist or stems[i] == stems[j]:
                parent[find(j)] = find(i)
    return [find(i) for i in range(n)]


def words(text: str) -> set[str]:
    return set(re.split(r"[^a-z]+", text.lower())) - {""}


_STREAM_WORDS = set(STREAM_WORDS)


def mentions_stream_concept(text: str) -> bool:
    """True if a clip-art file name contains a stream class word or member word."""
    return bool(words(text) & _STREAM_WORDS)


def names_stream_class(text: str) -> bool:
    """True if a text contains a word of a stream class name."""
    return bool(words(text) & CLASS_WORDS)


# ---- emoji -----------------------------------------------------------------------------
@dataclass
class Emoji:
    chars: str
    name: str
    group: str
    subgroup: str


def read_emoji_test(path: Path = EMOJI_TEST) -> list[Emoji]:
    """Fully-qualified emoji of ``emoji-test.txt`` without skin-tone variants, in file order."""
    out, group, subgroup = [], "", ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            codes, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            if status.strip() != "fully-qualified":
                continue
            # comment: " 😀 E1.0 grinning face"
            _, _, name = comment.strip().split(" ", 2)
            if "skin tone" in name:
                continue
            chars = "".join(chr(int(c, 16)) for c in codes.split())
            out.append(Emoji(chars, name, group, subgroup))
    return out


class EmojiRenderer:
    """Renders emoji with Pillow from the Noto Color Emoji bitmap font (size 109 is the
    font's only strike). Sequences the font cannot draw as one glyph are rejected."""

    def __init__(self, font_path: Path = EMOJI_FONT):
        self.font = ImageFont.truetype(str(font_path), 109)

    def render(self, chars: str) -> np.ndarray | None:
        left, top, right, bottom = self.font.getbbox(chars)
        if right - left > 160 or right <= left:  # several glyphs (unsupported sequence)
            return None
        canvas = Image.new("RGBA", (right - left + 8, bottom - top + 8), (255, 255, 255, 0))
        ImageDraw.Draw(canvas).text((4 - left, 4 - top), chars, font=self.font, embedded_color=True)
        if np.asarray(canvas.getchannel("A")).max() == 0:
            return None
        return to_square(canvas)


# ---- stream domains --------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def per_class_sample(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices per class, sorted."""
    idx = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(idx))


def build_fashion(root: Path, pool_per_class: int = 100, test_per_class: int = 100) -> Domain:
    """Fashion-MNIST: 100 pool images per class from the train split and 100 test images per
    class from the test split, stored at their native 28x28 (the stream upsamples them to
    64x64: storing the upsampled copies would cost 5x the space for no information)."""
    rng = np.random.default_rng([SEED, 1])
    xtr = read_idx(root / "train-images-idx3-ubyte.gz")
    ytr = read_idx(root / "train-labels-idx1-ubyte.gz").astype(np.int64)
    xte = read_idx(root / "t10k-images-idx3-ubyte.gz")
    yte = read_idx(root / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    itr = per_class_sample(ytr, pool_per_class, rng)
    ite = per_class_sample(yte, test_per_class, rng)
    return Domain("fashion_mnist", list(FASHION_CLASSES), xtr[itr], ytr[itr], xte[ite], yte[ite],
                  [f"fashion-mnist:train/{i}" for i in itr], [f"fashion-mnist:t10k/{i}" for i in ite])


def build_digits(pool_per_class: int = 60) -> Domain:
    """scikit-learn's digits: ``pool_per_class`` pool images per class, the rest is test.
    Stored as the original 8x8 ink counts (0..16); the stream renders them at 64x64
    (``moram_bench.streams.xtail_mini.render_digit``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.images.astype(np.uint8), d.target.astype(np.int64)
    rng = np.random.default_rng([SEED, 2])
    itr = per_class_sample(y, pool_per_class, rng)
    ite = np.setdiff1d(np.arange(len(y)), itr)
    return Domain("digits", list(DIGIT_CLASSES), x[itr], y[itr], x[ite], y[ite],
                  [f"sklearn-digits:{i}" for i in itr], [f"sklearn-digits:{i}" for i in ite])


def split_groups(groups: list, rng: np.random.Generator, pool_frac: float, min_pool: int,
                 max_pool: int) -> np.ndarray:
    """Boolean pool mask over the items of ONE class, keeping each group on one side.

    Whole groups are taken in random order while they fit into the target pool size
    (``pool_frac`` of the items, at least ``min_pool``, at most ``max_pool``); a group that
    would overshoot is skipped unless the pool is still below ``min_pool``."""
    keys = sorted(set(groups))
    sizes = {k: sum(g == k for g in groups) for k in keys}
    target = min(max(int(round(pool_frac * len(groups))), min_pool), max_pool)
    pool, n = set(), 0
    for i in rng.permutation(len(keys)):
        k = keys[i]
        if n + sizes[k] <= target or n < min_pool:
            pool.add(k)
            n += sizes[k]
        if n >= target:
            break
    return np.array([g in pool for g in groups])


def split_domain(name: str, classnames: list[str], items: list[list[tuple[str, np.ndarray]]],
                 seed: int, pool_frac: float = 0.4, min_pool: int = 4, max_pool: int = 60,
                 min_test: int = 4, group_variants: bool = True) -> Domain:
    """``items[c]`` = (source, image) of class c -> pool/test split. With
    ``group_variants`` near-duplicates stay on one side (see ``variant_groups``); emoji
    are distinct symbols by definition and are split one by one."""
    rng = np.random.default_rng([SEED, seed])
    tr_x, tr_y, tr_s, te_x, te_y, te_s = [], [], [], [], [], []
    for c, cls_items in enumerate(items):
        groups = (variant_groups([src for src, _ in cls_items], [img for _, img in cls_items])
                  if group_variants else list(range(len(cls_items))))
        mask = split_groups(groups, rng, pool_frac, min_pool, max_pool)
        if mask.sum() < min_pool or (~mask).sum() < min_test:
            raise SystemExit(f"{name}/{classnames[c]}: {len(cls_items)} images in {len(set(groups))} groups "
                             f"give only {mask.sum()} pool / {(~mask).sum()} test images")
        for (src, img), in_pool in zip(cls_items, mask):
            (tr_x if in_pool else te_x).append(img)
            (tr_y if in_pool else te_y).append(c)
            (tr_s if in_pool else te_s).append(src)
    return Domain(name, classnames, np.stack(tr_x), np.array(tr_y, dtype=np.int64),
                  np.stack(te_x), np.array(te_y, dtype=np.int64), tr_s, te_s)


def clipart_files(folder: Path, recurse: bool = True) -> list[Path]:
    pattern = "**/*.png" if recurse else "*.png"
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def build_clipart_domain(name: str, spec: dict[str, list[str]], root: Path, seed: int,
                         seen: dict[str, str]) -> Domain:
    """A clip-art domain from folder lists; exact duplicate images are kept once."""
    items = []
    for cls, folders in spec.items():
        cls_items = []
        for folder in folders:
            for p in clipart_files(root / folder):
                if str(p.relative_to(root)) in CLIPART_DROP:
                    continue
                img = load_clipart(p)
                if img is None:
                    continue
                key = image_key(img)
                if key in seen:
                    continue
                rel = str(p.relative_to(root))
                seen[key] = f"{name}/{cls}"
                cls_items.append((f"openclipart:{rel}", img))
        items.append(cls_items)
        print(f"  {name}/{cls}: {len(cls_items)} images")
    return split_domain(name, list(spec), items, seed)


def build_emoji_domain(emoji: list[Emoji], renderer: EmojiRenderer, seed: int,
                       seen: dict[str, str]) -> Domain:
    items = []
    for cls, subgroup in EMOJI_THINGS.items():
        cls_items = []
        for e in emoji:
            if e.subgroup != subgroup or e.name in EMOJI_THINGS_DROP.get(subgroup, ()):
                continue
            img = renderer.render(e.chars)
            if img is None:
                continue
            key = image_key(img)
            if key in seen:
                continue
            seen[key] = f"emoji_things/{cls}"
            cls_items.append((f"emoji:{e.group}/{e.subgroup}/{e.name}", img))
        items.append(cls_items)
        print(f"  emoji_things/{cls}: {len(cls_items)} images")
    return split_domain("emoji_things", list(EMOJI_THINGS), items, seed, group_variants=False)


# ---- alignment set ---------------------------------------------------------------------
@dataclass
class AlignmentSet:
    images: np.ndarray
    captions: list[str]
    names: list[str]  # what the caption names (emoji name or clip-art category)
    kinds: list[str]  # "emoji" or "clip art"
    sources: list[str]


def build_alignment(emoji: list[Emoji], renderer: EmojiRenderer, root: Path,
                    seen: dict[str, str]) -> AlignmentSet:
    """Emoji and clip art disjoint from the stream (rules above ALIGN_EMOJI_EXCLUDED_GROUPS)."""
    rng = np.random.default_rng([SEED, 99])
    dropped = {"stream class word": 0, "stream concept word": 0, "duplicate of a stream image": 0,
               "duplicate": 0, "unrenderable": 0}

    chosen = [e for e in emoji if e.group not in ALIGN_EMOJI_EXCLUDED_GROUPS
              and e.subgroup not in ALIGN_EMOJI_EXCLUDED_SUBGROUPS]
    emoji_items = []
    for e in chosen:
        if names_stream_class(e.name):
            dropped["stream class word"] += 1
            continue
        img = renderer.render(e.chars)
        if img is None:
            dropped["unrenderable"] += 1
            continue
        key = image_key(img)
        if key in seen:
            dropped["duplicate of a stream image" if seen[key] != "align" else "duplicate"] += 1
            continue
        seen[key] = "align"
        emoji_items.append((img, e.name, "emoji", f"emoji:{e.group}/{e.subgroup}/{e.name}"))
    if len(emoji_items) > ALIGN_EMOJI_CAP:
        keep = np.sort(rng.choice(len(emoji_items), size=ALIGN_EMOJI_CAP, replace=False))
        emoji_items = [emoji_items[i] for i in keep]
    print(f"  alignment emoji: {len(emoji_items)}")

    clip_items = []
    for folder, category in ALIGN_CLIPART.items():
        all_files = clipart_files(root / folder, recurse=folder not in ALIGN_CLIPART_NO_RECURSE)
        files = [p for p in all_files if not mentions_stream_concept(p.stem)]
        dropped["stream concept word"] += len(all_files) - len(files)
        if len(files) > ALIGN_CLIPART_CAP:
            files = [files[i] for i in np.sort(rng.choice(len(files), size=ALIGN_CLIPART_CAP, replace=False))]
        n = 0
        for p in files:
            img = load_clipart(p)
            if img is None:
                continue
            key = image_key(img)
            if key in seen:
                dropped["duplicate of a stream image" if seen[key] != "align" else "duplicate"] += 1
                continue
            seen[key] = "align"
            clip_items.append((img, category, "clip art", f"openclipart:{p.relative_to(root)}"))
            n += 1
        print(f"  alignment clip art '{category}': {n}")
    items = emoji_items + clip_items
    out = AlignmentSet(np.stack([i[0] for i in items]), [caption(n, k) for _, n, k, _ in items],
                       [i[1] for i in items], [i[2] for i in items], [i[3] for i in items])
    bad = [c for c in out.captions if names_stream_class(c)]
    if bad:
        raise SystemExit(f"alignment captions name stream classes: {bad[:5]}")
    print(f"  alignment: {len(items)} pairs, dropped {dropped}")
    return out


def caption(name: str, kind: str) -> str:
    """The alignment caption of an emoji name or clip-art category."""
    return f"an emoji of {name}." if kind == "emoji" else f"a clip art of a {name}."


# ---- saving ----------------------------------------------------------------------------
def gray(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) -> (N, H, W) when the image is grayscale (all channels equal)."""
    if x.ndim == 4 and (x == x[..., :1]).all():
        return np.ascontiguousarray(x[..., 0])
    return x


def npz_bytes(**arrays) -> bytes:
    """A compressed .npz (readable by ``np.load``) whose bytes depend only on the arrays:
    unlike ``np.savez_compressed`` it stamps every member with a fixed date."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue(), compresslevel=9)
    return buf.getvalue()


def palette_encode(images: np.ndarray, colours: int = ALIGN_COLOURS) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) -> palette indices (N, H, W) and per-image palettes (N, colours, 3):
    median-cut quantisation without dithering (mean absolute error ~1 grey level on clip
    art and emoji), which stores 2.5x smaller than the RGB arrays. Decode with
    ``palettes[np.arange(N)[:, None, None], indices]``."""
    idx = np.zeros(images.shape[:3], dtype=np.uint8)
    pal = np.zeros((len(images), colours, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        q = Image.fromarray(im).quantize(colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        idx[i] = np.asarray(q)
        p = np.array(q.getpalette()[: 3 * colours], dtype=np.uint8).reshape(-1, 3)
        pal[i, : len(p)] = p
    return idx, pal


def domain_bytes(d: Domain) -> bytes:
    return npz_bytes(
        train_images=gray(d.train_images), train_labels=d.train_labels,
        test_images=gray(d.test_images), test_labels=d.test_labels,
        classnames=np.array(d.classnames), train_sources=np.array(d.train_sources),
        test_sources=np.array(d.test_sources))


def load_domain(path: Path) -> Domain:
    """A stored domain file back as a ``Domain`` (for ``--align-only``)."""
    with np.load(path, allow_pickle=False) as z:
        return Domain(path.stem, [str(c) for c in z["classnames"]], z["train_images"], z["train_labels"],
                      z["test_images"], z["test_labels"], [str(x) for x in z["train_sources"]],
                      [str(x) for x in z["test_sources"]])


def build_all(args) -> dict[str, bytes]:
    """Build every output file in memory: {file name: content}."""
    t0 = time.time()
    emoji = read_emoji_test(args.emoji_test)
    renderer = EmojiRenderer(args.emoji_font)
    seen: dict[str, str] = {}  # image hash -> owner, for cross-file disjointness
    if args.align_only:
        # the stored 64x64 RGB clip-art/emoji arrays are exactly the rendered images
        domains = [load_domain(args.out / f"{name}.npz") for name in
                   ("fashion_mnist", "digits", "clipart_nature", "clipart_food", "emoji_things")]
        for d in domains[2:]:
            for x in np.concatenate([d.train_images, d.test_images]):
                seen[image_key(x)] = d.name
    else:
        print("fashion_mnist ...")
        domains = [build_fashion(args.fashion_dir)]
        print("digits ...")
        domains.append(build_digits())
        print("clipart_nature ...")
        domains.append(build_clipart_domain("clipart_nature", CLIPART_NATURE, args.clipart_dir, 3, seen))
        print("clipart_food ...")
        domains.append(build_clipart_domain("clipart_food", CLIPART_FOOD, args.clipart_dir, 4, seen))
        print("emoji_things ...")
        domains.append(build_emoji_domain(emoji, renderer, 5, seen))
    print("alignment set ...")
    a = build_alignment(emoji, renderer, args.clipart_dir, seen)

    files = {f"{d.name}.npz": domain_bytes(d) for d in domains}
    a_idx, a_pal = palette_encode(a.images)
    files["align.npz"] = npz_bytes(indices=a_idx, palettes=a_pal, captions=np.array(a.captions),
                                   names=np.array(a.names), kinds=np.array(a.kinds), sources=np.array(a.sources))
    manifest = {
        "description": "derived data of the xtail-mini stream; regenerate with data/build_xtail_mini.py",
        "image_size": SIZE,
        "seed": SEED,
        "domains": [
            {"name": d.name, "file": f"{d.name}.npz", "classes": d.classnames,
             "stored_shape": list(d.test_images.shape[1:]),
             "pool": int(len(d.train_labels)), "test": int(len(d.test_labels)),
             "pool_per_class": np.bincount(d.train_labels, minlength=len(d.classnames)).tolist(),
             "test_per_class": np.bincount(d.test_labels, minlength=len(d.classnames)).tolist()}
            for d in domains],
        "align": {"file": "align.npz", "pairs": len(a.captions), "palette_colours": ALIGN_COLOURS,
                  "emoji": a.kinds.count("emoji"), "clipart": a.kinds.count("clip art"),
                  "captions": len(set(a.captions))},
        "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in sorted(files.items())},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=1) + "\n").encode()
    print(f"built in {time.time() - t0:.1f} s")
    return files


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=here / "xtail_mini")
    ap.add_argument("--fashion-dir", type=Path, default=FASHION_DIR)
    ap.add_argument("--clipart-dir", type=Path, default=CLIPART_DIR)
    ap.add_argument("--emoji-test", type=Path, default=EMOJI_TEST)
    ap.add_argument("--emoji-font", type=Path, default=EMOJI_FONT)
    ap.add_argument("--align-only", action="store_true",
                    help="rebuild only align.npz (and manifest.json) against the stored domain files")
    ap.add_argument("--check", action="store_true",
                    help="rebuild in memory and compare with the files in --out (no writing)")
    args = ap.parse_args(argv)
    for p in (args.fashion_dir, args.clipart_dir, args.emoji_test, args.emoji_font):
        if not p.exists():
            print(f"error: source {p} not found (install the Debian package named in data/README.md)",
                  file=sys.stderr)
            return 2
    Image.MAX_IMAGE_PIXELS = 200_000_000  # a few public-domain drawings are huge PNGs
    files = build_all(args)
    if args.check:
        bad = [n for n, b in files.items() if not (args.out / n).is_file()
               or hashlib.sha256((args.out / n).read_bytes()).digest() != hashlib.sha256(b).digest()]
        print("identical" if not bad else f"differ: {bad}")
        return 1 if bad else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        tmp = args.out / f".{name}.tmp"
        tmp.write_bytes(content)
        tmp.replace(args.out / name)
    total = sum(len(b) for b in files.values())
    print(f"wrote {len(files)} files to {args.out} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
