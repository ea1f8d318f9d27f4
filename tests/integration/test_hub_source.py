"""A Hugging Face Hub source (`raydpo.data.sources._hub`) without the Hub: `hub_filesystem` replaced
by a local fsspec filesystem over a folder laid out like the repository
(``datasets/<repo>/data/rl/*.parquet``), so the listing, the split rule, the format peek and the
error lines are raydpo's own code run for real; only the transport differs.

The driver lists the files and reads the first rows of the first one; Ray Data read tasks read the
files (the integration tier's cluster, for the one test that reads rows)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from raydpo.config import Config
from raydpo.data import sources
from raydpo.data.sample import generate_rows
from raydpo.data.sources import DataSourceError, hub_files, hub_path, records_to_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPO_ID = "lvwerra/stack-exchange-paired"
# parquet shards per data_dir and their names: one names its split, the other none (all "train" then)
FILES = {"data/rl": (3, "train-{i:05d}-of-{n:05d}.parquet"), "data/finetune": (2, "part-{i:05d}.parquet")}
ROWS_PER_FILE = 7


def _layout(root: Path) -> dict[str, list[pa.Table]]:
    """The repository under ``root``: parquet shards per data_dir, plus the files a repo also holds."""
    repo = root / "datasets" / REPO_ID
    tables: dict[str, list[pa.Table]] = {}
    for k, (data_dir, (n, name)) in enumerate(FILES.items()):
        (repo / data_dir).mkdir(parents=True)
        for i in range(n):
            rows = generate_rows(ROWS_PER_FILE, seed=100 * k + i)
            table = pa.Table.from_pylist([{c: r[c] for c in ("qid", "question", "date", "metadata", "response_j",
                                                             "response_k")} for r in rows])
            pq.write_table(table, repo / data_dir / name.format(i=i, n=n), row_group_size=4)
            tables.setdefault(data_dir, []).append(table)
    lines = generate_rows(5, seed=7)  # JSON Lines, as .jsonl and as .json (what Dataset.to_json writes)
    (repo / "data" / "lines").mkdir()
    for i, suffix in enumerate((".jsonl", ".json")):
        part = lines[3 * i:3 * i + 3]
        (repo / "data" / "lines" / f"train-{i}{suffix}").write_text("".join(json.dumps(r) + "\n" for r in part))
        tables.setdefault("data/lines", []).append(pa.Table.from_pylist(part))
    (repo / "README.md").write_text("---\nlicense: cc-by-sa-4.0\n---\n")
    (repo / "data" / "rl" / "dataset_info.json").write_text('{"features": {}}')  # metadata, not rows
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n")
    return tables


class HubLike(DirFileSystem):
    """What `huggingface_hub.HfFileSystem.find` does for a repository that does not exist (or is
    private without a token): FileNotFoundError naming it (hf_file_system.py `_raise_file_not_found`),
    where a local folder would list nothing."""

    def find(self, path, *args, **kwargs):
        repo = "/".join(path.split("/")[:3])
        if not self.fs.exists(self._join(repo)):
            raise FileNotFoundError(f"{repo} (repository not found). If the repo is private, make sure you are "
                                    "authenticated and your token has the required permissions.")
        return super().find(path, *args, **kwargs)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return root, _layout(root)


def _cfg(**data) -> Config:
    base = {"source": REPO_ID, "sft_data_dir": "data/finetune", "dpo_data_dir": "data/rl", "max_chars": 100_000}
    return Config().with_overrides({f"data.{k}": v for k, v in {**base, **data}.items()})


def _fs(root: Path, cls=DirFileSystem):
    return cls(path=str(root), fs=LocalFileSystem(), skip_instance_cache=True)  # each test its own (it patches some)


def _where(split: str = "train", data_dir: str = "data/rl", src: str = REPO_ID) -> str:
    return f"{src} (data_dir={data_dir}, split={split})"


# -- the driver's part: no Ray -------------------------------------------------------------------

def test_a_data_dir_is_its_data_files_in_name_order_without_the_repos_other_files(hub):
    root, _ = hub
    files = hub_files(_fs(root), hub_path(REPO_ID, "data/rl"), "train", _where())
    assert files == [("parquet", f"datasets/{REPO_ID}/data/rl/train-{i:05d}-of-00003.parquet") for i in range(3)]
    assert hub_path(REPO_ID, "data/rl/", revision="v1") == f"datasets/{REPO_ID}@v1/data/rl"


def test_splits_follow_the_datasets_keyword_rule(tmp_path):
    d = tmp_path / "datasets" / "o" / "r"
    d.mkdir(parents=True)
    for name in ("train-00000-of-00001.parquet", "test-00000-of-00001.parquet", "dev.jsonl"):
        (d / name).write_bytes(b"{}\n")
    fs, base = _fs(tmp_path), hub_path("o/r", None)
    assert [f.rsplit("/", 1)[1] for _, f in hub_files(fs, base, "test", "w")] == ["test-00000-of-00001.parquet"]
    assert hub_files(fs, base, "validation", "w") == [("jsonl", "datasets/o/r/dev.jsonl")]
    with pytest.raises(DataSourceError, match=r"^w: no files of split eval \(its files name test, train, validation\)"):
        hub_files(fs, base, "eval", "w")


def test_the_format_is_read_from_the_first_rows_of_the_first_file_only(hub, monkeypatch):
    root, _ = hub
    fs, opened = _fs(root), []
    real_open = fs.open
    monkeypatch.setattr(fs, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    rows = sources._hub_first_rows(fs, hub_files(fs, hub_path(REPO_ID, "data/rl"), "train", _where()))
    fmt, renderer = sources.resolve_format(_cfg().data, rows, _where())
    assert (fmt, renderer) == ("stack_exchange", None)
    assert opened == [f"datasets/{REPO_ID}/data/rl/train-00000-of-00003.parquet"]  # not the other two


def test_the_hub_filesystem_carries_the_drivers_token_to_the_read_tasks(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    fs = sources.hub_filesystem()
    assert type(fs).__name__ == "HfFileSystem" and fs.token == "hf_test_token_not_real"
    assert pickle.loads(pickle.dumps(fs)).token == "hf_test_token_not_real"  # what Ray ships to each task


@pytest.mark.parametrize("case, message", [
    ("unknown repo", "^nobody/nothing \\(data_dir=data/rl, split=train\\): FileNotFoundError: datasets/nobody/nothing "
                     "\\(repository not found\\)"),
    ("no network", f"^{REPO_ID} \\(data_dir=data/rl, split=train\\): ConnectionError: \\[Errno 101\\] Network is "
                   "unreachable$"),
    ("no data files", f"^{REPO_ID} \\(data_dir=data/none, split=train\\): no .parquet, .jsonl or .json files$"),
    ("other split", f"^{REPO_ID} \\(data_dir=data/finetune, split=test\\): its files name no split, so all of them "
                    "are split train; set data.split=train$"),
    ("missing split", f"^{REPO_ID} \\(data_dir=data/rl, split=test\\): no files of split test \\(its files name "
                      "train\\)$"),
    ("json array", r"^datasets/o/r/rows.json: a JSON array is read whole, not streamed from the Hub; use .jsonl or "
                   r".parquet files$"),
    ("broken parquet", r"^datasets/o/r/train.parquet: ArrowInvalid: .*"),
])
def test_a_source_that_cannot_be_read_stops_with_one_line(hub, tmp_path, monkeypatch, case, message):
    root, _ = hub
    fs, data = _fs(root, HubLike), {}
    if case == "unknown repo":
        data = {"source": "nobody/nothing"}
    elif case == "no network":
        def unreachable(*a, **k):
            raise ConnectionError("[Errno 101] Network is unreachable")
        monkeypatch.setattr(fs, "find", unreachable)
    elif case == "no data files":
        (root / "datasets" / REPO_ID / "data" / "none").mkdir(exist_ok=True)
        (root / "datasets" / REPO_ID / "data" / "none" / "notes.txt").write_text("no rows here")
        data = {"dpo_data_dir": "data/none"}
    elif case == "other split":
        data = {"split": "test", "dpo_data_dir": "data/finetune"}
    elif case == "missing split":
        data = {"split": "test"}
    else:
        (tmp_path / "datasets" / "o" / "r").mkdir(parents=True)
        name, body = ("rows.json", b' [{"prompt": "p"}]') if case == "json array" else ("train.parquet", b"PAR1 no")
        (tmp_path / "datasets" / "o" / "r" / name).write_bytes(body)
        fs, data = _fs(tmp_path, HubLike), {"source": "o/r", "dpo_data_dir": None}
    monkeypatch.setattr(sources, "hub_filesystem", lambda: fs)
    with pytest.raises(DataSourceError, match=message) as e:
        sources.read(_cfg(**data).data, "dpo")
    assert "\n" not in str(e.value)


# -- Ray Data reads the files --------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_local(ray_connected):
    """The session's cluster (tests/integration/conftest.py), joined by this process."""
    return ray_connected


