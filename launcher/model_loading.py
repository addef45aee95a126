"""Loading what the project wrote: a run directory, a `model.pt`, or a DeepSpeed checkpoint (ZeRO 0-3,
consolidated with DeepSpeed's own `zero_to_fp32`), its teacher, and the thresholds saved beside it.

Shared by `launcher/evaluate.py` and `launcher/export.py`.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.manifest import read_manifest
from launcher.checkpoints import CheckpointDamaged, check_complete, newest_complete, tags_newest_first
from launcher.config import Config, ConfigError, load_config
from rmsnet.teachers import (CheckpointMismatchError, TappedModel, create_tapped_model, create_teacher,
                             describe_unreadable, read_state_dict)

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = "thresholds.json"
STUDENT_PREFIX = "student.model."
TAG = re.compile(r"-s(?P<step>\d+)$")


class CheckpointError(ValueError):
    """A --checkpoint the project cannot read; the message names the path."""


# ------------------------------------------------------------------------------ loading a model
@dataclass
class LoadedModel:
    model: TappedModel  # eval mode, fp32, CPU
    meta: dict  # arch, num_classes, in_chans, feature_indices, image_size, label_names, multilabel, step
    source: str  # what was read, in words
    model_dir: Path  # where thresholds.json lives
    run_dir: Path | None
    config: Config | None

    @property
    def fingerprint(self) -> str:
        return state_fingerprint(self.model)


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the weights (as fp32), to tie thresholds.json to the model it was chosen for."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _find_run_dir(start: Path) -> Path | None:
    """The run directory (holding config.yaml) at or up to two levels above `start`."""
    for d in [start, *list(start.parents)[:2]]:
        if (d / "config.yaml").is_file():
            return d
    return None


def locate_checkpoint(path) -> tuple[str, Path, str | None]:
    """('file', model.pt, None) or ('deepspeed', checkpoint dir, tag) for any accepted --checkpoint."""
    p = Path(path)
    if p.is_file():
        return "file", p, None
    if not p.is_dir():
        raise CheckpointError(f"--checkpoint {p}: no such file or directory")
    for f in (p / "final" / "model.pt", p / "model.pt"):
        if f.is_file():
            return "file", f, None
    if any(p.glob("*model_states.pt")):  # a DeepSpeed tag directory
        try:
            check_complete(p)
        except CheckpointDamaged as e:
            raise CheckpointError(str(e)) from None
        return "deepspeed", p.parent, p.name
    for d in (p, p / "checkpoints"):
        if tags_newest_first(d):
            passed: list[str] = []
            tag = newest_complete(d, passed)
            for why in passed:
                print(f"warning: passing over {why}", file=sys.stderr)
            if tag is None:
                raise CheckpointError(f"--checkpoint {p}: no complete checkpoint in {d} "
                                      f"({len(passed)} damaged or incomplete)")
            return "deepspeed", d, tag
    raise CheckpointError(f"--checkpoint {p}: not a run directory (final/model.pt), a model.pt file, "
                          f"or a DeepSpeed checkpoint directory (with tags or *model_states.pt)")


def consolidate_deepspeed(ckpt_dir: Path, tag: str) -> tuple[dict, str]:
    """Full fp32 state dict of a DeepSpeed checkpoint, and how it was obtained."""
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3: partitioned fp32 master weights
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(io.StringIO()):  # the tool prints per-parameter progress
            full = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        how = "ZeRO partitions consolidated with deepspeed.utils.zero_to_fp32"
    else:  # ZeRO stage 0: the whole module is in the model-states file
        states = tag_dir / "mp_rank_00_model_states.pt"
        if not states.is_file():
            raise CheckpointError(f"{tag_dir}: neither ZeRO optimizer partitions nor {states.name}")
        try:
            full = torch.load(states, map_location="cpu", weights_only=True)["module"]
        except Exception as e:
            raise CheckpointError(f"cannot read {states}: {type(e).__name__}: {e}") from None
        how = "module state of a ZeRO-0 checkpoint"
    return {k: v.float() if v.is_floating_point() else v for k, v in full.items()}, how


def model_meta(cfg: Config, manifest: dict, step: int | None, feature_indices=None) -> dict:
    """The metadata a student's model.pt carries (what rebuilding and evaluating it needs); the one
    builder, used by the launcher's exports and by readers of checkpoints without metadata."""
    return {"arch": cfg.student.name, "num_classes": len(manifest["label_names"]),
            "in_chans": cfg.student.in_chans,
            "feature_indices": list(feature_indices) if feature_indices is not None
            else cfg.student.feature_indices,
            "image_size": cfg.data.image_size, "label_names": list(manifest["label_names"]),
            "multilabel": manifest["multilabel"], "step": step, "mode": cfg.run.mode}


