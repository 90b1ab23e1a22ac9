"""Corpus: cleaning, the file-level split, token windows and multiple-choice items (real texts under `slow`)."""

import numpy as np
import pytest

from pipeline.model import corpus
from pipeline.errors import DataError


class WordTokenizer:
    """Stands in for a Hugging Face tokenizer: one id per whitespace word, ids in order of first use; with `bos`,
    that id leads every text encoded with special tokens (as Gemma's tokenizer does)."""

    def __init__(self, bos: int | None = None):
        self.vocab, self.bos = {}, bos

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return {"input_ids": ([self.bos] if add_special_tokens and self.bos is not None else []) + ids}


def prose(prefix: str, n: int) -> str:
    """n distinct, clean, 8-word sentences in paragraphs of five."""
    sentences = [f"The {prefix} number {i} walked slowly across the field." for i in range(n)]
    return "\n\n".join(" ".join(sentences[i:i + 5]) for i in range(0, n, 5))


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


# ---------------------------------------------------------------- token windows

def test_token_windows_shape_and_spread():
    texts = [" ".join(f"a{i}" for i in range(100)), " ".join(f"b{i}" for i in range(100))]
    tok = WordTokenizer()
    windows = corpus.token_windows(tok, texts, n=4, seq_len=10)
    assert windows.shape == (4, 10) and windows.dtype == np.int64
    flat = windows.ravel().tolist()
    assert len(set(flat)) == len(flat)  # non-overlapping
    assert all(np.diff(windows[0]) == 1)  # consecutive tokens
    names = {w for w, i in tok.vocab.items() if i in set(flat)}
    assert any(w.startswith("a") for w in names) and any(w.startswith("b") for w in names)  # both texts used


def test_token_windows_start_with_the_tokenizers_start_token():
    texts = [" ".join(f"a{i}" for i in range(100))]
    windows = corpus.token_windows(WordTokenizer(bos=999), texts, n=4, seq_len=10)
    assert windows.shape == (4, 10) and (windows[:, 0] == 999).all()
    assert all((np.diff(w[1:]) == 1).all() for w in windows)  # then 9 consecutive tokens of running text
    assert corpus.start_tokens(WordTokenizer()) == [] and corpus.start_tokens(WordTokenizer(bos=7)) == [7]


def test_token_windows_too_short_says_found_and_needed():
    with pytest.raises(DataError, match=r"found 30 tokens in 1 text\(s\), need n\*seq_len = 4\*10 = 40"):
        corpus.token_windows(WordTokenizer(), [" ".join(["w"] * 30)], n=4, seq_len=10)


# ---------------------------------------------------------------- multiple choice

def test_mc_items_deterministic_and_answer_is_the_true_next_sentence():
    text, distractors = prose("cat", 60), prose("dog", 40)
    items = corpus.multiple_choice_items(text, distractors, n=10, seed=3)
    assert items == corpus.multiple_choice_items(text, distractors, n=10, seed=3)
    assert items != corpus.multiple_choice_items(text, distractors, n=10, seed=4)
    sentences = [s for para in corpus.split_sentences(text) for s in para]
    for item in items:
        assert len(item.choices) == 4 and len(set(item.choices)) == 4
        first, second = item.context.split(". ", 1)
        i = sentences.index(first + ".")
        assert sentences[i + 1] == second and item.choices[item.answer] == sentences[i + 2]
        assert all("dog" in c for k, c in enumerate(item.choices) if k != item.answer)
    assert len({item.answer for item in items}) > 1  # the true sentence is not always in one slot


def test_mc_items_too_many_requested():
    with pytest.raises(DataError, match=r"found 36 multiple-choice items .* need 1000"):
        corpus.multiple_choice_items(prose("cat", 60), prose("dog", 40), n=1000, seed=0)


def test_split_sentences_keeps_abbreviations_and_initials():
    text = ("Mr. Donnelly met J. O. Halliwell at St. Albans in 1590. He wrote 2 Henry VI. and more. "
            "Was it true? It was, cf. the register.")
    assert corpus.split_sentences(text) == [[
        "Mr. Donnelly met J. O. Halliwell at St. Albans in 1590.", "He wrote 2 Henry VI. and more.",
        "Was it true?", "It was, cf. the register."]]


# ---------------------------------------------------------------- cleaning

