"""MovieLens loading, preprocessing (paper Sec. 5.2), caching and the verified download."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from goldstone_cli.cli import app
from goldstone_cli.data import movielens as ml
from goldstone_cli.data.download import (ChecksumMismatchError, DownloadError, download_file,
                                         parse_checksum_file, unpack_zip)
from goldstone_cli.data.movielens import MalformedRatingsError, load_movielens

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ML_SMALL = SHARED / "movielens" / "ml-latest-small" / "ratings.csv"


@pytest.fixture(scope="module")
def small_csv() -> Path:
    if not ML_SMALL.is_file():
        pytest.skip(f"real MovieLens sample not found at {ML_SMALL} (see ../shared/data/README.md)")
    return ML_SMALL


@pytest.fixture(scope="module")
def small_df(small_csv) -> pd.DataFrame:
    return pd.read_csv(small_csv)


@pytest.fixture(scope="module")
def small(small_csv, tmp_path_factory) -> ml.MovieLensData:
    return load_movielens(small_csv, T=100, seed=0, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def _assert_same(a: ml.MovieLensData, b: ml.MovieLensData) -> None:
    for k in ("user", "item", "t", "x", "split", "bin_edges", "user_ids", "item_ids"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k), err_msg=k)
    assert (a.n_users, a.n_items, a.T, a.median) == (b.n_users, b.n_items, b.T, b.median)


# ---------------------------------------------------------------------------------------------
# Preprocessing on the real ml-latest-small


def test_counts_and_median_binarization_match_pandas(small, small_df):
    assert len(small_df) == 100_836 and small_df.userId.nunique() == 610
    assert small.source.n_raw == 100_836 and small.source.layout == "csv"
    median = small_df.rating.median()  # independent: pandas
    assert small.median == median == 3.5
    kept = small_df[small_df.rating != median]
    assert len(small) == len(kept) == 100_836 - (small_df.rating == median).sum()
    assert small.source.n_dropped_at_median == (small_df.rating == median).sum()
    np.testing.assert_array_equal(small.x, np.where(kept.rating > median, 1, -1))
    assert small.x.dtype == np.int8 and set(np.unique(small.x)) == {-1, 1}
    # ids: contiguous over all kept ratings, sorted by original id, and round-trip to the file's ids
    assert small.n_users == kept.userId.nunique() and small.n_items == kept.movieId.nunique()
    np.testing.assert_array_equal(small.user_ids, np.sort(kept.userId.unique()))
    np.testing.assert_array_equal(small.item_ids, np.sort(kept.movieId.unique()))
    np.testing.assert_array_equal(small.user_ids[small.user], kept.userId.to_numpy())
    np.testing.assert_array_equal(small.item_ids[small.item], kept.movieId.to_numpy())
    for a in (small.user, small.item, small.t):
        assert a.dtype == np.int64
    assert small.user.min() == 0 and small.user.max() == small.n_users - 1
    assert small.item.min() == 0 and small.item.max() == small.n_items - 1


@pytest.mark.parametrize("T", [100, 7, 1])
def test_time_bins_equal_duration_and_cover_the_range(small_csv, small_df, tmp_path, T):
    d = load_movielens(small_csv, T=T, cache_dir=tmp_path, progress=False)
    ts = small_df.timestamp[small_df.rating != small_df.rating.median()].to_numpy()
    lo, hi = ts.min(), ts.max()
    assert d.bin_edges.shape == (T + 1,) and d.bin_edges[0] == lo and d.bin_edges[-1] == hi
    np.testing.assert_allclose(np.diff(d.bin_edges), (hi - lo) / T)
    # independent exact computation: bin t covers [lo + t*(hi-lo)/T, lo + (t+1)*(hi-lo)/T)
    np.testing.assert_array_equal(d.t, np.minimum((ts - lo) * T // (hi - lo), T - 1))
    assert d.t.min() == 0 and d.t.max() == T - 1
    assert np.all(d.bin_edges[d.t] <= ts) and np.all((ts < d.bin_edges[d.t + 1]) | (ts == hi))
    assert str(d.bin_dates()[0]) == "1996-03-29T18:36:55"


def test_split_fractions_determinism_and_tensors(small_csv, small, tmp_path):
    n = len(small)
    counts = np.bincount(small.split, minlength=3)
    assert counts.tolist() == [round(0.5 * n), round(0.2 * n), n - round(0.5 * n) - round(0.2 * n)]
    again = load_movielens(small_csv, seed=0, use_cache=False, progress=False)
    _assert_same(small, again)
    other = load_movielens(small_csv, seed=1, use_cache=False, progress=False)
    assert not np.array_equal(other.split, small.split)
    np.testing.assert_array_equal(np.bincount(other.split, minlength=3), counts)
    np.testing.assert_array_equal(other.x, small.x)
    # random across all bins: in each half of the time range the train share is close to 50%
    early = small.t < 50
    for part in (early, ~early):
        assert abs((small.split[part] == 0).mean() - 0.5) < 0.02
    custom = load_movielens(small_csv, split_fractions=(0.8, 0.1, 0.1), use_cache=False, progress=False)
    assert np.bincount(custom.split).tolist()[:2] == [round(0.8 * n), round(0.1 * n)]

    sizes = 0
    for name, code in (("train", 0), ("val", 1), ("test", 2)):
        s = small.split_tensors(name)
        m = small.split == code
        assert all(v.shape == (m.sum(),) for v in s)
        assert s.user.dtype == s.item.dtype == s.t.dtype == torch.int64 and s.x.dtype == torch.float32
        np.testing.assert_array_equal(s.user.numpy(), small.user[m])
        np.testing.assert_array_equal(s.x.numpy(), small.x[m].astype(np.float32))
        sizes += len(s.x)
    assert sizes == n
    with pytest.raises(ValueError, match="unknown split"):
        small.split_mask("holdout")


def test_bad_settings_are_rejected(small_csv):
    with pytest.raises(ValueError, match="positive integer"):
        load_movielens(small_csv, T=0, use_cache=False)
    with pytest.raises(ValueError, match="summing to 1"):
        load_movielens(small_csv, split_fractions=(0.5, 0.5, 0.5), use_cache=False)


# ---------------------------------------------------------------------------------------------
# Layouts


def _write_layouts(df_str: pd.DataFrame, folder: Path) -> dict[str, Path]:
    """The same ratings as ratings.csv, ratings.dat ('::') and u.data (tab, no header)."""
    rows = df_str[["userId", "movieId", "rating", "timestamp"]].to_numpy()
    paths = {}
    for layout, name, sep, header in (("csv", "ratings.csv", ",", "userId,movieId,rating,timestamp\n"),
                                      ("dat", "ratings.dat", "::", ""), ("udata", "u.data", "\t", "")):
        sub = folder / layout
        sub.mkdir()
        (sub / name).write_text(header + "".join(sep.join(r) + "\n" for r in rows))
        paths[layout] = sub
    return paths


def test_all_three_layouts_give_identical_results(small_csv, small, tmp_path):
    df_str = pd.read_csv(small_csv, dtype=str)  # keep the exact text of every field
    paths = _write_layouts(df_str, tmp_path)
    for layout, folder in paths.items():
        assert ml.detect_layout(ml.find_ratings_file(folder)) == layout
        d = load_movielens(folder, cache_dir=tmp_path / "cache", progress=False)  # found from the folder
        assert d.source.layout == layout and d.source.n_raw == 100_836
        _assert_same(d, small)
    # CRLF line endings (files edited on Windows) parse the same
    crlf = tmp_path / "crlf" / "u.data"
    crlf.parent.mkdir()
    crlf.write_bytes((paths["udata"] / "u.data").read_bytes().replace(b"\n", b"\r\n"))
    _assert_same(load_movielens(crlf, use_cache=False, progress=False), small)


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_miss_and_invalidation(small_csv, tmp_path):
    raw = tmp_path / "ml" / "ratings.csv"
    raw.parent.mkdir()
    raw.write_bytes(small_csv.read_bytes())
    cache = tmp_path / "cache"
    first = load_movielens(raw, cache_dir=cache, progress=False)
    assert not first.source.from_cache and Path(first.source.cache_path).is_file()
    hit = load_movielens(raw, cache_dir=cache, progress=False)
    assert hit.source.from_cache and hit.source.cache_path == first.source.cache_path
    _assert_same(first, hit)

    for settings in ({"T": 50}, {"seed": 3}, {"split_fractions": (0.6, 0.2, 0.2)}):
        d = load_movielens(raw, cache_dir=cache, progress=False, **settings)
        assert not d.source.from_cache, settings
        assert d.source.cache_path != first.source.cache_path
        assert load_movielens(raw, cache_dir=cache, progress=False, **settings).source.from_cache
    assert len(list(cache.glob("*.npz"))) == 4

    # same content under a new modification time: still a hit (the key is the content hash)
    raw.touch()
    assert load_movielens(raw, cache_dir=cache, progress=False).source.from_cache
    # changed content (one rating 4.0 -> 1.0, same file size): miss, and the result changes
    text = raw.read_text().splitlines(keepends=True)
    assert text[1] == "1,1,4.0,964982703\n"
    text[1] = "1,1,1.0,964982703\n"
    raw.write_text("".join(text))
    changed = load_movielens(raw, cache_dir=cache, progress=False)
    assert not changed.source.from_cache and changed.source.content_sha256 != first.source.content_sha256
    assert changed.x[0] == -1 and first.x[0] == 1
    assert load_movielens(raw, cache_dir=cache, progress=False).source.from_cache


def test_interrupted_cache_write_is_never_used(small_csv, small, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_savez = np.savez

    def savez_then_crash(f, **arrays):
        real_savez(f, **{k: arrays[k] for k in list(arrays)[:3]})  # part of the arrays on disk...
        raise KeyboardInterrupt  # ...then Ctrl-C

    monkeypatch.setattr(ml.np, "savez", savez_then_crash)
    with pytest.raises(KeyboardInterrupt):
        load_movielens(small_csv, cache_dir=cache, progress=False)
    monkeypatch.setattr(ml.np, "savez", real_savez)
    assert list(cache.iterdir()) == []  # no final file and no temporary left behind
    d = load_movielens(small_csv, cache_dir=cache, progress=False)
    assert not d.source.from_cache
    _assert_same(d, small)

    # a truncated cache file under the final name (e.g. a disk that filled up while copying)
    path = Path(d.source.cache_path)
    good = path.read_bytes()
    for cut in (len(good) // 2, len(good) - 10, 100):
        path.write_bytes(good[:cut])
        with pytest.warns(UserWarning, match="damaged cache"):
            again = load_movielens(small_csv, cache_dir=cache, progress=False)
        assert not again.source.from_cache
        _assert_same(again, small)
        assert path.read_bytes() == good  # rebuilt in place

    # a flipped byte inside an array is caught by the zip member's CRC-32
    zf = zipfile.ZipFile(path)
    info = zf.getinfo("x.npy")
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    zf.close()
    corrupt = bytearray(good)
    corrupt[offset] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.warns(UserWarning, match="damaged cache"):
        assert not load_movielens(small_csv, cache_dir=cache, progress=False).source.from_cache

    # a complete file whose key belongs to other settings (copied over by hand) is not used either
    other = load_movielens(small_csv, T=10, cache_dir=cache, progress=False)
    path.write_bytes(Path(other.source.cache_path).read_bytes())
    with pytest.warns(UserWarning, match="key does not match"):
        d = load_movielens(small_csv, cache_dir=cache, progress=False)
    assert not d.source.from_cache and d.T == 100
    _assert_same(d, small)


_KILLED_WRITER = """
import sys, time
from pathlib import Path
import numpy as np
from goldstone_cli.data import movielens as ml
real_savez = np.savez
def savez_and_hang(f, **arrays):
    real_savez(f, **{k: arrays[k] for k in list(arrays)[:3]})  # part of the cache file on disk
    f.flush()
    Path(sys.argv[3]).write_text("writing")
    time.sleep(600)
