"""Retrieval results a person can look at: an HTML page and a PNG contact sheet.

For one composed query (its source views and the modification text) and its
ranked results (product ids and scores, with a way to get each product's
views), `write_results_page` writes

  <out_dir>/<name>.html        query views, the text, and one row per result:
                               rank, score, product id, views; the target (if
                               known) framed in green, the source in grey
  <out_dir>/<name>.png         the same as a contact sheet
  <out_dir>/<name>_files/      the view images the page shows (JPEG), linked
                               with relative paths (or embedded: embed=True)

  paths = results_page.write_results_page(
      "workdir/search", query_views=[front, back], text="make it blue",
      product_ids=ids[0], scores=scores[0], views=product_views,
      target_id="id_00004544", name="query_0007")

Views are uint8 arrays (HxW, HxWx1, HxWx3 or HxWx4), image file paths or
encoded image bytes; `views` maps a product id to its views, as a dict or a
callable. The HTML pieces (`ImageStore`, `load_row`, `row_html`, `query_html`,
`page_html`) are shared with the evaluation's report page (report_page.py).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import os
from typing import Any, Callable, Mapping, Sequence, Union

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from PIL import ImageOps

ImageLike = Union[np.ndarray, str, os.PathLike, Image.Image, bytes]
ViewSource = Union[Mapping[str, Sequence[ImageLike]],
                   Callable[[str], Sequence[ImageLike]]]

# Contact sheet colours.
_BACKGROUND = (255, 255, 255)
_PANEL = (246, 247, 249)
_TEXT = (33, 37, 41)
_MUTED = (108, 117, 125)
_TARGET = (25, 135, 84)
_SOURCE = (134, 142, 150)
_PLACEHOLDER = (226, 229, 233)


def to_image(view: ImageLike) -> Image.Image:
  """An RGB PIL image from a uint8 array, a PIL image, an image file path or
  encoded image bytes (as `fashionmv.Product.views` holds them)."""
  if isinstance(view, Image.Image):
    return view.convert("RGB")
  if isinstance(view, bytes):
    # Opened as the release opens views: EXIF orientation left alone.
    with Image.open(io.BytesIO(view)) as im:
      return im.convert("RGB")
  if isinstance(view, (str, os.PathLike)):
    path = os.fspath(view)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"view image {path} does not exist")
    with Image.open(path) as im:
      return im.convert("RGB")
  array = np.asarray(view)
  if array.dtype != np.uint8:
    raise ValueError(f"view arrays must be uint8, got {array.dtype}")
  if array.ndim == 3 and array.shape[2] == 1:
    array = array[:, :, 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and
                                  array.shape[2] not in (3, 4)):
    raise ValueError("view arrays must be HxW, HxWx1, HxWx3 or HxWx4, got "
                     f"shape {array.shape}")
  return Image.fromarray(array).convert("RGB")


def views_of(views: ViewSource | None, product_id: str) -> list[ImageLike]:
  """The views `views` holds for the product (none when it holds none)."""
  if views is None:
    return []
  if callable(views) and not isinstance(views, Mapping):
    found = views(product_id)
  else:
    found = views.get(product_id)
  return list(found) if found is not None else []


@dataclasses.dataclass
class _Row:
  label: str            # "Query" or "#3"
  product_id: str | None
  score: float | None
  images: list[Image.Image]
  role: str = ""        # "target", "source" or ""
  error: str = ""       # why the views are missing, if they are


def role_of(product_id, target_id: str | None, source_id: str | None) -> str:
  return ("target" if product_id == target_id else
          "source" if product_id == source_id else "")


def load_row(label: str, product_id: str, score: float | None,
             views: ViewSource | None, role: str = "") -> _Row:
  """A row with the product's views; unreadable or missing views are noted."""
  row = _Row(label, product_id, score, [], role)
  try:
    row.images = [to_image(v) for v in views_of(views, product_id)]
    if not row.images and views is not None:
      row.error = "no views found"
  except (OSError, ValueError) as e:
    row.error = f"views unreadable: {e}"
  return row


def result_rows(product_ids: Sequence[str | None], scores: Sequence[float],
                views: ViewSource | None, *, target_id: str | None = None,
                source_id: str | None = None) -> list[_Row]:
  """One row per ranked result, labelled "#rank"; None ids (empty slots) are
  skipped."""
  return [load_row(f"#{rank}", str(pid), float(score), views,
                   role_of(str(pid), target_id, source_id))
          for rank, (pid, score) in enumerate(zip(product_ids, scores), start=1)
          if pid is not None]


