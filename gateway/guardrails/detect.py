"""The built-in detectors: where in a text a kind of personal data or secret is, as (start, end) spans.

Each is a pattern that finds candidates cheaply (Python's ``re`` in C, patterns without nested repetition, so no
input makes one run long) and, where the kind has one, a validation that drops what only looks like it: a payment
card's Luhn checksum and issuer prefix (python-stdnum), an IBAN's mod-97 check and country length (python-stdnum),
a US SSN's area, group and serial rules (python-stdnum), a phone number's numbering plan (phonenumbers, Google's
libphonenumber), an IP address's ranges (ipaddress). Provider keys and tokens are matched by the prefixes and
shapes their issuers document. A library scanning the whole text (detect-secrets' entropy plugins, phonenumbers'
own matcher) was measured at 250 µs to 1.2 ms for a one-line prompt, too slow to leave on for every request.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable

import phonenumbers
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.us import ssn as stdnum_ssn

Span = tuple[int, int]
Detector = Callable[[str], list[Span]]

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
                    r"\.[A-Za-z]{2,24}(?![\w-])")
# A pattern that begins with a look-behind scans at about half the speed of one that begins with its digits: the
# character before a match is checked in Python instead (``not_after``).
_PHONE = re.compile(r"(?:\+\d{1,3}[ .-]?(?:\(0\)[ .-]?)?)?(?:\(\d{1,5}\)[ .-]?)?\d{1,5}(?:[ .-]?\d{1,5}){1,6}"
                    r"(?:[ ]?(?:x|ext\.?)[ ]?\d{1,6})?(?!\w)")
_EXTENSION = re.compile(r"[ ]?(?:x|ext\.?)[ ]?\d{1,6}$")
_CARD = re.compile(r"\d(?:[ -]?\d){11,18}(?!\d)")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{1,4}){3,8}(?![A-Za-z0-9])")
_IBAN_START = re.compile(r"[A-Z]{2}\d{2}")
_SSN = re.compile(r"\d{3}([- ])\d{2}\1\d{4}(?![\d-])")
_IPV4 = re.compile(r"\d{1,3}(?:\.\d{1,3}){3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![:\w])")
_SECRETS = re.compile("|".join((
    r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b",  # AWS access key ids
    r"\bgh[pousr]_[A-Za-z0-9]{36,255}\b",  # GitHub tokens
    r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b",
    r"\bglpat-[A-Za-z0-9_-]{20,}\b",  # GitLab
    r"\bsk-ant-[A-Za-z0-9_-]{20,}",  # Anthropic
    r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,}",  # OpenAI (and keys shaped like them, this gateway's too)
    r"\bsk-gw-[A-Za-z0-9_-]{20,}",
    r"\bxox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"\bAIza[0-9A-Za-z_-]{35}\b",  # Google API keys
    r"\b(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}\b",  # Stripe
    r"\bhf_[A-Za-z0-9]{30,}\b",  # Hugging Face
    r"\bnpm_[A-Za-z0-9]{36}\b",  # npm
    r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JSON web tokens
    r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----[A-Za-z0-9+/=\s:,-]{0,20000}?"
    r"(?:-----END (?:[A-Z]+ )*PRIVATE KEY(?: BLOCK)?-----|$)",  # PEM and PGP private keys
)))


def phone_validator(regions: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a candidate is a number of a real numbering plan: its own country's when it starts with + (or 00),
    else one of ``regions`` (ISO country codes: a national number reads differently in each)."""
    def valid(candidate: str) -> bool:
        number_part = _EXTENSION.sub("", candidate)
        digits = sum(ch.isdigit() for ch in number_part)
        if not 7 <= digits <= 15 or _IPV4.fullmatch(number_part):
            return False
        if number_part.startswith("00"):
            number_part = "+" + number_part[2:]
        for region in (None,) if number_part.startswith("+") else regions:
            try:
                if phonenumbers.is_valid_number(phonenumbers.parse(number_part, region)):
                    return True
            except phonenumbers.NumberParseException:
                continue
        return False

    return valid