ml.np.savez = savez_and_hang
ml.load_movielens(sys.argv[1], cache_dir=sys.argv[2], progress=False)
"""


def test_a_cache_write_killed_by_sigkill_leaves_a_temporary_that_the_next_load_removes(small_csv, small, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from goldstone_cli.io import remove_abandoned_temporaries

    cache, ready = tmp_path / "cache", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(small_csv), str(cache), str(ready)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.returncode
        temps = [p for p in cache.iterdir() if p.name.endswith(".npz.tmp")]
        assert len(temps) == 1 and temps[0].stat().st_size > 0
        assert remove_abandoned_temporaries(cache) == [] and temps[0].exists()  # its writer still runs
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    d = load_movielens(small_csv, cache_dir=cache, progress=False)
    assert not d.source.from_cache
    _assert_same(d, small)
    assert [p.name for p in cache.iterdir()] == [Path(d.source.cache_path).name]  # the temporary is gone


def test_unwritable_cache_warns_and_still_loads(small_csv, small, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="Could not write the MovieLens cache"):
        d = load_movielens(small_csv, cache_dir=blocker / "sub", progress=False)
    assert d.source.cache_path is None
    _assert_same(d, small)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_data_set_says_where_it_looked_and_how_to_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_movielens("ml-20m", data_dir=tmp_path / "data", use_cache=False)
    msg = str(e.value)
    assert str(tmp_path / "data" / "ml-20m") in msg and "ratings.csv" in msg and "u.data" in msg
    assert f"goldstone data download movielens --variant ml-20m --dest {tmp_path / 'data'}" in msg

    with pytest.raises(FileNotFoundError) as e:
        load_movielens(tmp_path / "data" / "ml-25m" / "ratings.csv", use_cache=False)
    assert f"--variant ml-25m --dest {tmp_path / 'data'}" in str(e.value)
    # a path not named like a data set: --dest / would have written /ml-20m, not this path
    with pytest.raises(FileNotFoundError) as e:
        load_movielens(tmp_path / "mydata", use_cache=False)
    assert "--variant ml-20m --dest data\n" in str(e.value) and "then train with data.path=data/ml-20m" in str(e.value)

    empty = tmp_path / "data" / "ml-1m"
    empty.mkdir(parents=True)
    (empty / "movies.dat").write_text("1::Toy Story (1995)::Animation\n")
    with pytest.raises(FileNotFoundError) as e:
        load_movielens(empty, use_cache=False)
    assert "ratings.dat" in str(e.value) and "movies.dat" in str(e.value) and "--variant ml-1m" in str(e.value)


@pytest.mark.parametrize("name, content, line, what", [
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,3,4.0,101\n2,x,1.0,102\n", 4, "item id 'x'"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,3,4.0\n", 3, "expected 4 fields"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n\n1,3,nan,101\n", 4, "rating 'nan'"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,3,inf,101\n", 3, "rating 'inf'"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,3,,101\n", 3, "rating ''"),
    ("ratings.csv", "user,movie,rating,time\n1,2,3.5,100\n", 1, "unexpected header"),
    ("ratings.dat", "1::2::3::100\n1::3::4::101\n1:4::5::102\n", 3, "stray ':'"),
    ("ratings.dat", "1::2::3::100\n1::3::4::1.5e9\n", 2, "timestamp '1.5e9'"),
    ("u.data", "1\t2\t3\t100\n1\t3\t4\t101\t7\n", 2, "got 5"),
    ("u.data", "   \n\n", None, "empty"),
    ("u.data", "1 2 3 100\n", 1, "unrecognized layout"),
    # issue: whitespace-only line, int64 overflow, negative timestamp, exact repeats, blank line before the header
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n   \n1,3,4.0,101\n", 3, "a line of only spaces"),
    ("u.data", "1\t2\t3\t100\n \t \n", 2, "a line of only spaces"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n99999999999999999999,3,4.0,101\n", 3,
     "user id '99999999999999999999' does not fit in a 64-bit integer"),
    ("ratings.dat", "1::2::3::100\n1::9223372036854775808::4::101\n", 2, "item id '9223372036854775808' does not fit"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,3,4.0,-5\n2,3,4.0,-7\n", 3,
     "2 ratings have a negative timestamp (before 1970), the first is line 3 (user 1, item 3, rating 4, timestamp -5)"),
    ("u.data", "1\t2\t3\t100\n\n1\t3\t4\t-1\n", 3, "1 rating has a negative timestamp"),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.5,100\n1,3,4.0,101\n1,3,4.0,101\n2,1,1.0,5\n", 4,
     "1 row repeats an earlier row exactly (same user, item, rating and timestamp), the first is line 4 "
     "(user 1, item 3, rating 4, timestamp 101), a repeat of line 3. Remove the repeated lines"),
    # sorted by (user, item), the repeat not adjacent (a re-rating in between); empty lines shift the lines
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,3,4.0,101\n\n1,3,2.0,200\n\n1,3,4.0,101\n1,3,2.0,200\n", 6,
     "2 rows repeat an earlier row exactly (same user, item, rating and timestamp), the first is line 6 "
     "(user 1, item 3, rating 4, timestamp 101), a repeat of line 2."),
    ("ratings.dat", "5::1::3::100\n1::2::3::100\n5::1::3::100\n", 3, "a repeat of line 1"),  # unsorted
    ("ratings.csv", "\n\nuserId,movieId,rating,timestamp\n1,2,3.5,100\n1,x,4.0,101\n", 5, "item id 'x'"),
])
def test_malformed_rows_name_file_and_line(tmp_path, name, content, line, what):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MalformedRatingsError) as e:
        load_movielens(path, use_cache=False, progress=False)
    assert e.value.path == path and e.value.line == line
    assert str(path) in str(e.value) and what in str(e.value)
    if line is not None:
        assert f"line {line}" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Verified download against a local HTTP server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/datasets/movielens"
    httpd.shutdown()
    httpd.server_close()


RATINGS = "userId,movieId,rating,timestamp\n1,10,4.0,1000\n1,20,1.0,2000\n2,10,5.0,3000\n2,30,2.5,4000\n3,20,3.5,5000\n"


def _publish(root: Path, variant: str, files: dict[str, str], corrupt: bool = False, md5_style: str = "bsd") -> str:
    """Serve <variant>.zip (folder <variant>/ with ``files``) and its .md5; return the true MD5."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(f"{variant}/{name}", text)
    data = buf.getvalue()
    md5 = hashlib.md5(data).hexdigest()
    folder = root / "datasets" / "movielens"
    folder.mkdir(parents=True, exist_ok=True)
    if corrupt:  # one flipped bit in the middle of the transfer
        data = bytearray(data)
        data[len(data) // 2] ^= 0x01
        data = bytes(data)
    (folder / f"{variant}.zip").write_bytes(data)
    line = f"MD5 ({variant}.zip) = {md5}\n" if md5_style == "bsd" else f"{md5}  {variant}.zip\n"
    (folder / f"{variant}.zip.md5").write_text(line)
    return md5


def _cli(*args: str):
    return CliRunner().invoke(app, ["data", "download", "movielens", *args])


def test_download_verifies_and_unpacks(server, tmp_path):
    root, url = server
    _publish(root, "ml-latest-small", {"ratings.csv": RATINGS, "README.txt": "terms\n"})
    dest = tmp_path / "data"
    r = _cli("--variant", "ml-latest-small", "--dest", str(dest), "--base-url", url)
    assert r.exit_code == 0, r.output
    assert "downloaded and verified" in r.output
    assert (dest / "ml-latest-small" / "ratings.csv").read_text() == RATINGS
    assert sorted(p.name for p in dest.iterdir()) == ["ml-latest-small"]  # zip and temp files are gone
    d = load_movielens("ml-latest-small", data_dir=dest, use_cache=False, progress=False, T=2)
    assert d.source.n_raw == 5 and d.median == 3.5 and d.x.tolist() == [1, -1, 1, -1]

    r = _cli("--variant", "ml-latest-small", "--dest", str(dest), "--base-url", url)
    assert r.exit_code == 0 and "already present" in r.output
    # --force replaces the folder with a fresh copy; --keep-zip keeps the verified archive
    (dest / "ml-latest-small" / "ratings.csv").write_text("edited")
    r = _cli("--variant", "ml-latest-small", "--dest", str(dest), "--base-url", url, "--force", "--keep-zip")
    assert r.exit_code == 0, r.output
    assert (dest / "ml-latest-small" / "ratings.csv").read_text() == RATINGS
    assert sorted(p.name for p in dest.iterdir()) == ["ml-latest-small", "ml-latest-small.zip"]


def test_base_url_from_environment_and_gnu_md5(server, tmp_path, monkeypatch):
    root, url = server
    _publish(root, "ml-latest-small", {"ratings.csv": RATINGS}, md5_style="gnu")
    monkeypatch.setenv("GOLDSTONE_MOVIELENS_URL", url)
    folder, downloaded = ml.download_movielens("ml-latest-small", tmp_path / "d", progress=False)
    assert downloaded and (folder / "ratings.csv").read_text() == RATINGS


def test_corrupt_download_is_detected_and_removed(server, tmp_path):
    root, url = server
    _publish(root, "ml-latest-small", {"ratings.csv": RATINGS}, corrupt=True)
    dest = tmp_path / "data"
    r = _cli("--variant", "ml-latest-small", "--dest", str(dest), "--base-url", url)
    assert r.exit_code == 1
    assert "Checksum mismatch" in r.output and "deleted" in r.output
    assert list(dest.iterdir()) == []  # no zip, no .part file, nothing unpacked

    # an existing good copy survives a failed --force download untouched
    (dest / "ml-latest-small").mkdir()
    (dest / "ml-latest-small" / "ratings.csv").write_text(RATINGS)
    with pytest.raises(ChecksumMismatchError):
        ml.download_movielens("ml-latest-small", dest, base_url=url, force=True, progress=False)
    assert sorted(p.name for p in dest.rglob("*")) == ["ml-latest-small", "ratings.csv"]


def test_pinned_checksum_and_md5_override(server, tmp_path):
    root, url = server
    udata = "1\t10\t4\t1000\n2\t10\t2\t2000\n3\t20\t5\t3000\n"
    md5 = _publish(root, "ml-100k", {"u.data": udata})  # a fake ml-100k: its .md5 differs from the pin
    dest = tmp_path / "data"
    r = _cli("--variant", "ml-100k", "--dest", str(dest), "--base-url", url)
    assert r.exit_code == 1 and "differs from the MD5 pinned" in r.output
    assert not dest.exists() or list(dest.iterdir()) == []
    r = _cli("--variant", "ml-100k", "--dest", str(dest), "--base-url", url, "--md5", md5)
    assert r.exit_code == 0, r.output
    d = load_movielens(dest / "ml-100k", use_cache=False, progress=False, T=3)
    assert d.source.layout == "udata" and d.median == 4.0 and d.x.tolist() == [-1, 1]


def test_missing_md5_file_and_bad_url(server, tmp_path):
    root, url = server
    _publish(root, "ml-latest-small", {"ratings.csv": RATINGS})
    (root / "datasets" / "movielens" / "ml-latest-small.zip.md5").unlink()
    r = _cli("--variant", "ml-latest-small", "--dest", str(tmp_path / "d"), "--base-url", url)
    assert r.exit_code == 1 and "HTTP 404" in r.output and "--md5" in r.output
    # no .md5 reachable: falls back to the pin, then fails on the zip; the CLI says only that (one line)
    r = _cli("--variant", "ml-20m", "--dest", str(tmp_path / "d"), "--base-url", "http://127.0.0.1:9/none")
    assert r.exit_code == 1 and "Could not reach http://127.0.0.1:9/none/ml-20m.zip" in r.output
    assert "pinned MD5" not in r.output and len(r.output.strip().splitlines()) == 1
    from goldstone_cli.data.download import DownloadError
    from goldstone_cli.data.movielens import download_movielens

    with pytest.warns(UserWarning, match="pinned MD5"), pytest.raises(DownloadError, match="ml-20m.zip"):
        download_movielens("ml-20m", tmp_path / "d", base_url="http://127.0.0.1:9/none")  # the library warns
    assert not (tmp_path / "d").exists() or list((tmp_path / "d").iterdir()) == []


def test_truncated_transfer_is_an_error(tmp_path):
    body = b"x" * 5000

    class Short(_QuietHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body)  # then the connection closes early

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DownloadError, match="interrupted|truncated"):
            download_file(f"http://127.0.0.1:{httpd.server_address[1]}/f.zip", tmp_path / "f.zip",
                          md5=hashlib.md5(body).hexdigest(), progress=False)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert list(tmp_path.iterdir()) == []


