"""Output folders: made with their parents, or refused with the path and the reason named."""
import os

import pytest

from ddetr_jax import errors
from ddetr_jax import output_folder


def test_make_creates_parents_and_accepts_an_existing_folder(tmp_path):
  path = tmp_path / "a" / "b"
  output_folder.make(str(path), "--out")
  assert path.is_dir()
  (path / "kept.txt").write_text("keep me")
  output_folder.make(str(path), "--out")  # already there: nothing changes.
  assert (path / "kept.txt").read_text() == "keep me"


def test_make_refuses_a_file_and_a_path_below_a_file(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("keep me")
  with pytest.raises(errors.InvalidInputError, match=r"^--out='x' is a file, not a folder$"):
    output_folder.make(str(afile), "--out='x'")
  with pytest.raises(errors.InvalidInputError,
                     match=rf"^workdir 'w' cannot be created: Not a directory \({afile}"):
    output_folder.make(str(afile / "run"), "workdir 'w'")
  assert afile.read_text() == "keep me"
  (tmp_path / "dangling").symlink_to(tmp_path / "gone")
  with pytest.raises(errors.InvalidInputError, match=r"^--out='d' is a link to nothing, not a folder$"):
    output_folder.make(str(tmp_path / "dangling"), "--out='d'")


def test_why_not_creatable_judges_the_nearest_existing_ancestor(tmp_path, monkeypatch):
  afile = tmp_path / "afile"
  afile.write_text("data")
  assert output_folder.why_not_creatable(str(tmp_path / "new" / "deeper")) is None
  assert output_folder.why_not_creatable(str(afile / "a" / "b")) == (
      f"{str(afile)!r} is a file, not a folder")
  monkeypatch.setattr(os, "access", lambda path, mode: path != str(tmp_path))
  assert output_folder.why_not_creatable(str(tmp_path / "new" / "deeper")) == (
      f"no permission to write in {str(tmp_path)!r}")
  assert not (tmp_path / "new").exists()  # checked, never made.
