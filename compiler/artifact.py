"""The ``.ember`` artifact: one zip file, no pickle anywhere.

Layout::

    manifest.json          format version, signature (symbolic dims), target, backend and why,
                           passes and their records, fidelity, tool versions, sha256 of each file
    ir.json                the optimized IR (ember.ir.serialize)
    weights.safetensors    every IR param (tensors shared between params stored once)
    payload/...            the backend's files (e.g. an AOTInductor .pt2 package)

`load` verifies the format version and every checksum before it reads anything else, and
refuses a tampered, truncated or mismatched artifact with one line naming the file and problem.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import platform
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ArtifactError
from .ir import graph_from_json, graph_to_json

if TYPE_CHECKING:
    from .compiled import CompiledModel

__all__ = ["save_artifact", "load", "read_manifest", "describe", "to_jsonable", "FORMAT_VERSION"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


def to_jsonable(v: Any) -> Any:
    """Plain JSON for the manifest: dicts stay dicts, dims become strings, tuples lists."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [to_jsonable(x) for x in v]
    if isinstance(v, bool | int | str) or v is None:
        return v
    if isinstance(v, float):
        return v if v == v and abs(v) != float("inf") else str(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return str(v)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    import numpy

    from .version import __version__

    out = {"ember": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
           "python": platform.python_version()}
    for mod in ("onnx", "onnxruntime", "triton", "tvm"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:  # optional tools: absent is fine
            continue
    return out


def _dedupe_weights(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                             dict[str, str]]:
    """Stores tensors that share memory once; returns (unique tensors, alias -> canonical)."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in weights.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t.detach().contiguous().clone() if not t.is_contiguous() or \
            t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size() \
            else t.detach()
    return unique, aliases


def save_artifact(cm: CompiledModel, path: Path) -> Path:
    """Writes ``cm`` to ``path`` (a zip; ``.ember`` suffix recommended) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with tempfile.TemporaryDirectory(prefix="ember-save-") as tmp:
        root = Path(tmp)
        (root / "ir.json").write_text(json.dumps(graph_to_json(cm.graph), indent=1))
        unique, aliases = _dedupe_weights(dict(cm.graph.weights))
        save_file(unique, str(root / "weights.safetensors"), metadata={"format": "ember"})
        payload_dir = root / "payload"
        payload_dir.mkdir()
        payload_files = list(cm.program.save(payload_dir)) if hasattr(cm.program, "save") else []
        files = ["ir.json", "weights.safetensors"] + [f"payload/{f}" for f in payload_files]
        sig = cm.signature()
        manifest = {
            "format": "ember-artifact",
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": cm.target,
            "backend": cm.backend,
            "backend_info": to_jsonable(dict(getattr(cm.program, "info", {}))),
            "placement": to_jsonable(cm.placement),
            "passes": cm.pipeline,
            "pass_records": to_jsonable(cm.records),
            "fidelity": to_jsonable(cm.fidelity),
            "inputs": [{"name": n, **t.to_json()} for n, t in sig["inputs"]],
            "outputs": [{"name": n, **t.to_json()} for n, t in sig["outputs"]],
            "ir_summary": {"nodes": len(cm.graph.nodes), "params": len(cm.graph.params),
                           "param_bytes": cm.graph.param_bytes(), "ops": cm.graph.op_counts()},
            "weight_aliases": aliases,
            "tool_versions": tool_versions(),
            "files": {f: _sha256(root / f) for f in files},
        }
        (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
        tmp_zip = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(tmp_zip, "w", zipfile.ZIP_STORED) as z:
            z.write(root / MANIFEST, MANIFEST)
            for f in files:
                z.write(root / f, f)
        tmp_zip.replace(path)
    log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def _open(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact")
    if path.is_dir():
        raise ArtifactError(f"{path}: is a directory; an Ember artifact is a single .ember file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArtifactError(f"{path}: not a valid Ember artifact (truncated or corrupt: {e})") \
            from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Reads and checks the manifest (format and version) without verifying file hashes."""
    path = Path(path)
    with _open(path) as z:
        return _manifest(z, path)


def _manifest(z: zipfile.ZipFile, path: Path) -> dict[str, Any]:
    try:
        raw = z.read(MANIFEST)
    except KeyError:
        raise ArtifactError(f"{path}: {MANIFEST} is missing (not an Ember artifact)") from None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: {MANIFEST} is unreadable ({e})") from None
    try:
        m = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != "ember-artifact":
        raise ArtifactError(f"{path}: {MANIFEST} does not describe an Ember artifact")
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {m.get('format_version')} is not supported "
                            f"by this Ember (it reads version {FORMAT_VERSION})")
    return m


_EXTRACTED: list[str] = []


def _cleanup() -> None:
    for d in _EXTRACTED:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)


def load(path: str | Path, *, fallback: str | None = None) -> CompiledModel:
    """Loads a ``.ember`` artifact into a callable `CompiledModel`.

    Args:
        path: the artifact.
        fallback: a backend to use when the artifact's backend cannot run here (e.g.
            "reference" to run a CUDA artifact's IR on the CPU). Default: refuse with the reason.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ember.backends.registry import get_backend

    from .compiled import CompiledModel

    path = Path(path)
    with _open(path) as z:
        m = _manifest(z, path)
        files: dict[str, str] = m.get("files") or {}
        names = set(z.namelist()) - {MANIFEST}
        extra = sorted(names - set(files))
        if extra:
            raise ArtifactError(f"{path}: unexpected file(s) not in the manifest: {extra[:3]}")
        for f in files:
            if f.startswith("/") or ".." in Path(f).parts:
                raise ArtifactError(f"{path}: unsafe file name in manifest: {f}")
            if f not in names:
                raise ArtifactError(f"{path}: {f} listed in the manifest is missing (truncated?)")
        tmp = tempfile.mkdtemp(prefix="ember-load-")
        _EXTRACTED.append(tmp)
        root = Path(tmp)
        try:
            for f in files:
                z.extract(f, root)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ArtifactError(f"{path}: cannot extract ({e}); the file is truncated or "
                                f"corrupt") from None
    for f, digest in files.items():
        if _sha256(root / f) != digest:
            raise ArtifactError(f"{path}: {f} fails its sha256 check (modified or corrupted)")
    try:
        weights = load_file(str(root / "weights.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: weights.safetensors is unreadable ({e})") from None
    for alias, canon in (m.get("weight_aliases") or {}).items():
        weights[alias] = weights[canon]
    try:
        graph = graph_from_json(json.loads((root / "ir.json").read_text()), weights)
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: ir.json is invalid ({e})") from None
    backend = m["backend"]
    be = get_backend(backend)
    avail = be.available()
    info = m.get("backend_info") or {}
    if not avail.ok:
        if fallback is None:
            raise ArtifactError(f"{path}: built for backend '{backend}' (target "
                                f"'{m['target']}'), which cannot run here: {avail.reason}. "
                                f"Load with fallback='reference' to run its IR on the CPU.")
        backend = fallback
        be = get_backend(fallback)
        program = be.compile(graph, [])
    else:
        program = be.load(root / "payload", info, graph=graph)
    return CompiledModel(graph, program, target=m["target"], backend=backend,
                         pipeline=m.get("passes", ""), records=m.get("pass_records", {}),
                         fidelity=m.get("fidelity", {}), placement=m.get("placement", {}))


RUNTIME_LABELS = {"inductor": "fused kernels", "eager": "one kernel per op",
                  "onnxruntime": "ONNX Runtime"}


def describe(cm: CompiledModel) -> str:
    """Human-readable summary: signature, backend and why, passes, IR op counts."""
    sig = cm.signature()
    lines = [f"target: {cm.target}   backend: {cm.backend}"]
    prog = (cm.placement or {}).get("program") or getattr(cm.program, "info", {}) or {}
    if prog:
        chosen = prog.get("chosen") or prog.get("kind")
        why = prog.get("why") or prog.get("reason", "")
        lines.append(f"program: {chosen}" + (f"  ({why})" if why else ""))
        plan = prog.get("plan") or []
        if plan:
            lines.append(f"kernel plan ({len(plan)} nodes"
                         + (f", predicted {prog['predicted_h100_us']:.1f} us on H100"
                            if prog.get("predicted_h100_us") is not None else "") + "):")
            for p in plan[:40]:
                kern = p.get("kernels") or p.get("kernel") or ""
                us = p.get("h100_us")
                lines.append(f"  {p.get('op', '?')} -> {p.get('impl', '?')}"
                             + (f" {kern}" if kern else "")
                             + (f"  {us:.2f} us" if isinstance(us, int | float) else ""))
            if len(plan) > 40:
                lines.append(f"  ... {len(plan) - 40} more")
    fb = (cm.placement or {}).get("fallback")
    if fb:
        lines.append(f"fallback: {fb['from']} -> {fb['to']}: {fb['reason']}")
    lines.append(f"passes: {cm.pipeline or '(none)'}")
    lines.append("inputs:")
    lines += [f"  {n}: {t}" for n, t in sig["inputs"]]
    lines.append("outputs:")
    lines += [f"  {n}: {t}" for n, t in sig["outputs"]]
    g = cm.graph
    lines.append(f"IR: {len(g.nodes)} nodes, {len(g.params)} params "
                 f"({g.param_bytes() / 1e6:.2f} MB)")
    counts = g.op_counts()
    lines.append("  ops: " + ", ".join(f"{k} x{v}" for k, v in
                                       sorted(counts.items(), key=lambda kv: -kv[1])))
    cost = (cm.placement or {}).get("cost_model")
    if cost:
        sym = ", ".join(f"{k}={v}" for k, v in (cost.get("symbols") or {}).items())
        # the cost model's "inductor" runtime means fused kernels: AOTI on CPU, Triton on
        # CUDA, TVM's fused ops on mobile (the name alone read as "Inductor" on a phone)
        how = RUNTIME_LABELS.get(cost["runtime"], cost["runtime"])
        lines.append(f"predicted latency on {cost['device']} ({how}"
                     + (f", {sym}" if sym else "") + f"): {cost['predicted_ms']:.3f} ms")
        top = sorted((cost.get("by_class_us") or {}).items(), key=lambda kv: -kv[1])[:6]
        if top:
            lines.append("  by op class: " + ", ".join(f"{k} {v / 1e3:.3f} ms" for k, v in top))
    if cm.fidelity:
        lines.append("fidelity: " + ", ".join(f"{k}={v}" for k, v in cm.fidelity.items()))
    for name, rec in (cm.records or {}).items():
        lines.append(f"pass {name}: " + json.dumps(rec, default=str)[:300])
    return "\n".join(lines)