def test_checksum_file_parsing_and_zip_slip(tmp_path):
    h = "cd245b17a1ae2cc31bb14903e1204af3"
    assert parse_checksum_file(f"MD5 (ml-20m.zip) = {h}\n") == h
    assert parse_checksum_file(f"{h.upper()}  ml-20m.zip\n") == h
    assert parse_checksum_file(f"{'0' * 32}  other.zip\n{h}  ml-20m.zip\n", filename="ml-20m.zip") == h
    with pytest.raises(DownloadError, match="0 candidates"):
        parse_checksum_file("<html>Not Found</html>")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("ok/ratings.csv", RATINGS)
        zf.writestr("../escaped.txt", "gotcha")
    with pytest.raises(DownloadError, match="outside"):
        unpack_zip(evil, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists() and list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Download safety (issue 12): non-https warning, a zip without ratings leaves nothing behind


def test_non_https_base_url_warns(server, tmp_path):
    root, url = server
    _publish(root, "ml-latest-small", {"ratings.csv": RATINGS})
    with pytest.warns(UserWarning, match="is not https: the zip and its .md5 travel unencrypted"):
        folder, downloaded = ml.download_movielens("ml-latest-small", tmp_path / "a", base_url=url, progress=False)
    assert downloaded and (folder / "ratings.csv").read_text() == RATINGS
    md5 = hashlib.md5((root / "datasets" / "movielens" / "ml-latest-small.zip").read_bytes()).hexdigest()
    with pytest.warns(UserWarning, match="your --md5 still detects a replaced file"):
        ml.download_movielens("ml-latest-small", tmp_path / "b", base_url=url, md5=md5, progress=False)
    # https (here unreachable) does not warn about the scheme
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DownloadError):
            ml.download_movielens("ml-latest-small", tmp_path / "c", base_url="https://127.0.0.1:9/x", progress=False)
    assert not [w for w in caught if "not https" in str(w.message)]