def test_clean_text_drops_boilerplate_markup_and_garbage():
    raw = ("\ufeffThe Project Gutenberg EBook of X\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n"
           "### START: page.tif.txt ###\n#### Source: http://x\n\np.772:0\n\n"
           "Some   _italic_ text[^1]\nand *more*.\n\n[^1]: a footnote.\n\np.777:0 [[ed: TODO]]\n\n"
           "The plays:\n  * Hamlet (1603)\n  * Othello (1622).\n\n"
           "‘`»A``”% “ '`”``“ i 'ii7iiI -\n\n"
           "*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence text")
    assert corpus.clean_text(raw) == "Some italic text\nand more.\n\nThe plays:\n\nHamlet (1603)\n\nOthello (1622)."


def test_unwrap_joins_lines_hyphens_and_page_breaks():
    text = "He was born at Stratford-upon-\nAvon and Shake-\nspeare was\n\nbaptized there. New para.\n\nNext one."
    assert corpus.unwrap(text) == ("He was born at Stratford-upon-Avon and Shakespeare was baptized there. "
                                   "New para.\n\nNext one.")


# ---------------------------------------------------------------- user files and disjointness

def test_user_files_are_read_and_checked(tmp_path):
    good = write(tmp_path / "good.txt", prose("cat", 20))
    assert corpus.calibration_texts([good]) == [corpus.clean_text(prose("cat", 20))]
    assert "\n" not in corpus.evaluation_text([good]).split("\n\n")[0]  # prose is unwrapped per paragraph
    with pytest.raises(DataError, match="missing.txt does not exist"):
        corpus.calibration_texts([tmp_path / "missing.txt"])
    with pytest.raises(DataError, match=r"small.txt has 11 characters .* at least 500"):
        corpus.evaluation_text([write(tmp_path / "small.txt", "Hello there")])
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        corpus.distractor_text([write(tmp_path / "latin1.txt", "Caf\u00e9 " * 200, encoding="latin-1")])
    with pytest.raises(DataError, match="no text files"):
        corpus.evaluation_text([])


def test_check_disjoint_catches_same_path_and_same_content_under_another_name(tmp_path):
    a = write(tmp_path / "areopagitica.txt", prose("cat", 20))
    b = write(tmp_path / "areopagitica_gut.txt", prose("cat", 20).replace("\n", "\r\n"))
    c = write(tmp_path / "other.txt", prose("dog", 20))
    corpus.check_disjoint([c], [a, b])
    with pytest.raises(DataError, match="areopagitica.txt has the same text as calibration file .*areopagitica_gut"):
        corpus.check_disjoint([b, c], [a])
    with pytest.raises(DataError, match="other.txt is both a calibration and an evaluation file"):
        corpus.check_disjoint([c], [tmp_path / "." / "other.txt"])


# ---------------------------------------------------------------- the real packaged split

@pytest.mark.slow
def test_default_split_is_disjoint_and_large_enough():
    split = corpus.default_files()
    names = {role: [p.name for p in paths] for role, paths in split.items()}
    assert len(names["calibration"]) == 11 and all(n.endswith("_gut.txt") for n in names["calibration"])
    assert names["evaluation"] == ["britannica-11th.txt"] and names["distractor"] == ["areopagitica.txt"]
    # The same texts ship under two names; none of the evaluation side may hide in calibration.
    twins = [p.with_name("areopagitica_gut.txt") for p in split["distractor"]]
    with pytest.raises(DataError):
        corpus.check_disjoint(split["calibration"] + twins, split["distractor"])
    corpus.check_disjoint(None, None)
    calibration = corpus.calibration_texts()
    assert len(calibration) == 11 and min(map(len, calibration)) > 80_000
    text, distractors = corpus.evaluation_text(), corpus.distractor_text()
    assert "BIBLIOGRAPHY" not in text and "###" not in text and "tif.txt" not in text
    items = corpus.multiple_choice_items(text, distractors, n=200, seed=0)
    assert len(items) == 200 and all(it.choices[it.answer] in text for it in items)


def test_bits_per_byte_counts_the_utf8_bytes_of_the_scored_tokens():
    """Token k spells k characters ("é" is two bytes); each window's first token is not scored."""
    import math

    from pipeline.model.corpus import bits_per_byte

    class Spelling:
        def decode(self, ids, skip_special_tokens=True):
            return "".join("é" * k if k % 2 else "x" * k for k in ids)

    windows = np.array([[5, 1, 2, 3], [4, 2, 2, 1]])
    scored_bytes = (2 * 1 + 2 + 2 * 3) + (2 + 2 + 2 * 1)
    assert bits_per_byte(math.e, Spelling(), windows) == pytest.approx(6 / (math.log(2) * scored_bytes))
