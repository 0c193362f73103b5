"""Matrix HTML ↔ a remote network's text, with mentions both ways.

:class:`Formatter` turns a Matrix message into remote text (its ``formatted_body``
HTML when it has one) and remote text into a Matrix message
(:class:`MatrixText`: ``body``, HTML and ``m.mentions``). A network subclasses
it and overrides the hooks: the markers of bold, italic..., how a pill becomes a
remote mention (:meth:`Formatter.matrix_mention`) and which remote text is a
mention of whom (:attr:`Formatter.mention_pattern`,
:meth:`Formatter.remote_mention`). The default renders plain text;
:class:`MarkdownFormatter` renders and reads markdown.

HTML is read with the standard library's :mod:`html.parser` (lenient, as
received HTML needs); markdown with ``markdown-it-py`` (CommonMark), raw HTML
disabled so that remote text can never inject markup.

The helpers below handle what every bridge meets in received events: reply
fallbacks (:func:`strip_reply_fallback`) and edits (:func:`parse_edit`,
:func:`edit_message`).
"""

from __future__ import annotations

import html as html_lib
import re
import urllib.parse
from collections.abc import Collection, Iterable, Mapping
from html.parser import HTMLParser
from typing import Any, ClassVar

import attrs
from markdown_it import MarkdownIt
from markdown_it.token import Token

from bridge_kit.types.converter import converter
from bridge_kit.types.messages import REL_REPLACE
from bridge_kit.types.room import HTML_FORMAT, MessageType, TextMessage

__all__ = [
    "Edit",
    "Formatter",
    "MarkdownFormatter",
    "MatrixText",
    "Mention",
    "edit_message",
    "html_to_markdown",
    "html_to_text",
    "markdown_to_html",
    "parse_edit",
    "pill",
    "pill_target",
    "reply_target",
    "strip_reply_fallback",
    "text_to_html",
]

MATRIX_TO = "https://matrix.to/#/"

#: Deeper HTML than this is read as the text of the deepest element kept (the spec
#: suggests clients limit nesting to 100; it also bounds the renderer's recursion).
MAX_DEPTH = 100

_VOID = frozenset({"br", "hr", "img", "wbr", "input", "col", "area", "source", "meta", "link"})
# mx-reply is the reply fallback (removed in Matrix v1.13); the rest is never text.
_DROPPED = frozenset({"mx-reply", "script", "style", "head", "title", "template"})
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
# Blocks set apart by a paragraph break; the other blocks by a line break.
_PARAGRAPHS = frozenset({"p", "pre", "blockquote", "hr", "table", "details"} | _HEADINGS)
_LINES = frozenset({"div", "ul", "ol", "li", "tr", "thead", "tbody", "summary", "dl", "dt", "dd"})
_BLOCKS = _PARAGRAPHS | _LINES
_WHITESPACE = re.compile(r"[ \t\r\n\f]+")
_SPACED_NEWLINE = re.compile(r" *\n *")


# -- mentions and pills -------------------------------------------------------------


@attrs.frozen
class Mention:
    """A Matrix user mentioned from the remote side, and the name shown for them."""

    user_id: str
    name: str


def pill_target(href: str) -> str | None:
    """The user ID a link points to when it is a pill (``https://matrix.to/#/@u:s``
    or ``matrix:u/u:s``), else ``None``."""
    if href.startswith(MATRIX_TO):
        target = urllib.parse.unquote(href[len(MATRIX_TO) :].partition("?")[0])
    elif href.startswith("matrix:u/"):
        target = "@" + urllib.parse.unquote(href[len("matrix:u/") :].partition("?")[0])
    else:
        return None
    localpart, colon, server = target[1:].partition(":")
    if not target.startswith("@") or not localpart or not colon or not server or "/" in server:
        return None
    return target