@pytest.mark.parametrize("files", [{"README.txt": "terms\n"}, {"movies.csv": "movieId,title\n"}])
@pytest.mark.parametrize("keep", [False, True])
def test_zip_without_ratings_leaves_nothing_behind(server, tmp_path, files, keep):
    root, url = server
    _publish(root, "ml-latest-small", files)
    dest = tmp_path / "data"
    r = _cli("--variant", "ml-latest-small", "--dest", str(dest), "--base-url", url, *(["--keep-zip"] if keep else []))
    assert r.exit_code == 1 and "holds none of ml-latest-small/ratings.csv" in r.output
    assert "Traceback" not in r.output
    assert not dest.exists() or list(dest.rglob("*")) == []  # no folder, no zip, no .part / .unpack


def test_zip_with_ratings_in_another_folder_is_rejected(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("elsewhere/ratings.csv", RATINGS)
    archive = tmp_path / "ml-20m.zip"
    archive.write_bytes(buf.getvalue())
    with pytest.raises(DownloadError, match="holds none of ml-20m/ratings.csv"):
        unpack_zip(archive, tmp_path / "out", require_any=["ml-20m/ratings.csv"])
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Time bins (issue 12): one timestamp far outside the rest; data.time_range

OUTLIER_TS = 9_000_000_000_000_000_000  # 2.9e11 years after 1970 (an int64 a corrupt export produced)


@pytest.fixture(scope="module")
def small_with_outlier(small_csv, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("outlier")
    text = small_csv.read_text()
    (folder / "ratings.csv").write_text(text + f"1,1,5.0,{OUTLIER_TS}\n")
    return folder / "ratings.csv"


def test_far_outlier_timestamp_warns_with_per_bin_counts(small_with_outlier, small_df, tmp_path):
    with pytest.warns(UserWarning, match=r"99% of the .* ratings fall into 1 of the 100 .*per-bin counts: [\d,]+, "
                                         r"0 \(x98\), 1\).*data.time_range=\[1996-0\d-\d\d,2018-\d\d-\d\d\]"):
        d = load_movielens(small_with_outlier, T=100, cache_dir=tmp_path, progress=False)
    assert np.bincount(d.t, minlength=100)[-1] == 1  # the outlier alone in the last bin, the rest in bin 0
    # the warning comes back on a cache hit
    with pytest.warns(UserWarning, match="per-bin counts"):
        d2 = load_movielens(small_with_outlier, T=100, cache_dir=tmp_path, progress=False)
    assert d2.source.from_cache


def test_time_range_drops_outside_ratings_and_bins_the_range(small_with_outlier, small_df, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = load_movielens(small_with_outlier, T=100, cache_dir=tmp_path, progress=False,
                           time_range=["1996-01-01", "2019-01-01"])
    msgs = [str(w.message) for w in caught]
    assert any("dropped 1 of the 100,837 ratings" in m for m in msgs), msgs
    assert not any("per-bin counts" in m for m in msgs)
    start, end = ml.parse_time("1996-01-01"), ml.parse_time("2019-01-01")
    assert d.bin_edges[0] == start and d.bin_edges[-1] == end
    ts = small_df.timestamp.to_numpy()
    # the same ratings as the file without the outlier, binned over [start, end] exactly
    kept = small_df.rating != small_df.rating.median()
    np.testing.assert_array_equal(d.t, (ts[kept] - start) * 100 // (end - start))
    assert len(d) == int(kept.sum())
    # time_range is part of the cache key
    other = load_movielens(small_with_outlier, T=100, cache_dir=tmp_path, progress=False, time_range=[start, end - 1])
    assert other.source.cache_path != d.source.cache_path and not other.source.from_cache


def test_time_range_errors_are_one_line(small_with_outlier, tmp_path):
    with pytest.raises(ValueError, match="no rating lies in time_range"):
        load_movielens(small_with_outlier, T=10, use_cache=False, progress=False, time_range=[0, 1000])
    from goldstone_cli.config import ConfigError, compose

    for bad, why in (("[2016-01-01,1995-01-01]", "start < end"), ("[1995-01-01]", r"\[start, end\]"),
                     ("[soon,2016-01-01]", "not a time: 'soon'")):
        with pytest.raises(ConfigError, match=why) as info:
            compose(["model=movielens", "data=movielens", f"data.time_range={bad}"])
        assert "\n" not in str(info.value)
    cfg = compose(["model=movielens", "data=movielens", "data.time_range=[828124615,2016-01-01T12:00:00]"])
    assert ml.check_time_range(cfg.data.time_range) == (828124615, ml.parse_time("2016-01-01T12:00:00"))


def test_time_range_reaches_the_loader_from_the_config(tmp_path):
    from goldstone_cli.config import compose
    from goldstone_cli.models import build_model

    (tmp_path / "ratings.csv").write_text(RATINGS)
    cfg = compose(["model=movielens", "data=movielens", f"data.path={tmp_path}", "data.T=2", "model.d=2",
                   f"data.cache_dir={tmp_path / 'cache'}", "data.time_range=[1000,4500]", "trainer.progress=false"])
    with pytest.warns(UserWarning, match="dropped 1 of the 5 ratings"):
        model = build_model(cfg, torch.device("cpu"), torch.float32)
    assert sum(model.split_sizes().values()) == 4  # 5 ratings, one outside; the median 3.25 of the rest drops none


# ---------------------------------------------------------------------------------------------
# Validation (issue: repeats, negative timestamps, rating scale, compressed files, header position)


def test_part_of_the_file_appended_to_itself_is_rejected(small_csv, tmp_path):
    lines = small_csv.read_bytes().splitlines(keepends=True)  # CRLF line ends
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"".join(lines + lines[1000:1050]))  # unsorted now: the sort-based check
    with pytest.raises(MalformedRatingsError) as e:
        load_movielens(path, use_cache=False, progress=False)
    first = lines[1000].decode().strip().split(",")
    assert e.value.line == len(lines) + 1
    assert f"line {len(lines) + 1}: 50 rows repeat an earlier row exactly" in str(e.value)
    assert f"(user {first[0]}, item {first[1]}, rating {float(first[2]):g}, timestamp {first[3]}), " \
           f"a repeat of line 1001." in str(e.value)
    # a re-rating of the same movie at another time, even with the same stars, is fine (sorted and unsorted)
    u, m, r, ts = first
    for extra in ([lines[1000].replace(ts.encode(), str(int(ts) + 1).encode())], [f"1,1,5.0,{ts}\r\n".encode()]):
        path.write_bytes(b"".join(lines[:1001] + extra + lines[1001:]))
        assert load_movielens(path, use_cache=False, progress=False).source.n_raw == len(lines)


@pytest.mark.parametrize("order", ["sorted", "shuffled", "wide_ids", "huge_ids", "huge_times"])
def test_repeats_match_pandas(order):
    rng = np.random.default_rng(1)
    n = 3000
    df = pd.DataFrame({"u": rng.integers(0, 30, n), "i": rng.integers(0, 20, n),
                       "r": rng.integers(1, 3, n) / 2, "t": rng.integers(0, 4, n)})
    if order == "sorted":  # the O(n) path
        df = df.sort_values(["u", "i"], kind="stable").reset_index(drop=True)
    if order == "wide_ids":  # (user, item) fits one int64 key, but not beside the row number
        df["u"] = df.u * (1 << 24)
        df["i"] = df.i * (1 << 20)
    if order == "huge_ids":  # (user, item) does not fit in one int64 key
        df["u"] = df.u * (1 << 58)
        df["i"] = df.i * (1 << 58) - (1 << 62)
    if order == "huge_times":  # (pair, timestamp) does not fit in one int64 key
        df["t"] = df.t * (1 << 61)

    def first(cols):  # (count, first repeating row in file order, the first row it repeats) as pandas sees them
        dup = df.duplicated(list(cols))
        row = dup.idxmax()
        return int(dup.sum()), int(row), int((df[list(cols)] == df.loc[row, list(cols)]).all(axis=1).idxmax())

    def ours():
        return ml._repeats(*[df[c].to_numpy() for c in "uirt"])

    exact = first("uirt")
    assert exact[0] > 0 and exact[2] < exact[1] and ours() == (exact, None)
    df = df.drop_duplicates().reset_index(drop=True)  # no exact repeats left: pairs rated twice at one time
    same_time = first("uit")
    assert same_time[0] > 0 and ours() == (None, same_time)
    df = df.drop_duplicates(["u", "i", "t"]).reset_index(drop=True)
    assert df.duplicated(["u", "i"]).any() and ours() == (None, None)  # re-rated at other times: fine


def test_ratings_outside_the_star_scale_warn(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n1,1,0,100\n1,2,7,200\n2,1,10,300\n2,3,3,400\n3,1,1,500\n")
    for hit in (False, True):  # the warning comes back on a cache hit
        with pytest.warns(UserWarning, match=r"3 of the 5 ratings lie outside MovieLens's 0.5-5 star scale \(min 0, "
                                             r"max 10\); the ratings are binarized at their median \(3\) as they are"):
            d = load_movielens(path, T=2, cache_dir=tmp_path / "cache", progress=False)
        assert d.source.from_cache == hit and d.x.tolist() == [-1, 1, 1, -1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 0.5 and 5 are on the scale: no warning
        path.write_text("userId,movieId,rating,timestamp\n1,1,0.5,100\n1,2,5,200\n2,1,3,300\n")
        load_movielens(path, T=2, use_cache=False, progress=False)


@pytest.mark.parametrize("kind, magic, tool", [
    ("gzip", None, "gunzip -k"), ("bzip2", None, "bunzip2 -k"), ("xz", None, "unxz -k"),
    ("zip", None, "unzip"), ("zstd", b"\x28\xb5\x2f\xfd\x04\x00\x81\x00", "unzstd")])
@pytest.mark.parametrize("name", ["ratings.csv", "ratings.csv.gz"])
def test_compressed_file_says_decompress_it(tmp_path, kind, magic, tool, name):
    import bz2
    import gzip
    import lzma

    text = RATINGS.encode()
    if kind == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("ratings.csv", text)
    data = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}.get(kind, lambda b: None)(text) \
        or (buf.getvalue() if kind == "zip" else magic + b"\x00" * 20)
    (tmp_path / name).write_bytes(data)
    for path in (tmp_path / name, tmp_path):  # the file, or the folder holding ratings.csv
        if path == tmp_path and name != "ratings.csv":
            continue
        with pytest.raises(MalformedRatingsError) as e:
            load_movielens(path, use_cache=False, progress=False)
        msg = str(e.value)
        assert f"is {kind}-compressed" in msg and tool in msg and e.value.line is None
        assert msg.isprintable() and "\\x" not in msg  # no binary junk
    if kind == "gzip" and name == "ratings.csv":  # the suggested command works
        assert f"`mv {tmp_path / name} {tmp_path / name}.gz && gunzip -k {tmp_path / name}.gz`" in msg
    if kind == "gzip" and name == "ratings.csv.gz":
        assert f"`gunzip -k {tmp_path / name}`" in msg


def test_blank_lines_before_the_header(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_bytes(b"\r\n  \r\n" + RATINGS.replace("\n", "\r\n").encode())
    d = load_movielens(path, T=2, use_cache=False, progress=False)
    (tmp_path / "plain.csv").write_text(RATINGS)
    _assert_same(d, load_movielens(tmp_path / "plain.csv", T=2, use_cache=False, progress=False))
    path.write_text("\n" + RATINGS + RATINGS.splitlines(keepends=True)[2])  # line 4 again, at line 8
    with pytest.raises(MalformedRatingsError, match=r"line 8: 1 row repeats .* a repeat of line 4\.") as e:
        load_movielens(path, T=2, use_cache=False, progress=False)
    assert e.value.line == 8


# ---------------------------------------------------------------------------------------------
# Layouts that users' own copies have (own-data review)


@pytest.mark.parametrize("header, row", [
    ("userId,movieId,rating,timestamp,tag", "{u},{i},{r},{t},x"),  # extra column after the four
    ('"userId","movieId","rating","timestamp","comment"', '{u},{i},{r},{t},"a, b"'),  # quoted comma inside
    ("movieId,userId,timestamp,rating", "{i},{u},{t},{r}"),  # another column order
    ("UserID,MovieID,Rating,Timestamp", "{u},{i},{r},{t}"),  # other capitalization
    ("title,userId,movieId,rating,timestamp", "caf\xe9,{u},{i},{r},{t}"),  # extra column first, not UTF-8
])
def test_csv_with_extra_or_reordered_columns_reads_the_four_by_name(tmp_path, header, row):
    rows = [line.split(",") for line in RATINGS.strip().splitlines()[1:]]
    text = header + "\n" + "".join(row.format(u=u, i=i, r=r, t=t) + "\n" for u, i, r, t in rows)
    path = tmp_path / "mine" / "ratings.csv"
    path.parent.mkdir()
    path.write_bytes(text.encode("latin-1"))
    (tmp_path / "plain.csv").write_text(RATINGS)
    want = load_movielens(tmp_path / "plain.csv", T=2, use_cache=False, progress=False)
    _assert_same(load_movielens(path.parent, T=2, use_cache=False, progress=False), want)
    raw = ml.read_ratings(path)
    np.testing.assert_array_equal(raw.timestamp, [1000, 2000, 3000, 4000, 5000])


@pytest.mark.parametrize("content, line, what", [
    ("userId,movieId,rating,timestamp,tag\n1,2,3.5,100,x\n1,3,4.0,101\n", 3,
     "expected 5 fields (userId,movieId,rating,timestamp,tag), got 4"),
    ("movieId,userId,rating,timestamp\n1,2,3.5,100\n1,x,4.0,101\n", 3, "user id 'x' is not an integer"),
    ("userId,movieId,rating,timestamp,userId\n1,2,3.5,100,1\n", 1, "column userId appears 2 times"),
    ("userId,itemId,rating,timestamp\n1,2,3.5,100\n", 1, "has no column movieId"),
    ("userId,movieId,rating,timestamp\n1,2,3.5,100\n+1,3,4.0,101\n", 3, "user id '+1' has a leading '+'"),
    ("user\titem\trating\ttimestamp\n1\t2\t3\t100\n", 1, "a header line? u.data has none"),
    ("userId::movieId::rating::timestamp\n1::2::3::100\n", 1, "a header line? ratings.dat has none"),
])
def test_own_csv_errors_name_the_line_and_the_fix(tmp_path, content, line, what):
    name = "u.data" if "\t" in content else "ratings.dat" if "::" in content else "ratings.csv"
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MalformedRatingsError) as e:
        load_movielens(path, use_cache=False, progress=False)
    assert e.value.line == line and what in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_unexpected_header_message_is_short_and_does_not_claim_the_header_is_wrong_when_it_starts_right(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("user,movie,score,time\n1,2,3.5,100\n")
    with pytest.raises(MalformedRatingsError, match="unexpected header 'user,movie,score,time'.*columns userId, "
                       "movieId, rating and timestamp"):
        load_movielens(path, use_cache=False, progress=False)


def test_classic_mac_line_endings_are_read(tmp_path):
    """Excel's "CSV (Macintosh)" ends lines with a bare CR; the header must not swallow the whole file."""
    path = tmp_path / "ratings.csv"
    path.write_bytes(RATINGS.replace("\n", "\r").encode())
    (tmp_path / "plain.csv").write_text(RATINGS)
    _assert_same(load_movielens(path, T=2, use_cache=False, progress=False),
                 load_movielens(tmp_path / "plain.csv", T=2, use_cache=False, progress=False))
    path.write_bytes((RATINGS + "1,3,x,7\n").replace("\n", "\r").encode())
    with pytest.raises(MalformedRatingsError, match="line 7: rating 'x' is not a finite number") as e:
        load_movielens(path, T=2, use_cache=False, progress=False)
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("name, tool", [("ratings.csv.gz", "gunzip -k"), ("u.data.gz", "gunzip -k"),
                                        ("ratings.dat.bz2", "bunzip2 -k")])
def test_folder_with_only_a_compressed_ratings_file_says_decompress_it(tmp_path, name, tool):
    import bz2
    import gzip

    comp = gzip.compress if name.endswith(".gz") else bz2.compress
    (tmp_path / name).write_bytes(comp(RATINGS.encode()))
    with pytest.raises(MalformedRatingsError) as e:
        load_movielens(tmp_path, use_cache=False, progress=False)
    msg = str(e.value)
    assert str(tmp_path / name) in msg and "-compressed" in msg and tool in msg and "download" not in msg


def test_folder_above_the_data_set_names_the_sub_folder(tmp_path):
    (tmp_path / "ml-20m").mkdir()
    (tmp_path / "ml-20m" / "ratings.csv").write_text(RATINGS)
    with pytest.raises(FileNotFoundError, match=f"data.path={tmp_path / 'ml-20m'}"):
        load_movielens(tmp_path, use_cache=False, progress=False)


def test_semicolon_separated_csv_says_commas(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text(RATINGS.replace(",", ";"))
    with pytest.raises(MalformedRatingsError, match="separated by ';': a ratings.csv separates them by commas"):
        load_movielens(path, use_cache=False, progress=False)


@pytest.mark.parametrize("rows, line", [
    ("1,3,4.0,101\n1,3,1.5,101\n1,3,1.5,900\n1,5,2.0,150\n", 3),  # sorted by (user, item): the O(n) path
    ("2,3,4.0,101\n1,5,2.0,150\n2,3,1.5,101\n1,3,1.5,900\n", 4),  # unsorted
])
def test_two_ratings_of_one_movie_at_one_time_are_rejected(tmp_path, rows, line):
    path = tmp_path / "ratings.csv"
    path.write_text("userId,movieId,rating,timestamp\n" + rows)
    with pytest.raises(MalformedRatingsError, match=rf"line {line}: 1 row gives an earlier row's user, item and "
                       r"timestamp another rating, .*against line 2 \(.*rating 4, timestamp 101\)") as e:
        load_movielens(path, T=2, use_cache=False, progress=False)
    assert e.value.line == line


def test_a_cache_made_before_the_same_time_check_is_not_trusted(tmp_path, monkeypatch):
    path = tmp_path / "ratings.csv"
    path.write_text(RATINGS + "1,10,2.0,1000\n")  # line 2's user, item and timestamp, another rating
    df = pd.read_csv(path)

    def lenient(p, layout=None):  # what earlier versions read, without the check
        return ml.RawRatings(*(df[c].to_numpy() for c in ml.CSV_HEADER))

    with monkeypatch.context() as m:
        m.setattr(ml, "PREPROCESS_VERSION", 2)
        m.setattr(ml, "read_ratings", lenient)
        load_movielens(path, T=2, cache_dir=tmp_path / "cache", progress=False)  # an old cache file
    assert list((tmp_path / "cache").glob("*.npz"))
    with pytest.raises(MalformedRatingsError, match="line 7: 1 row gives"):
        load_movielens(path, T=2, cache_dir=tmp_path / "cache", progress=False)
