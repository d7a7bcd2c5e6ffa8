"""PII scrubbing on a labelled set: positives of every type, tricky negatives, precision/recall."""
from __future__ import annotations

import numpy as np
import pytest

from ratray.data.pii import TYPES, find_pii, iban_ok, luhn_ok, scrub

# (text, the PII value inside it, its type). Card numbers, IBANs and the AWS key are the issuers'
# published test/example values; addresses use reserved documentation ranges where they exist.
POSITIVES = [
    ("contact jane.doe@example.com for access", "jane.doe@example.com", "EMAIL"),
    ("Author: Guido van Rossum <guido@python.org>", "guido@python.org", "EMAIL"),
    ("mailto:first.last+tag@sub.example.co.uk?subject=hi", "first.last+tag@sub.example.co.uk", "EMAIL"),
    ("# maintainer: bob_smith99@mail-server.example.org", "bob_smith99@mail-server.example.org", "EMAIL"),
    ("'reply-to': 'noreply@company.io',", "noreply@company.io", "EMAIL"),
    ("send it to A.B@EXAMPLE.COM.", "A.B@EXAMPLE.COM", "EMAIL"),
    ("(x%y@example.net)", "x%y@example.net", "EMAIL"),
    ("Email: o'neil@example.ie", "neil@example.ie", "EMAIL"),
    ("users: [alice@corp.example, bob@corp.example]", "alice@corp.example", "EMAIL"),
    ("questions -> support@ratray.dev", "support@ratray.dev", "EMAIL"),
    ("call +1 415-555-2671 now", "+1 415-555-2671", "PHONE"),
    ("tel (212) 555-0198", "(212) 555-0198", "PHONE"),
    ("London office: +44 20 7946 0958", "+44 20 7946 0958", "PHONE"),
    ("Berlin: +49 30 901820", "+49 30 901820", "PHONE"),
    ("Paris +33 1 42 68 53 00 (standard)", "+33 1 42 68 53 00", "PHONE"),
    ("mobile: +91 98765 43210", "+91 98765 43210", "PHONE"),
    ("Tokyo +81 3-1234-5678", "+81 3-1234-5678", "PHONE"),
    ("phone: 650-253-0000", "650-253-0000", "PHONE"),
    ("fax 415.555.2671", "415.555.2671", "PHONE"),
    ("+1 (650) 253-0000 ext. 1", "+1 (650) 253-0000", "PHONE"),
    ("ring 020 7946 0958 after six", "020 7946 0958", "PHONE"),  # UK national, no +44: a known miss
    ("call me at 4155552671", "4155552671", "PHONE"),  # a bare digit run: refused, a known miss
    ("server at 192.168.1.20 port 22", "192.168.1.20", "IP_ADDRESS"),
    ("nameserver 8.8.8.8", "8.8.8.8", "IP_ADDRESS"),
    ("client_ip='203.0.113.195'", "203.0.113.195", "IP_ADDRESS"),
    ("host 10.0.0.1:8080", "10.0.0.1", "IP_ADDRESS"),
    ("gw=172.16.254.1;", "172.16.254.1", "IP_ADDRESS"),
    ("addr 2001:db8:85a3::8a2e:370:7334 up", "2001:db8:85a3::8a2e:370:7334", "IP_ADDRESS"),
    ("link-local fe80::1ff:fe23:4567:890a%eth0", "fe80::1ff:fe23:4567:890a", "IP_ADDRESS"),
    ("[2001:0db8:0000:0000:0000:ff00:0042:8329]", "2001:0db8:0000:0000:0000:ff00:0042:8329", "IP_ADDRESS"),
    ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111", "CREDIT_CARD"),
    ("visa=4012888888881881", "4012888888881881", "CREDIT_CARD"),
    ("MC 5555-5555-5555-4444", "5555-5555-5555-4444", "CREDIT_CARD"),
    ("mastercard 5105105105105100.", "5105105105105100", "CREDIT_CARD"),
    ("amex 3782 822463 10005", "3782 822463 10005", "CREDIT_CARD"),
    ("Amex: 371449635398431", "371449635398431", "CREDIT_CARD"),
    ("discover 6011 1111 1111 1117", "6011 1111 1111 1117", "CREDIT_CARD"),
    ("jcb 3530111333300000", "3530111333300000", "CREDIT_CARD"),
    ("diners 30569309025904", "30569309025904", "CREDIT_CARD"),
    ("mc2 2223003122003222", "2223003122003222", "CREDIT_CARD"),
    ("IBAN DE89 3704 0044 0532 0130 00", "DE89 3704 0044 0532 0130 00", "IBAN"),
    ("pay to GB82 WEST 1234 5698 7654 32 today", "GB82 WEST 1234 5698 7654 32", "IBAN"),
    ("FR1420041010050500013M02606", "FR1420041010050500013M02606", "IBAN"),
    ("iban: NL91ABNA0417164300", "NL91ABNA0417164300", "IBAN"),
    ("CH9300762011623852957 (Zürich)", "CH9300762011623852957", "IBAN"),
    ("ES91 2100 0418 4502 0005 1332", "ES91 2100 0418 4502 0005 1332", "IBAN"),
    ("aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE", "SECRET"),
    ("token: ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "SECRET"),
    ("SLACK=xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
     "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx", "SECRET"),
    ("stripe.api_key = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'", "sk_live_4eC39HqLyjWDarjtT1zdp7dc", "SECRET"),
    ("key=AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "SECRET"),
    ("OPENAI_API_KEY=sk-proj-Abc123Def456Ghi789Jkl012Mno345", "sk-proj-Abc123Def456Ghi789Jkl012Mno345", "SECRET"),
    ("HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh", "hf_AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh", "SECRET"),
    ("Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "SECRET"),
    ('db_password = "hunter2Hunter2x9"', "hunter2Hunter2x9", "SECRET"),
    ('{"api_key": "a1b2c3d4e5f6g7h8i9"}', "a1b2c3d4e5f6g7h8i9", "SECRET"),
    ("SECRET_KEY='django-insecure-9x8y7z6w5v4u'", "django-insecure-9x8y7z6w5v4u", "SECRET"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n"
     "aFDrBz9vFqU4yVkzSwy3BZ7G\n-----END RSA PRIVATE KEY-----",
     "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn", "PRIVATE_KEY"),
    ("key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
     "-----END OPENSSH PRIVATE KEY-----\n", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ", "PRIVATE_KEY"),
    ("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIFx\n-----END PRIVATE KEY-----",
     "MC4CAQAwBQYDK2VwBCIEIFx", "PRIVATE_KEY"),
]

NEGATIVES = [
    "version 1.2.3", "v2.10.0", "Python 3.12.1", "release 2024.1.0", "numpy>=1.26,<2.1", "v1.0.0.1",
    "__version__ = '4.0.0.dev1'", "setuptools==69.5.1", "2.0.0-rc1+build.5", "version 10.0.19041.1",
    "commit 3f786850e387550fdab836ed7e6dc881de23001b", "fix in a1b2c3d (see #123)",
    "sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "md5 d41d8cd98f00b204e9800998ecf8427e", "2024-03-15", "15/03/2024", "2024-03-15T10:20:30Z",
    "March 5, 2024 at 10:30:45", "12:30:45.123", "uuid 123e4567-e89b-12d3-a456-426614174000",
    "ISBN 978-3-16-148410-0", "ISBN 0-306-40615-2", "4111 1111 1111 1112", "1234 5678 9012 3452",
    "order 1234567890123456", "x = 2147483647", "MAX = 9223372036854775807", "0xDEADBEEF", "0x7fffffff",
    "pi = 3.14159265358979", "N_A = 6.022e23", "1.7976931348623157e+308", "localhost:8080",
    "coords 48.8566, 2.3522", "OID 1.3.6.1.4.1.311.21.7", "a[1::2] + b[::3]", "std::vector<int> v;",
    "time 10:30:45", "@property\ndef name(self):", "@dataclass(frozen=True)", "user@localhost",
    "git tag v4.2.1", "see RFC 2616 section 14.9", "port 65535", "error 0x80070005",
    "ticket #123456 in PR 4567", "token = get_token(request)", 'password = "password"',
    "key = os.environ['API_KEY']", "pip install torch==2.13.0", "DE00 0000 0000 0000 0000 00",
    "sk-short", "ghp_tooShort", "Content-Length: 348", "a.b.c.d = 1.2.3.4.5", "shape (512, 384, 64)",
    "epoch 3/100 loss 2.3456 lr 1e-3", "seed=1234567", "ports 8000-8100", "3.12.1.4.5 build",
    # found in the stdlib by an earlier version (decimals, AIX build ids, a code-page table)
    "'6107-1415-64': '7.1'", "Decimal('+35236450.6')", "0x0148: 33471-90901,", "mu = 31.01875",
]


def _evaluate():
    """(true positives, misses, false positives, wrong-type hits), each a list of the strings."""
    tp, fn, fp, wrong = [], [], [], []
    for text, value, kind in POSITIVES:
        out, counts = scrub(text)
        if value not in out and counts.get(kind):
            tp.append(text)
        elif counts:
            wrong.append((text, out))
        else:
            fn.append(text)
    for text in NEGATIVES:
        out, counts = scrub(text)
        if counts:
            fp.append((text, out))
    return tp, fn, fp, wrong


def _bootstrap(hits: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of 0/1 outcomes."""
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), (n_boot, len(hits)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_labelled_set_precision_and_recall():
    """Bars: precision >= 0.95 (a false positive destroys real text: versions, hashes, dates in code
    must survive) and recall >= 0.9 (two known misses are in the set on purpose: a national
    number of another country and a bare digit run)."""
    assert len(POSITIVES) >= 50 and len(NEGATIVES) >= 50
    assert {k for _, _, k in POSITIVES} == set(TYPES)
    tp, fn, fp, wrong = _evaluate()
    precision = len(tp) / max(1, len(tp) + len(fp) + len(wrong))
    recall = len(tp) / len(POSITIVES)
    p_hits = np.array([1] * len(tp) + [0] * (len(fp) + len(wrong)), float)
    r_hits = np.array([1] * len(tp) + [0] * (len(POSITIVES) - len(tp)), float)
    p_lo, p_hi = _bootstrap(p_hits)
    r_lo, r_hi = _bootstrap(r_hits)
    print(f"\nPII labelled set: {len(POSITIVES)} positives, {len(NEGATIVES)} negatives")
    print(f"precision {precision:.3f} (95% CI {p_lo:.3f}-{p_hi:.3f}), "
          f"recall {recall:.3f} (95% CI {r_lo:.3f}-{r_hi:.3f})")
    for text in fn:
        print(f"  missed: {text!r}")
    for text, out in fp + wrong:
        print(f"  false positive: {text!r} -> {out!r}")
    assert precision >= 0.95, (fp, wrong)
    assert recall >= 0.9, fn


@pytest.mark.parametrize("text,value,kind", POSITIVES[:-3:4])
def test_placeholders_are_typed(text, value, kind):
    out, counts = scrub(text)
    if kind == "PHONE" and value in ("020 7946 0958", "4155552671"):
        pytest.skip("a known miss of the labelled set")
    assert f"<{kind}>" in out and value not in out
    assert set(counts) == {kind}


def test_counts_by_type_and_surrounding_text_kept():
    text = ("# Copyright jane@example.com, bob@example.org\n"
            "HOST = '10.1.2.3'  # version 1.2.3.4 on port 8080\n"
            "card = '4111-1111-1111-1111'\n")
    out, counts = scrub(text)
    assert counts == {"EMAIL": 2, "IP_ADDRESS": 1, "CREDIT_CARD": 1}
    assert out == ("# Copyright <EMAIL>, <EMAIL>\n"
                   "HOST = '<IP_ADDRESS>'  # version 1.2.3.4 on port 8080\n"
                   "card = '<CREDIT_CARD>'\n")


def test_private_key_block_wins_over_what_it_contains():
    block = "-----BEGIN EC PRIVATE KEY-----\nAKIAIOSFODNN7EXAMPLE me@example.com\n-----END EC PRIVATE KEY-----"
    out, counts = scrub(f"x\n{block}\ny")
    assert out == "x\n<PRIVATE_KEY>\ny" and counts == {"PRIVATE_KEY": 1}
    assert [s[2] for s in find_pii(block)] == ["PRIVATE_KEY"]


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
    assert not iban_ok("GB82 WEST 1234 5698 7654")  # the country's length
    assert not iban_ok("XX82 WEST 1234 5698 7654 32")  # no such country


def test_text_without_pii_is_unchanged():
    text = "def f(x):\n    return x[1::2]  # 2024-03-15, v1.2.3\n"
    assert scrub(text) == (text, {})
