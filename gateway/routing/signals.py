"""What a request says about its own difficulty: the signals the complexity classifier weighs.

Each signal is a number from 0 to 1 read off the request's text and shape; the rules decide how much each one
counts. The text is split into lower-case words once; the marker lists are looked up word by word (and word
pair by word pair), so the cost grows with the text's length, not with the number of markers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Words and phrases as seed 001's routing examples use them; admins replace any list in models.yaml.
SIMPLE_MARKERS = (
    "hi", "hello", "hey", "thanks", "thank you", "what is", "what's", "who is", "when is", "list", "status",
    "define", "translate", "summarize", "yes or no",
)
COMPLEX_MARKERS = (
    "analyze", "analyse", "root cause", "design", "architecture", "strategy", "trade-off", "tradeoff", "compare",
    "evaluate", "optimize", "optimise", "prove", "derive", "debug", "refactor", "investigate", "recommend",
    "implications", "assess", "diagnose", "plan for", "recovery",
)
CRITICAL_MARKERS = (
    "security breach", "breach", "compliance", "audit", "hipaa", "pci", "sox", "gdpr", "legal", "lawsuit",
    "incident response", "fraud", "regulator", "patient safety", "vulnerability", "exploit",
)
TECHNICAL_TERMS = (
    "database", "kubernetes", "latency", "throughput", "algorithm", "api", "protocol", "encryption", "cluster",
    "distributed", "concurrency", "transaction", "schema", "index", "memory", "kernel", "network", "compiler",
    "regression", "gradient", "matrix", "integral", "derivative", "theorem", "equation", "probability",
    "statistic", "enzyme", "molecule", "statute", "jurisdiction", "liability", "portfolio",
)
REASONING_MARKERS = (
    "step by step", "why", "how would", "how does", "explain", "calculate", "compute", "estimate", "justify",
    "reason", "show that", "what if", "suppose", "assume", "therefore", "implies",
)
# Markers of how a request is put rather than what it is about: they carry over from one field to another.
MULTI_STEP_MARKERS = (
    "then", "after", "afterwards", "each", "every", "per", "total", "remaining", "altogether", "twice", "half",
    "times", "left", "first", "second", "finally", "next", "how many", "how much", "how long", "in all",
)
NEGATION_MARKERS = ("not", "except", "false", "incorrect", "never", "cannot", "neither", "nor", "least", "unless")
CONSTRAINT_MARKERS = (
    "must", "exactly", "at least", "at most", "only", "without", "no more than", "no less than", "ensure",
    "required", "make sure", "within", "limit",
)
CATEGORIES = ("simple", "complex", "critical", "technical", "reasoning", "multi_step", "negation", "constraints")
SIGNALS = ("length", "simple_words", "complex_words", "critical_words", "technical_terms", "code", "reasoning",
           "quantitative", "multi_step", "negation", "constraints", "sentences", "instruction", "depth", "tools")

WORD = re.compile(r"[a-z0-9']+")
_CODE = re.compile(r"```|\bdef \w+\(|\bclass \w+[:(]|\bimport \w+|\bfunction\s*\(|=>|\breturn\b.*;|[{};][ \t]*$",
                   re.MULTILINE)
_CODE_HINTS = ("```", "def ", "class ", "import ", "function", "=>", ";", "{", "}")  # cheap scans before the regex
_MATH_SYMBOLS = "=^∫∑√±≤≥"
_ARITHMETIC = re.compile(r"\d\s*[-+*/]\s*\d")  # one branch starting with a digit: several times faster than two
_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_SENTENCE_END = re.compile(r"[.?!](?:\s|$)")
# Answer options listed after a question ("A. ...", "(B) ...", "C) ..."): the question is what is read for its shape.
_OPTIONS = re.compile(r"\n\s*\(?A[.)]\s.*\n\s*\(?B[.)]\s", re.DOTALL)
HEAD_CHARS, TAIL_CHARS = 800, 400  # a long text is read at its start and its end (where the question usually is)


@dataclass(frozen=True)
class Vocabulary:
    """Marker words and phrases by category, indexed for one pass over the words of a text."""

    words: dict[str, str]  # single word -> category
    phrases: dict[tuple[str, ...], str]  # several words -> category
    starts: frozenset[str]  # first words of the phrases

    @classmethod
    def from_lists(cls, lists: dict[str, tuple[str, ...] | list[str]] | None = None) -> "Vocabulary":
        defaults = {"simple": SIMPLE_MARKERS, "complex": COMPLEX_MARKERS, "critical": CRITICAL_MARKERS,
                    "technical": TECHNICAL_TERMS, "reasoning": REASONING_MARKERS, "multi_step": MULTI_STEP_MARKERS,
                    "negation": NEGATION_MARKERS, "constraints": CONSTRAINT_MARKERS}
        defaults.update({k: tuple(v) for k, v in (lists or {}).items()})
        words: dict[str, str] = {}
        phrases: dict[tuple[str, ...], str] = {}
        for category, markers in defaults.items():
            for marker in markers:
                parts = tuple(WORD.findall(marker.lower()))
                if len(parts) == 1:
                    words[parts[0]] = category
                elif parts:
                    phrases[parts] = category
        return cls(words, phrases, frozenset(p[0] for p in phrases))

    def count(self, tokens: list[str]) -> dict[str, int]:
        counts = dict.fromkeys(CATEGORIES, 0)
        words, phrases, starts = self.words, self.phrases, self.starts
        for i, token in enumerate(tokens):
            category = words.get(token)
            if category is not None:
                counts[category] += 1
            if token in starts:
                for length in (2, 3):
                    category = phrases.get(tuple(tokens[i:i + length]))
                    if category is not None:
                        counts[category] += 1
        return counts


DEFAULT_VOCABULARY = Vocabulary.from_lists()


def request_text(body: dict) -> tuple[str, int]:
    """The text the classifier reads (the last user turn, or the prompt) and the number of conversation turns."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in reversed(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, list):
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict)
                                       and isinstance(p.get("text"), str))
                return (content if isinstance(content, str) else ""), len(messages)
        return "", len(messages)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        prompt = prompt[0]
    return (prompt if isinstance(prompt, str) else ""), 1