def _valid_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and digits[0] in "123456" and luhn.is_valid(digits)


def _valid_iban(candidate: str) -> bool:
    return stdnum_iban.is_valid(candidate)


def _valid_ssn(candidate: str) -> bool:
    return stdnum_ssn.is_valid(candidate.replace(" ", "-"))


def _valid_ip(candidate: str) -> bool:
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return address.version == 4 or candidate.count(":") >= 2 and any(ch.isalnum() for ch in candidate)


def _validated(pattern: re.Pattern, valid: Callable[[str], bool] | None,
               needs: Callable[[str], bool] | None = None, not_after: str = "") -> Detector:
    """``pattern``'s matches that ``valid`` confirms and that do not follow a character of ``not_after``; texts that
    fail ``needs`` (a substring test in C, far cheaper than the pattern's scan) have none."""
    def detect(text: str) -> list[Span]:
        if needs is not None and not needs(text):
            return []
        found = []
        for match in pattern.finditer(text):
            start = match.start()
            if start and not_after and (text[start - 1] in not_after or text[start - 1].isalnum() and "w" in not_after):
                continue
            if valid is None or valid(match.group()):
                found.append(match.span())
        return found

    return detect


# Every provider key above starts with one of these (a private key has its header)
_SECRET_MARKS = ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA", "ANVA", "AIPA", "ghp_", "gho_", "ghu_", "ghs_",
                 "ghr_", "github_pat_", "glpat-", "sk-", "xox", "AIza", "sk_", "rk_", "hf_", "npm_", "eyJ",
                 "PRIVATE KEY")


def _has_secret_mark(text: str) -> bool:
    return any(mark in text for mark in _SECRET_MARKS)


def _ip(text: str) -> list[Span]:
    spans = _ipv4(text) if "." in text else []
    if ":" in text:
        spans += [m.span() for m in _IPV6.finditer(text) if _valid_ip(m.group())]
    return spans


_ipv4 = _validated(_IPV4, _valid_ip, not_after="0123456789.")

DETECTORS: dict[str, Detector] = {
    "email": _validated(_EMAIL, None, lambda text: "@" in text),
    "phone": _validated(_PHONE, phone_validator(("US",)), not_after="w+_"),
    "payment_card": _validated(_CARD, _valid_card, not_after="0123456789"),
    "iban": _validated(_IBAN, _valid_iban, lambda text: _IBAN_START.search(text) is not None),
    "us_ssn": _validated(_SSN, _valid_ssn, not_after="0123456789-"),
    "ip_address": _ip,
    "secrets": _validated(_SECRETS, None, _has_secret_mark),
}
# What a redacted span becomes
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "payment_card": "[PAYMENT_CARD]", "iban": "[IBAN]",
                "us_ssn": "[US_SSN]", "ip_address": "[IP_ADDRESS]", "secrets": "[SECRET]"}


def phone_detector(regions: tuple[str, ...]) -> Detector:
    return _validated(_PHONE, phone_validator(regions), not_after="w+_")


def words_detector(words: list[str]) -> Detector:
    """Whole words or phrases of a list, in any case: one alternation of literals (no backtracking to speak of)."""
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
                         + r")(?!\w)", re.IGNORECASE)
    return _validated(pattern, None)


def regex_detector(pattern: str) -> Detector:
    """A tenant's own regular expression, run by RE2 (google-re2): its time grows with the text, never more, so no
    pattern can stall the gateway. Raises ValueError for a pattern RE2 refuses."""
    import re2

    try:
        compiled = re2.compile(pattern)
    except re2.error as exc:
        raise ValueError(f"not a regular expression RE2 accepts: {exc}") from None

    def detect(text: str) -> list[Span]:
        return [match.span() for match in compiled.finditer(text) if match.end() > match.start()]

    return detect
