"""Matrix HTML ↔ remote text: every element, mentions both ways, edits and reply fallbacks."""

from __future__ import annotations

import html as html_lib
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge_kit.bridge import formatting
from bridge_kit.bridge.formatting import (
    MAX_MARKDOWN,
    MAX_MENTIONS,
    Formatter,
    MarkdownFormatter,
    MatrixText,
    Mention,
    edit_message,
    html_to_markdown,
    html_to_text,
    markdown_to_html,
    parse_edit,
    pill,
    pill_target,
    reply_target,
    strip_reply_fallback,
    text_to_html,
)
from bridge_kit.types.room import MessageType

# -- Matrix HTML → plain text and markdown ------------------------------------------


@pytest.mark.parametrize(
    ("html", "text", "markdown"),
    [
        ("<b>bold</b> and <strong>strong</strong>", "bold and strong", "**bold** and **strong**"),
        ("<i>it</i> <em>em</em>", "it em", "_it_ _em_"),
        ("<u>under</u>", "under", "under"),
        ("<s>gone</s> <del>del</del>", "gone del", "~~gone~~ ~~del~~"),
        ("use <code>a*b</code>", "use a*b", "use `a*b`"),
        ("<code>has `tick`</code>", "has `tick`", "`` has `tick` ``"),
        ('<a href="https://x.org/a">site</a>', "site (https://x.org/a)", "[site](https://x.org/a)"),
        ('<a href="https://x.org">https://x.org</a>', "https://x.org", "<https://x.org>"),
        ("one<br>two<br/>three", "one\ntwo\nthree", "one\ntwo\nthree"),
        ("<p>para one</p>\n<p>para two</p>", "para one\n\npara two", "para one\n\npara two"),
        ("<h2>Title</h2>text", "Title\n\ntext", "## Title\n\ntext"),
        ("a<hr>b", "a\n\n---\n\nb", "a\n\n---\n\nb"),
        ("  lots   of\n  space  ", "lots of space", "lots of space"),
        ("5 * 3 _x_ [y]", "5 * 3 _x_ [y]", r"5 \* 3 \_x\_ \[y\]"),
        ("&lt;b&gt; &amp; &quot;", '<b> & "', r'\<b> & "'),
        ('<img alt=":cat:" src="mxc://x/y">!', ":cat:!", ":cat:!"),
        ('<span data-mx-spoiler="">secret</span>', "secret", "||secret||"),
        ('<font data-mx-color="#ff0000">red</font>', "red", "red"),
        ("<script>alert(1)</script>ok", "ok", "ok"),
    ],
)
def test_each_element_in_text_and_markdown(html: str, text: str, markdown: str) -> None:
    assert html_to_text(html) == text
    assert html_to_markdown(html) == markdown


def test_line_breaks_at_a_blocks_edge_add_nothing() -> None:
    assert html_to_text("a<br><p>b</p><br>c<br>") == "a\n\nb\n\nc"
    assert html_to_text("<p>a<br><br>b</p>") == "a\n\nb"


def test_blockquote_lines_are_quoted() -> None:
    html = "<blockquote><p>first</p><p>second<br>third</p></blockquote>after"
    assert html_to_text(html) == "> first\n>\n> second\n> third\n\nafter"


def test_lists_nested_and_numbered_from_start() -> None:
    html = "<ul><li>one</li><li>two<ol start='3'><li>three</li><li>four<br>more</li></ol></li></ul>"
    assert html_to_text(html) == "- one\n- two\n  3. three\n  4. four\n     more"


def test_a_table_is_one_line_per_row() -> None:
    html = (
        "<table><thead><tr><th>nick</th><th>idle</th></tr></thead>"
        "<tbody><tr><td><b>bob</b></td><td>5<br>min</td></tr></tbody></table>after"
    )
    assert html_to_text(html) == "nick | idle\nbob | 5 min\n\nafter"
    assert html_to_markdown(html).startswith("nick | idle\n**bob** | 5 min")


def test_pre_keeps_its_whitespace_and_language() -> None:
    html = '<pre><code class="language-python">def f():\n    return  1\n</code></pre>'
    assert html_to_text(html) == "def f():\n    return  1"
    assert html_to_markdown(html) == "```python\ndef f():\n    return  1\n```"
    fence = html_to_markdown("<pre><code>```inner```</code></pre>")
    assert fence == "````\n```inner```\n````"


def test_reply_fallback_element_is_dropped() -> None:
    html = "<mx-reply><blockquote>In reply to <b>bob</b>: hi</blockquote></mx-reply>answer"
    assert html_to_text(html) == "answer"


def test_malformed_html_is_read_leniently() -> None:
    assert html_to_text("<b>unclosed <i>both") == "unclosed both"
    assert html_to_text("stray</b> close</p>") == "stray close"
    assert html_to_markdown("<b>bold <i>both</b> plain") == "**bold _both_** plain"


