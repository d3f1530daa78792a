"""A synthetic FashionMV, written in exactly the layout of the real release.

Products are drawn from attributes (category, colour, pattern, sleeves, length) and
rendered from up to five views (front, back, side, other side, close-up) that differ
visibly. Captions are derived from the attributes, and every triplet's target differs
from its source in 1-3 attributes, with a modification text that states the change.
Within one source and split no two products share all attributes, so a model that
reads attributes can solve every triplet exactly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterable, Sequence

from etils import epath
import numpy as np
from PIL import Image, ImageDraw

from tfds_fashionmv.release import SOURCES, image_folder

CATEGORIES = ("dress", "t-shirt", "shirt", "sweater", "jacket", "coat")
COLOURS = {
    "red": (200, 30, 35), "orange": (235, 125, 20), "yellow": (235, 205, 40),
    "green": (40, 145, 60), "blue": (35, 90, 210), "navy": (20, 30, 90),
    "purple": (120, 50, 160), "pink": (240, 140, 180), "brown": (115, 70, 35),
    "black": (25, 25, 25), "white": (245, 245, 240), "grey": (135, 135, 135),
}
PATTERNS = ("solid", "striped", "dotted", "checked", "floral")
SLEEVES = ("sleeveless", "short-sleeved", "long-sleeved")
LENGTHS = ("cropped", "regular", "long")
ATTRIBUTES = ("category", "colour", "pattern", "sleeves", "length")
CHOICES = {"category": CATEGORIES, "colour": tuple(COLOURS), "pattern": PATTERNS,
            "sleeves": SLEEVES, "length": LENGTHS}
VIEW_NAMES = ("front", "back", "side", "three-quarter", "close-up")

# Image file extensions per source, as in the release.
_EXTENSIONS = {"deepfashion": ".jpg", "f200k": ".jpeg", "fashiongen": ".jpg"}
_SPLIT_ID_OFFSET = {"train": 0, "validation": 500_000}  # shared folders: no clashes


@dataclasses.dataclass(frozen=True)
class Attributes:
  category: str
  colour: str
  pattern: str
  sleeves: str
  length: str

  def replace(self, **changes: str) -> Attributes:
    return dataclasses.replace(self, **changes)


def sample_value(rng: np.random.Generator, key: str,
                 other_than: str | None = None) -> str:
  """One value of attribute `key`, uniform over CHOICES[key] (without `other_than`)."""
  options = CHOICES[key]
  if other_than is not None:
    options = [v for v in options if v != other_than]
  return str(rng.choice(options))


def sample_attributes(rng: np.random.Generator) -> Attributes:
  """A product's attributes: each drawn uniformly and independently, in ATTRIBUTES
  order, so one seed gives one sequence of products wherever they are drawn."""
  return Attributes(**{k: sample_value(rng, k) for k in ATTRIBUTES})


@dataclasses.dataclass(frozen=True)
class Product:
  product_id: str
  source: str
  attributes: Attributes
  num_views: int


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Sizes of the generated release (per source, so x3 in all)."""

  seed: int = 0
  train_products: int = 120
  train_triplets: int = 200
  val_products: int = 40
  val_triplets: int = 60
  image_size: int = 128
  min_views: int = 1
  max_views: int = 5


# ---------------------------------------------------------------------------------
# Texts.

def _pattern_word(pattern: str) -> str:
  return "plain" if pattern == "solid" else pattern


_SLEEVE_PHRASES = {"sleeveless": "no sleeves", "short-sleeved": "short sleeves",
                   "long-sleeved": "long sleeves"}


def _length_word(length: str) -> str:
  return "regular-length" if length == "regular" else length


def short_caption(a: Attributes) -> str:
  return (f"{_length_word(a.length)} {a.colour} {_pattern_word(a.pattern)} "
          f"{a.sleeves} {a.category}")


def long_caption(a: Attributes, num_views: int) -> str:
  views = ", ".join(VIEW_NAMES[:num_views])
  return (f"A {_length_word(a.length)} {a.category} in {a.colour} with a "
          f"{a.pattern} pattern and {_SLEEVE_PHRASES[a.sleeves]}. "
          f"Shown in {num_views} view{'s' if num_views > 1 else ''}: {views}.")


