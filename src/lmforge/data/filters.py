"""Text normalization, language identification, quality filters and PII scrubbing, language-aware.

Quality rules follow Gopher (Rae et al. 2021) and C4 (Raffel et al. 2020), made to work for Chinese, which has no
spaces between words and uses full-width punctuation:
- normalization is NFC plus full-width ASCII letters/digits folded to ASCII; not NFKC, which would also turn the
  Chinese comma and full stop (，。) into ASCII ones;
- "words" are whitespace words for English and single CJK characters for Chinese, so the repetition rules (top
  n-gram share, duplicated n-gram share, repeated lines) apply to both;
- English documents need stop words (Gopher); Chinese ones need a minimum share of CJK characters and sentence
  punctuation (a list of bare characters is not prose);
- PII (e-mail addresses, phone numbers, Chinese resident ID numbers with a valid check digit, IPv4 addresses) is
  replaced by placeholders, also where it touches Han characters with no space between; dates, years and ordinary
  numbers do not match.
Every check returns the name of the rule a document broke, or None. Thresholds live in `QualityConfig`.
It does not read files or count anything; `clean.py` does.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np

CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef]")
ZH_PUNCT = re.compile("[。！？；，、：]")
EN_STOP_WORDS = frozenset(
    ["the", "be", "to", "of", "and", "that", "have", "with", "a", "in", "is", "it", "for", "was", "on", "as", "he",
     "she", "they", "you"]
)
BOILERPLATE = re.compile(
    r"cookie|privacy policy|terms of (use|service)|all rights reserved|javascript|click here|subscribe|"
    r"log ?in|sign up|版权所有|免责声明|点击(这里|此处)|关注我们|登录|注册|隐私政策",
    re.IGNORECASE,
)
_FULLWIDTH_ALNUM = {c: c - 0xFEE0 for c in [*range(0xFF10, 0xFF1A), *range(0xFF21, 0xFF3B), *range(0xFF41, 0xFF5B)]}
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")  # a whitespace word holding a letter
_LETTERS = re.compile(r"[^\W\d_]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).translate(_FULLWIDTH_ALNUM)
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [" ".join(line.split()) if not CJK.search(line) else line.strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def cjk_ratio(text: str) -> float:
    n_chars = len(text) - sum(map(str.isspace, text))
    return len(CJK.findall(text)) / n_chars if n_chars else 0.0


def identify_language(text: str) -> str:
    """'zh' for text that is mostly CJK characters (fast and sure); otherwise py3langid's guess."""
    if cjk_ratio(text[:2000]) >= 0.3:
        return "zh"
    import py3langid

    return py3langid.classify(text[:2000])[0]


def to_simplified(text: str) -> str:
    import zhconv

    return zhconv.convert(text, "zh-cn")


@dataclass
class QualityConfig:
    min_words: int = 20  # English words; Chinese counts characters against min_chars_zh
    max_words: int = 100_000
    min_chars_zh: int = 20
    min_mean_word_len: float = 2.5
    max_mean_word_len: float = 12.0
    max_symbol_ratio: float = 0.1  # '#' and '...' per word (Gopher)
    max_digit_ratio: float = 0.3
    min_alpha_words: float = 0.7  # share of English words holding a letter
    min_stop_words: int = 2
    min_cjk_ratio: float = 0.3
    min_zh_punct_per_100: float = 0.5
    max_dup_line_frac: float = 0.3
    max_boilerplate_line_frac: float = 0.3


def units(text: str, lang: str) -> list[str]:
    """Words for repetition rules: CJK characters one by one, other runs split on whitespace."""
    if lang == "zh":
        return re.findall(r"[\u3400-\u9fff\uf900-\ufaff]|[^\s\u3400-\u9fff\uf900-\ufaff]+", text)
    return text.split()


# Gopher: a document whose most frequent n-gram covers more than this share of characters is repetitive.
TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def _gram_hashes(ids: np.ndarray, n_max: int) -> dict[int, np.ndarray]:
    """64-bit polynomial hashes of every window of n word ids, for n = 2..n_max, each built from the last."""
    out, h = {}, ids.copy()
    with np.errstate(over="ignore"):
        for n in range(2, min(n_max, ids.size) + 1):
            h = h[:-1] * np.uint64(1_000_003) + ids[n - 1 :]
            out[n] = h
    return out


def _repetition(words: list[str]) -> str | None:
    """Gopher's n-gram repetition rules, vectorized: words become ids, n-grams rolling hashes."""
    if len(words) < 2:
        return None
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.uint64, count=len(words))
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = int(lengths.sum())
    grams = _gram_hashes(ids, max(DUP_NGRAM_MAX))
    for n, limit in TOP_NGRAM_MAX.items():
        if n not in grams:
            break
        _, first, counts = np.unique(grams[n], return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] > 1 and counts[top] * int(lengths[first[top] : first[top] + n].sum()) / total > limit:
            return f"top_{n}gram"
    for n, limit in DUP_NGRAM_MAX.items():
        if n not in grams:
            break
        _, first = np.unique(grams[n], return_index=True)
        if first.size == grams[n].size:
            continue  # no window repeats
        repeat = np.ones(grams[n].size, dtype=bool)
        repeat[first] = False  # every window that is not the first of its kind repeats an earlier one
        starts = np.flatnonzero(repeat)
        marks = np.zeros(len(words) + 1, dtype=np.int64)  # covered words: +1 at a window's start, -1 past its end
        np.add.at(marks, starts, 1)
        np.add.at(marks, starts + n, -1)
        if int(lengths[np.cumsum(marks[:-1]) > 0].sum()) / total > limit:
            return f"dup_{n}gram"
    return None


