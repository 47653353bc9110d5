"""Markdown from untrusted sources (prompts, model responses) to HTML that is safe to show.

Two layers: Markdown's raw-HTML handling is switched off, so HTML in a response shows as text;
then nh3 keeps only an allow-list of tags and attributes. Images are never kept: a model could
leak what a labeler sees through an image URL. Links stay as links that open nothing by
themselves and carry no referrer.
"""

import re

import markdown
import nh3
from django.utils.safestring import SafeString, mark_safe
from markdown.preprocessors import Preprocessor

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "b", "i", "del", "code", "pre", "blockquote",
    "ul", "ol", "li", "h1", "h2", "h3", "h4", "h5", "h6",
    "table", "thead", "tbody", "tr", "th", "td", "a",
}  # fmt: skip
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "th": {"align"}, "td": {"align"}}
ALLOWED_URL_SCHEMES = {"http", "https", "mailto"}


_LIST_ITEM = re.compile(r"^\s{0,3}([-*+]|\d{1,9}[.)])\s+\S")


class _ListAfterParagraph(Preprocessor):
    """Models (and most Markdown renderers) start a list right under a line of text; Python-Markdown
    wants a blank line first, so add one. Runs after fenced code is stashed, so code is untouched."""

    def run(self, lines: list[str]) -> list[str]:
        result: list[str] = []
        for line in lines:
            if result and result[-1].strip() and _LIST_ITEM.match(line) and not _LIST_ITEM.match(result[-1]):
                result.append("")
            result.append(line)
        return result


def _markdown() -> markdown.Markdown:
    md = markdown.Markdown(extensions=["fenced_code", "tables", "sane_lists"])
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    md.preprocessors.register(_ListAfterParagraph(md), "list_after_paragraph", 20)
    return md


def render_markdown(text: str) -> SafeString:
    html = _markdown().convert(text)
    # The one place where HTML is marked safe: what nh3 returns holds only the allow-list above.
    return mark_safe(
        nh3.clean(
            html,
            tags=ALLOWED_TAGS,
            attributes=ALLOWED_ATTRIBUTES,
            url_schemes=ALLOWED_URL_SCHEMES,
            link_rel="noopener noreferrer nofollow",
            strip_comments=True,
        )
    )
