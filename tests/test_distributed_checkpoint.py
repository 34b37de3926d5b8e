"""goldstone_cli.distributed.checkpoint: sharded checkpoints (torch.distributed.checkpoint) that are
never trusted half-written, never unpickle anything but DCP's metadata classes, and reshard."""

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from goldstone_cli import checkpoint as ckpt
from goldstone_cli.checkpoint import CheckpointError
from goldstone_cli.distributed import checkpoint as dck
from goldstone_cli.distributed.local import run_local
from goldstone_cli.distributed.shard import RowShard

CPU = torch.device("cpu")


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one rank in this process (DTensors need a device mesh)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield RowShard(0, 1, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _state(step=3):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "model": {"U": torch.randn(2, 5, 3, generator=g, dtype=torch.float64)},
            "optimizer": {"lr": 0.1}, "generator": torch.Generator().manual_seed(1).get_state()}


PATHS = {("model", "U"): 5}


def test_save_load_and_prev_rotation(tmp_path, world_of_one):
    a, b = _state(3), _state(4)
    dck.save(tmp_path, a, PATHS, world_of_one, CPU)
    dck.save(tmp_path, b, PATHS, world_of_one, CPU)
    assert sorted(p.name for p in tmp_path.iterdir() if "dcp" in p.name) == ["last.dcp", "prev.dcp"]
    assert dck.has_checkpoint(tmp_path) and ckpt.has_checkpoint(tmp_path.parent / "x") is False
    state, path = dck.load_latest(tmp_path, RowShard.single(), CPU)
    assert path.name == "last.dcp" and state["step"] == 4 and state["optimizer"] == {"lr": 0.1}
    assert torch.equal(state["model"]["U"], b["model"]["U"])
    assert torch.equal(state["generator"], b["generator"])
    files = {p.name for p in path.iterdir()}
    assert {".metadata", "meta.pt"} <= files and any(f.endswith(".distcp") for f in files)


def test_a_save_without_rotation_drops_the_last_checkpoint_and_keeps_prev(tmp_path, world_of_one):
    for step in (3, 4):
        dck.save(tmp_path, _state(step), PATHS, world_of_one, CPU)
    dck.save(tmp_path, _state(5), PATHS, world_of_one, CPU, rotate=False)  # step 4 was an interrupt's
    assert sorted(p.name for p in tmp_path.iterdir() if "dcp" in p.name) == ["last.dcp", "prev.dcp"]
    assert dck.step_of(tmp_path / "last.dcp") == 5 and dck.step_of(tmp_path / "prev.dcp") == 3
    dck.save(tmp_path, _state(6), PATHS, world_of_one, CPU)
    assert dck.step_of(tmp_path / "last.dcp") == 6 and dck.step_of(tmp_path / "prev.dcp") == 5
    for step in (7, 8):  # the same for one process's last.pt / prev.pt
        ckpt.save_last(tmp_path, _state(step), rotate=step == 7)
    assert ckpt.load(tmp_path / "last.pt")["step"] == 8 and not (tmp_path / "prev.pt").exists()
    ckpt.save_last(tmp_path, _state(9))
    assert ckpt.load(tmp_path / "prev.pt")["step"] == 8 and ckpt.load(tmp_path / "last.pt")["step"] == 9
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_corrupt_last_falls_back_to_prev(tmp_path, world_of_one):
    dck.save(tmp_path, _state(3), PATHS, world_of_one, CPU)
    dck.save(tmp_path, _state(4), PATHS, world_of_one, CPU)
    _flip_a_byte(tmp_path / "last.dcp")
    warnings = []
    state, path = dck.load_latest(tmp_path, RowShard.single(), CPU, warn=warnings.append)
    assert path.name == "prev.dcp" and state["step"] == 3
    assert "do not match the SHA-256" in warnings[0]