def test_very_deep_html_is_read_without_recursion_errors() -> None:
    html = "<b>" * 5000 + "deep" + "</b>" * 5000
    assert html_to_text(html) == "deep"
    assert html_to_text("<blockquote>" * 5000 + "q").endswith("q")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/ab&;#\"'= \nlipreodu!-")), max_size=200))
def test_arbitrary_markup_never_raises(html: str) -> None:
    assert isinstance(html_to_text(html), str)
    assert isinstance(html_to_markdown(html), str)


# -- pills and mentions -------------------------------------------------------------


@pytest.mark.parametrize(
    ("href", "target"),
    [
        ("https://matrix.to/#/@bob:example.org", "@bob:example.org"),
        ("https://matrix.to/#/%40bob%3Aexample.org?via=x", "@bob:example.org"),
        ("matrix:u/bob:example.org?action=chat", "@bob:example.org"),
        ("https://matrix.to/#/#room:example.org", None),
        ("https://matrix.to/#/@nocolon", None),
        ("https://example.org/@bob:example.org", None),
    ],
)
def test_pill_targets(href: str, target: str | None) -> None:
    assert pill_target(href) == target


class Network(MarkdownFormatter):
    """A network whose mentions are @name, whose users are @net_<name>:example.org."""

    mention_pattern = re.compile(r"@[a-z]+")

    async def remote_mention(self, text: str) -> Mention | None:
        if text == "@nobody":
            return None
        return Mention(f"@net_{text[1:]}:example.org", text[1:].title())

    async def matrix_mention(self, user_id: str, text: str) -> str:
        if user_id.startswith("@net_"):
            return "@" + user_id.removeprefix("@net_").partition(":")[0]
        return text


async def test_pills_become_remote_mentions_through_the_hook() -> None:
    html = (
        f"hi {pill('@net_alice:example.org', 'Alice')} and "
        f"{pill('@carol:matrix.org', 'Carol <3')}, <b>look</b>"
    )
    assert await Network().html_to_remote(html) == "hi @alice and Carol <3, **look**"
    # Without awaiting the hook, a pill shows its text.
    assert Network().render_html(html) == "hi Alice and Carol <3, **look**"


async def test_remote_mentions_become_pills_and_m_mentions() -> None:
    message = await Network().remote_to_matrix("hey @alice, **see** `@alice` and @nobody")
    assert message.body == "hey Alice, **see** `@alice` and @nobody"
    assert message.html == (
        'hey <a href="https://matrix.to/#/@net_alice:example.org">Alice</a>, '
        "<strong>see</strong> <code>@alice</code> and @nobody"
    )
    assert message.mentions == {"@net_alice:example.org"}
    assert message.content()["m.mentions"] == {"user_ids": ["@net_alice:example.org"]}


async def test_mentions_in_plain_text_networks() -> None:
    class Plain(Formatter):
        mention_pattern = Network.mention_pattern
        remote_mention = Network.remote_mention

    message = await Plain().remote_to_matrix("@bob: <b>not bold</b>\nbye")
    assert message.body == "Bob: <b>not bold</b>\nbye"
    assert message.html == (
        '<a href="https://matrix.to/#/@net_bob:example.org">Bob</a>: '
        "&lt;b&gt;not bold&lt;/b&gt;<br/>bye"
    )
    plain = await Plain().remote_to_matrix("no one here <b>")
    assert plain == MatrixText("no one here <b>", None, frozenset())
    assert plain.content() == {"msgtype": "m.text", "body": "no one here <b>", "m.mentions": {}}


# -- markdown → Matrix HTML ---------------------------------------------------------


@pytest.mark.parametrize(
    ("markdown", "html"),
    [
        ("**b** _i_ ~~s~~ `c`", "<strong>b</strong> <em>i</em> <s>s</s> <code>c</code>"),
        ("line one\nline two **x**", "line one<br />\nline two <strong>x</strong>"),
        ("> quoted\n\nafter", "<blockquote>\n<p>quoted</p>\n</blockquote>\n<p>after</p>"),
        ("- a\n- b", "<ul>\n<li>a</li>\n<li>b</li>\n</ul>"),
        ("[x](https://x.org)", '<a href="https://x.org">x</a>'),
    ],
)
def test_markdown_to_html(markdown: str, html: str) -> None:
    assert markdown_to_html(markdown) == html


@pytest.mark.parametrize(
    "hostile",
    [
        "<script>alert(1)</script>",
        '<img src=x onerror="alert(1)">',
        "[click](javascript:alert(1))",
        "![tracker](https://evil.example/pixel.png)",
        '<a href="https://evil">x</a>',
    ],
)
def test_remote_markdown_cannot_inject_html(hostile: str) -> None:
    html = markdown_to_html(hostile)
    assert "<script" not in html
    assert "<img" not in html
    assert 'href="javascript' not in html
    assert '<a href="https://evil">' not in html