def test_ray_read_tasks_stream_the_stage_data_dir_and_the_driver_never_holds_the_table(hub, ray_local,
                                                                                        monkeypatch, capsys):
    import datasets
    import ray
    from ray.data.dataset import MaterializedDataset

    root, tables = hub
    monkeypatch.setattr(sources, "hub_filesystem", lambda: _fs(root))

    def driver_table(*a, **k):
        raise AssertionError("the table passed through the driver")

    for mod, name in ((datasets, "load_dataset"), (ray.data, "from_arrow"), (ray.data, "from_items")):
        monkeypatch.setattr(mod, name, driver_table)
    cfg = _cfg().data
    for stage, data_dir in (("dpo", "data/rl"), ("sft", "data/finetune"), ("dpo", "data/lines")):
        ds, fmt = sources.read(cfg.model_copy(update={"dpo_data_dir": data_dir}) if stage == "dpo" else cfg, stage)
        assert fmt == "stack_exchange"
        # a lazy plan that starts with the file read (its tasks run on the workers), nothing computed yet
        capsys.readouterr()
        ds.explain()
        plan = capsys.readouterr().out.split("-------- Physical Plan")[0]
        read_op = "ReadBinary" if data_dir == "data/lines" else "ReadFilesParquet"
        assert read_op in plan and not isinstance(ds, MaterializedDataset)
        want = records_to_rows(pa.concat_tables(tables[data_dir]), **sources._opts(cfg, fmt, None)).to_pylist()
        key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
        assert sorted(ds.take_all(), key=key) == sorted(want, key=key)
        assert len(want) == (5 if data_dir == "data/lines" else FILES[data_dir][0] * ROWS_PER_FILE)
        assert all(r["reason"] == "" for r in want)
    limited, _ = sources.read(_cfg(max_rows=5).data, "dpo")
    assert limited.count() == 5
