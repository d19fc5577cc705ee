"""PII masking: phone numbers, e-mail addresses, PRC resident ID numbers and bank card numbers.

:func:`mask` rewrites a text in one pass of one precompiled regex; every match
goes through a small check that decides whether it is really PII, so ordinary
numbers stay as they are. What is recognised, and what it becomes:

========================  ===================================  ==========================
kind                      recognised                           masked
========================  ===================================  ==========================
mainland China mobile     ``1[3-9]`` + 9 digits, optionally    ``138****5678``; a prefix
                          ``+86``/``0086``/``86`` in front and  is kept as written
                          split 3-4-4 by spaces or dashes      (``+86 138****5678``)
international phone       ``+`` country code and digits, in    ``+44 ******0958``: the
                          E.164 (``+442079460958``) or grouped  country code and the last
                          by spaces, dots, dashes, parentheses  4 digits
                          (``+1 (415) 555-2671``); 8-15 digits
e-mail address            ``local@domain.tld``                 ``j***@example.com``
PRC resident ID           17 digits + a digit or ``X``; a      ``110101********1234``:
                          province code, a real birth date      first 6, last 4
                          (1900-2099) and the ISO 7064
                          MOD 11-2 check character
bank card                 13-19 digits, plain or in groups      ``**** **** **** 1234``
                          (4-4-4-4, 4-4-4-4-3, 4-6-5, ...) split
                          by spaces or dashes, with an issuer
                          prefix (2221-2720, 3-6) and a valid
                          Luhn sum
========================  ===================================  ==========================

A number only counts when it stands on its own: no ASCII letter, digit or
``*`` right before or after it (so hex ids such as ``9f86d0818...`` are left
alone, while ``手机13812345678`` and ``req-13812345678`` are masked). Years,
prices, 6-digit codes, timestamps (they start with ``1``, which no card
issuer uses, and are 10, 13, 16 or 19 digits) and numbers that fail the
checks above are not touched. Masking is idempotent: a masked text has no
digit run long enough to match again. The price of the format with no check
digit: any free-standing 11-digit number that starts with 13-19 is taken for
a mobile number.

Cost, measured on 10 kB of text (tests/unit/test_pii.py prints it): about
1 us without a digit or ``@``, 0.2 ms with digits but no PII, 0.5 ms with
PII and ``@`` (the e-mail rule is the dearer half).

Not recognised: numbers written with full-width digits, national phone
formats without a country code other than China's mobiles (``(415) 555-2671``),
international numbers written with ``00`` instead of ``+`` (China's excepted),
and 15-digit first-generation resident IDs.

:func:`mask_value` applies :func:`mask` to every string in a structure of
dicts, lists and tuples, keys included. :class:`MaskingFilter` masks log
records.
"""

from __future__ import annotations

import logging
import re
from datetime import date
from typing import Any

# A number stands on its own: no ASCII letter, digit or mask star next to it.
_BEFORE = r"(?<![0-9A-Za-z*])"
_AFTER = r"(?![0-9A-Za-z*])"

_EMAIL = r"(?<![A-Za-z0-9._%+-])(?P<email>[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})"
_NUMBERS = (
    # Every number starts on its own with a digit or "+" and runs for 8 characters at least: checked
    # once up front, this keeps the alternatives below from being tried at most positions (4x faster).
    rf"{_BEFORE}(?=[0-9+][0-9 ().+-]{{7}})(?:"
    # Mainland China mobile, tried first so that "+86 138..." is not taken for an international number.
    rf"(?P<cn>(?P<cn_prefix>(?:\+|00)?86[ -]?)?1[3-9][0-9](?P<cn_sep>[ -]?)[0-9]{{4}}(?P=cn_sep)[0-9]{{4}}){_AFTER}"
    # International: "+", then digit groups split by one separator each (no nested quantifiers).
    r"|(?P<intl>\+[0-9]+(?:(?:[ .-]|[ ]?\(|\)[ .-]?)[0-9]+){0,7})"
    # Bank card in groups: 4-4-4-(1..4)[-(1..3)] or 4-6-(4..5).
    rf"|(?P<grouped>[0-9]{{4}}(?P<g_sep>[ -])(?:[0-9]{{4}}(?P=g_sep)[0-9]{{4}}(?P=g_sep)[0-9]{{1,4}}"
    rf"(?:(?P=g_sep)[0-9]{{1,3}})?|[0-9]{{6}}(?P=g_sep)[0-9]{{4,5}})){_AFTER}"
    # A plain run: resident ID (17 digits + X) or a card / resident ID of 13-19 digits.
    rf"|(?P<run>[0-9]{{17}}[Xx]|[0-9]{{13,19}}){_AFTER}"
    ")"
)
# Three compiled forms of the same rules, so a text pays only for what it can contain.
_ALL = re.compile(f"{_EMAIL}|{_NUMBERS}")
_ONLY_NUMBERS = re.compile(_NUMBERS)
_ONLY_EMAIL = re.compile(_EMAIL)
_DIGITS = "0123456789"
_CN_MOBILE = re.compile(r"1[3-9][0-9]{9}")


def _codes(table: str) -> frozenset[str]:
    """A set of codes from a space-separated table (as the standards list them)."""
    return frozenset(table.split())


