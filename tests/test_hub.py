"""The Hub download through `huggingface_hub`, against a local stand-in of the Hub's HTTP API.

The client is the real one: it resolves the revision, lists the tree, HEADs and GETs files, follows
redirects, resumes a dropped transfer. The stand-in (tests/hubstandin.py) also plays a broken or
hostile server: wrong hashes, paths that try to leave the cache, bodies without end.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import constants

from gemma3.data import hub as hubmod
from gemma3.data.hub import PINNED_REVISION, PINS, pinned_sha256, prepare_hub
from gemma3.data.raw import read_split
from gemma3.errors import Gemma3Error
from tests.hubstandin import Standin, serve, sha256
from tests.project import REPO, write_params

TRAIN_0 = ["Once there was a frog.", "The frog 🐸 jumped.\n\nIt was happy."]
TRAIN_1 = ["Lily had a red ball.", "Café for Ben."]
VALID = ["A small bird sang.", "The end."]
T0, T1, V = (
    "data/train-00000-of-00002.parquet",
    "data/train-00001-of-00002.parquet",
    "data/validation-00000-of-00001.parquet",
)


def parquet_bytes(texts: list[str | None]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), buf)
    return buf.getvalue()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite runs with HF_HUB_OFFLINE=1 (conftest); these tests talk to 127.0.0.1 only."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HF_ENDPOINT", "HF_TOKEN", "http_proxy", "HTTP_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture
def standin(online):
    servers = []

    def start(repo_id: str = "someone/tiny-stories", files: dict | None = None):
        hub = Standin(repo_id=repo_id)
        hub.files = dict(files or {T0: parquet_bytes(TRAIN_0), T1: parquet_bytes(TRAIN_1),
                                   V: parquet_bytes(VALID)})  # fmt: skip
        server, url = serve(hub)
        servers.append(server)
        return hub, url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and ".locks" not in p.parts)


def blobs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.glob("datasets--*/blobs/*"))


def download(tmp_path: Path, hub: Standin, url: str, name: str = "raw", **kw) -> dict:
    raw = tmp_path / name
    raw.mkdir(exist_ok=True)
    kw.setdefault("revision", "main")
    return prepare_hub(raw, repo_id=hub.repo_id, endpoint=url, cache_dir=tmp_path / "hf", **kw)


def test_download_through_the_client_verifies_and_caches(standin, tmp_path: Path) -> None:
    hub, url = standin()
    hub.faults = {T1: "redirect"}
    hub.extra_entries = [{"type": "directory", "path": "data/extra", "oid": "0" * 40}]
    hub.extra_entries.append({"type": "file", "path": "data/README.md", "size": 3, "oid": "1" * 40})
    info = download(tmp_path, hub, url)
    assert list(read_split(tmp_path / "raw", "train")) == TRAIN_0 + TRAIN_1
    assert list(read_split(tmp_path / "raw", "validation")) == VALID
    assert info["commit"] == hub.commit and info["revision"] == "main"
    assert info["train"]["files"] == {T0: sha256(hub.files[T0]), T1: sha256(hub.files[T1])}
    assert info["train"]["stories"] == 4
    assert info["train"]["bytes"] == sum(len(s.encode()) for s in TRAIN_0 + TRAIN_1)
    source = json.loads((tmp_path / "raw" / "source.json").read_text(encoding="utf-8"))
    assert source == info and str(tmp_path) not in json.dumps(source)
    # The standard HF cache layout: blobs named by sha256, snapshot links per commit, a ref.
    cache = tmp_path / "hf" / "datasets--someone--tiny-stories"
    assert blobs(tmp_path / "hf") == sorted(sha256(b) for b in hub.files.values())
    for path, data in hub.files.items():
        assert (cache / "snapshots" / hub.commit / path).read_bytes() == data
    assert (cache / "refs" / "main").read_text() == hub.commit
    assert sorted(hub.downloads()) == sorted(hub.files), hub.requests  # no README fetched
    assert ("GET", f"/cdn/{T1}") in [(m, p) for m, p, _ in hub.requests]

    # Second run: the listing is fetched, the bytes come from the cache (and are hashed again).
    hub.requests.clear()
    download(tmp_path, hub, url, "raw2")
    assert hub.downloads() == []
    assert (tmp_path / "raw2" / "train.jsonl").read_bytes() == (
        tmp_path / "raw" / "train.jsonl"
    ).read_bytes()


def test_token_goes_to_the_hub_not_to_the_cdn(standin, tmp_path, monkeypatch) -> None:
    hub, url = standin()
    hub.faults = {T0: "redirect"}
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    download(tmp_path, hub, url)
    for _method, path, headers in hub.requests:
        auth = headers.get("authorization")
        assert auth == (None if path.startswith("/cdn/") else "Bearer hf_test_token"), path


def test_dropped_transfer_resumes_with_a_range_request(standin, tmp_path, monkeypatch) -> None:
    # The client hands data to disk in chunks of this size (10 MB by default): small chunks let
    # a small file be dropped midway with some bytes already written.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64)
    hub, url = standin()
    hub.faults = {T0: "truncate_once"}
    download(tmp_path, hub, url)
    gets = [h.get("range") for m, p, h in hub.requests if m == "GET" and p.endswith(T0)]
    assert len(gets) == 2 and gets[0] is None and gets[1].startswith("bytes=")
    resumed_at = int(gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(hub.files[T0]) // 2  # only what was received is asked again
    assert list(read_split(tmp_path / "raw", "train")) == TRAIN_0 + TRAIN_1


def test_server_that_ignores_range_still_gives_the_right_file(
    standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64)
    hub, url = standin()
    hub.faults = {T0: "truncate_once+ignore_range"}  # the resumed request gets the whole file
    download(tmp_path, hub, url)
    gets = [h.get("range") for m, p, h in hub.requests if m == "GET" and p.endswith(T0)]
    assert len(gets) == 2 and gets[1] is not None
    assert list(read_split(tmp_path / "raw", "train")) == TRAIN_0 + TRAIN_1


def test_listed_sha256_mismatch_is_refused_and_nothing_stays(standin, tmp_path: Path) -> None:
    hub, url = standin()
    wrong = sha256(b"some other file")
    hub.listed_sha256[T1] = wrong
    with pytest.raises(Gemma3Error) as e:
        download(tmp_path, hub, url)
    msg = str(e.value)
    assert "\n" not in msg and T1 in msg and wrong in msg and "sha256" in msg
    assert T1 in hub.downloads()  # it did download, then refused
    assert sha256(hub.files[T1]) not in blobs(tmp_path / "hf")
    assert not list((tmp_path / "hf").rglob(f"*{Path(T1).name}"))  # nor its snapshot link
    assert not list((tmp_path / "hf").rglob("*.incomplete"))
    assert not (tmp_path / "raw" / "train.jsonl").exists()


def test_file_without_any_sha256_needs_an_explicit_opt_out(standin, tmp_path: Path) -> None:
    hub, url = standin()
    hub.listed_sha256[V] = None  # a listing without an LFS oid
    with pytest.raises(Gemma3Error, match=r"no pinned or listed sha256.*data\.hub\.verify: false"):
        download(tmp_path, hub, url)
    assert V not in hub.downloads()
    download(tmp_path, hub, url, verify=False)
    assert list(read_split(tmp_path / "raw", "validation")) == VALID


def tinystories_files() -> dict[str, bytes]:
    return {p: parquet_bytes([f"story of {p}"]) for p in PINS}


def test_pins_cover_every_tinystories_file_and_beat_the_listing(standin, tmp_path: Path) -> None:
    # The five REFERENCE.md pins, and the pinned revision, by value.
    assert PINNED_REVISION == "7dfb18bd830e361f237a94bcdb466bc6e7b09050"
    assert len(PINS) == 5 and {p.split("-")[0] for p in PINS} == {"data/train", "data/validation"}
    assert sorted(p for p in PINS if "/train-" in p) == [
        f"data/train-0000{i}-of-00004-{h}.parquet"
        for i, h in enumerate(
            ["2d5a1467fff1081b", "5852b56a2bd28fd9", "a26307300439e943", "d243063613e5a057"]
        )
    ]
    assert pinned_sha256(
        "roneneldan/TinyStories", "data/train-00003-of-00004-d243063613e5a057.parquet"
    ) == ("862514ae75723ddd339337f1ef7617b88f82290dcddd57445e1d38d257ca7891")
    assert pinned_sha256("someone/else", next(iter(PINS))) == ""

    # A mirror that lists matching hashes for other content is refused before any transfer.
    hub, url = standin("roneneldan/TinyStories", tinystories_files())
    with pytest.raises(Gemma3Error) as e:
        download(tmp_path, hub, url)
    assert "pinned TinyStories file" in str(e.value) and "\n" not in str(e.value)
    assert hub.downloads() == []

    # A mirror that lists the pinned hashes but serves other bytes: downloaded, hashed, refused.
    hub.listed_sha256 = dict(PINS)
    with pytest.raises(Gemma3Error, match="does not match the expected") as e:
        download(tmp_path, hub, url)
    assert len(hub.downloads()) == 1
    assert blobs(tmp_path / "hf") == []

    # The same files under another repo name are fine: the pins are TinyStories' own.
    other, url2 = standin("mirror/TinyStories", tinystories_files())
    info = download(tmp_path, other, url2)
    assert info["train"]["stories"] == 4 and info["validation"]["stories"] == 1


@pytest.mark.parametrize(
    "path",
    [
        "data/../../../../../tmp/gemma3-escape.parquet",
        "/tmp/gemma3-escape.parquet",
        "data/%2e%2e/%2e%2e/gemma3-escape.parquet",
        "data/sub/../../gemma3-escape.parquet",
    ],
)
def test_listing_with_an_escaping_path_is_refused(standin, tmp_path: Path, path: str) -> None:
    hub, url = standin()
    hub.extra_entries = [{"type": "file", "path": path, "size": 10, "oid": "2" * 40,
                          "lfs": {"oid": sha256(b"x"), "size": 10, "pointerSize": 134}}]  # fmt: skip
    before = set(Path("/tmp").glob("gemma3-escape*"))
    with pytest.raises(Gemma3Error, match="refusing a path") as e:
        download(tmp_path, hub, url)
    assert "\n" not in str(e.value)
    assert hub.downloads() == []
    assert set(Path("/tmp").glob("gemma3-escape*")) == before
    assert files_under(tmp_path / "hf") == [] if (tmp_path / "hf").exists() else True


@pytest.mark.parametrize(
    "fault, message",
    [
        ('etag:"../../../../../tmp/gemma3-etag"', "ETag"),
        ("etag:/tmp/gemma3-etag", "ETag"),
        ("commit:../../../gemma3-commit", "X-Repo-Commit"),
        ("endless", "more than the"),
        ("oversize", "more than the"),
    ],
)
def test_hostile_headers_and_bodies(standin, tmp_path: Path, fault: str, message: str) -> None:
    hub, url = standin()
    hub.faults = {T0: fault}
    t0 = time.monotonic()
    with pytest.raises(Gemma3Error, match=message) as e:
        download(tmp_path, hub, url)
    assert "\n" not in str(e.value)
    assert time.monotonic() - t0 < 30  # the endless body was cut off, not waited out
    assert not list(Path("/tmp").glob("gemma3-etag*"))
    assert not list(tmp_path.glob("gemma3-*"))
    cache = tmp_path / "hf"
    leftovers = (
        [p for p in files_under(cache) if p.name != "CACHEDIR.TAG"] if cache.exists() else []
    )
    assert leftovers == []  # no partial file, no blob, no link
    assert not (tmp_path / "raw" / "train.jsonl").exists()


def test_missing_repo_revision_and_file(standin, tmp_path: Path) -> None:
    hub, url = standin()
    with pytest.raises(Gemma3Error, match=r"404 .*wrong repo_id or revision"):
        prepare_hub(tmp_path, repo_id="nobody/nothing", endpoint=url, cache_dir=tmp_path / "hf")
    with pytest.raises(Gemma3Error, match=r"404 .*wrong repo_id or revision"):
        download(tmp_path, hub, url, revision="f" * 40)
    hub.faults = {V: "missing"}
    with pytest.raises(Gemma3Error, match="a listed file is missing on the server"):
        download(tmp_path, hub, url)
    hub.faults = {}
    del hub.files[V]
    with pytest.raises(Gemma3Error, match="no validation parquet files"):
        download(tmp_path, hub, url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_uses_the_cache_and_otherwise_names_the_alternatives(
    standin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # No network and nothing cached: the one-line error with the offline alternatives.
    for offline in (False, True):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        with pytest.raises(Gemma3Error) as e:
            prepare_hub(tmp_path, repo_id="someone/tiny-stories", revision="main", endpoint=dead,
                        cache_dir=tmp_path / "hf")  # fmt: skip
        msg = str(e.value)
        assert "\n" not in msg and "synthetic" in msg and "local path" in msg, msg
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    hub, url = standin()
    first = download(tmp_path, hub, url)
    # HF_HUB_OFFLINE=1: no request at all, same output, for the branch and for the commit.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    for rev in ("main", hub.commit):
        info = download(tmp_path, hub, url, f"off-{rev}", revision=rev)
        assert info["train"] == first["train"] and info["validation"] == first["validation"]
        assert (tmp_path / f"off-{rev}" / "train.jsonl").read_bytes() == (
            tmp_path / "raw" / "train.jsonl"
        ).read_bytes()
    assert hub.requests == []
    # Unreachable endpoint, offline flag not set: falls back to the cache too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    info = prepare_hub(tmp_path / "off-dead", repo_id=hub.repo_id, revision="main", endpoint=dead,
                       cache_dir=tmp_path / "hf")  # fmt: skip
    assert info["train"]["files"] == first["train"]["files"]
    # A snapshot missing a shard (an interrupted first download) is not taken for the dataset.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    link = tmp_path / "hf" / "datasets--someone--tiny-stories" / "snapshots" / hub.commit / T1
    target = os.readlink(link)
    link.unlink()
    with pytest.raises(Gemma3Error, match=r"HF cache holds an incomplete set of train shards"):
        download(tmp_path, hub, url, "off-partial")
    link.symlink_to(target)
    # A cached file that was corrupted is caught by its hash offline as well.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    blob = next((tmp_path / "hf").glob(f"datasets--*/blobs/{sha256(hub.files[T1])}"))
    blob.write_bytes(b"garbage")
    with pytest.raises(Gemma3Error, match="does not match the expected"):
        download(tmp_path, hub, url, "off-bad")


# ---------------------------------------------------------------------------------------------
# Through the download stage, as a user runs it


def stage_env(tmp_path: Path, url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_ENDPOINT": url,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_OFFLINE": "0",
            "HOME": str(tmp_path / "home"),
            "no_proxy": "127.0.0.1,localhost",
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def test_stage_downloads_and_ctrl_c_leaves_no_partial_file(standin, tmp_path: Path) -> None:
    hub, url = standin()
    big = [f"Story number {i} about a cat and a very long walk." * 4 for i in range(3000)]
    hub.files[T0] = parquet_bytes(big)
    hub.faults = {T0: "slow"}
    root = tmp_path / "ws"
    root.mkdir()
    (tmp_path / "home").mkdir()
    write_params(root, data={"source": hub.repo_id, "hub": {"repo_id": hub.repo_id,
                                                             "revision": "main"}})  # fmt: skip
    env = stage_env(tmp_path, url)
    proc = subprocess.Popen([sys.executable, "-m", "stages.download"], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 60
    while T0 not in hub.downloads() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # well inside the ~10 s dribble (49 KB at ~5 KB/s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    hf = tmp_path / "hf-home"
    assert not list(hf.rglob("*.incomplete")) and not blobs(hf / "hub")
    assert not (root / "data" / "raw").exists()
    assert not [p for p in (root / "data").iterdir()] if (root / "data").exists() else True
    assert list((tmp_path / "home").iterdir()) == []  # nothing in the user's home

    # Without the fault the stage completes; the output names the counts and the null rows.
    hub.faults = {}
    hub.files[V] = parquet_bytes(VALID + [None, None])
    done = subprocess.run([sys.executable, "-m", "stages.download"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        f"download: {hub.repo_id}@{hub.commit[:12]} -> data/raw (train: {len(big) + 2:,} stories; "
        "validation: 2 stories, 2 null rows skipped)"
    ), done.stdout
    assert list(read_split(root / "data" / "raw", "train")) == big + TRAIN_1
    assert list((tmp_path / "home").iterdir()) == []
    online_raw = (root / "data" / "raw" / "train.jsonl").read_bytes()

    # HF_HUB_OFFLINE=1: the same data from the HF cache, with no request to the server.
    hub.requests.clear()
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "stages.download"], cwd=root, env=offline,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert hub.requests == []
    assert (root / "data" / "raw" / "train.jsonl").read_bytes() == online_raw
    # ... and with an empty cache: one line naming the offline alternatives, exit 2.
    empty = {**offline, "HF_HOME": str(tmp_path / "empty-hf-home")}
    failed = subprocess.run([sys.executable, "-m", "stages.download"], cwd=root, env=empty,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download: error: cannot download")
    assert "data.source: synthetic" in lines[0] and "local path" in lines[0]
    assert (root / "data" / "raw" / "train.jsonl").read_bytes() == online_raw  # kept


def test_download_module_has_no_handwritten_http_client() -> None:
    hits = [p for p in (REPO / "gemma3").rglob("*.py") if "urllib" in p.read_text(encoding="utf-8")]
    assert hits == []
    assert hubmod.ALLOW_PATTERNS == ["data/*.parquet"]


def _small_file_limit() -> None:
    """In the child: writes past 256 KB fail with EFBIG, as on a full disk."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


def test_full_disk_during_download_names_the_cache(standin, tmp_path: Path) -> None:
    import random

    rng = random.Random(0)
    words = ["cat", "dog", "sun", "tree", "ball", "red", "ran", "saw", "big", "home"]
    noisy = [" ".join(rng.choice(words) + str(rng.randrange(10**6)) for _ in range(60))
             for _ in range(3000)]  # fmt: skip
    hub, url = standin()
    hub.files[T0] = parquet_bytes(noisy)
    assert len(hub.files[T0]) > 256 * 1024
    root = tmp_path / "ws"
    root.mkdir()
    (tmp_path / "home").mkdir()
    write_params(root, data={"source": hub.repo_id, "hub": {"repo_id": hub.repo_id,
                                                             "revision": "main"}})  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "stages.download"], cwd=root,
                          env=stage_env(tmp_path, url), capture_output=True, text=True,
                          timeout=300, preexec_fn=_small_file_limit)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("download:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"download: error: {tmp_path / 'hf-home' / 'hub'}")
    assert "cannot write (File too large)" in lines[0]
    assert not list((tmp_path / "hf-home").rglob("*.incomplete"))
    assert not (root / "data" / "raw").exists()
