"""Fixtures shared by the integration tests."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest


@pytest.fixture(scope="session")
def tiny_sft_data(synth_corpus, tmp_path_factory):
    """4 trainable rows, 2 whose response cannot fit max_len=96, 1 unparseable line."""
    shard = sorted((synth_corpus / "train").glob("*.parquet"))[0]
    rows = [r for r in pq.read_table(shard).to_pylist()
            if not json.loads(r["meta"]).get("garbage")][:4]
    lines = [json.dumps({"id": r["id"], "messages": r["messages"]}) for r in rows]
    long = "many words " * 200
    lines += [json.dumps({"id": f"long{i}", "messages": [{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": long}]})
              for i in range(2)]
    lines.append("{not json")
    path = tmp_path_factory.mktemp("sftdata") / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