# E.164 country codes of one and two digits; every other code has three.
_CC1 = _codes("1 7")
_CC2 = _codes(
    "20 27 30 31 32 33 34 36 39 40 41 43 44 45 46 47 48 49 51 52 53 54 55 56 57 58 "
    "60 61 62 63 64 65 66 81 82 84 86 90 91 92 93 94 95 98"
)
# First two digits of a PRC resident ID: the province-level region.
_PROVINCES = _codes(
    "11 12 13 14 15 21 22 23 31 32 33 34 35 36 37 41 42 43 44 45 46 50 51 52 53 54 61 62 63 64 65 71 81 82 83 91"
)
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_PHONE_DIGITS = (8, 15)  # an international number has 8 to 15 digits, country code included


def luhn_ok(digits: str) -> bool:
    """Whether ``digits`` pass the Luhn (mod 10) check used by card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def resident_id_ok(text: str) -> bool:
    """Whether ``text`` is an 18-character PRC resident ID: region, birth date and check character."""
    if len(text) != 18 or not text[:17].isdigit() or text[:2] not in _PROVINCES:
        return False
    try:
        born = date(int(text[6:10]), int(text[10:12]), int(text[12:14]))
    except ValueError:
        return False
    if not 1900 <= born.year <= 2099:
        return False
    check = _ID_CHECK[sum(int(c) * w for c, w in zip(text[:17], _ID_WEIGHTS, strict=True)) % 11]
    return text[17].upper() == check


def card_ok(digits: str) -> bool:
    """Whether ``digits`` look like a payment card: 13-19 digits, an issuer's prefix, Luhn."""
    if not 13 <= len(digits) <= 19:
        return False
    first = digits[0]
    # 3-6: Amex, Diners, JCB, Visa, Mastercard, Discover, UnionPay; 2221-2720: Mastercard's 2-series.
    # Not 1 (airlines), which keeps epoch timestamps in ms, us and ns out.
    if not ("3" <= first <= "6" or 2221 <= int(digits[:4]) <= 2720):
        return False
    return luhn_ok(digits)


def _country_code(digits: str) -> str:
    if digits[0] in _CC1:
        return digits[0]
    return digits[:2] if digits[:2] in _CC2 else digits[:3]


def _mask_card(digits: str) -> str:
    return "**** **** **** " + digits[-4:]


def _mask_intl(text: str) -> str:
    """``+44 20 7946 0958`` -> ``+44 ******0958``; groups past 15 digits are left as they are."""
    groups = re.split(r"([^0-9]+)", text[1:])  # digits, separator, digits, ...
    kept = len(groups)
    while kept > 1 and sum(len(g) for g in groups[:kept:2]) > _PHONE_DIGITS[1]:
        kept -= 2  # a trailing group (a year, a count) that ran into the number
    digits = "".join(groups[:kept:2])
    if not _PHONE_DIGITS[0] <= len(digits) <= _PHONE_DIGITS[1]:
        return text
    cc = _country_code(digits)
    national, rest = digits[len(cc) :], "".join(groups[kept:])
    if cc == "86" and _CN_MOBILE.fullmatch(national):  # written unusually, e.g. "(+86) 138 ..."
        return f"+86 {national[:3]}****{national[-4:]}{rest}"
    return f"+{cc} {'*' * (len(national) - 4)}{national[-4:]}{rest}"


def _replace(m: re.Match[str]) -> str:
    text = m.group(0)
    found = m.groupdict()
    if found.get("email"):
        local, _, domain = text.partition("@")
        return f"{local[0]}***@{domain}"
    if found.get("cn"):
        digits = re.sub(r"[^0-9]", "", text)[-11:]
        return f"{found['cn_prefix'] or ''}{digits[:3]}****{digits[-4:]}"
    if found.get("intl"):
        return _mask_intl(text)
    if found.get("grouped"):
        digits = re.sub(r"[^0-9]", "", text)
        return _mask_card(digits) if card_ok(digits) else text
    if len(text) == 18 and resident_id_ok(text):
        return f"{text[:6]}********{text[-4:]}"
    if text.isdigit() and card_ok(text):
        return _mask_card(text)
    return text


def mask(text: str) -> str:
    """``text`` with every phone number, e-mail address, resident ID and card number masked.

    Returns ``text`` itself (no copy) when it holds no digit and no ``@``.
    """
    # str.__contains__ is a memchr-speed scan, far quicker than a regex search for a class.
    digits = any(d in text for d in _DIGITS)
    if "@" in text:
        return (_ALL if digits else _ONLY_EMAIL).sub(_replace, text)
    return _ONLY_NUMBERS.sub(_replace, text) if digits else text


def mask_value(obj: Any) -> Any:
    """``obj`` with :func:`mask` applied to every string in it, dict keys included.

    Recurses into dicts, lists and tuples (a tuple stays a tuple); anything else
    (numbers, None, bytes) is returned as it is.
    """
    if isinstance(obj, str):
        return mask(obj)
    if isinstance(obj, dict):
        return {mask_value(k): mask_value(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [mask_value(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(mask_value(v) for v in obj)
    return obj


class MaskingFilter(logging.Filter):
    """Masks a log record's message (``msg % args``), exception text and stack.

    Installed on the handler (not a logger), so it sees the records of every
    logger that propagates to it. The record is formatted here, once; a record
    that cannot be formatted is left for the handler to report.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # bad args: the handler's own error report is the better message
            return True
        record.msg, record.args = mask(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return True


_FORMATTER = logging.Formatter()
