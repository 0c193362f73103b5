"""IRC formatting codes → Matrix HTML, and Matrix HTML → IRC through the layer's
Formatter with the IRC bridge's hooks."""

from __future__ import annotations

import pytest
from irc_bridge.connector import IrcConfig, IrcConnector, IrcFormatter
from irc_bridge.formatting import irc_colour, irc_to_html, strip_codes


@pytest.mark.parametrize(
    ("irc", "html"),
    [
        ("plain <b>", None),
        ("\x02bold\x02 rest", "<b>bold</b> rest"),
        ("\x1di\x1d \x1fu\x1f \x1es\x1e \x11m\x11",
         "<i>i</i> <u>u</u> <del>s</del> <code>m</code>"),
        ("\x02\x1dboth\x0f after", "<b><i>both</i></b> after"),
        ("\x0304,01red\x03 none",
         '<font data-mx-color="#ff0000" data-mx-bg-color="#000000">red</font> none'),
        ("\x0312blue", '<font data-mx-color="#0000fc">blue</font>'),
        ("\x02<&>\x02", "<b>&lt;&amp;&gt;</b>"),
        ("\x02\x02", ""),
    ],
)  # fmt: skip
def test_irc_codes_become_html(irc: str, html: str | None) -> None:
    assert irc_to_html(irc) == html


def test_codes_are_stripped_for_the_plain_body() -> None:
    assert strip_codes("\x02a\x02 \x0304,01b\x03 \x1dc\x0f") == "a b c"


def test_the_nearest_irc_colour() -> None:
    assert irc_colour("#ff0000") == 4
    assert irc_colour("#fe0101") == 4
    assert irc_colour("#000000") == 1
    assert irc_colour("not a colour") == 0


async def test_matrix_html_becomes_irc_codes_and_pills_become_nicks() -> None:
    connector = IrcConnector(IrcConfig(server="127.0.0.1:6667"))
    formatter = IrcFormatter(connector)
    html = (
        "<b>b</b> <em>i</em> <u>u</u> <del>s</del> <code>c</code> "
        '<font data-mx-color="#ff0000">red</font> '
        '<a href="https://matrix.to/#/@irc_bob:x">Bob (IRC)</a>: hi'
    )
    text = await formatter.html_to_remote(html)
    assert text == "\x02b\x02 \x1di\x1d \x1fu\x1f \x1es\x1e \x11c\x11 \x0304red\x03 bob: hi"
