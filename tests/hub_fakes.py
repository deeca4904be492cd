"""An offline stand-in for the Hub upload of ``push_to_hub``, shared by the tests that push."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Callable


def fake_hub_upload(monkeypatch, destination: Callable[[str], Path]) -> None:
    """push_to_hub's network calls copy the uploaded files into ``destination(repo_id)``; a new repo gets
    transformers' template card, as on the Hub."""
    import transformers.utils.hub as hub
    from huggingface_hub import ModelCard, ModelCardData

    def create_commit(repo_id, operations, **kwargs):
        for operation in operations:
            target = destination(repo_id) / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(operation.path_or_fileobj, target)
        return SimpleNamespace(commit_url="offline")

    api = SimpleNamespace(create_repo=lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id),
                          create_commit=create_commit)
    monkeypatch.setattr(hub, "hf_api", lambda: api)
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda repo_id, tags=None, token=None:
                        ModelCard.from_template(ModelCardData(tags=tags or [], library_name="transformers")))