def _join(words: Sequence[str]) -> str:
  return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def modification_texts(source: Attributes, target: Attributes) -> tuple[str, str]:
  """(short, long) texts stating how target differs from source."""
  changed = [k for k in ATTRIBUTES if getattr(source, k) != getattr(target, k)]
  if not changed:
    raise ValueError(f"Source and target are the same product: {source}.")
  adjectives = []
  for key in ("colour", "pattern", "sleeves", "length"):
    if key in changed:
      value = getattr(target, key)
      adjectives.append({"pattern": _pattern_word(value),
                         "length": _length_word(value)}.get(key, value))
  if "category" in changed:
    article = "an" if (adjectives or [target.category])[0][0] in "aeiou" else "a"
    short = f"make it {article} {' '.join(adjectives + [target.category])}"
  else:
    short = f"make it {_join(adjectives)}"
  names = {"category": "the garment", "colour": "the colour", "pattern": "the pattern",
           "sleeves": "the sleeves", "length": "the length"}
  changes = [f"{names[k]} from {getattr(source, k)} to {getattr(target, k)}"
             for k in changed]
  return short, f"Change {_join(changes)}; keep everything else the same."


# ---------------------------------------------------------------------------------
# Rendering.

def _texture(a: Attributes, size: int, rng: np.random.Generator) -> np.ndarray:
  """A [size, size, 3] uint8 cloth texture in the product's colour and pattern."""
  base = np.array(COLOURS[a.colour], np.float32)
  accent = np.full(3, 25.0) if base.mean() > 128 else np.full(3, 240.0)
  y, x = np.mgrid[0:size, 0:size]
  period = max(6, size // 12)
  phase = int(rng.integers(period))
  if a.pattern == "striped":
    mask = ((y + phase) // (period // 2)) % 2 == 0
  elif a.pattern == "checked":
    mask = (((y + phase) // period) + ((x + phase) // period)) % 2 == 0
  elif a.pattern == "dotted":
    cy, cx = (y + phase) % period - period / 2, (x + phase) % period - period / 2
    mask = cy**2 + cx**2 < (period / 4) ** 2
  elif a.pattern == "floral":
    cy = np.abs((y + phase) % (2 * period) - period)
    cx = np.abs((x + phase) % (2 * period) - period)
    mask = (((cy < period / 6) & (cx < period / 2))
            | ((cx < period / 6) & (cy < period / 2)))
  else:
    mask = np.zeros((size, size), bool)
  image = np.where(mask[..., None], accent, base)
  shade = 1.0 - 0.12 * (y / size)  # soft light from above
  return np.clip(image * shade[..., None], 0, 255).astype(np.uint8)


def _garment_mask(a: Attributes, size: int, view: str) -> Image.Image:
  """The garment's silhouette for one view, as an L-mode mask."""
  s = size
  mask = Image.new("L", (s, s), 0)
  draw = ImageDraw.Draw(mask)
  side = view == "side"
  half = {"side": 0.09, "three-quarter": 0.13}.get(view, 0.18) * s
  top = 0.2 * s
  body = {"cropped": 0.33, "regular": 0.48, "long": 0.66}[a.length] * s
  if a.category in ("dress", "coat"):
    body += 0.08 * s
  flare = {"dress": 0.1, "coat": 0.04}.get(a.category, 0.0) * s
  cx = s / 2
  draw.polygon([(cx - half, top), (cx + half, top),
                (cx + half + flare, top + body), (cx - half - flare, top + body)],
               fill=255)
  sleeve_len = {"sleeveless": 0, "short-sleeved": 0.14, "long-sleeved": 0.45}[a.sleeves]
  if sleeve_len:
    arm = sleeve_len * s
    width = 0.08 * s
    sides = (1,) if side else (-1, 1)
    for d in sides:
      x0 = cx + d * half
      draw.polygon([(x0, top), (x0 + d * width, top),
                    (x0 + d * (width + 0.35 * arm), top + arm),
                    (x0 + d * 0.35 * arm, top + arm)], fill=255)
  neck = (0.03 if view == "back" else 0.07) * s
  if not side:
    draw.ellipse([cx - 0.07 * s, top - neck, cx + 0.07 * s, top + neck], fill=0)
  if view == "three-quarter":  # the far sleeve is foreshortened
    draw.rectangle([0, 0, cx - half - 0.04 * s, s], fill=0)
  return mask


def _draw_details(image: Image.Image, a: Attributes, view: str) -> None:
  """Category-specific details that make front and back differ."""
  s = image.size[0]
  draw = ImageDraw.Draw(image)
  cx, top = s / 2, 0.2 * s
  dark = (30, 30, 30)
  if view == "back":
    draw.line([(cx, top + 0.04 * s), (cx, top + 0.3 * s)], fill=dark, width=1)
    return
  if view == "three-quarter":  # the front, turned: details sit off-centre
    cx += 0.04 * s
  elif view != "front":
    return
  if a.category in ("shirt", "jacket", "coat"):
    for i in range(4):  # buttons
      y = top + (0.1 + 0.09 * i) * s
      draw.ellipse([cx - 2, y - 2, cx + 2, y + 2], fill=dark)
  if a.category in ("shirt", "jacket"):  # collar / lapels
    draw.polygon([(cx - 0.08 * s, top), (cx, top + 0.08 * s), (cx - 0.02 * s, top)],
                 fill=(235, 235, 235))
    draw.polygon([(cx + 0.08 * s, top), (cx, top + 0.08 * s), (cx + 0.02 * s, top)],
                 fill=(235, 235, 235))
  if a.category == "coat":  # belt
    draw.rectangle([cx - 0.2 * s, top + 0.3 * s, cx + 0.2 * s, top + 0.33 * s],
                   fill=dark)
  if a.category == "sweater":  # ribbed hem band
    draw.line([(cx - 0.18 * s, top + 0.06 * s), (cx + 0.18 * s, top + 0.06 * s)],
              fill=dark, width=2)
  if a.category == "dress":  # waist seam
    draw.line([(cx - 0.18 * s, top + 0.18 * s), (cx + 0.18 * s, top + 0.18 * s)],
              fill=dark, width=1)


def render_view(a: Attributes, view: str, size: int,
                rng: np.random.Generator) -> Image.Image:
  """One photo of a product: garment on a light backdrop, slightly jittered."""
  tint = rng.integers(215, 250, size=3)
  image = Image.new("RGB", (size, size), tuple(int(t) for t in tint))
  texture = Image.fromarray(_texture(a, size, rng))
  if view == "close-up":  # a magnified patch of the cloth
    crop = size // 3
    texture = texture.crop((crop, crop, 2 * crop, 2 * crop)).resize(
        (size, size), Image.NEAREST)
    image.paste(texture, (0, 0))
    ImageDraw.Draw(image).rectangle([0, 0, size - 1, size - 1], outline=(60, 60, 60),
                                    width=max(1, size // 32))
    return image
  if view == "back":  # the back of the cloth sits in shadow
    texture = Image.fromarray((np.asarray(texture) * 0.85).astype(np.uint8))
  image.paste(texture, (0, 0), _garment_mask(a, size, view))
  _draw_details(image, a, view)
  shift = tuple(int(v) for v in rng.integers(-size // 16, size // 16 + 1, size=2))
  return image.rotate(0, translate=shift, fillcolor=tuple(int(t) for t in tint))


# ---------------------------------------------------------------------------------
# Catalogue and triplets.

def _plural(category: str) -> str:
  word = category.replace("-", "_")
  return word + ("es" if word.endswith("s") else "s")


def _product_id(source: str, split: str, index: int, a: Attributes) -> str:
  n = _SPLIT_ID_OFFSET[split] + index
  if source == "deepfashion":  # e.g. WOMEN/Dresses/id_00004544/02
    gender = "WOMEN" if n % 2 == 0 else "MEN"
    return f"{gender}/{_plural(a.category).title()}/id_{n:08d}/{n % 7:02d}"
  if source == "f200k":
    return f"{_plural(a.category)}/{31_000_000 + n}"
  return str(100_000 + n)


class _Catalogue:
  """The products of one source and split; attribute combinations are unique."""

  def __init__(self, source: str, split: str, rng: np.random.Generator,
               views: tuple[int, int]):
    self.source, self.split, self.rng, self.views = source, split, rng, views
    self.products: list[Product] = []
    self.by_attributes: dict[Attributes, Product] = {}

  def add(self, a: Attributes) -> Product:
    if a in self.by_attributes:
      return self.by_attributes[a]
    num_views = int(self.rng.integers(self.views[0], self.views[1] + 1))
    product = Product(_product_id(self.source, self.split, len(self.products), a),
                      self.source, a, num_views)
    self.products.append(product)
    self.by_attributes[a] = product
    return product

  def add_random(self) -> Product:
    while True:
      a = sample_attributes(self.rng)
      if a not in self.by_attributes:
        return self.add(a)

  def target_for(self, source: Product) -> Product:
    """A product that differs from `source` in 1-3 attributes (made if needed)."""
    n_changes = int(self.rng.integers(1, 4))
    keys = self.rng.choice(ATTRIBUTES, size=n_changes, replace=False)
    changes = {str(k): sample_value(self.rng, str(k),
                                    other_than=getattr(source.attributes, k))
               for k in keys}
    return self.add(source.attributes.replace(**changes))


def _write_jsonl(path: epath.Path, rows: Iterable[dict]) -> int:
  count = 0
  with path.open("w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
      count += 1
  return count


def generate(out_dir: str | epath.Path, config: SyntheticConfig = SyntheticConfig()
             ) -> dict[str, int]:
  """Writes a synthetic release under out_dir; returns counts by file/kind."""
  out_dir = epath.Path(out_dir)
  (out_dir / "data").mkdir(parents=True, exist_ok=True)
  counts: dict[str, int] = {}
  file_prefix = {"train": "train", "validation": "val"}
  for split_index, split in enumerate(("train", "validation")):
    n_products = config.train_products if split == "train" else config.val_products
    n_triplets = config.train_triplets if split == "train" else config.val_triplets
    caption_rows, triplet_rows, images = [], [], 0
    for source_index, source in enumerate(SOURCES):
      rng = np.random.default_rng([config.seed, split_index, source_index])
      catalogue = _Catalogue(source, split, rng,
                             (config.min_views, config.max_views))
      for _ in range(n_products):
        catalogue.add_random()
      dataset = image_folder(source, split)  # the release names rows by folder
      for _ in range(n_triplets):
        src = catalogue.products[int(rng.integers(n_products))]
        tgt = catalogue.target_for(src)
        short, long = modification_texts(src.attributes, tgt.attributes)
        triplet_rows.append({"dataset": dataset, "source_id": src.product_id,
                             "target_id": tgt.product_id,
                             "modification_text_short": short,
                             "modification_text_long": long})
      folder = out_dir / "images" / dataset
      for product in catalogue.products:
        caption_rows.append(_caption_row(product, dataset))
        images += _write_views(folder, product, config, rng)
    counts[f"{split}_triplets"] = _write_jsonl(
        out_dir / "data" / f"{file_prefix[split]}_triplets.jsonl", triplet_rows)
    counts[f"{split}_products"] = _write_jsonl(
        out_dir / "data" / f"{file_prefix[split]}_captions.jsonl", caption_rows)
    counts[f"{split}_images"] = images
  return counts


def _caption_row(product: Product, dataset: str) -> dict:
  a = product.attributes
  return {"product_id": product.product_id, "dataset": dataset,
          "caption_long": long_caption(a, product.num_views),
          "caption_short": short_caption(a),
          "view_captions": [f"{view} view of a {short_caption(a)}"
                            for view in VIEW_NAMES[:product.num_views]]}


def _write_views(folder: epath.Path, product: Product, config: SyntheticConfig,
                 rng: np.random.Generator) -> int:
  product_dir = folder / product.product_id
  product_dir.mkdir(parents=True, exist_ok=True)
  for i, view in enumerate(VIEW_NAMES[:product.num_views]):
    image = render_view(product.attributes, view, config.image_size, rng)
    name = f"{i:02d}_{view.replace(' ', '_')}{_EXTENSIONS[product.source]}"
    with (product_dir / name).open("wb") as f:
      image.save(f, format="JPEG", quality=90)
  return product.num_views
