"""PII scrubbing: personal data and secrets in a document's text → typed placeholders.

    text ─► detectors (each: spans + type) ─► overlaps resolved (earlier TYPES entry wins, then the
         longer span) ─► spans replaced by "<TYPE>" ─► (scrubbed text, counts by type)

Runs before tokenization (ratray/data/clean.py calls it on every document of a build), so neither
the tokenizer, the chunk store, the embeddings nor the model ever see the scrubbed values.

  type          placeholder       what is caught
  PRIVATE_KEY   <PRIVATE_KEY>     PEM / OpenSSH / PGP private-key blocks (BEGIN ... END, whole block)
  SECRET        <SECRET>          token formats: AWS access key ids (AKIA/ASIA...), GitHub (ghp_,
                                  gho_, ghs_, ghu_, ghr_, github_pat_), Slack (xox?-), Stripe
                                  (sk_/rk_ live/test), Google API keys (AIza...), OpenAI-style
                                  (sk-..., sk-proj-...), Hugging Face (hf_...), JWTs (eyJ.eyJ.sig),
                                  and the VALUE of an assignment to a name like password / secret /
                                  api_key / token / access_key when it is a quoted string of >= 12
                                  characters mixing letters and digits
  EMAIL         <EMAIL>           local@domain.tld (a dotted domain with a letters-only TLD)
  IBAN          <IBAN>            country code + check digits + BBAN, optionally grouped by 4,
                                  with the country's IBAN length and the ISO 13616 mod-97 check
  CREDIT_CARD   <CREDIT_CARD>     13-19 digits (optionally grouped by spaces or dashes) with a card
                                  issuer's prefix (Visa, Mastercard, Amex, Discover, Diners, JCB,
                                  UnionPay) that pass the Luhn check
  IP_ADDRESS    <IP_ADDRESS>      IPv4 dotted quads (each part 0-255; not a part of a longer dotted
                                  run such as an OID, not after "v" or "version"), IPv6 (validated
                                  by `ipaddress`; at least 3 groups or a group of >= 3 hex digits,
                                  so Python slices like `x[1::2]` are not addresses)
  PHONE         <PHONE>           `phonenumbers` (Google libphonenumber's port) matches valid numbers
                                  for their country, grouped as that country groups them
                                  (STRICT_GROUPING: build ids like 6107-1415-64 are not numbers):
                                  international (+CC) anywhere, national ones for PHONE_REGION; a
                                  match written as one bare digit run (no "+", space, dash, dot or
                                  parenthesis) is refused (in code such runs are integer constants:
                                  2147483647 is a valid Dallas number), and so is one inside a
                                  decimal or a word (+35236450.6)

Why not Presidio: `presidio-analyzer` 2.2.366 pulls spaCy 3.8 and 19 other packages (thinc, blis,
tldextract, httpx, ...), and its AnalyzerEngine wants a spaCy language model that is downloaded at
run time (not possible offline here). Its pattern recognizers are regexes + checksums like these;
the phone recognizer is the same `phonenumbers`. We use `phonenumbers` and our own patterns with the
checksums (Luhn, IBAN mod-97) instead.

What this cannot do (offline or at all): names of people, postal addresses, dates of birth, national
id numbers, and anything else that needs a named-entity model (Presidio would need spaCy's model
for those too); obfuscated addresses ("jane at example dot com"); national phone numbers of countries
other than PHONE_REGION written without their +CC; secrets in formats not listed above (a random
string assigned to a name like `key` is not caught unless the name says password/secret/token/...);
credit-card numbers written as one digit run inside longer digit runs.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Callable, Iterator

import phonenumbers

PHONE_REGION = "US"  # the country whose national phone numbers (without +CC) are recognised

# in priority order: on overlapping spans the earlier type wins (a key block may contain anything)
TYPES = ("PRIVATE_KEY", "SECRET", "EMAIL", "IBAN", "CREDIT_CARD", "IP_ADDRESS", "PHONE")

Span = tuple[int, int, str]  # (start, end, type) in characters of the text

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----.*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY"
    r"(?: BLOCK)?-----", re.S)
_TOKENS = re.compile(r"""(?<![A-Za-z0-9_-])(?:
      (?:AKIA|ASIA)[0-9A-Z]{16}
    | gh[pousr]_[A-Za-z0-9]{36}
    | github_pat_[A-Za-z0-9_]{60,}
    | xox[abprs]-[A-Za-z0-9-]{10,}
    | [sr]k_(?:live|test)_[A-Za-z0-9]{20,}
    | AIza[0-9A-Za-z_-]{35}
    | sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}
    | hf_[A-Za-z]{30,}
    | eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}
    )(?![A-Za-z0-9_-])""", re.X)
_ASSIGNED = re.compile(  # the name may have any prefix (db_password, SECRET_KEY, stripe.api_key)
    r"""(?i)(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?key|auth[_-]?token|token)[\w-]*"""
    r"""["']?\s*[:=]\s*["']([^"'\s]{12,})["']""")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])([A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)"
                   r"(?![A-Za-z0-9])")
_CARD = re.compile(r"(?<![\w.-])\d(?:[ -]?\d){12,18}(?!\w|[.-]\d)")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:.])")
_NUMBER_AROUND = re.compile(r"[\w.]\||.*\|\.\d")  # "before|after": part of a decimal or a word
_VERSION_BEFORE = re.compile(r"(?i)(?:\bv|version\s*|release\s*)$")