async def test_plain_markdown_is_sent_without_html() -> None:
    message = await MarkdownFormatter().remote_to_matrix("just words\non two lines")
    assert message.html is None
    assert (await MarkdownFormatter().remote_to_matrix(r"not \*bold\*")).html == "not *bold*"
    assert (await MarkdownFormatter().remote_to_matrix("a &amp; b")).html == "a &amp; b"


def test_text_to_html_escapes_and_keeps_lines() -> None:
    assert text_to_html("<b> & x\ny") == "&lt;b&gt; &amp; x<br/>y"


# -- received events: reply fallbacks, edits ----------------------------------------


def test_reply_fallback_is_stripped_from_a_reply_only() -> None:
    reply = {
        "msgtype": "m.text",
        "body": "> <@bob:x> original\n> second line\n\nmy answer\n> my own quote",
        "format": "org.matrix.custom.html",
        "formatted_body": "<mx-reply><blockquote>original</blockquote></mx-reply>my answer",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$orig"}},
    }
    stripped = strip_reply_fallback(reply)
    assert stripped["body"] == "my answer\n> my own quote"
    assert stripped["formatted_body"] == "my answer"
    assert reply_target(reply) == "$orig"
    quote = {"msgtype": "m.text", "body": "> a quote of my own\n\ntext"}
    assert strip_reply_fallback(quote) == quote
    assert reply_target(quote) is None


async def test_matrix_to_remote_prefers_html_and_strips_the_fallback() -> None:
    content = {
        "body": "> <@bob:x> hi\n\n**answer**",
        "format": "org.matrix.custom.html",
        "formatted_body": "<mx-reply><blockquote>hi</blockquote></mx-reply><b>answer</b>",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$orig"}},
    }
    assert await Network().matrix_to_remote(content) == "**answer**"
    assert await Formatter().matrix_to_remote(content) == "answer"
    plain = {"body": "2 * 3 = 6", "msgtype": "m.text"}
    assert await Network().matrix_to_remote(plain) == r"2 \* 3 = 6"
    assert await Formatter().matrix_to_remote(plain) == "2 * 3 = 6"
    assert await Formatter().matrix_to_remote({"body": 5}) == ""


def test_an_edit_is_built_with_its_fallback_and_new_mentions_only() -> None:
    new = MatrixText("hi Bob", f"hi {pill('@bob:x', 'Bob')}", frozenset({"@bob:x", "@al:x"}))
    edit = edit_message("$orig", new.message(MessageType.NOTICE), mentioned_before=["@al:x"])
    content = edit_message_content(edit)
    assert content["body"] == "* hi Bob"
    assert content["formatted_body"].startswith("* hi <a href=")
    assert content["msgtype"] == "m.notice"
    assert content["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$orig"}
    assert content["m.new_content"]["body"] == "hi Bob"
    assert content["m.new_content"]["m.mentions"] == {"user_ids": ["@al:x", "@bob:x"]}
    assert content["m.mentions"] == {"user_ids": ["@bob:x"]}
    parsed = parse_edit(content)
    assert parsed is not None
    assert parsed.target == "$orig"
    assert parsed.content == content["m.new_content"]


def edit_message_content(message: object) -> dict[str, object]:
    from bridge_kit.types.converter import converter

    content: dict[str, object] = converter.unstructure(message)
    return content


def test_an_edit_without_new_content_falls_back_to_its_body() -> None:
    broken = {
        "body": "* fixed",
        "msgtype": "m.text",
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"},
    }
    parsed = parse_edit(broken)
    assert parsed is not None
    assert parsed.content == {"body": "fixed", "msgtype": "m.text"}
    assert parse_edit({"body": "x"}) is None
    assert parse_edit({"body": "x", "m.relates_to": {"rel_type": "m.replace"}}) is None


# -- hostile input ------------------------------------------------------------------

#: Text that made html.parser rescan the rest of the input again and again
#: (60 kB of the first took 61 s before the input was defused).
QUADRATIC_FOR_HTML_PARSER = ['<a href="x" ', "<!--", "<!-- >", "<![CDATA[ >", "<?", "<a =>"]