def quality(text: str, lang: str, cfg: QualityConfig) -> str | None:
    """The first rule `text` breaks, or None for a document worth keeping."""
    if "lorem ipsum" in text.lower():
        return "lorem_ipsum"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and sum(bool(BOILERPLATE.search(line)) for line in lines) / len(lines) > cfg.max_boilerplate_line_frac:
        return "boilerplate"
    # lines of a few characters (code fences, braces, "---") repeat in good text, so they do not count
    counted = [line.strip() for line in lines if len(line.strip()) >= 4]
    if len(counted) > 1 and 1 - len(set(counted)) / len(counted) > cfg.max_dup_line_frac:
        return "repeated_lines"
    n_chars = len(text) - sum(map(str.isspace, text))
    if n_chars and sum(map(str.isdigit, text)) / n_chars > cfg.max_digit_ratio:
        return "digit_ratio"
    rule = _chinese(text, n_chars, cfg) if lang == "zh" else _english(text, cfg)
    return rule or _repetition(units(text, lang))


def _chinese(text: str, n_chars: int, cfg: QualityConfig) -> str | None:
    if n_chars < cfg.min_chars_zh:
        return "too_short"
    if cjk_ratio(text) < cfg.min_cjk_ratio:
        return "cjk_ratio"
    if 100.0 * len(ZH_PUNCT.findall(text)) / n_chars < cfg.min_zh_punct_per_100:
        return "no_punctuation"
    return None


def _english(text: str, cfg: QualityConfig) -> str | None:
    words = text.split()
    if len(words) < cfg.min_words:
        return "too_short"
    if len(words) > cfg.max_words:
        return "too_long"
    mean = sum(len(w) for w in words) / len(words)
    if not cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len:
        return "mean_word_length"
    if (text.count("#") + text.count("...") + text.count("…")) / len(words) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if len(_ALPHA_WORD.findall(text)) / len(words) < cfg.min_alpha_words:
        return "alpha_words"
    if len(EN_STOP_WORDS.intersection(map(str.lower, _LETTERS.findall(text)))) < cfg.min_stop_words:
        return "stop_words"
    return None


# --- PII -------------------------------------------------------------------------------------------------------

# Chinese has no spaces, so PII sits right against Han characters (电话13812345678，邮箱a.b@c.com联系). Python's \b
# and \w count a Han character as a word character, which kept such a phone number whole and cut such an e-mail
# inside its local part; so every edge below is an ASCII class.
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}(?![A-Za-z0-9_])")
CN_ID = re.compile(
    r"(?<![0-9A-Za-z])[1-9]\d{5}(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![0-9A-Za-z])"
)
PHONE = re.compile(
    r"(?<![A-Za-z0-9_.+-])(?:"
    r"(?:\+?86[- ]?)?1[3-9]\d[- ]?\d{4}[- ]?\d{4}"  # Chinese mobile
    r"|\+\d{1,3}[- ]?\(?\d{1,4}\)?(?:[- ]?\d{2,4}){2,4}"  # international, with a leading +
    r"|\(\d{3}\) ?\d{3}[-.]\d{4}|\d{3}[-.]\d{3}[-.]\d{4}"  # North American
    r")(?![A-Za-z0-9_.-]*\d)"
)
IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.]*\d)")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def valid_cn_id(s: str) -> bool:
    """GB 11643 check digit: only real-looking ID numbers are scrubbed, not any 18-digit number."""
    total = sum(int(d) * w for d, w in zip(s[:17], _ID_WEIGHTS, strict=True))
    return "10X98765432"[total % 11] == s[17].upper()


def scrub_pii(text: str) -> tuple[str, Counter]:
    found: Counter = Counter()

    def sub(pattern: re.Pattern, placeholder: str, text: str, check=None) -> str:  # noqa: ANN001
        def repl(m: re.Match) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            found[placeholder] += 1
            return placeholder

        return pattern.sub(repl, text)

    text = sub(EMAIL, "<EMAIL>", text)
    text = sub(CN_ID, "<ID_NUMBER>", text, valid_cn_id)
    text = sub(IPV4, "<IP_ADDRESS>", text)
    text = sub(PHONE, "<PHONE>", text)
    return text, found


def blocklist_pattern(phrases: list[str]) -> re.Pattern | None:
    phrases = [p.strip() for p in phrases if p.strip() and not p.startswith("#")]
    if not phrases:
        return None
    return re.compile("|".join(re.escape(p) for p in sorted(phrases, key=len, reverse=True)), re.IGNORECASE)
