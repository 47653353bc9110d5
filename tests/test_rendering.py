"""Untrusted Markdown renders to a small, inert subset of HTML."""

from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest

from annotation.rendering import ALLOWED_ATTRIBUTES, ALLOWED_TAGS, render_markdown
from tests.xss_payloads import PAYLOADS


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(html)
    return parser.elements


def test_there_are_at_least_thirty_payloads():
    assert len(PAYLOADS) >= 30


@pytest.mark.parametrize("payload", PAYLOADS)
def test_payload_renders_inert(payload):
    html = render_markdown(payload)
    for tag, attributes in elements(html):
        assert tag in ALLOWED_TAGS, html
        assert set(attributes) <= ALLOWED_ATTRIBUTES.get(tag, set()) | {"rel"}, html
        if "href" in attributes:
            assert urlsplit(attributes["href"] or "").scheme in {"http", "https", "mailto"}, html
            assert attributes["rel"] == "noopener noreferrer nofollow"
    assert "<img" not in html and "<script" not in html and "<svg" not in html and "<style" not in html


def test_raw_html_shows_as_text_not_markup():
    assert render_markdown("<b>bold?</b>") == "<p>&lt;b&gt;bold?&lt;/b&gt;</p>"


def test_markdown_formatting_survives():
    html = render_markdown("**Bold** and `code`\n\n```python\nprint(1 < 2)\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    assert "<strong>Bold</strong>" in html and "<code>code</code>" in html
    assert "print(1 &lt; 2)" in html and "<table>" in html


def test_a_list_right_under_a_line_of_text_is_a_list():
    assert "<ul>\n<li>one</li>\n<li>two</li>\n</ul>" in render_markdown("Steps:\n- one\n- two")


def test_images_are_dropped_and_links_get_no_referrer():
    assert render_markdown("![x](https://example.com/a.png)") == "<p></p>"
    assert 'rel="noopener noreferrer nofollow"' in render_markdown("[x](https://example.com)")