@pytest.mark.parametrize("unit", QUADRATIC_FOR_HTML_PARSER)
def test_hostile_html_of_an_events_size_is_read_in_linear_time(unit: str) -> None:
    html = unit * (60_000 // len(unit))
    started = time.perf_counter()
    html_to_text(html)
    # Linear: tens of milliseconds; the bound is loose for a busy machine.
    assert time.perf_counter() - started < 5.0


def test_defusing_keeps_what_matrix_html_holds() -> None:
    html = "a <!-- hidden --> b < c <b>d</b> e<f <i>g</i> <!DOCTYPE x> <!-- open"
    assert html_to_text(html) == "a b < c d e<f g <!DOCTYPE x>"


async def test_long_markdown_is_parsed_off_the_loop_with_the_same_result() -> None:
    text = ("**bold** and @alice\n" * 400).strip()  # 8 kB: past MARKDOWN_IN_THREAD
    long = await Network().remote_to_matrix(text)
    short = await Network().remote_to_matrix("**bold** and @alice")
    assert long.html is not None and short.html is not None
    assert long.html.count("<strong>bold</strong>") == 400
    assert long.html.startswith(short.html + "<br />")
    assert long.mentions == short.mentions


async def test_markdown_past_its_limit_is_not_parsed() -> None:
    message = await MarkdownFormatter().remote_to_matrix("**x** " * (MAX_MARKDOWN // 6 + 1))
    assert message.html is None
    message = await MarkdownFormatter().remote_to_matrix("**x** " * (MAX_MARKDOWN // 6))
    assert message.html is not None


async def test_a_flood_of_would_be_mentions_is_not_a_flood_of_lookups() -> None:
    asked: list[str] = []

    class Counting(Network):
        async def remote_mention(self, text: str) -> Mention | None:
            asked.append(text)
            return None

    names = " ".join(f"@{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}x" for i in range(600))
    await Counting().remote_to_matrix(names)
    assert len(asked) == MAX_MENTIONS


async def test_a_flood_of_pills_is_not_a_flood_of_lookups() -> None:
    asked: list[str] = []

    class Counting(Network):
        async def matrix_mention(self, user_id: str, text: str) -> str:
            asked.append(user_id)
            return "@" + text

    pills = " ".join(pill(f"@u{i}:x.org", f"u{i}") for i in range(300))
    pills += " " + pill("@u0:x.org", "u0")  # the same pill again: asked once
    text = await Counting().html_to_remote(pills)
    assert len(asked) == MAX_MENTIONS
    assert text.startswith("@u0 @u1 ")
    assert text.endswith(" u298 u299 @u0")


ALLOWED_TAGS = {"p", "br", "strong", "em", "s", "code", "pre", "blockquote", "ul", "ol", "li"}
ALLOWED_TAGS |= {"a", "h1", "h2", "h3", "h4", "h5", "h6", "hr"}


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("<>/\"'=&;:# \n*_~`[]()!-ahijsv1.")), max_size=120))
def test_any_remote_markdown_gives_only_safe_html(text: str) -> None:
    html = markdown_to_html(text)
    tags = set(re.findall(r"</?([a-zA-Z0-9]+)", html))
    assert tags <= ALLOWED_TAGS, html
    for attribute, value in re.findall(r'\s([a-z-]+)="([^"]*)"', html):
        assert attribute in ("href", "class", "start"), html
        if attribute == "href":
            assert not value.lower().lstrip().startswith(("javascript:", "vbscript:", "data:"))


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab \n*_~`[]()<>&;#\\!-1.>")), max_size=60))
async def test_markdown_is_sent_plain_only_when_it_formats_nothing(text: str) -> None:
    message = await MarkdownFormatter().remote_to_matrix(text)
    if message.html is None:
        rendered = formatting._MARKDOWN.render(text)
        shown = html_to_text(rendered)
        assert shown.split() == text.split(), (text, rendered)


# -- markdown written for a markdown network reads back as the text -----------------


@pytest.mark.parametrize(
    ("text", "markdown"),
    [
        ("- not a list", r"\- not a list"),
        ("# not a heading", r"\# not a heading"),
        ("> not a quote", r"\> not a quote"),
        ("1. not numbered", r"1\. not numbered"),
        ("&amp; stays", r"\&amp; stays"),
        ("<https://x.org> stays", r"\<https://x.org> stays"),
        ("3.14 - #tag & more", "3.14 - #tag & more"),  # nothing to escape
    ],
)
def test_text_that_markdown_would_read_as_markup_is_escaped(text: str, markdown: str) -> None:
    assert html_to_markdown(html_lib.escape(text)) == markdown


#: Pieces of text that markdown may read as markup, alone or together.
PIECES = [
    *("a", "b", " ", "  ", "\n", "<", ">", "&", "amp;", "#", "1.", "1)", "-", "+", "*", "_"),
    *("~", "`", "[", "]", "(", ")", "!", "\\", "|", "===", "---", "http:", "x@y"),
]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=25).map("".join))
def test_any_text_survives_html_to_markdown_and_back(text: str) -> None:
    html = text_to_html(text)
    markdown = html_to_markdown(html)
    shown = html_to_text(markdown_to_html(markdown))
    assert shown.split() == text.split(), (text, markdown, shown)