def _run_config(run_dir: Path | None) -> Config | None:
    if run_dir is None:
        return None
    try:
        return load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise CheckpointError(f"{run_dir / 'config.yaml'}: {e}") from None


def build_model(state: dict, meta: dict, origin: str) -> TappedModel:
    """The TappedModel of `meta`, strictly loaded with `state` (eval mode)."""
    try:
        model = create_tapped_model(meta["arch"], int(meta["num_classes"]), in_chans=meta.get("in_chans"),
                                    feature_indices=meta.get("feature_indices"))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{origin}: cannot rebuild the model from its metadata ({e})") from None
    expected = model.model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(origin, missing, unexpected, shapes, meta["arch"])
    model.model.load_state_dict(state, strict=True)
    return model.eval()


def load_model(checkpoint, manifest: dict | None = None) -> LoadedModel:
    """Rebuild the student of any checkpoint the project writes (see the module docstring).

    `manifest` (of the shards to evaluate) supplies label names for a DeepSpeed checkpoint and is
    checked against a model.pt's own label names.
    """
    kind, path, tag = locate_checkpoint(checkpoint)
    if kind == "file":
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(describe_unreadable(path, e)) from None
        run_dir = _find_run_dir(path.parent)
        if isinstance(saved, dict) and isinstance(saved.get("meta"), dict) and "model" in saved:
            state, meta = saved["model"], dict(saved["meta"])
        else:  # a bare state dict: the architecture must come from the run's config
            cfg = _run_config(run_dir)
            if cfg is None or manifest is None:
                raise CheckpointError(f"{path} has no metadata (meta) and no run config.yaml above it")
            state, meta = read_state_dict(path), model_meta(cfg, manifest, None)
        source, model_dir = str(path), path.parent
    else:
        run_dir = _find_run_dir(path.parent)
        cfg = _run_config(run_dir)
        if cfg is None:
            raise CheckpointError(f"DeepSpeed checkpoint {path / tag}: the run's config.yaml (expected in "
                                  f"{path.parent}) is needed to rebuild the architecture")
        if manifest is None:
            manifest = read_manifest(cfg.data.shards)
        full, how = consolidate_deepspeed(path, tag)
        state = {k[len(STUDENT_PREFIX):]: v for k, v in full.items() if k.startswith(STUDENT_PREFIX)}
        if not state:
            raise CheckpointError(f"{path / tag}: no '{STUDENT_PREFIX}*' weights "
                                  f"(not a DistillTask checkpoint)")
        m = TAG.search(tag)
        meta = model_meta(cfg, manifest, int(m["step"]) if m else None)
        source, model_dir = f"{path / tag} ({how})", path / tag
    if manifest is not None and list(meta.get("label_names", manifest["label_names"])) != \
            list(manifest["label_names"]):
        raise CheckpointError(f"{path}: model label names {meta['label_names']} differ from the shards' "
                              f"{manifest['label_names']}")
    model = build_model(state, meta, str(path if kind == "file" else path / tag))
    broken = [k for k, v in model.model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{source}: {len(broken)} of the model's tensors hold NaN/inf (first: {broken[0]}): "
                              f"it trained into non-finite values and is neither evaluated nor exported")
    meta["feature_indices"] = list(model.feature_indices)  # resolved (a config may say None)
    return LoadedModel(model, meta, source, model_dir, run_dir, _run_config(run_dir))


# ------------------------------------------------------------------------------------- teacher
@dataclass
class TeacherSpec:
    name: str
    checkpoint: Path
    in_chans: int | None = None


def _saved_arch(path: Path) -> str | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None  # safetensors or other: read_state_dict reports real problems later
    meta = saved.get("meta") if isinstance(saved, dict) else None
    return meta.get("arch") if isinstance(meta, dict) else None


