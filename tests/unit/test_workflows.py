"""Workflow files: found by name, parsed once per version of the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.llm.comfyui import WorkflowError, load_workflow


def write_workflow(folder: Path, name: str, text_node: str) -> Path:
    path = folder / f"{name}.json"
    path.write_text(
        json.dumps(
            {
                "workflow": {text_node: {"class_type": "CLIPTextEncode", "inputs": {}}},
                "inputs": {"prompt": [text_node, "text"]},
            }
        )
    )
    return path


def test_an_edited_workflow_is_read_again_and_an_unchanged_one_is_not(tmp_path: Path) -> None:
    path = write_workflow(tmp_path, "mine", "6")
    first = load_workflow("mine", tmp_path)
    assert load_workflow("mine", tmp_path) is first  # unchanged: the parsed one again

    write_workflow(tmp_path, "mine", "77")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    edited = load_workflow("mine", tmp_path)
    assert edited.inputs["prompt"] == ("77", "text")


def test_a_folder_workflow_shadows_the_packaged_one_and_a_missing_one_is_an_error(
    tmp_path: Path,
) -> None:
    assert "prompt" in load_workflow("txt2img", None).inputs
    write_workflow(tmp_path, "txt2img", "42")
    assert load_workflow("txt2img", tmp_path).inputs["prompt"] == ("42", "text")
    with pytest.raises(WorkflowError, match="no workflow"):
        load_workflow("absent", tmp_path)


def test_a_broken_file_is_an_error_every_time(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    for _ in range(2):
        with pytest.raises(WorkflowError, match="cannot read"):
            load_workflow("bad", tmp_path)
