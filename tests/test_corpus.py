"""data_dir's dataset folder: which files go up, in which layout, and the hash that decides whether they do."""

from __future__ import annotations

import json
import zipfile

import pytest

from kaggle_runner import corpus
from kaggle_runner.errors import KaggleRunnerError


def write_files(folder, names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"text of {name}\n")


def test_up_to_50_files_go_up_flat_with_sub_folders_folded_into_their_names(tmp_path):
    write_files(tmp_path / "mine", ["a.txt", "notes/b.md", "notes/deep/c.JSONL", ".hidden/d.txt", "e.png"])
    (tmp_path / "mine" / "link.txt").symlink_to(tmp_path / "mine" / "a.txt")
    built = corpus.build_corpus(tmp_path / "mine", tmp_path / "up", "alice/x-corpus", "X Corpus")
    assert sorted(p.name for p in built.folder.iterdir()) == [
        "a.txt", "dataset-metadata.json", "notes__b.md", "notes__deep__c.JSONL"]
    assert built.files == 3 and built.size == sum(len(f"text of {n}\n") for n in ("a.txt", "notes/b.md",
                                                                                   "notes/deep/c.JSONL"))
    assert json.loads((built.folder / "dataset-metadata.json").read_text())["id"] == "alice/x-corpus"


def test_past_50_files_the_corpus_goes_up_as_one_zip_keeping_its_paths(tmp_path):
    write_files(tmp_path / "mine", [f"part/{i:02d}.txt" for i in range(51)])
    built = corpus.build_corpus(tmp_path / "mine", tmp_path / "up", "alice/x-corpus", "X Corpus")
    assert sorted(p.name for p in built.folder.iterdir()) == ["corpus.zip", "dataset-metadata.json"]
    with zipfile.ZipFile(built.folder / "corpus.zip") as archive:
        assert len(archive.namelist()) == 51 and "part/50.txt" in archive.namelist()
        assert archive.read("part/07.txt") == b"text of part/07.txt\n"


def test_the_hash_follows_names_and_bytes_only(tmp_path):
    write_files(tmp_path / "mine", ["a.txt", "b.md"])
    _, first = corpus.content_hash(tmp_path / "mine")
    write_files(tmp_path / "mine", ["ignored.png"])
    assert corpus.content_hash(tmp_path / "mine")[1] == first
    (tmp_path / "mine" / "b.md").write_text("changed\n")
    _, changed = corpus.content_hash(tmp_path / "mine")
    (tmp_path / "mine" / "b.md").rename(tmp_path / "mine" / "c.md")
    assert len({first, changed, corpus.content_hash(tmp_path / "mine")[1]}) == 3


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: (root / "file.txt").write_text("x"), "is not a folder"),
    (lambda root: write_files(root / "file.txt", ["image.png"]), "holds no .txt, .md or .jsonl files"),
])
def test_a_folder_without_text_is_one_clear_error(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(KaggleRunnerError, match=message):
        corpus.content_hash(tmp_path / "file.txt")
