"""IRC formatting codes → Matrix HTML (the other way is the layer's Formatter, with
the hooks of :class:`~irc_bridge.connector.IrcFormatter`).

IRC marks text with toggles: bold ``\\x02``, italic ``\\x1d``, underline ``\\x1f``,
strike ``\\x1e``, monospace ``\\x11``, colour ``\\x03FG[,BG]`` (``\\x03`` alone ends
it), reverse ``\\x16`` (ignored) and reset ``\\x0f``.
"""

from __future__ import annotations

import html
import re

__all__ = ["irc_colour", "irc_to_html", "strip_codes"]

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


def irc_colour(colour: str) -> int:
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