# IBAN lengths by country (ISO 13616 registry; SWIFT's IBAN registry, release 2024)
IBAN_LENGTHS = dict(
    AD=24, AE=23, AL=28, AT=20, AZ=28, BA=20, BE=16, BG=22, BH=22, BR=29, BY=28, CH=21, CR=22, CY=28,
    CZ=24, DE=22, DK=18, DO=28, EE=20, EG=29, ES=24, FI=18, FO=18, FR=27, GB=22, GE=22, GI=23, GL=18,
    GR=27, GT=28, HR=21, HU=28, IE=22, IL=23, IQ=23, IS=26, IT=27, JO=30, KW=30, KZ=20, LB=28, LC=32,
    LI=21, LT=20, LU=20, LV=21, MC=27, MD=24, ME=22, MK=19, MR=27, MT=31, MU=30, NL=18, NO=15, PK=24,
    PL=28, PS=29, PT=25, QA=29, RO=24, RS=22, SA=24, SC=31, SE=24, SI=19, SK=24, SM=27, ST=25, SV=28,
    TL=23, TN=24, TR=26, UA=29, VA=22, VG=24, XK=20)
# card issuer prefixes (IIN ranges): Visa 4; Mastercard 51-55, 2221-2720; Amex 34, 37; Discover
# 6011, 644-649, 65; Diners 300-305, 36, 38; JCB 3528-3589; UnionPay 62
_CARD_PREFIX = re.compile(r"4|5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|6011|64[4-9]|65"
                          r"|30[0-5]|3[68]|35(?:2[89]|[3-8]\d)|62")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (credit cards)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    """ISO 13616: the country's length and mod-97 == 1 over BBAN + country + check digits."""
    s = iban.replace(" ", "")
    if IBAN_LENGTHS.get(s[:2]) != len(s) or not s[2:4].isdigit():
        return False
    return int("".join(str(int(c, 36)) for c in s[4:] + s[:4])) % 97 == 1


def _private_keys(text: str) -> Iterator[Span]:
    for m in _PRIVATE_KEY.finditer(text):
        yield m.start(), m.end(), "PRIVATE_KEY"


def _secrets(text: str) -> Iterator[Span]:
    for m in _TOKENS.finditer(text):
        yield m.start(), m.end(), "SECRET"
    for m in _ASSIGNED.finditer(text):
        value = m.group(1)
        if re.search(r"[A-Za-z]", value) and re.search(r"\d", value):
            yield m.start(1), m.end(1), "SECRET"


def _emails(text: str) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        yield m.start(), m.end(), "EMAIL"


def _ibans(text: str) -> Iterator[Span]:
    for m in _IBAN.finditer(text):
        if iban_ok(m.group(1)):
            yield m.start(1), m.end(1), "IBAN"


def _cards(text: str) -> Iterator[Span]:
    for m in _CARD.finditer(text):
        raw = m.group()
        digits = re.sub(r"[ -]", "", raw)
        seps = set(re.findall(r"[ -]", raw))
        if len(seps) <= 1 and _CARD_PREFIX.match(digits) and luhn_ok(digits):
            yield m.start(), m.end(), "CREDIT_CARD"


def _ips(text: str) -> Iterator[Span]:
    for m in _IPV4.finditer(text):
        parts = m.group().split(".")
        if all(int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in parts) \
                and not _VERSION_BEFORE.search(text, max(0, m.start() - 10), m.start()):
            yield m.start(), m.end(), "IP_ADDRESS"
    for m in _IPV6.finditer(text):
        s = m.group()
        groups = [g for g in s.split(":") if g]
        if len(groups) < 3 and not any(len(g) >= 3 for g in groups):
            continue
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            continue
        yield m.start(), m.end(), "IP_ADDRESS"


def _phones(text: str) -> Iterator[Span]:
    if not re.search(r"\d{3}", text.replace(" ", "").replace("-", "")):
        return  # fewer than three digits in a row even without separators: no phone number
    for m in phonenumbers.PhoneNumberMatcher(text, PHONE_REGION,
                                             leniency=phonenumbers.Leniency.STRICT_GROUPING):
        if re.search(r"[+\s().-]", m.raw_string) \
                and not _NUMBER_AROUND.match(text[max(0, m.start - 1):m.start] + "|"
                                             + text[m.end:m.end + 2]):
            yield m.start, m.end, "PHONE"


DETECTORS: dict[str, Callable[[str], Iterator[Span]]] = {
    "PRIVATE_KEY": _private_keys, "SECRET": _secrets, "EMAIL": _emails, "IBAN": _ibans,
    "CREDIT_CARD": _cards, "IP_ADDRESS": _ips, "PHONE": _phones}


def find_pii(text: str) -> list[Span]:
    """Non-overlapping PII spans of `text`, sorted by start (overlaps: TYPES order, then length)."""
    spans = [s for t in TYPES for s in DETECTORS[t](text)]
    rank = {t: i for i, t in enumerate(TYPES)}
    spans.sort(key=lambda s: (rank[s[2]], -(s[1] - s[0]), s[0]))
    taken: list[Span] = []
    for s in spans:
        if all(s[1] <= a or s[0] >= b for a, b, _ in taken):
            taken.append(s)
    return sorted(taken)


def placeholder(kind: str) -> str:
    return f"<{kind}>"


def scrub(text: str) -> tuple[str, dict[str, int]]:
    """(text with every PII span replaced by its typed placeholder, {type: spans replaced})."""
    spans = find_pii(text)
    if not spans:
        return text, {}
    out, counts, at = [], {}, 0
    for a, b, kind in spans:
        out += [text[at:a], placeholder(kind)]
        counts[kind] = counts.get(kind, 0) + 1
        at = b
    out.append(text[at:])
    return "".join(out), counts
