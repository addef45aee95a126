"""A sliced build (`--num-slices N --slice I`, one process per slice, e.g. a SLURM array task) plus
`--merge-slices N` gives the same shards, byte for byte, and the same manifest (timings aside) as a
single-process build, also when a slice rejects an image (the merge renumbers the sample ids of the
shards after it). The merge names the slice file and the array task to rerun when a slice is missing,
unfinished, damaged or from another build; a slice resumes after a crash without touching the others.

The dataset is tiny (30 images of 32 px, 16 px shards of 3 records, one truncated PNG) so that every
slice holds several shards of every split.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_pipeline import build_plan, build_shards
from data_pipeline.shard_format import ShardWriter
from conftest import make_cxr_with_rejects
from data_pipeline.verify_shards import verify

REPO = Path(__file__).resolve().parents[1]
N_IMAGES, N_SLICES, SPLITS = 30, 3, ("train", "val", "test")
BAD = 2  # index (in name order) of the source image that is truncated: a reject


class Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_cxr_with_rejects(tmp_path_factory.mktemp("cxr"), N_IMAGES, seed=3, bad=(BAD,))


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--dataset", "chestxray14", "--root", str(root), "--out", str(out), "--size", "16",
            "--shard-size", "3", "--val-fraction", "0.25", "--max-reject-fraction", "0.1",
            "--workers", "1", "--quiet", *extra]


def _slice(i: int, n: int = N_SLICES) -> list[str]:
    return ["--num-slices", str(n), "--slice", str(i)]


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline.build_shards", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    build_shards.main(_argv(root, out))
    return out


@pytest.fixture(scope="module")
def slices_built(root, tmp_path_factory) -> Path:
    """The 3 slices, each built by its own process, in the order 2, 0, 1; not merged."""
    out = tmp_path_factory.mktemp("sliced")
    for i in (2, 0, 1):
        proc = _cli(*_argv(root, out), *_slice(i))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def merged(slices_built, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("merged") / "out"
    shutil.copytree(slices_built, out)
    return out, _cli("--merge-slices", str(N_SLICES), "--out", str(out), "--verify")


@pytest.fixture
def copy(slices_built, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(slices_built, out)
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _without_timings(manifest: dict) -> dict:
    summary = {k: v for k, v in manifest["summary"].items()
               if k not in ("seconds", "images_per_second")}
    return {**manifest, "summary": summary}


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".idx")}


def _merge_error(out: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_shards.main(["--merge-slices", str(N_SLICES), "--out", str(out), *extra])
    assert e.value.code not in (0, None)
    assert not (out / "manifest.json").exists()
    return str(e.value.code)


def _slice_manifest(out: Path, i: int, n: int = N_SLICES) -> dict:
    return json.loads((out / "slices" / f"slice-{i:04d}-of-{n:04d}.json").read_text())


# ------------------------------------------------------------------------------ equivalence
def test_three_slices_built_out_of_order_merge_into_the_single_process_build(merged, reference):
    out, proc = merged
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"verified {out}" in proc.stdout and "merged 3 slices" in proc.stdout
    renumbered = int(proc.stdout.split(" shard(s) renumbered")[0].rsplit(" ", 1)[1])
    assert renumbered > 0  # the reject shifts the ids of later shards: the merge fixed them
    assert len(_files(reference)) > 2 * 3 * N_SLICES  # several shards per slice and split
    assert _files(out) == _files(reference)
    assert _without_timings(_manifest(out)) == _without_timings(_manifest(reference))
    assert sorted(p.name for p in out.iterdir() if p.suffix not in (".tar", ".idx")) == \
        ["manifest.json"]  # no slices/, no .part left


def test_merged_shards_verify_and_read_back_through_the_loaders(merged):
    from data_pipeline.loader import build_loader

    out, proc = merged
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, problems = verify(out)
    assert problems == [] and summary["unlisted"] == []
    manifest = _manifest(out)
    for split in SPLITS:
        tars = [str(out / s["name"]) for s in manifest["splits"][split]["shards"]]
        samples = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
        assert len(samples) == manifest["splits"][split]["samples"] > 0
        assert [int(np.frombuffer(s["sid"], dtype="<i8")[0]) for s in samples] == \
            list(range(len(samples)))
        assert {json.loads(s["json"])["split"] for s in samples} == {split}
    loader = build_loader(out, "train", backend="torch", batch_size=4, image_size=16, train=False)
    sids = {int(s) for batch in loader for s in batch["sid"]}  # (the last batch is padded)
    assert sorted(sids) == list(range(manifest["splits"]["train"]["samples"]))


def test_the_corrupt_image_of_one_slice_is_in_the_merged_rejects(root, slices_built, merged):
    bad = sorted((root / "images").iterdir())[BAD]
    owners = [i for i in range(N_SLICES) for r in _slice_manifest(slices_built, i)["results"]
              for x in r["rejected"] if Path(x["input"]).name == bad.name]
    assert len(owners) == 1
    manifest = _manifest(merged[0])
    assert [Path(r["input"]).name for r in manifest["rejected"]] == [bad.name]
    assert manifest["rejected"][0]["reason"].startswith("cannot decode image")
    assert manifest["summary"]["rejected"] == 1
    assert manifest["summary"]["accepted"] == N_IMAGES - 1 == manifest["summary"]["inputs"] - 1


# ------------------------------------------------------------------------------ merge errors
def test_a_missing_or_unfinished_slice_is_one_error_naming_its_file_and_task(copy):
    (copy / "slices" / "slice-0001-of-0003.json").unlink()
    message = _merge_error(copy)
    assert message.startswith("error:") and "\n" not in message
    assert "slice-0001-of-0003.json is missing" in message and "array task(s) 1 " in message
    (copy / "slices" / "slice-0001-of-0003.state.json").write_text("{}")
    assert "interrupted or is still running" in _merge_error(copy)
    with pytest.raises(SystemExit) as e:
        build_shards.main(["--merge-slices", "4", "--out", str(copy)])
    assert "slice-0000-of-0004.json is missing" in str(e.value.code)
    assert "array task(s) 0,1,2,3 " in str(e.value.code) and "--merge-slices 3?" in str(e.value.code)


def test_slices_of_builds_with_another_seed_are_refused_naming_both_files(root, copy):
    with pytest.raises(SystemExit) as e:  # a merge given other options than the slices'
        build_shards.main(_argv(root, copy, "--seed", "1", "--merge-slices", "3"))
    assert "other options" in str(e.value.code) and "options.seed: 0 vs 1" in str(e.value.code)
    build_shards.main(_argv(root, copy, "--seed", "1", "--overwrite") + _slice(1))
    message = _merge_error(copy)
    assert "slice-0000-of-0003.json and " in message and "slice-0001-of-0003.json" in message
    assert "options.seed: 0 vs 1" in message


def test_a_damaged_shard_names_the_task_to_rerun_and_the_rerun_repairs_it(root, copy, reference,
                                                                        capsys):
    shard = _slice_manifest(copy, 2)["results"][0]["shard"]["name"]
    data = bytearray((copy / shard).read_bytes())
    data[600] ^= 0xFF
    (copy / shard).write_bytes(bytes(data))
    message = _merge_error(copy)
    assert f"{shard} (listed in slice-0002-of-0003.json)" in message
    assert "array task(s) 2 " in message
    capsys.readouterr()
    build_shards.main(_argv(root, copy) + _slice(0))  # a finished, intact slice: nothing to do
    assert "already built" in capsys.readouterr().out
    build_shards.main(_argv(root, copy) + _slice(2))  # rebuilds slice 2
    build_shards.main(_argv(root, copy) + ["--merge-slices", "3"])  # the build's options: checked
    assert _files(copy) == _files(reference)


def test_too_many_rejects_over_all_slices_fail_the_merge_and_keep_nothing(copy):
    message = _merge_error(copy, "--max-reject-fraction", "0.01")
    assert f"1 of {N_IMAGES} inputs rejected" in message and "--max-reject-fraction" in message
    assert not list(copy.glob("*.tar")) and not (copy / "slices").exists()


# ------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("extra", [["--slice", "0"], ["--num-slices", "3"],
                                   ["--num-slices", "3", "--slice", "3"],
                                   ["--num-slices", "3", "--slice", "-1"],
                                   ["--num-slices", "0", "--slice", "0"],
                                   ["--num-slices", "3", "--slice", "0", "--verify"],
                                   ["--merge-slices", "0"],
                                   ["--merge-slices", "3", "--num-slices", "3", "--slice", "0"]],
                         ids=["slice-alone", "num-slices-alone", "slice-too-big", "slice-negative",
                              "zero-slices", "verify-on-a-slice", "merge-zero", "merge-and-slice"])
def test_bad_slice_arguments_are_argparse_errors(root, tmp_path, extra, capsys):
    with pytest.raises(SystemExit) as e:
        build_shards.parse_args(_argv(root, tmp_path / "out") + extra)
    assert e.value.code == 2
    assert "slice" in capsys.readouterr().err


def test_shard_bytes_caps_a_shard_in_both_modes_instead_of_moving_boundaries(root, tmp_path):
    for extra in ([], _slice(1)):
        with pytest.raises(SystemExit) as e:
            build_shards.main(_argv(root, tmp_path / f"out{len(extra)}", "--shard-bytes", "3000")
                              + extra)
        assert "--shard-bytes" in str(e.value.code) and "--shard-size of at most" in str(e.value.code)


# ------------------------------------------------------------------------------ resume
def test_an_interrupted_slice_resumes_its_own_shards_and_leaves_the_others_alone(
        root, copy, reference, monkeypatch):
    (copy / "slices" / "slice-0001-of-0003.json").unlink()
    others = {p.name: p.stat().st_mtime_ns for p in copy.glob("*.tar")}
    calls, close = [], ShardWriter.close

    def failing_close(self):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted("injected failure at the third close")
        return close(self)

    with monkeypatch.context() as m:
        m.setattr(ShardWriter, "close", failing_close)
        with pytest.raises(Interrupted):
            build_shards.main(_argv(root, copy, "--overwrite") + _slice(1))
    state = json.loads((copy / "slices" / "slice-0001-of-0003.state.json").read_text())
    assert len(state["results"]) == 2

    decoded, prepare = [], build_plan.prepare
    monkeypatch.setattr(build_plan, "prepare", lambda path, **kw: decoded.append(path)
                        or prepare(path, **kw))
    build_shards.main(_argv(root, copy) + _slice(1))
    slice1 = _slice_manifest(copy, 1)
    kept = slice1["results"][:2]
    assert len(decoded) == sum(r["records"] for r in slice1["results"][2:])  # not the kept ones
    assert all(r["shard"] for r in kept)
    unchanged = {n: t for n, t in others.items()
                 if n not in {r["shard"]["name"] for r in slice1["results"] if r["shard"]}}
    assert unchanged and all(copy.joinpath(n).stat().st_mtime_ns == t for n, t in unchanged.items())
    build_shards.main(["--merge-slices", "3", "--out", str(copy), "--quiet"])
    assert _files(copy) == _files(reference)
    assert _without_timings(_manifest(copy)) == _without_timings(_manifest(reference))


def test_a_merge_interrupted_after_renumbering_can_be_rerun(root, copy, reference, monkeypatch,
                                                            capsys):
    def crash(out, manifest):
        raise Interrupted("killed before manifest.json was written")

    with monkeypatch.context() as m:
        m.setattr("data_pipeline.slices.write_manifest", crash)
        with pytest.raises(Interrupted):
            build_shards.main(["--merge-slices", "3", "--out", str(copy), "--quiet"])
    assert _files(copy) == _files(reference)  # renumbered: only the manifest is missing
    assert not (copy / "manifest.json").exists()
    capsys.readouterr()
    for i in range(N_SLICES):  # resubmitting the array: renumbered shards still count as built
        build_shards.main(_argv(root, copy) + _slice(i))
    assert capsys.readouterr().out.count("already built") == N_SLICES
    build_shards.main(["--merge-slices", "3", "--out", str(copy), "--quiet"])
    assert _files(copy) == _files(reference)
    assert _without_timings(_manifest(copy)) == _without_timings(_manifest(reference))


@pytest.mark.parametrize("shard_size,n", [(1, 4), (3, 13)],
                         ids=["1-record-shards-with-a-gap", "more-slices-than-shards"])
def test_in_process_slices_equal_the_single_build_at_the_edges(root, tmp_path, shard_size, n):
    """Shard size 1: the rejected record's shard is not written (a gap in the numbers), in both
    modes. 13 slices of 12 shards: one slice has nothing to do and still reports."""
    single, sliced = tmp_path / "single", tmp_path / "sliced"
    size = ["--shard-size", str(shard_size)]
    build_shards.main(_argv(root, single) + size)
    for i in reversed(range(n)):
        build_shards.main(_argv(root, sliced) + size + _slice(i, n))
    build_shards.main(["--merge-slices", str(n), "--out", str(sliced), "--verify", "--quiet"])
    assert _files(sliced) == _files(single)
    assert _without_timings(_manifest(sliced)) == _without_timings(_manifest(single))
    shards = [s["name"] for e in _manifest(single)["splits"].values() for s in e["shards"]]
    if shard_size == 1:
        assert len(shards) == N_IMAGES - 1
    else:
        assert len(shards) == n - 1