def excerpt(text: str) -> str:
    """What the classifier reads of ``text``: all of it, or its first and last characters when it is long."""
    if len(text) <= HEAD_CHARS + TAIL_CHARS:
        return text
    return text[:HEAD_CHARS] + "\n" + text[-TAIL_CHARS:]


def words_of(text: str) -> list[str]:
    """The lower-case words of the excerpt of ``text``."""
    return WORD.findall(excerpt(text).lower())


def question_of(text: str) -> str:
    """``text`` without the answer options listed after it, if it lists some ("A. ..." then "B. ..."): an option
    that says "Not wrong" does not make the question a negated one."""
    if "A" not in text or "\n" not in text:
        return text
    found = _OPTIONS.search(text)
    return text[:found.start()] if found is not None and found.start() > 0 else text


def signals(text: str, tokens: list[str], turns: int, wants_tools: bool, vocabulary: Vocabulary) -> dict[str, float]:
    """The signals of ``text`` (a question, its options left out); ``tokens`` is ``words_of(text)``."""
    words = len(tokens) if len(text) <= HEAD_CHARS + TAIL_CHARS else len(text) // 5
    counts = vocabulary.count(tokens)
    head = excerpt(text)
    math = any(symbol in head for symbol in _MATH_SYMBOLS) or _ARITHMETIC.search(head) is not None
    numbers = len(_NUMBER.findall(head)) if any(c.isdigit() for c in head) else 0
    return {
        "length": min(1.0, words / 300),
        "simple_words": min(1.0, counts["simple"] / 2) if words < 40 else 0.0,
        "complex_words": min(1.0, counts["complex"] / 2),
        "critical_words": min(1.0, float(counts["critical"])),
        "technical_terms": min(1.0, counts["technical"] / 3),
        "code": 1.0 if any(hint in head for hint in _CODE_HINTS) and _CODE.search(head) else 0.0,
        "reasoning": min(1.0, counts["reasoning"] / 2 + (0.5 if math else 0.0)),
        "quantitative": min(1.0, numbers / 6 + (0.25 if math else 0.0)),
        "multi_step": min(1.0, counts["multi_step"] / 4),
        "negation": min(1.0, counts["negation"] / 2),
        "constraints": min(1.0, counts["constraints"] / 2),
        "sentences": min(1.0, max(0, len(_SENTENCE_END.findall(head)) - 1) / 6),
        "instruction": 0.0 if not text or text.rstrip().endswith("?") else 1.0,  # not put as a question
        "depth": min(1.0, max(0, turns - 1) / 10),
        "tools": 1.0 if wants_tools else 0.0,
    }
