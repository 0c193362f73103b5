"""IRC formatting codes ↔ Matrix HTML.

IRC marks text with toggles: bold ``\\x02``, italic ``\\x1d``, underline ``\\x1f``,
strike ``\\x1e``, monospace ``\\x11``, colour ``\\x03FG[,BG]`` (``\\x03`` alone ends
it), reverse ``\\x16`` (ignored) and reset ``\\x0f``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from html.parser import HTMLParser

__all__ = ["html_to_irc", "irc_to_html", "strip_codes"]

BOLD, ITALIC, UNDERLINE, STRIKE, MONO = "\x02", "\x1d", "\x1f", "\x1e", "\x11"
COLOUR, REVERSE, RESET = "\x03", "\x16", "\x0f"
TOGGLES = {BOLD: "b", ITALIC: "i", UNDERLINE: "u", STRIKE: "del", MONO: "code"}
#: mIRC's 16 standard colours.
PALETTE = (
    "#ffffff", "#000000", "#00007f", "#009300", "#ff0000", "#7f0000", "#9c009c", "#fc7f00",
    "#ffff00", "#00fc00", "#009393", "#00ffff", "#0000fc", "#ff00ff", "#7f7f7f", "#d2d2d2",
)  # fmt: skip
_COLOUR_CODE = re.compile(r"\x03(\d{1,2})?(?:,(\d{1,2}))?")
_CODES = re.compile(r"\x03(?:\d{1,2}(?:,\d{1,2})?)?|[\x02\x1d\x1f\x1e\x11\x16\x0f]")


def strip_codes(text: str) -> str:
    """``text`` without any formatting code."""
    return _CODES.sub("", text)


def irc_to_html(text: str) -> str | None:
    """``text`` as Matrix HTML, or None when it has no formatting (plain body only)."""
    if not _CODES.search(text):
        return None
    out: list[str] = []
    open_tags: list[str] = []  # innermost last; each as its closing tag
    styles: dict[str, bool] = {}
    colour: tuple[str | None, str | None] = (None, None)
    pos = 0
    for match in _CODES.finditer(text):
        out.append(html.escape(text[pos : match.start()], quote=False))
        pos = match.end()
        code = match.group()
        if code[0] in TOGGLES:
            styles[code] = not styles.get(code, False)
        elif code[0] == COLOUR:
            colour = _colour(match.group(), colour)
        elif code == RESET:
            styles, colour = {}, (None, None)
        # Closing and reopening everything keeps the HTML well nested whatever the order.
        out.extend(reversed(open_tags))
        open_tags = []
        for toggle, on in styles.items():
            if on:
                out.append(f"<{TOGGLES[toggle]}>")
                open_tags.append(f"</{TOGGLES[toggle]}>")
        if colour != (None, None):
            out.append(_font(*colour))
            open_tags.append("</font>")
    out.append(html.escape(text[pos:], quote=False))
    out.extend(reversed(open_tags))
    return re.sub(r"<(\w+)[^>]*></\1>", "", "".join(out))


def _colour(code: str, current: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
    match = _COLOUR_CODE.fullmatch(code)
    if match is None or match.group(1) is None:
        return (None, None)  # a bare \x03 ends the colour
    fg = PALETTE[int(match.group(1)) % 16]
    bg = PALETTE[int(match.group(2)) % 16] if match.group(2) else current[1]
    return (fg, bg)


def _font(fg: str | None, bg: str | None) -> str:
    attributes = f' data-mx-color="{fg}"' if fg else ""
    attributes += f' data-mx-bg-color="{bg}"' if bg else ""
    return f"<font{attributes}>"


def html_to_irc(formatted: str, mention: Callable[[str], str | None] | None = None) -> str:
    """Matrix HTML as IRC text with formatting codes.

    ``mention`` turns a pill's Matrix user id into the text IRC users see (a
    nick); without it, or when it returns None, a pill is its link text.
    """
    parser = _ToIrc(mention)
    parser.feed(formatted)
    parser.close()
    return re.sub(r"\n{3,}", "\n\n", "".join(parser.out)).strip("\n")


_TAG_CODES = {
    "b": BOLD, "strong": BOLD, "i": ITALIC, "em": ITALIC, "u": UNDERLINE,
    "del": STRIKE, "s": STRIKE, "strike": STRIKE, "code": MONO,
}  # fmt: skip
_BLOCKS = frozenset({"p", "div", "pre", "blockquote", "ul", "ol", "li", "h1", "h2", "h3",
                     "h4", "h5", "h6", "tr", "table"})  # fmt: skip
_PILL = re.compile(r"^https://matrix\.to/#/(@[^/?]+)")


class _ToIrc(HTMLParser):
    def __init__(self, mention: Callable[[str], str | None] | None) -> None:
        super().__init__(convert_charrefs=True)
        self.mention = mention
        self.out: list[str] = []
        self._skip = 0  # inside <mx-reply>: the reply fallback, not the message
        self._link: str | None = None  # the pill being read, its text replaced
        self._colours = 0
        self._quote = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "mx-reply":
            self._skip += 1
        elif tag in _TAG_CODES:
            self.out.append(_TAG_CODES[tag])
        elif tag == "br":
            self._text("\n")
        elif tag == "blockquote":
            self._quote += 1
            self._block()
        elif tag in _BLOCKS:
            self._block()
            if tag == "li":
                self._text("• ")
        elif tag == "a":
            self._start_link(attributes.get("href") or "")
        elif tag in ("font", "span"):
            colour = attributes.get("data-mx-color") or attributes.get("color")
            if colour:
                self.out.append(f"{COLOUR}{_nearest(colour):02d}")
                self._colours += 1

    def _start_link(self, href: str) -> None:
        match = _PILL.match(href)
        nick = self.mention(match.group(1)) if match and self.mention else None
        if nick is not None:
            self._text(nick)
            self._link = nick
        elif match:
            self._link = ""  # a pill without a nick: its text stands

    def handle_endtag(self, tag: str) -> None:
        if tag == "mx-reply":
            self._skip = max(0, self._skip - 1)
        elif tag in _TAG_CODES:
            self.out.append(_TAG_CODES[tag])
        elif tag == "a":
            self._link = None
        elif tag in ("font", "span") and self._colours:
            self._colours -= 1
            self.out.append(COLOUR)
        elif tag == "blockquote":
            self._quote = max(0, self._quote - 1)
            self._block()
        elif tag in _BLOCKS:
            self._block()

    def handle_data(self, data: str) -> None:
        if self._link:  # the pill's nick is written already
            return
        self._text(data)

    def _text(self, data: str) -> None:
        if self._skip:
            return
        if self._quote and (not self.out or self.out[-1].endswith("\n")):
            data = "> " + data
        self.out.append(data.replace("\n", "\n" + "> " * self._quote) if self._quote else data)

    def _block(self) -> None:
        if self.out and not "".join(self.out[-2:]).endswith("\n"):
            self._text("\n")


def _nearest(colour: str) -> int:
    """The mIRC colour nearest to a ``#rrggbb`` colour (white for what is not one)."""
    try:
        rgb = int(colour.lstrip("#")[:6], 16)
    except ValueError:
        return 0
    target = (rgb >> 16, (rgb >> 8) & 255, rgb & 255)

    def distance(index: int) -> int:
        value = int(PALETTE[index][1:], 16)
        return sum(
            (a - b) ** 2
            for a, b in zip(target, (value >> 16, (value >> 8) & 255, value & 255), strict=True)
        )

    return min(range(len(PALETTE)), key=distance)