def _font(size: int):
  return ImageFont.load_default(size=size)


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
  """Greedy word wrap to `width` pixels; long words are cut."""
  lines, line = [], ""
  for word in text.split():
    trial = f"{line} {word}".strip()
    if draw.textlength(trial, font=font) <= width:
      line = trial
      continue
    if line:
      lines.append(line)
    while draw.textlength(word, font=font) > width and len(word) > 1:
      cut = len(word)
      while cut > 1 and draw.textlength(word[:cut], font=font) > width:
        cut -= 1
      lines.append(word[:cut])
      word = word[cut:]
    line = word
  if line:
    lines.append(line)
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] = lines[-1].rstrip() + "..."
  return lines


def _thumb(image: Image.Image, size: int) -> Image.Image:
  """`image` fitted into a size x size white square, aspect kept."""
  fitted = ImageOps.contain(image, (size, size), Image.Resampling.LANCZOS)
  tile = Image.new("RGB", (size, size), _BACKGROUND)
  tile.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
  return tile


def contact_sheet(query_row: _Row, text: str, rows: Sequence[_Row], *,
                  thumb: int = 160, max_views: int = 5,
                  title: str = "") -> Image.Image:
  """The contact sheet image: a query band, then one band per result."""
  pad, gap, label_w = 16, 8, 240
  columns = max([1] + [min(len(r.images), max_views)
                       for r in [query_row, *rows]])
  width = pad * 2 + label_w + columns * (thumb + gap)
  title_h = 40 if title else 0
  text_h = 0
  big, small, tiny, quote = _font(20), _font(15), _font(13), _font(19)
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  text_lines = _wrap(probe, f"\u201c{text}\u201d", quote,
                     width - 3 * pad, max_lines=3) if text else []
  text_h = 20 + 26 * len(text_lines) + 8 if text_lines else 0
  band = thumb + 2 * pad
  height = pad + title_h + band + text_h + pad + len(rows) * (band + 4) + pad
  sheet = Image.new("RGB", (width, height), _BACKGROUND)
  draw = ImageDraw.Draw(sheet)
  y = pad
  if title:
    draw.text((pad, y), title, font=big, fill=_TEXT)
    y += title_h

  def draw_band(row: _Row, y: int, fill, extra_h: int = 0) -> int:
    h = band + extra_h
    draw.rectangle([pad // 2, y, width - pad // 2, y + h], fill=fill)
    colour = {"target": _TARGET, "source": _SOURCE}.get(row.role)
    if colour:
      draw.rectangle([pad // 2, y, width - pad // 2, y + h], outline=colour,
                     width=4)
    tx, ty = pad + 4, y + pad
    draw.text((tx, ty), row.label, font=big, fill=_TEXT)
    if row.score is not None:
      label_end = tx + draw.textlength(row.label, font=big) + 10
      draw.text((label_end, ty + 4), f"{row.score:.4f}", font=small,
                fill=_MUTED)
    ty += 30
    for line in _wrap(draw, row.product_id or "", tiny, label_w - 16, 4):
      draw.text((tx, ty), line, font=tiny, fill=_TEXT)
      ty += 17
    if row.role:
      draw.text((tx, ty + 4), row.role.upper(), font=small, fill=colour)
    x = pad + label_w
    images = row.images[:max_views]
    if not images:
      draw.rectangle([x, y + pad, x + thumb, y + pad + thumb],
                     fill=_PLACEHOLDER)
      msg = row.error or "no views"
      for i, line in enumerate(_wrap(draw, msg, tiny, thumb - 12, 6)):
        draw.text((x + 6, y + pad + 6 + 16 * i), line, font=tiny, fill=_MUTED)
    for image in images:
      sheet.paste(_thumb(image, thumb), (x, y + pad))
      x += thumb + gap
    if len(row.images) > max_views:
      draw.text((x - gap - 40, y + pad + thumb - 16),
                f"+{len(row.images) - max_views}", font=small, fill=_MUTED)
    return y + h

  y = draw_band(query_row, y, _PANEL, text_h)
  if text_lines:
    draw.text((pad + 4, y - text_h), "modification text", font=tiny,
              fill=_MUTED)
  for i, line in enumerate(text_lines):
    draw.text((pad + 4, y - text_h + 20 + 26 * i), line, font=quote,
              fill=_TEXT)
  y += pad
  for row in rows:
    y = draw_band(row, y, _BACKGROUND if row.role != "target" else _PANEL) + 4
    draw.line([pad, y - 2, width - pad, y - 2], fill=_PLACEHOLDER)
  return sheet


_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial,
       sans-serif; margin: 24px; color: #212529; background: #fff; }
h1 { font-size: 22px; margin: 0 0 16px; }
.query { background: #f6f7f9; border-radius: 8px; padding: 16px;
         margin-bottom: 20px; }
.text { font-size: 20px; margin: 4px 0 0; }
.text::before { content: "\\201C"; } .text::after { content: "\\201D"; }
.meta { color: #6c757d; font-size: 13px; }
.row { display: flex; align-items: center; gap: 16px; padding: 12px;
       border-bottom: 1px solid #e2e5e9; border-left: 5px solid transparent; }
.row.target { border-left-color: #198754; background: #f1f8f4; }
.row.source { border-left-color: #868e96; }
.label { width: 220px; flex: none; }
.rank { font-size: 22px; font-weight: 600; }
.score { color: #6c757d; margin-left: 8px; font-variant-numeric: tabular-nums; }
.pid { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px;
       word-break: break-all; margin-top: 4px; }
.badge { display: inline-block; margin-top: 6px; padding: 2px 8px;
         border-radius: 10px; font-size: 12px; color: #fff; }
.badge.target { background: #198754; } .badge.source { background: #868e96; }
.views { display: flex; gap: 8px; flex-wrap: wrap; }
.views img { width: %(px)dpx; height: %(px)dpx; object-fit: contain;
             background: #fff; border: 1px solid #e2e5e9; border-radius: 4px; }
.missing { width: %(px)dpx; height: %(px)dpx; background: #e2e5e9;
           color: #6c757d; font-size: 12px; display: flex; padding: 8px;
           box-sizing: border-box; }
"""


class ImageStore:
  """Turns view images into <img> sources: data URIs inside the page (embed),
  or JPEG files in `out_dir/files_dir` linked by relative path. An image is
  stored once per stem, however often the page shows it."""

  def __init__(self, out_dir: str, files_dir: str, thumb: int, embed: bool):
    self.out_dir, self.files_dir = out_dir, files_dir
    self.thumb, self.embed = thumb, embed
    self.saved: list[str] = []
    self._sources: dict[str, str] = {}
    if not embed:
      os.makedirs(os.path.join(out_dir, files_dir), exist_ok=True)

  def src(self, image: Image.Image, stem: str) -> str:
    if stem in self._sources:
      return self._sources[stem]
    # Twice the display size, so the page stays sharp on dense screens.
    small = ImageOps.contain(image, (2 * self.thumb, 2 * self.thumb),
                             Image.Resampling.LANCZOS)
    if self.embed:
      buf = io.BytesIO()
      small.save(buf, format="JPEG", quality=90)
      src = "data:image/jpeg;base64," + base64.b64encode(
          buf.getvalue()).decode()
    else:
      src = f"{self.files_dir}/{stem}.jpg"
      path = os.path.join(self.out_dir, self.files_dir, f"{stem}.jpg")
      small.save(path, format="JPEG", quality=90)
      self.saved.append(path)
    self._sources[stem] = src
    return src

  def close(self) -> None:
    """Removes the files folder when nothing went into it."""
    if not self.embed and not self.saved:
      try:
        os.rmdir(os.path.join(self.out_dir, self.files_dir))
      except OSError:
        pass


def views_html(row: _Row, stem: str, store: ImageStore, max_views: int) -> str:
  """The row's views as <img> tags, or a grey box saying why there are none."""
  esc = html.escape
  if not row.images:
    return f'<div class="missing">{esc(row.error or "no views")}</div>'
  tags = []
  for i, image in enumerate(row.images[:max_views]):
    src = esc(store.src(image, f"{stem}_v{i}"), quote=True)
    tags.append(f'<img src="{src}" alt="{esc(stem)} view {i + 1}" '
                'loading="lazy">')
  more = len(row.images) - max_views
  if more > 0:
    tags.append(f'<span class="meta">+{more} more</span>')
  return "".join(tags)


def row_html(row: _Row, stem: str, store: ImageStore | None,
             max_views: int) -> str:
  """One ranked result: rank, score, product id, role badge and views (left
  out when `store` is None: a page without views)."""
  esc = html.escape
  badge = (f'<div><span class="badge {row.role}">{row.role}</span></div>'
           if row.role else "")
  score = ("" if row.score is None else
           f'<span class="score">{row.score:.4f}</span>')
  views = ("" if store is None else '<div class="views">'
           f"{views_html(row, stem, store, max_views)}</div>")
  pid = esc(row.product_id or "")
  return (f'<div class="row {row.role}" data-product="{pid}">'
          f'<div class="label"><span class="rank">{esc(row.label)}</span>{score}'
          f'<div class="pid">{pid}</div>{badge}</div>{views}</div>')


def query_html(query_row: _Row, text: str, store: ImageStore | None,
               max_views: int, meta: str, stem: str = "query") -> str:
  """The query panel: a line of `meta` (already HTML), the source views and
  the modification text."""
  views = ("" if store is None else
           f'<div class="views">{views_html(query_row, stem, store, max_views)}'
           "</div>")
  words = (f'<div class="meta" style="margin-top:12px">modification text</div>'
           f'<p class="text">{html.escape(text)}</p>') if text else ""
  return (f'<section class="query"><div class="meta">{meta}</div>{views}{words}'
          "</section>")


def target_summary(rows: Sequence[_Row]) -> str:
  found = [r.label for r in rows if r.role == "target"]
  return (f"target at rank {found[0][1:]}" if found
          else f"target not in the top {len(rows)}")


def page_html(title: str, body: Sequence[str], *, thumb: int,
              css: str = "") -> str:
  """A complete page: the shared style (views `thumb` px wide) and `css`."""
  esc = html.escape
  parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{esc(title)}</title>",
           f"<style>{_CSS % {'px': thumb}}{css}</style></head><body>",
           f"<h1>{esc(title)}</h1>", *body, "</body></html>"]
  return "\n".join(p for p in parts if p)


def write_results_page(out_dir, query_views: Sequence[ImageLike], text: str,
                       product_ids: Sequence[str], scores: Sequence[float],
                       views: ViewSource | None, *,
                       target_id: str | None = None,
                       source_id: str | None = None, title: str = "",
                       name: str = "results", thumb: int = 160,
                       max_views: int = 5, embed: bool = False
                       ) -> dict[str, Any]:
  """Writes the HTML page and the PNG contact sheet for one query.

  Args:
    out_dir: output directory (created if needed).
    query_views: the query's source views.
    text: the modification text.
    product_ids: ranked product ids (None entries, empty slots, are skipped).
    scores: their scores, same length.
    views: product id -> its views (a mapping or a callable); a product
      without views, or whose images cannot be read, is shown as a grey box
      saying why.
    target_id: the query's target, framed in green where it appears.
    source_id: the query's source product, marked where it appears.
    title: page heading (default: "Query <source_id>" or "Query").
    name: base name of the .html, .png and the _files folder.
    thumb: view size in pixels on the sheet and the page.
    max_views: views shown per product.
    embed: put the images inside the HTML (data URIs) instead of beside it.

  Returns:
    {"html": path, "png": path, "images": [paths of the saved views]}.
  """
  if len(product_ids) != len(scores):
    raise ValueError(f"{len(product_ids)} product ids but {len(scores)} scores")
  if not name or os.sep in name or name.startswith("."):
    raise ValueError(f"bad page name {name!r}")
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  title = title or (f"Query {source_id}" if source_id else "Query")

  query_row = _Row("Query", source_id, None,
                   [to_image(v) for v in query_views][:max_views])
  rows = result_rows(product_ids, scores, views, target_id=target_id,
                     source_id=source_id)
  store = ImageStore(out_dir, f"{name}_files", thumb, embed)
  esc = html.escape
  meta = f'source {esc(source_id or "-")}'
  if target_id:
    meta += f" &middot; target {esc(target_id)}"
  body = [query_html(query_row, text, store, max_views, meta)]
  if target_id is not None:
    body.append(f'<p class="meta">{esc(target_summary(rows))}</p>')
  body += [row_html(row, "r" + row.label[1:], store, max_views) for row in rows]
  html_path = os.path.join(out_dir, f"{name}.html")
  with open(html_path, "w", encoding="utf-8") as f:
    f.write(page_html(title, body, thumb=thumb))
  store.close()

  png_path = os.path.join(out_dir, f"{name}.png")
  contact_sheet(query_row, text, rows, thumb=thumb, max_views=max_views,
                title=title).save(png_path, format="PNG", optimize=True)
  return {"html": html_path, "png": png_path, "images": store.saved}