def _flip_a_byte(folder: Path) -> Path:
    """Damage one of ``folder``'s shard files (its SHA-256 no longer matches meta.pt's); returns it."""
    data = next(p for p in sorted(folder.iterdir()) if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    return data


def test_a_corrupt_last_is_set_aside_on_resume_so_the_next_save_keeps_the_good_prev(tmp_path, world_of_one):
    """Resume (quarantine=True, under the run lock) falls back to prev.dcp and renames the damaged
    last.dcp to last.dcp.corrupt first: the next save then keeps the good prev.dcp (it used to rotate
    the damaged last.dcp over it, leaving nothing good to fall back to). remove_stale leaves it alone."""
    dck.save(tmp_path, _state(3), PATHS, world_of_one, CPU)
    dck.save(tmp_path, _state(4), PATHS, world_of_one, CPU)
    data = _flip_a_byte(tmp_path / "last.dcp")
    warnings = []
    state, path = dck.load_latest(tmp_path, RowShard.single(), CPU, warn=warnings.append, quarantine=True)
    assert path.name == "prev.dcp" and state["step"] == 3
    assert "kept as last.dcp.corrupt" in warnings[0]
    dck.remove_stale(tmp_path)
    assert (tmp_path / "last.dcp.corrupt" / data.name).is_file() and not (tmp_path / "last.dcp").exists()
    dck.save(tmp_path, _state(5), PATHS, world_of_one, CPU)  # the resumed run's first checkpoint, rotating
    assert dck.step_of(tmp_path / "last.dcp") == 5 and dck.step_of(tmp_path / "prev.dcp") == 3
    assert dck.read_meta(tmp_path / "prev.dcp")  # verifies
    assert (tmp_path / "last.dcp.corrupt").is_dir()
    # analysis / export (checkpoint.load_latest) read without quarantine: nothing is renamed there
    _flip_a_byte(tmp_path / "last.dcp")
    assert dck.load_latest(tmp_path, RowShard.single(), CPU, warn=lambda m: None)[0]["step"] == 3
    assert (tmp_path / "last.dcp").is_dir()


def test_half_written_folder_is_never_loaded(tmp_path, world_of_one):
    dck.save(tmp_path, _state(3), PATHS, world_of_one, CPU)
    shutil.copytree(tmp_path / "last.dcp", tmp_path / ".last.dcp.tmp")  # a save killed before its rename
    (tmp_path / "last.dcp" / "meta.pt").unlink()  # ... or a folder without its meta.pt
    assert not dck.has_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no readable sharded checkpoint|not completely written"):
        dck.load_latest(tmp_path, RowShard.single(), CPU)
    dck.remove_stale(tmp_path)
    assert not (tmp_path / ".last.dcp.tmp").exists()


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_crafted_metadata_is_refused_without_running_it(tmp_path, world_of_one, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dck.save(tmp_path, _state(3), PATHS, world_of_one, CPU)
    folder = tmp_path / "last.dcp"
    (folder / ".metadata").write_bytes(pickle.dumps(_Boom()))
    # a forger who also rewrites meta.pt's file hashes (meta.pt is checksummed, not signed)
    meta = ckpt.load(folder / "meta.pt", kind="dcp")
    meta["files"][".metadata"] = __import__("goldstone_cli.io", fromlist=["x"]).file_sha256(folder / ".metadata")
    ckpt.save(folder / "meta.pt", meta, kind="dcp")
    with pytest.raises(CheckpointError, match="Unsupported global: (posix|os).system"):
        dck.load(folder, RowShard.single(), CPU)
    assert not (tmp_path / "pwned.txt").exists()


def test_non_tensor_entries_in_dcp_files_are_refused(tmp_path, world_of_one):
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "x"
    dcp.save({"t": torch.zeros(2), "note": "a string DCP would torch.load(weights_only=False)"},
             storage_writer=dcp.FileSystemWriter(str(folder)))
    with pytest.raises(CheckpointError, match="non-tensor entries"):
        dck.read_metadata(folder / ".metadata")


def test_meta_names_outside_the_folder_are_refused(tmp_path, world_of_one):
    dck.save(tmp_path, _state(3), PATHS, world_of_one, CPU)
    folder = tmp_path / "last.dcp"
    meta = ckpt.load(folder / "meta.pt", kind="dcp")
    meta["files"]["../../etc/passwd"] = "0" * 64
    ckpt.save(folder / "meta.pt", meta, kind="dcp")
    with pytest.raises(CheckpointError, match="outside its folder"):
        dck.read_meta(folder)


def test_shard_paths_in_dcp_metadata_must_stay_in_the_folder(tmp_path, world_of_one):
    """DCP opens folder / relative_path for every shard: a .metadata whose paths leave the folder
    (or name files that are not shard files) is refused before DCP reads anything."""
    import dataclasses

    dck.save(tmp_path, _state(3), PATHS, world_of_one, CPU)
    folder = tmp_path / "last.dcp"
    md = dck.read_metadata(folder / ".metadata")  # the genuine one reads
    (tmp_path / "outside.distcp").write_bytes(b"x")
    for bad in ("../outside.distcp", str(tmp_path / "outside.distcp"), "meta.pt"):
        md.storage_data = {k: dataclasses.replace(v, relative_path=bad) for k, v in md.storage_data.items()}
        with open(folder / ".metadata", "wb") as f:
            pickle.dump(md, f)
        with pytest.raises(CheckpointError, match="not a shard file of its own folder"):
            dck.read_metadata(folder / ".metadata")


# ---- resharding: saved on 2 ranks, loaded on 3 ranks and on one process --------------------------
def _save_on_ranks(folder):
    sh = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    g = torch.Generator().manual_seed(0)
    full = {"A": torch.randn(3, 7, 2, generator=g, dtype=torch.float64),
            "B": torch.randn(3, 5, 4, generator=g, dtype=torch.float32)}
    state = {"step": 9, "model": {k: sh.take(v).clone() for k, v in full.items()}}
    dck.save(folder, state, {("model", "A"): 7, ("model", "B"): 5}, sh, CPU)
    return full


def _load_on_ranks(folder):
    import torch.distributed.checkpoint as dcp

    from goldstone_cli.distributed import collective

    sh = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    dcp_load = dcp.load

    def load_and_mark(*args, **kwargs):  # forget our collectives' Work when DCP's own return
        dcp_load(*args, **kwargs)
        collective._last_work[0] = None

    dcp.load = load_and_mark
    try:
        state, _ = dck.load_latest(folder, sh, CPU)
    finally:
        dcp.load = dcp_load
    return {"rows": [list(sh.rows(7)), list(sh.rows(5))], "A": state["model"]["A"], "B": state["model"]["B"],
            "ours_after_dcp": collective.last_work() is not None}


@pytest.mark.slow
def test_saved_on_two_ranks_loads_on_three_and_on_one(tmp_path):
    full = run_local(_save_on_ranks, 2, str(tmp_path))[0]
    for res in run_local(_load_on_ranks, 3, str(tmp_path)):  # blocks 3 + 3 + 1 and 2 + 2 + 1 rows
        (a0, a1), (b0, b1) = res["rows"]
        assert torch.equal(res["A"], full["A"][:, a0:a1]) and torch.equal(res["B"], full["B"][:, b0:b1])
        # DCP's collectives do not keep their Work: ours, after them, lets gloo's workers free DCP's
        # tensors before a script can exit (else 2 of 30 such loads died with SIGABRT at exit)
        assert res["ours_after_dcp"]
    state, _ = dck.load_latest(tmp_path, RowShard.single(), CPU)
    assert torch.equal(state["model"]["A"], full["A"]) and state["model"]["B"].dtype == torch.float32


def _save_twice_on_ranks(folder):
    sh = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    for step in (3, 4):
        dck.save(folder, {"step": step, "model": {"U": sh.take(_state(step)["model"]["U"]).clone()}}, PATHS, sh, CPU)
    meta = ckpt.load(Path(folder) / "last.dcp" / dck.META, kind=dck.KIND)
    return sorted(meta["files"])


def _load_latest_on_ranks(folder):
    sh = RowShard(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)
    warnings = []
    state, path = dck.load_latest(folder, sh, CPU, warn=warnings.append)
    return {"step": state["step"], "path": path.name, "warnings": warnings, "U": state["model"]["U"]}


@pytest.mark.slow
def test_ranks_verify_their_share_and_agree_on_a_corrupt_file(tmp_path):
    """Saved on 2 ranks (each hashes its share of the files into meta.pt); a file that only rank 1
    checks on load is corrupted: both ranks fall back to prev.dcp together, rank 0 says why."""
    names = run_local(_save_twice_on_ranks, 2, str(tmp_path))[0]
    assert ".metadata" in names and sum(n.endswith(".distcp") for n in names) >= 2
    state, _ = dck.load_latest(tmp_path, RowShard.single(), CPU)  # every digest in meta.pt is right
    assert state["step"] == 4
    victim = tmp_path / "last.dcp" / names[1::2][0]  # rank 1's share on a 2-rank load
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    res = run_local(_load_latest_on_ranks, 2, str(tmp_path))
    assert [r["step"] for r in res] == [3, 3] and [r["path"] for r in res] == ["prev.dcp"] * 2
    assert "is corrupt" in res[0]["warnings"][0] and victim.name in res[0]["warnings"][0] and not res[1]["warnings"]
    full = _state(3)["model"]["U"]
    assert torch.equal(torch.cat([r["U"] for r in res], dim=1), full)


def test_checkpoint_load_latest_reads_a_sharded_run(tmp_path, world_of_one):
    """checkpoint.load_latest (resume on one process, analysis, export, words) reads last.dcp as full
    tensors, also when an older one-process last.pt of the same run is there."""
    d = tmp_path / "checkpoints"
    d.mkdir()
    dck.save(d, _state(7), PATHS, world_of_one, CPU)
    state, path = ckpt.load_latest(d)
    assert path.name == "last.dcp" and state["step"] == 7 and state["model"]["U"].shape == (2, 5, 3)
    ckpt.save_last(d, _state(5))  # an older leg on one process
    assert ckpt.load_latest(d)[0]["step"] == 7
    ckpt.save_last(d, _state(9))  # a newer one
    state, path = ckpt.load_latest(d)
    assert path.name == "last.pt" and state["step"] == 9


def test_checkpoint_load_latest_passes_over_a_damaged_newer_sharded_run_for_a_good_last_pt(tmp_path, world_of_one):
    """analysis / export / age-words read the run through checkpoint.load_latest: a newer last.dcp
    that does not verify (and no prev.dcp) gives a warning and the verified last.pt, not an error."""
    d = tmp_path / "checkpoints"
    d.mkdir()
    ckpt.save_last(d, _state(5))
    dck.save(d, _state(7), PATHS, world_of_one, CPU)
    _flip_a_byte(d / "last.dcp")
    warnings = []
    state, path = ckpt.load_latest(d, warn=warnings.append)
    assert path.name == "last.pt" and state["step"] == 5
    assert any("newer sharded checkpoint does not load" in w for w in warnings), warnings