def resolve_teacher(loaded: LoadedModel, checkpoint=None, name: str | None = None) -> TeacherSpec | None:
    """--teacher CKPT [--teacher-name NAME], else the teacher the run's config names if that file
    exists (relative paths: from the working directory, then from the repository root)."""
    cfg = loaded.config
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"--teacher {path}: file not found")
        arch = name or _saved_arch(path) or (cfg.teacher.name if cfg else None)
        if arch is None:
            raise ValueError(f"--teacher {path}: no architecture in the file; pass --teacher-name")
        in_chans = cfg.teacher.in_chans if cfg is not None and cfg.teacher.name == arch else None
        return TeacherSpec(arch, path, in_chans)
    if cfg is None or cfg.run.mode != "distill" or not cfg.teacher.checkpoint:
        return None
    for path in (Path(cfg.teacher.checkpoint), REPO / cfg.teacher.checkpoint):
        if path.is_file():
            return TeacherSpec(name or cfg.teacher.name, path, cfg.teacher.in_chans)
    print(f"note: the run's teacher checkpoint {cfg.teacher.checkpoint} was not found: no teacher column",
          file=sys.stderr)
    return None


def check_teacher_file(path: Path, label_names: list[str]) -> None:
    """Before a distillation starts: the teacher file is a readable checkpoint and, when it carries
    label names (this project's model.pt does), they are the shards' in the same order. A teacher
    of as many classes in another order would load without complaint and teach wrong labels."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"teacher.checkpoint: {describe_unreadable(path, e)}") from None
    meta = saved.get("meta") if isinstance(saved, dict) else None
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if names is not None and list(names) != list(label_names):
        raise CheckpointError(f"teacher.checkpoint {path} was trained on the labels {list(names)}, the shards "
                              f"have {list(label_names)}: the order must be the same")


def check_pretrained_file(cfg, num_classes: int) -> None:
    """Before a run starts: `student.pretrained_file` is a readable checkpoint that loads into the
    student's architecture (the student is built once with it, on the CPU: a few megabytes)."""
    path = Path(cfg.student.pretrained_file)
    if not path.is_file():
        raise FileNotFoundError(f"student.pretrained_file {path}: file not found")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if path.suffix != ".safetensors":
            raise CheckpointError(f"student.pretrained_file: {describe_unreadable(path, e)}") from None
    try:
        create_tapped_model(cfg.student.name, num_classes, in_chans=cfg.student.in_chans,
                            feature_indices=cfg.student.feature_indices, pretrained_file=str(path))
    except Exception as e:
        raise CheckpointError(f"student.pretrained_file {path} does not load into {cfg.student.name}: "
                              f"{_load_failure(e)} (the weights must be timm's for that "
                              f"architecture)") from None


def _load_failure(e: Exception) -> str:
    """torch's load_state_dict error (one line per key) counted in a few words; else its first line."""
    lines = [ln.strip() for ln in str(e).strip().splitlines()]
    if lines and lines[0].startswith("Error(s) in loading state_dict"):
        counts = {"missing": 0, "unexpected": 0, "of another shape": 0}
        for ln in lines[1:]:
            if ln.startswith("Missing key(s)"):
                counts["missing"] += ln.count('"') // 2
            elif ln.startswith("Unexpected key(s)"):
                counts["unexpected"] += ln.count('"') // 2
            elif ln.startswith("size mismatch"):
                counts["of another shape"] += 1
        found = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        if found:
            return f"state dict keys: {found}"
    return f"{type(e).__name__}: {(lines or [''])[0][:200]}"


def load_teacher(spec: TeacherSpec, num_classes: int) -> TappedModel:
    return create_teacher(spec.name, num_classes, checkpoint=str(spec.checkpoint), in_chans=spec.in_chans)


# ---------------------------------------------------------------------------------- thresholds
def write_thresholds(path: Path, loaded: LoadedModel, split: str, thresholds, j, samples: int) -> None:
    names = loaded.meta["label_names"]
    doc = {"method": "Youden's J (max sensitivity + specificity - 1) per class",
           "rule": "positive when probability >= threshold",
           "probability": "sigmoid of the logit" if loaded.meta["multilabel"]
           else "softmax, one class against the rest",
           "chosen_on": {"split": split, "samples": samples},
           "label_names": names, "thresholds": dict(zip(names, thresholds)),
           "youden_j": dict(zip(names, j)), "model": loaded.source, "fingerprint": loaded.fingerprint}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def read_thresholds(loaded: LoadedModel) -> dict | None:
    """thresholds.json next to the model, checked to belong to it; None when there is none."""
    path = loaded.model_dir / THRESHOLDS
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if doc.get("fingerprint") != loaded.fingerprint:
        raise CheckpointError(f"{path} was chosen for other weights (fingerprint {doc.get('fingerprint')}, "
                              f"model {loaded.fingerprint}): run launcher/evaluate.py again")
    return doc


# ------------------------------------------------------------------------------------- metrics
