"""IRC lines (RFC 1459/2812): parsing, encoding, and splitting text to fit a line."""

from __future__ import annotations

import attrs

__all__ = ["LINE_LIMIT", "Line", "ctcp_action", "split_text"]

#: Bytes in one IRC line, CR LF included (RFC 2812 §2.3).
LINE_LIMIT = 512
#: The room kept for the prefix the server puts in front of what we send
#: (``:nick!user@host ``): servers cut relayed lines at 512 bytes with it.
PREFIX_ROOM = 100
#: Nick prefixes in a NAMES reply that mark channel status, not the nick.
STATUS_PREFIXES = "~&@%+"


@attrs.frozen
class Line:
    """One IRC message: ``[:prefix] COMMAND params... [:trailing]``."""

    command: str
    params: tuple[str, ...] = ()
    prefix: str = ""

    @property
    def nick(self) -> str:
        """Who sent it (the nick of ``nick!user@host``), or the server's name."""
        return self.prefix.split("!", 1)[0]

    @classmethod
    def parse(cls, raw: bytes) -> Line:
        """A received line (CR LF stripped or not); text is UTF-8, else Latin-1."""
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            text = raw.decode("latin-1")  # old clients: every byte is a character
        text = text.rstrip("\r\n")
        if text.startswith("@"):  # IRCv3 tags: not asked for, ignored if sent anyway
            text = text.partition(" ")[2]
        prefix = ""
        if text.startswith(":"):
            prefix, _, text = text[1:].partition(" ")
        head, colon, trailing = text.partition(" :")
        words = head.split()
        if not words:
            return cls(command="", prefix=prefix)
        params = words[1:] + ([trailing] if colon else [])
        return cls(command=words[0].upper(), params=tuple(params), prefix=prefix)

    def encode(self) -> bytes:
        """The line to send, CR LF included; CR, LF and NUL in params are removed."""
        params = [_clean(p) for p in self.params]
        if params and (not params[-1] or " " in params[-1] or params[-1].startswith(":")):
            params[-1] = ":" + params[-1]
        return (" ".join([self.command, *params]) + "\r\n").encode()


def _clean(text: str) -> str:
    return text.replace("\r", "").replace("\n", " ").replace("\0", "")


def ctcp_action(text: str) -> str | None:
    """The text of a CTCP ACTION (``/me``), or None when it is not one."""
    if text.startswith("\x01ACTION") and len(text) > 7 and text[7] in " \x01":
        return text[8:].rstrip("\x01") if len(text) > 8 else ""
    return None


def split_text(text: str, budget: int) -> list[str]:
    """``text`` in pieces of at most ``budget`` UTF-8 bytes each, one per line of it.

    A piece ends at a space when one is near the limit (else mid-word), never
    inside a character's bytes. Empty lines are dropped.
    """
    pieces: list[str] = []
    for line in text.splitlines():
        data = line.encode()
        while len(data) > budget:
            cut = _utf8_boundary(data, budget)
            space = data.rfind(b" ", budget // 2, cut + 1)
            if space > 0:
                cut = space
            pieces.append(data[:cut].decode())
            data = data[cut:].lstrip(b" ")
        if data.strip():
            pieces.append(data.decode())
    return pieces


def _utf8_boundary(data: bytes, limit: int) -> int:
    """The largest index <= ``limit`` that does not fall inside a UTF-8 sequence."""
    cut = limit
    while cut > 0 and data[cut] & 0xC0 == 0x80:  # a continuation byte
        cut -= 1
    return cut
