"""matplotlib figures as inline SVG: :class:`SvgFigure` saves a figure as an ``<svg>`` element to inline in
the report page (vector: sharp at any zoom; text kept as text: small, searchable and escaped), named for screen
readers, with a class and hover texts (an SVG ``<title>`` per mark) on the artists that carry data. Sizes are
given in CSS pixels (:func:`canvas`), font sizes in points (0.75 CSS px).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.text import Text  # noqa: E402

#: inches per CSS pixel (matplotlib's SVG is 72 pt per inch, 1 pt = 4/3 px)
PX = 1 / 96
#: matplotlib settings of the SVG figures: text kept as text, font sizes in points
SVG_RC = {"svg.fonttype": "none", "font.sans-serif": ["DejaVu Sans"], "font.size": 7.5}
SVG_NS, XLINK_NS = "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"
ET.register_namespace("", SVG_NS)
ET.register_namespace("xlink", XLINK_NS)
#: the SVG elements a mark is drawn as (marker, bar, line), and the definitions they use (not marks)
#: a decimal number in an SVG attribute
NUMBER = re.compile(r"-?\d+\.\d+")
MARK_TAGS, DEFS = {f"{{{SVG_NS}}}use", f"{{{SVG_NS}}}path"}, f"{{{SVG_NS}}}defs"
#: the smallest text a figure may show, in CSS px: a figure is never shown narrower than that allows
MIN_TEXT_PX = 10.0


def footer(fig: plt.Figure, run_name: str, size: float = 7.5) -> None:
    """The run's name in the lower right corner (nothing for an empty name)."""
    if run_name:
        fig.text(0.995, 0.005, run_name, ha="right", va="bottom", fontsize=size, color="#777")


def smallest_font(fig: plt.Figure) -> float:
    """The smallest font size (pt) of ``fig``'s visible, non-empty texts (:data:`MIN_TEXT_PX` in pt if none)."""
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes, default=MIN_TEXT_PX * 0.75)


def min_width(fig: plt.Figure) -> int:
    """The narrowest width (CSS px) ``fig`` may be scaled to with no text under :data:`MIN_TEXT_PX`: its width
    in px times MIN_TEXT_PX over its smallest font in px, both at 1:1, which at any resolution is the width in
    inches times 72 times MIN_TEXT_PX over the smallest font in pt."""
    return math.ceil(fig.get_figwidth() * 72 * MIN_TEXT_PX / smallest_font(fig))


def svg_style(draw: Callable[..., Any]) -> Callable[..., Any]:
    """Run a figure function under :data:`SVG_RC` (font sizes are read when the artists are made)."""

    @functools.wraps(draw)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with plt.rc_context(SVG_RC):
            return draw(*args, **kwargs)

    return wrapped


class SvgFigure:
    """A matplotlib figure saved as an inline ``<svg>`` element named for screen readers (``role="img"``,
    ``aria-label`` and ``<title>``: ``label``). Artists given to :meth:`mark` get a ``class`` attribute and a
    hover text on each mark; every other group id is dropped (ids stay unique on a page of several figures)."""

    def __init__(self, fig: plt.Figure, label: str) -> None:
        self.fig, self.label = fig, label
        self._marks: dict[str, tuple[str, Sequence[str]]] = {}

    def mark(self, artist: Artist, cls: str, tips: Sequence[str] = ()) -> None:
        """Give ``artist``'s group the class ``cls`` and its marks (markers, bars or rectangles, in drawing
        order) the hover texts ``tips`` (none: no hover text)."""
        key = f"mark{len(self._marks)}"
        artist.set_gid(key)
        self._marks[key] = (cls, tips)

    def render(self, run_name: str) -> str:
        """The ``<svg>`` element's text (no XML prolog: for inlining in HTML, or as a file of its own)."""
        footer(self.fig, run_name)
        narrowest = min_width(self.fig)
        buf = io.StringIO()
        with plt.rc_context({"svg.hashsalt": self.label}):  # ids: reproducible, and apart from other figures'
            self.fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
        plt.close(self.fig)
        root = ET.fromstring(buf.getvalue())
        for element in list(root.iter(f"{{{SVG_NS}}}g")):  # (the hover texts are added on the way)
            cls, tips = self._marks.get(element.attrib.pop("id", ""), ("", ()))
            if cls:
                element.set("class", cls)
                _add_tips(element, tips)
        _compact(root)
        _styles_to_classes(root, "s" + hashlib.sha1(self.label.encode()).hexdigest()[:6])
        root.set("style", f"min-width:{narrowest}px")  # the page scrolls it sideways rather than shrink its text
        root.set("role", "img")
        root.set("aria-label", self.label)
        title = ET.Element(f"{{{SVG_NS}}}title")
        title.text = self.label
        root.insert(0, title)
        return ET.tostring(root, encoding="unicode")


