from django import template
from django.utils.safestring import SafeString

from annotation.rendering import render_markdown

register = template.Library()


@register.filter(name="markdown")
def markdown_filter(text: str) -> SafeString:
    """Untrusted Markdown rendered and sanitized (see annotation.rendering)."""
    return render_markdown(text)
