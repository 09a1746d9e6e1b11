"""What a file says, and its chunks: text and Markdown as written, HTML without its markup, PDF's text layer."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser

KINDS = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
         ".pdf": "pdf"}
CHUNK_WORDS = 160  # about 210 tokens: inside the embedding model's 256
OVERLAP_WORDS = 30


class Unreadable(ValueError):
    """A file whose text cannot be read (not UTF-8, a broken PDF, no text at all)."""


def kind_of(filename: str) -> str | None:
    """The file's kind by its extension; None for kinds not read."""
    dot = filename.rfind(".")
    return KINDS.get(filename[dot:].lower()) if dot >= 0 else None


def text_of(content: bytes, kind: str) -> str:
    if kind == "pdf":
        text = _pdf_text(content)
    else:
        try:
            text = content.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise Unreadable("the file is not UTF-8 text") from None
        if kind == "html":
            text = _html_text(text)
    text = text.replace("\x00", " ")  # a separator, not nothing: "beta\0gamma" is two words
    if not text.strip():
        raise Unreadable("the file has no text")
    return text


def chunks_of(text: str, words: int = CHUNK_WORDS, overlap: int = OVERLAP_WORDS) -> list[str]:
    """Windows of ``words`` words, each overlapping the one before by ``overlap`` (a sentence cut by one window
    is whole in the next)."""
    tokens = text.split()
    step = max(1, words - overlap)
    return [" ".join(tokens[start:start + words]) for start in range(0, max(1, len(tokens) - overlap), step)]


def _pdf_text(content: bytes) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(content))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as exc:
        raise Unreadable(f"the PDF cannot be read: {exc}") from None


class _Text(HTMLParser):
    SKIPPED = {"script", "style", "noscript", "template", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs) -> None:
        if tag in self.SKIPPED:
            self._skipping += 1
        elif tag in ("p", "br", "div", "li", "h1", "h2", "h3", "h4", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag) -> None:
        if tag in self.SKIPPED and self._skipping:
            self._skipping -= 1

    def handle_data(self, data) -> None:
        if not self._skipping:
            self.parts.append(data)


def _html_text(html: str) -> str:
    parser = _Text()
    parser.feed(html)
    parser.close()
    return re.sub(r"[ \t]+", " ", "".join(parser.parts))
