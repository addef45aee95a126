"""`build_shards --verify` / `--verify-only` find every kind of damage and name the shard (and the
sample where there is one); an interrupted build, run again with the same command, keeps the shards
it had closed, decodes only the rest, and ends byte-identical to an uninterrupted build; a rerun with
other options is refused.

The interruption is injected deterministically: `ShardWriter.close` raises on its n-th call.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from data_pipeline import build_plan, build_shards
from data_pipeline.build_state import STATE_FILE
from data_pipeline.shard_format import ShardWriter
from conftest import make_cxr_with_rejects

N_IMAGES, SHARD = 40, 4
BAD = (5, 22)  # indices of source images damaged in the dataset, so the build has image rejects


class Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_cxr_with_rejects(tmp_path_factory.mktemp("cxr"), N_IMAGES, seed=5, bad=BAD)


def _argv(root: Path, out: Path, *extra: str, quiet: bool = True) -> list[str]:
    return ["--dataset", "chestxray14", "--root", str(root), "--out", str(out), "--size", "16",
            "--shard-size", str(SHARD), "--val-fraction", "0.25", "--max-reject-fraction", "0.1",
            "--workers", "1", *(["--quiet"] if quiet else []), *extra]


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    build_shards.main(_argv(root, out))
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def _without_timings(manifest: dict) -> dict:
    return {k: v for k, v in manifest.items() if k != "summary"}


# ------------------------------------------------------------------------------ verify
def test_verify_passes_on_a_good_build_and_prints_a_summary(root, reference, tmp_path, capsys):
    build_shards.main(_argv(root, tmp_path / "out", "--verify", quiet=False))
    out = capsys.readouterr().out
    assert "verified" in out and "checksums, DALI indices, images, labels and sample ids OK" in out
    build_shards.main(["--out", str(reference), "--verify-only"])
    assert f"verified {reference}" in capsys.readouterr().out


@pytest.fixture
def copy(reference, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    return out


def _verify_error(out: Path) -> str:
    with pytest.raises(SystemExit) as e:
        build_shards.main(["--out", str(out), "--verify-only"])
    assert e.value.code not in (0, None)
    return str(e.value.code)


def _member_offset(tar: Path, suffix: str) -> tuple[str, int]:
    """(sample key, byte offset) of the first member of `tar` whose name ends with `suffix`."""
    with tarfile.open(tar) as t:
        m = next(m for m in t if m.name.endswith(suffix))
    return m.name.split(".")[0], m.offset_data


def test_verify_fails_naming_shard_and_sample_when_an_image_byte_is_flipped(copy):
    shard = _manifest(copy)["splits"]["train"]["shards"][1]["name"]
    key, offset = _member_offset(copy / shard, ".png")
    data = bytearray((copy / shard).read_bytes())
    data[offset + 40] ^= 0xFF  # inside the PNG's IDAT: its CRC no longer matches
    (copy / shard).write_bytes(bytes(data))
    message = _verify_error(copy)
    assert "verification" in message and shard in message and "sha256" in message


def test_verify_names_the_sample_whose_label_byte_is_flipped(copy, capsys):
    shard = _manifest(copy)["splits"]["val"]["shards"][0]["name"]
    key, offset = _member_offset(copy / shard, ".lbl")
    data = bytearray((copy / shard).read_bytes())
    data[offset] ^= 0xFF
    (copy / shard).write_bytes(bytes(data))
    _verify_error(copy)
    lines = capsys.readouterr().err
    assert f"{shard}: sample {key}: label vector" in lines
    assert f"{shard}: sha256 differs" in lines


def test_verify_fails_naming_a_missing_shard(copy):
    shard = _manifest(copy)["splits"]["test"]["shards"][0]["name"]
    (copy / shard).unlink()
    message = _verify_error(copy)
    assert f"{shard}: shard file is missing" in message


def test_verify_fails_when_the_dali_index_does_not_match_the_tar(copy, capsys):
    shard = _manifest(copy)["splits"]["train"]["shards"][0]
    idx = copy / shard["index"]
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:-1]) + "\n")  # drop the last sample
    assert shard["name"] in _verify_error(copy)
    assert "DALI index" in capsys.readouterr().err


def test_verify_fails_when_sample_ids_are_not_contiguous(copy, capsys):
    """Swapping two shards of a split keeps every checksum but breaks the 0..n-1 id order."""
    shards = _manifest(copy)["splits"]["train"]["shards"]
    a, b = copy / shards[0]["name"], copy / shards[1]["name"]
    ta, tb = a.read_bytes(), b.read_bytes()
    a.write_bytes(tb)
    b.write_bytes(ta)
    _verify_error(copy)
    assert "expected 0 (ids run 0..n-1 per split)" in capsys.readouterr().err


def test_verify_only_without_a_manifest_is_one_error_line(tmp_path):
    message = _verify_error(tmp_path)
    assert message.startswith("error:") and "manifest.json" in message


# ------------------------------------------------------------------------------ resume
def _interrupt_at(monkeypatch, n: int) -> list[int]:
    """Make the n-th ShardWriter.close raise (before it finishes the tar), like a crash."""
    calls, original = [], ShardWriter.close

    def close(self):
        calls.append(1)
        if len(calls) == n:
            raise Interrupted(f"injected failure at close #{n}")
        return original(self)

    monkeypatch.setattr(ShardWriter, "close", close)
    return calls


def _count_decodes(monkeypatch) -> list[str]:
    decoded, original = [], build_plan.prepare  # the decode every build mode calls

    def prepare(path, **kw):
        decoded.append(Path(path).name)
        return original(path, **kw)

    monkeypatch.setattr(build_plan, "prepare", prepare)
    return decoded


@pytest.mark.parametrize("where", ["inside-train", "first-val-shard"])
def test_interrupted_build_resumes_to_byte_identical_output(root, reference, tmp_path, monkeypatch,
                                                            where):
    n_train = len(_manifest(reference)["splits"]["train"]["shards"])
    assert n_train >= 3
    fail_at = 3 if where == "inside-train" else n_train + 1
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_at(m, fail_at)
        with pytest.raises(Interrupted):
            build_shards.main(_argv(root, out))
    state = json.loads((out / STATE_FILE).read_text())
    kept = sorted(p.name for p in out.glob("*.tar"))
    assert len(kept) == fail_at - 1 and not (out / "manifest.json").exists()
    (out / "train-000009.tar.part").write_bytes(b"half a shard from a killed run")
    stamps = {name: (out / name).stat().st_mtime_ns for name in kept}

    decoded = _count_decodes(monkeypatch)
    build_shards.main(_argv(root, out))

    assert _files(out) == _files(reference)
    assert _without_timings(_manifest(out)) == _without_timings(_manifest(reference))
    assert not list(out.glob("*.part")) and not (out / STATE_FILE).exists()
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == stamps  # kept, not rewritten
    # Only the records after the cut were decoded again: not those in kept shards, nor the
    # rejects already recorded (this dataset has no adapter rejects, only undecodable images).
    kept_samples = sum(s["samples"] for e in state["done"].values() for s in e["shards"])
    kept_samples += sum(s["samples"] for s in (state["current"] or {}).get("shards", []))
    in_reference = {s["name"]: s["samples"] for e in _manifest(reference)["splits"].values()
                    for s in e["shards"]}
    assert kept_samples == sum(in_reference[name] for name in kept) > 0
    assert len(decoded) == N_IMAGES - kept_samples - len(state["rejected"])


def test_resume_with_a_worker_pool_gives_the_same_bytes(root, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_at(m, 2)
        with pytest.raises(Interrupted):
            build_shards.main(_argv(root, out))
    build_shards.main(_argv(root, out) + ["--workers", "2"])
    assert _files(out) == _files(reference)
    assert _without_timings(_manifest(out)) == _without_timings(_manifest(reference))


def test_rerun_with_other_options_is_refused_and_overwrite_starts_over(root, reference, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        with pytest.raises(Interrupted):
            build_shards.main(_argv(root, out))
    with pytest.raises(SystemExit) as e:
        build_shards.main(_argv(root, out, "--seed", "1"))
    message = str(e.value.code)
    assert message.startswith("error:") and "--overwrite" in message and STATE_FILE in message
    assert (out / STATE_FILE).exists() and len(list(out.glob("*.tar"))) == 2  # nothing touched
    build_shards.main(_argv(root, out, "--overwrite"))
    assert _files(out) == _files(reference)


def test_a_damaged_kept_shard_makes_the_resume_start_from_scratch(root, reference, tmp_path,
                                                                  monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _interrupt_at(m, 3)
        with pytest.raises(Interrupted):
            build_shards.main(_argv(root, out))
    first = out / "train-000000.tar"
    first.write_bytes(first.read_bytes()[:-512])
    build_shards.main(_argv(root, out))
    assert "from scratch" in capsys.readouterr().err
    assert _files(out) == _files(reference)


def test_a_complete_build_still_needs_overwrite(root, reference, tmp_path):
    with pytest.raises(SystemExit) as e:
        build_shards.main(_argv(root, reference))
    assert "--overwrite" in str(e.value.code)
