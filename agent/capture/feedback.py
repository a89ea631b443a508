"""The body of ``POST /v2/models/{name}/feedback`` (docs/agent.md, Field labels), checked."""

from __future__ import annotations

from typing import Any

from agent.errors import HTTPError

MAX_ID = 128
MAX_LABELS = 1024


def parse_feedback(doc: Any) -> tuple[str, list[int | str]]:
    """(request id, labels): ``{"id": ID, "label": L}`` or ``{"id": ID, "labels": [L, ...]}``; each label a
    class index or a label name. HTTPError 400 naming the field otherwise."""
    if not isinstance(doc, dict):
        raise HTTPError(400, 'expected a JSON object {"id": "<request id>", "label": <class>}')
    rid = doc.get("id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID:
        raise HTTPError(400, f"id: expected the request's id (a string of at most {MAX_ID} characters), as the "
                             "infer response gave it")
    if ("label" in doc) == ("labels" in doc):
        raise HTTPError(400, 'give exactly one of "label" (one sample) or "labels" (one per sample)')
    labels = [doc["label"]] if "label" in doc else doc["labels"]
    if not isinstance(labels, list) or not 0 < len(labels) <= MAX_LABELS:
        raise HTTPError(400, f"labels: expected a list of 1 to {MAX_LABELS} labels")
    for i, x in enumerate(labels):
        if isinstance(x, bool) or not isinstance(x, (int, str)) or (isinstance(x, str) and len(x) > 200):
            raise HTTPError(400, f"labels[{i}]: expected a class index or a label name, got {type(x).__name__}")
    return rid, labels