def stack_svgs(head: str, panels: Sequence[str], cols: int, label: str) -> str:
    """One ``<svg>`` named ``label``: the ``<svg>`` ``head`` on top, below it ``panels`` (``<svg>`` elements of
    one size, e.g. :meth:`SvgFigure.render`'s) in rows of ``cols``, each nested at its place."""
    top, parts = ET.fromstring(head), [ET.fromstring(p) for p in panels]
    head_w, head_h = _view_size(top)
    panel_w, panel_h = _view_size(parts[0]) if parts else (0.0, 0.0)
    width, height = max(head_w, cols * panel_w), head_h + math.ceil(len(parts) / max(cols, 1)) * panel_h
    outer = ET.Element(f"{{{SVG_NS}}}svg", {"width": f"{width:g}pt", "height": f"{height:g}pt"})
    outer.set("viewBox", f"0 0 {width:g} {height:g}")
    outer.set("role", "img")
    outer.set("aria-label", label)
    ET.SubElement(outer, f"{{{SVG_NS}}}title").text = label
    for k, part in enumerate([top, *parts]):
        x, y = (0.0, 0.0) if k == 0 else ((k - 1) % cols * panel_w, head_h + (k - 1) // cols * panel_h)
        w, h = _view_size(part)
        for key in ("style", "role"):
            part.attrib.pop(key, None)
        part.attrib.update({"x": f"{x:g}", "y": f"{y:g}", "width": f"{w:g}", "height": f"{h:g}"})
        outer.append(part)
    return ET.tostring(outer, encoding="unicode")


def _view_size(svg: ET.Element) -> tuple[float, float]:
    """(width, height) of an ``<svg>`` element's viewBox, in its user units (pt for matplotlib's)."""
    _, _, w, h = (float(v) for v in svg.get("viewBox").split())
    return w, h


def _compact(element: ET.Element) -> None:
    """Shrink matplotlib's SVG in place: no indentation, no attribute-less groups (their children move up),
    coordinates to 2 decimals (the figures are some hundred units wide), no ``rotate(-0 ...)``."""
    children = []
    for child in element:
        _compact(child)
        child.tail = None
        if child.tag == f"{{{SVG_NS}}}g" and not child.attrib:
            children += list(child)
        else:
            children.append(child)
    element[:] = children
    if element.tag != f"{{{SVG_NS}}}text" and element.text and not element.text.strip():
        element.text = None
    if element.get("transform", "").startswith("rotate(-0 "):
        del element.attrib["transform"]
    for key in ("d", "x", "y", "transform"):
        if key in element.attrib:
            element.set(key, NUMBER.sub(_round, " ".join(element.get(key).split())))


def _styles_to_classes(root: ET.Element, prefix: str) -> None:
    """Each distinct ``style`` attribute as one CSS class (``prefix``-n, apart from the other figures' on the
    page) in a ``<style>`` of ``root``: matplotlib repeats a handful of styles on every mark."""
    classes: dict[str, str] = {}
    for element in root.iter():
        style = element.attrib.pop("style", None)
        if style is not None:
            name = classes.setdefault(style, f"{prefix}-{len(classes)}")
            element.set("class", f"{element.get('class', '')} {name}".strip())
    css = ET.SubElement(ET.SubElement(root, f"{{{SVG_NS}}}defs"), f"{{{SVG_NS}}}style")
    css.text = "".join(f".{name}{{{style}}}" for style, name in classes.items())


def _round(number: re.Match) -> str:
    return f"{float(number[0]):.2f}".rstrip("0").rstrip(".")


def _marks(group: ET.Element) -> list[ET.Element]:
    """The elements drawn inside ``group`` (not its definitions), in document (= drawing) order."""
    found = []
    for child in group:
        if child.tag in MARK_TAGS:
            found.append(child)
        elif child.tag != DEFS:
            found += _marks(child)
    return found


def _add_tips(group: ET.Element, tips: Sequence[str]) -> None:
    for element, tip in zip(_marks(group), tips, strict=False):  # a report never fails for a tooltip
        ET.SubElement(element, f"{{{SVG_NS}}}title").text = tip


def canvas(width: float, height: float, box: tuple[float, float, float, float], **grid: Any) -> tuple:
    """(figure, axes array) of ``width`` x ``height`` CSS pixels, the plot area ``box`` = (left, top, right,
    bottom) pixels in from the edges; ``grid``: :func:`matplotlib.pyplot.subplots` arguments."""
    fig, axes = plt.subplots(figsize=(width * PX, height * PX), squeeze=False, **grid)
    left, top, right, bottom = box
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height)
    return fig, axes


def heading(fig: plt.Figure, text: str) -> None:
    fig.text(12 * PX / fig.get_figwidth(), 1 - 8 * PX / fig.get_figheight(), text, fontsize=9, va="top")