def pill(user_id: str, name: str) -> str:
    """The HTML of a pill: a link to ``user_id`` showing ``name``."""
    href = MATRIX_TO + urllib.parse.quote(user_id, safe="@:")
    return f'<a href="{html_lib.escape(href)}">{html_lib.escape(name, quote=False)}</a>'


# -- received HTML as a tree --------------------------------------------------------


@attrs.define
class _Element:
    tag: str
    attributes: dict[str, str]
    children: list[_Element | str] = attrs.field(factory=list)

    def text(self) -> str:
        """All the text inside, as written (no formatting, no collapsing)."""
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> Iterable[_Element]:
        yield self
        for child in self.children:
            if isinstance(child, _Element):
                yield from child.walk()


class _TreeBuilder(HTMLParser):
    """Received HTML (possibly malformed) → a tree of :class:`_Element`.

    An end tag closes the nearest open element of its name (and everything opened
    inside it); an end tag with no open element of its name is ignored.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = _Element("", {})
        self._open = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = _Element(tag, {name: value or "" for name, value in attrs})
        if tag not in _VOID and len(self._open) > MAX_DEPTH:
            return  # too deep: its content stays in the deepest element kept
        self._open[-1].children.append(element)
        if tag not in _VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for depth in range(len(self._open) - 1, 0, -1):
            if self._open[depth].tag == tag:
                del self._open[depth:]
                return

    def handle_data(self, data: str) -> None:
        self._open[-1].children.append(data)


def _parse_html(html: str) -> _Element:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


class _Blocks:
    """Joins rendered children: inline runs and blocks, each block set apart by its
    break (the larger of two neighbours' breaks wins)."""

    def __init__(self, preformatted: bool) -> None:
        self._preformatted = preformatted
        self._pieces: list[tuple[str, str]] = []
        self._run: list[str] = []

    def inline(self, text: str) -> None:
        self._run.append(text)

    def block(self, text: str, separator: str) -> None:
        self._flush()
        if text.strip():
            self._pieces.append((text, separator))

    def text(self) -> str:
        self._flush()
        out = ""
        previous = ""
        for text, separator in self._pieces:
            if out:
                out += max(previous, separator, key=len)
            out += text
            previous = separator
        return out

    def _flush(self) -> None:
        run = "".join(self._run)
        self._run = []
        if not self._preformatted:
            run = _SPACED_NEWLINE.sub("\n", run).strip(" ")
        if run.strip():
            self._pieces.append((run, "\n"))


# -- the formatter ------------------------------------------------------------------


@attrs.frozen
class MatrixText:
    """A message for Matrix: the plain ``body``, its HTML (``None``: plain text is
    enough) and the users it mentions (``m.mentions``)."""

    body: str
    html: str | None = None
    mentions: frozenset[str] = frozenset()

    def message(self, msgtype: MessageType = MessageType.TEXT) -> TextMessage:
        """The ``m.room.message`` content, with ``m.mentions`` (empty: nobody)."""
        extra = {"m.mentions": {"user_ids": sorted(self.mentions)} if self.mentions else {}}
        if self.html is None:
            return TextMessage(body=self.body, msgtype=msgtype, extra=extra)
        return attrs.evolve(TextMessage.html(self.body, self.html, msgtype), extra=extra)

    def content(self, msgtype: MessageType = MessageType.TEXT) -> dict[str, Any]:
        """:meth:`message` as the JSON object sent."""
        content: dict[str, Any] = converter.unstructure(self.message(msgtype))
        return content


def _markdown_parser() -> MarkdownIt:
    # CommonMark with raw HTML off (remote text is shown, never interpreted as
    # markup); strikethrough on (~~text~~); images off (Matrix clients show only
    # mxc images, so ![a](http://...) stays a link); a line break stays a line break.
    parser = MarkdownIt("commonmark", {"html": False, "breaks": True})
    return parser.enable("strikethrough").disable("image")


_MARKDOWN = _markdown_parser()


class Formatter:
    """Matrix messages ↔ remote text. Override the hooks for a network.

    Matrix → remote: :meth:`matrix_to_remote` (a received event's content) or
    :meth:`html_to_remote`; each element of the HTML goes through its hook
    (:meth:`bold`, :meth:`italic`, :meth:`link`, :meth:`matrix_mention`...).
    This class writes plain text: markers are dropped, a link keeps its URL.

    Remote → Matrix: :meth:`remote_to_matrix`. Text matching
    :attr:`mention_pattern` is passed to :meth:`remote_mention`; when that names a
    Matrix user, the text becomes a pill and the user is in ``m.mentions``.
    """

    #: Where remote text mentions someone (``None``: the network has no mentions).
    mention_pattern: ClassVar[re.Pattern[str] | None] = None
    #: Whether remote text is markdown (see :class:`MarkdownFormatter`).
    reads_markdown: ClassVar[bool] = False
    #: What sets paragraphs apart in remote text.
    paragraph_break: ClassVar[str] = "\n\n"

    # -- hooks: Matrix → remote ------------------------------------------------------

    async def matrix_mention(self, user_id: str, text: str) -> str:
        """A pill for ``user_id`` showing ``text``, as remote text (default: ``text``).

        Async, so a network may look the user up (their remote name, a ghost's id).
        """
        return text

    def escape(self, text: str) -> str:
        """Received text as remote text (a network with markup escapes its markers)."""
        return text

    def bold(self, text: str) -> str:
        return text

    def italic(self, text: str) -> str:
        return text

    def underline(self, text: str) -> str:
        return text

    def strikethrough(self, text: str) -> str:
        return text

    def spoiler(self, text: str, reason: str) -> str:
        return text

    def color(self, text: str, foreground: str | None, background: str | None) -> str:
        """Text with ``data-mx-color`` / ``data-mx-bg-color`` (``#rrggbb``) set."""
        return text

    def inline_code(self, code: str) -> str:
        return code

    def code_block(self, code: str, language: str | None) -> str:
        return code

    def heading(self, text: str, level: int) -> str:
        return self.bold(text)

    def link(self, text: str, url: str) -> str:
        """A link other than a pill; the plain default keeps the URL when it is not the text."""
        if not text or text == url or url.removeprefix("mailto:") == text:
            return text or url
        return f"{text} ({url})"

    def image(self, alt: str, src: str) -> str:
        """An inline image (custom emoji, usually): its alt text."""
        return alt

    def blockquote(self, text: str) -> str:
        return "\n".join(f"> {line}" if line else ">" for line in text.split("\n"))

    def list_item(self, text: str, marker: str) -> str:
        """One list item: ``marker`` is ``"- "`` or ``"3. "``; continuation lines
        are indented to line up with the text."""
        indent = " " * len(marker)
        first, *rest = text.split("\n")
        return "\n".join([marker + first, *(indent + line if line else line for line in rest)])

    def rule(self) -> str:
        return "---"

    # -- hooks: remote → Matrix ------------------------------------------------------

    async def remote_mention(self, text: str) -> Mention | None:
        """The Matrix user that ``text`` (a :attr:`mention_pattern` match) mentions,
        or ``None`` when it is no one known."""
        return None

    # -- Matrix → remote -------------------------------------------------------------

    async def matrix_to_remote(self, content: Mapping[str, Any]) -> str:
        """A received message's text for the remote side: its HTML when it has
        some, else its ``body``; the reply fallback removed."""
        content = strip_reply_fallback(content)
        formatted = content.get("formatted_body")
        if content.get("format") == HTML_FORMAT and isinstance(formatted, str):
            return await self.html_to_remote(formatted)
        body = content.get("body")
        return self.escape(body) if isinstance(body, str) else ""

    async def html_to_remote(self, html: str) -> str:
        """Matrix HTML as remote text, pills through :meth:`matrix_mention`."""
        tree = _parse_html(html)
        mentions = {}
        for element in tree.walk():
            target = pill_target(element.attributes.get("href", "")) if element.tag == "a" else None
            if target is not None:
                text = _WHITESPACE.sub(" ", element.text()).strip()
                mentions[target, text] = await self.matrix_mention(target, text)
        return _Renderer(self, mentions).render(tree)

    def render_html(self, html: str) -> str:
        """Matrix HTML as remote text without awaiting: a pill shows its text."""
        return _Renderer(self, {}).render(_parse_html(html))

    # -- remote → Matrix -------------------------------------------------------------

    async def remote_to_matrix(self, text: str) -> MatrixText:
        """Remote text as a Matrix message, mentions as pills (and ``m.mentions``)."""
        mentions = await self._resolve_mentions(text)
        body = self._replace_mentions(text, mentions, lambda m: m.name, lambda s: s)
        if self.reads_markdown:
            html = _render_markdown(text, mentions, self.mention_pattern)
        elif mentions:
            html = self._replace_mentions(
                text, mentions, lambda m: pill(m.user_id, m.name), text_to_html
            )
        else:
            html = None
        users = frozenset(mention.user_id for mention in mentions.values())
        return MatrixText(body, html, users)

    async def _resolve_mentions(self, text: str) -> dict[str, Mention]:
        if self.mention_pattern is None:
            return {}
        found: dict[str, Mention] = {}
        for match in self.mention_pattern.finditer(text):
            token = match.group(0)
            if token and token not in found:
                mention = await self.remote_mention(token)
                if mention is not None:
                    found[token] = mention
        return found

    def _replace_mentions(
        self,
        text: str,
        mentions: Mapping[str, Mention],
        mention: Any,
        other: Any,
    ) -> str:
        """``text`` with each resolved mention replaced by ``mention(m)`` and every
        other stretch of text by ``other(stretch)``."""
        if not mentions or self.mention_pattern is None:
            return str(other(text))
        return _split_mentions(text, mentions, self.mention_pattern, mention, other)


def _split_mentions(
    text: str, mentions: Mapping[str, Mention], pattern: re.Pattern[str], mention: Any, other: Any
) -> str:
    out = []
    position = 0
    for match in pattern.finditer(text):
        resolved = mentions.get(match.group(0))
        if resolved is None:
            continue
        out.append(other(text[position : match.start()]))
        out.append(mention(resolved))
        position = match.end()
    out.append(other(text[position:]))
    return "".join(out)


class MarkdownFormatter(Formatter):
    """Markdown both ways: Matrix HTML → markdown, remote markdown → Matrix HTML."""

    reads_markdown = True
    _ESCAPED = re.compile(r"([\\`*_\[\]~])")

    def escape(self, text: str) -> str:
        return self._ESCAPED.sub(r"\\\1", text)

    def bold(self, text: str) -> str:
        return _wrap(text, "**")

    def italic(self, text: str) -> str:
        return _wrap(text, "_")

    def strikethrough(self, text: str) -> str:
        return _wrap(text, "~~")

    def spoiler(self, text: str, reason: str) -> str:
        return _wrap(text, "||")

    def inline_code(self, code: str) -> str:
        fence = "`" * (_longest_run(code, "`") + 1)
        padding = " " if code.startswith("`") or code.endswith("`") else ""
        return f"{fence}{padding}{code}{padding}{fence}"

    def code_block(self, code: str, language: str | None) -> str:
        fence = "`" * max(3, _longest_run(code, "`") + 1)
        return f"{fence}{language or ''}\n{code}\n{fence}"

    def heading(self, text: str, level: int) -> str:
        return f"{'#' * level} {text}"

    def link(self, text: str, url: str) -> str:
        if not text or text == url:
            return f"<{url}>"
        return f"[{text}]({url.replace(')', '%29').replace(' ', '%20')})"


def _wrap(text: str, marker: str) -> str:
    """``text`` between markers, its outer spaces outside them (``** a**`` is no bold)."""
    stripped = text.strip()
    if not stripped:
        return text
    start = text[: len(text) - len(text.lstrip())]
    end = text[len(text.rstrip()) :]
    return f"{start}{marker}{stripped}{marker}{end}"


def _longest_run(text: str, char: str) -> int:
    runs = re.findall(f"{re.escape(char)}+", text)
    return max((len(run) for run in runs), default=0)


class _Renderer:
    """Renders a parsed HTML tree through a :class:`Formatter`'s hooks."""

    def __init__(self, formatter: Formatter, mentions: Mapping[tuple[str, str], str]) -> None:
        self.formatter = formatter
        self.mentions = mentions

    def render(self, tree: _Element) -> str:
        return self._children(tree, preformatted=False).strip("\n")

    def _children(self, element: _Element, preformatted: bool) -> str:
        blocks = _Blocks(preformatted)
        for child in element.children:
            if isinstance(child, str):
                blocks.inline(child if preformatted else self._text(child))
            elif child.tag in _DROPPED:
                continue
            elif child.tag in _BLOCKS and not preformatted:
                separator = self.formatter.paragraph_break if child.tag in _PARAGRAPHS else "\n"
                blocks.block(self._element(child, preformatted), separator)
            else:
                blocks.inline(self._element(child, preformatted))
        return blocks.text()

    def _text(self, text: str) -> str:
        return self.formatter.escape(_WHITESPACE.sub(" ", text))

    def _element(self, element: _Element, preformatted: bool) -> str:
        tag = element.tag
        f = self.formatter
        if tag == "br":
            return "\n"
        if tag == "hr":
            return f.rule()
        if tag == "img":
            return f.image(element.attributes.get("alt", ""), element.attributes.get("src", ""))
        if tag == "pre":
            return self._pre(element)
        if tag == "code":
            return f.inline_code(_WHITESPACE.sub(" ", element.text()))
        if tag in ("ul", "ol"):
            return self._list(element)
        if tag == "a":
            return self._link(element, preformatted)
        inner = self._children(element, preformatted)
        return self._styled(element, inner)

    def _styled(self, element: _Element, inner: str) -> str:
        tag = element.tag
        f = self.formatter
        if tag in ("b", "strong"):
            return f.bold(inner)
        if tag in ("i", "em"):
            return f.italic(inner)
        if tag in ("u", "ins"):
            return f.underline(inner)
        if tag in ("s", "del", "strike"):
            return f.strikethrough(inner)
        if tag == "blockquote":
            return f.blockquote(inner)
        if tag in _HEADINGS:
            return f.heading(inner, int(tag[1]))
        if "data-mx-spoiler" in element.attributes:
            return f.spoiler(inner, element.attributes["data-mx-spoiler"])
        foreground = element.attributes.get("data-mx-color") or element.attributes.get("color")
        background = element.attributes.get("data-mx-bg-color")
        if tag in ("font", "span") and (foreground or background):
            return f.color(inner, foreground or None, background or None)
        return inner

    def _pre(self, element: _Element) -> str:
        code = element.text()
        language = None
        for child in element.children:
            if isinstance(child, _Element) and child.tag == "code":
                classes = child.attributes.get("class", "").split()
                languages = [c.removeprefix("language-") for c in classes if "language-" in c]
                language = languages[0] if languages else None
        # A newline right after <pre> is not content (HTML); the last one ends the block.
        code = code.removeprefix("\n").removesuffix("\n")
        return self.formatter.code_block(code, language)

    def _list(self, element: _Element) -> str:
        ordered = element.tag == "ol"
        try:
            number = int(element.attributes.get("start", "1"))
        except ValueError:
            number = 1
        items = []
        for child in element.children:
            if not isinstance(child, _Element):
                continue
            text = self._children(child, preformatted=False).strip("\n")
            if child.tag != "li":
                items.append(text)
                continue
            marker = f"{number}. " if ordered else "- "
            items.append(self.formatter.list_item(text, marker))
            number += 1
        return "\n".join(item for item in items if item)

    def _link(self, element: _Element, preformatted: bool) -> str:
        href = element.attributes.get("href", "")
        target = pill_target(href)
        if target is not None:
            text = _WHITESPACE.sub(" ", element.text()).strip()
            return self.mentions.get((target, text), text or target)
        inner = self._children(element, preformatted)
        return self.formatter.link(inner, href) if href else inner


# -- markdown → HTML ----------------------------------------------------------------


def markdown_to_html(text: str) -> str:
    """Markdown (CommonMark, ``~~strike~~``) as Matrix HTML; raw HTML in it is escaped."""
    return _render_markdown(text, {}, None) or text_to_html(text)


def text_to_html(text: str) -> str:
    """Plain text as HTML: escaped, line breaks kept."""
    return html_lib.escape(text, quote=False).replace("\n", "<br/>")


def _render_markdown(
    text: str, mentions: Mapping[str, Mention], pattern: re.Pattern[str] | None
) -> str | None:
    """The HTML of markdown ``text``, or ``None`` when it has no formatting at all."""
    tokens = _MARKDOWN.parse(text)
    if not mentions and _plain(tokens, text):
        return None
    if mentions and pattern is not None:
        for token in tokens:
            if token.type == "inline" and token.children:
                token.children = _pill_tokens(token.children, mentions, pattern)
    rendered: str = _MARKDOWN.renderer.render(tokens, _MARKDOWN.options, {})
    html = rendered.strip()
    # One paragraph is the whole message: no <p> around it (what clients send).
    if html.count("<p>") == 1 and html.startswith("<p>") and html.endswith("</p>"):
        html = html[len("<p>") : -len("</p>")]
    return html


_PLAIN_BLOCKS = frozenset({"paragraph_open", "paragraph_close", "inline"})
_PLAIN_INLINE = frozenset({"text", "softbreak"})


def _plain(tokens: list[Token], text: str) -> bool:
    """Whether markdown ``text`` says nothing more than its plain reading: only
    paragraphs of text, and no escapes or entities (which change the text)."""
    if "\\" in text or "&" in text:
        return False
    for token in tokens:
        if token.type not in _PLAIN_BLOCKS:
            return False
        if any(child.type not in _PLAIN_INLINE for child in token.children or ()):
            return False
    return True


def _pill_tokens(
    children: list[Token], mentions: Mapping[str, Mention], pattern: re.Pattern[str]
) -> list[Token]:
    """Inline tokens with each resolved mention in a text token made a pill
    (not in code, which is its own token, nor in a link's text)."""
    out: list[Token] = []
    in_link = 0
    for child in children:
        in_link += {"link_open": 1, "link_close": -1}.get(child.type, 0)
        if child.type != "text" or in_link:
            out.append(child)
            continue
        position = 0
        for match in pattern.finditer(child.content):
            mention = mentions.get(match.group(0))
            if mention is None:
                continue
            out.append(_text_token(child.content[position : match.start()]))
            pill_token = Token("html_inline", "", 0)
            pill_token.content = pill(mention.user_id, mention.name)
            out.append(pill_token)
            position = match.end()
        out.append(_text_token(child.content[position:]))
    return out


def _text_token(content: str) -> Token:
    token = Token("text", "", 0)
    token.content = content
    return token


# -- module-level shortcuts ---------------------------------------------------------

_PLAIN = Formatter()
_MARKDOWN_OUT = MarkdownFormatter()


def html_to_text(html: str) -> str:
    """Matrix HTML as plain text (pills show their text)."""
    return _PLAIN.render_html(html)


def html_to_markdown(html: str) -> str:
    """Matrix HTML as markdown (pills show their text)."""
    return _MARKDOWN_OUT.render_html(html)


# -- replies and edits in received events -------------------------------------------


def reply_target(content: Mapping[str, Any]) -> str | None:
    """The event ID a message replies to, or ``None``."""
    relates_to = content.get("m.relates_to")
    if not isinstance(relates_to, Mapping):
        return None
    in_reply_to = relates_to.get("m.in_reply_to")
    if not isinstance(in_reply_to, Mapping):
        return None
    event_id = in_reply_to.get("event_id")
    return event_id if isinstance(event_id, str) else None


_MX_REPLY = re.compile(r"^\s*<mx-reply>.*?</mx-reply>", re.DOTALL | re.IGNORECASE)


def strip_reply_fallback(content: Mapping[str, Any]) -> dict[str, Any]:
    """A reply's content without its fallback: the quoted ``> `` lines at the
    start of ``body`` and the ``<mx-reply>`` at the start of ``formatted_body``.

    Only a reply (``m.in_reply_to``) is changed: a message that starts with a
    quote of its own keeps it.
    """
    stripped = dict(content)
    if reply_target(content) is None:
        return stripped
    body = content.get("body")
    if isinstance(body, str) and body.startswith("> "):
        lines = body.split("\n")
        quoted = next((i for i, line in enumerate(lines) if not line.startswith(">")), len(lines))
        rest = lines[quoted:]
        if rest and rest[0] == "":
            rest = rest[1:]
        stripped["body"] = "\n".join(rest)
    formatted = content.get("formatted_body")
    if isinstance(formatted, str):
        stripped["formatted_body"] = _MX_REPLY.sub("", formatted, count=1)
    return stripped


@attrs.frozen
class Edit:
    """A received edit: the event it replaces and the new content."""

    target: str
    content: dict[str, Any]


def parse_edit(content: Mapping[str, Any]) -> Edit | None:
    """The edit in a received message's content (``m.replace``), or ``None``.

    The new content is ``m.new_content``; without one (a broken client), the
    event's own content with the ``* `` fallback marker removed.
    """
    relates_to = content.get("m.relates_to")
    if not isinstance(relates_to, Mapping) or relates_to.get("rel_type") != REL_REPLACE:
        return None
    target = relates_to.get("event_id")
    if not isinstance(target, str):
        return None
    new_content = content.get("m.new_content")
    if isinstance(new_content, Mapping):
        return Edit(target, dict(new_content))
    fallback = {key: value for key, value in content.items() if key != "m.relates_to"}
    for key in ("body", "formatted_body"):
        if isinstance(fallback.get(key), str):
            fallback[key] = fallback[key].removeprefix("* ")
    return Edit(target, fallback)


def edit_message(
    target: str, new: TextMessage, *, mentioned_before: Collection[str] = ()
) -> TextMessage:
    """An edit of event ``target`` to ``new`` (build ``new`` with :class:`MatrixText`).

    Clients without edits show the fallback: the new text marked ``* ``. Its
    ``m.mentions`` names only users not in ``mentioned_before`` (the spec: an edit
    notifies only the newly mentioned); ``m.new_content`` keeps them all.
    """
    new_content: dict[str, Any] = converter.unstructure(new)
    new_content.pop("m.relates_to", None)
    html = None if new.formatted_body is None else f"* {new.formatted_body}"
    fallback = TextMessage(
        body=f"* {new.body}",
        msgtype=new.msgtype,
        format=new.format,
        formatted_body=html,
    )
    extra: dict[str, Any] = {
        "m.new_content": new_content,
        "m.relates_to": {"rel_type": REL_REPLACE, "event_id": target},
    }
    mentions = new.extra.get("m.mentions")
    if isinstance(mentions, Mapping):
        before = set(mentioned_before)
        users = [user for user in mentions.get("user_ids", ()) if user not in before]
        extra["m.mentions"] = {"user_ids": users} if users else {}
    return attrs.evolve(fallback, extra=extra)
