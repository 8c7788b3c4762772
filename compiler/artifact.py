"""The ``.ember`` artifact: one zip file, no pickle anywhere.

Layout::

    manifest.json          format version, signature (symbolic dims), target, backend and why,
                           passes and their records, fidelity, tool versions, sha256 of each file
    ir.json                the optimized IR (ember.ir.serialize)
    weights.safetensors    every IR param (tensors shared between params stored once)
    payload/...            the backend's files (e.g. an AOTInductor .pt2 package)

An optional ``signature.json`` (``ember sign``, `ember.signing`) signs the manifest, and so
every member. `load` checks the zip's structure (stored members only, safe names, sizes within
the file), the signature if any, the format version and every checksum while extracting, before
it reads anything else, and refuses a tampered, truncated or mismatched artifact with one line
naming the file and problem. A native program is loaded only from a trusted artifact.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import platform
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactError, CompilerError
from .ir import Graph, graph_from_json, graph_to_json, verify
from .signing import SIGNATURE, SignatureInfo, check_signature, make_signature

__all__ = ["save_artifact", "read_artifact", "LoadedArtifact", "read_manifest", "read_signature",
           "verify_members", "sign_artifact", "verify_artifact", "to_jsonable", "FORMAT_VERSION"]

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


def save_artifact(cm: Any, path: Path, *, data: dict[str, bytes] | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Writes ``cm`` (an `ember.compiled.CompiledModel`) to ``path`` (a zip; ``.ember`` suffix
    recommended) atomically. ``data``: more members (name -> bytes, e.g. a causal LM's
    ``tokenizer.json``), listed and hashed like the rest; ``extra``: more manifest fields."""
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
        for name, blob in (data or {}).items():  # e.g. an LM's tokenizer.json: listed, hashed
            if not _NAME_RE.match(name) or name in files or name == MANIFEST:
                raise ArtifactError(f"cannot store a data file named {name!r}")
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(blob)
            files.append(name)
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
            **to_jsonable(extra or {}),
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


# Limits on what a loaded artifact may ask of this machine. Ember writes stored (uncompressed)
# members, so a member's size on disk is its size extracted: nothing can expand.
_MAX_MEMBERS = 4096
_MAX_MANIFEST_BYTES = 16 << 20
_MAX_IR_BYTES = 1 << 30
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}(/[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}){0,7}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _open(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise ArtifactError(f"{path}: no such artifact")
    if not path.is_file():
        raise ArtifactError(f"{path}: not a file; an Ember artifact is a single .ember file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: not a valid Ember artifact (truncated or corrupt: "
                            f"{str(e)[:120]})") from None


def _check_members(z: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """The members by name, after refusing what Ember never writes: compression, encryption,
    links, duplicate or unsafe names, sizes beyond the archive's own."""
    infos = z.infolist()
    if len(infos) > _MAX_MEMBERS:
        raise ArtifactError(f"{path}: {len(infos)} members (at most {_MAX_MEMBERS})")
    out: dict[str, zipfile.ZipInfo] = {}
    total = 0
    size = path.stat().st_size
    for i in infos:
        name = i.filename
        if not _NAME_RE.match(name) or ".." in name.split("/"):
            raise ArtifactError(f"{path}: unsafe member name {name[:80]!r}")
        if name in out:
            raise ArtifactError(f"{path}: member {name} appears twice")
        if i.compress_type != zipfile.ZIP_STORED:
            raise ArtifactError(f"{path}: member {name} is compressed (method "
                                f"{i.compress_type}); Ember artifacts store members uncompressed")
        if i.flag_bits & 0x1:
            raise ArtifactError(f"{path}: member {name} is encrypted")
        if (i.external_attr >> 16) & 0o170000 not in (0, 0o100000):
            raise ArtifactError(f"{path}: member {name} is not a regular file (a link or device)")
        if i.file_size != i.compress_size:
            raise ArtifactError(f"{path}: member {name} declares {i.file_size} bytes stored "
                                f"in {i.compress_size}")
        total += i.file_size
        if total > size:
            raise ArtifactError(f"{path}: members declare more bytes than the file holds "
                                f"(overlapping or forged sizes)")
        out[name] = i
    return out


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, cap: int) -> bytes:
    if info.file_size > cap:
        raise ArtifactError(f"{path}: {info.filename} is {info.file_size} bytes "
                            f"(at most {cap})")
    try:
        return z.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: {info.filename} is unreadable ({str(e)[:120]})") from None


def _parse_manifest(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        m = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ArtifactError(f"{path}: {MANIFEST} is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(m, dict) or m.get("format") != "ember-artifact":
        raise ArtifactError(f"{path}: {MANIFEST} does not describe an Ember artifact")
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {str(m.get('format_version'))[:20]} is not "
                            f"supported by this Ember (it reads version {FORMAT_VERSION})")
    files = m.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.match(v)
            for k, v in files.items()):
        raise ArtifactError(f"{path}: {MANIFEST} field 'files' must map names to sha256 digests")
    for f in files:
        if not _NAME_RE.match(f) or ".." in f.split("/") or f in (MANIFEST, SIGNATURE):
            raise ArtifactError(f"{path}: unsafe file name in manifest: {f[:80]!r}")
    for f in ("ir.json", "weights.safetensors"):
        if f not in files:
            raise ArtifactError(f"{path}: {MANIFEST} lists no {f}")
    for key, kind in (("backend", str), ("target", str), ("backend_info", dict),
                      ("passes", str), ("pass_records", dict), ("fidelity", dict),
                      ("placement", dict), ("weight_aliases", dict)):
        if key in m and not isinstance(m[key], kind):
            raise ArtifactError(f"{path}: {MANIFEST} field '{key}' must be "
                                f"{'a string' if kind is str else 'an object'}")
    if not isinstance(m.get("backend"), str) or not isinstance(m.get("target"), str):
        raise ArtifactError(f"{path}: {MANIFEST} needs 'backend' and 'target' strings")
    return m


def _manifest_and_members(z: zipfile.ZipFile, path: Path
                          ) -> tuple[bytes, dict[str, Any], dict[str, zipfile.ZipInfo]]:
    members = _check_members(z, path)
    if MANIFEST not in members:
        raise ArtifactError(f"{path}: {MANIFEST} is missing (not an Ember artifact)")
    raw = _read_member(z, members[MANIFEST], path, _MAX_MANIFEST_BYTES)
    m = _parse_manifest(raw, path)
    files: dict[str, str] = m["files"]
    extra = sorted(set(members) - set(files) - {MANIFEST, SIGNATURE})
    if extra:
        raise ArtifactError(f"{path}: unexpected file(s) not in the manifest: {extra[:3]}")
    for f in files:
        if f not in members:
            raise ArtifactError(f"{path}: {f} listed in the manifest is missing (truncated?)")
    return raw, m, members


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Reads and checks the manifest (format, version, field types) without verifying hashes."""
    path = Path(path)
    with _open(path) as z:
        return _manifest_and_members(z, path)[1]


def read_signature(path: str | Path) -> bytes | None:
    """The raw ``signature.json`` of an artifact, or None when it is unsigned."""
    path = Path(path)
    with _open(path) as z:
        members = _check_members(z, path)
        if SIGNATURE not in members:
            return None
        return _read_member(z, members[SIGNATURE], path, 1 << 20)


def _copy_hashed(z: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path | None, path: Path,
                 digest: str) -> None:
    """Streams one member to ``dest`` (or nowhere), hashing as it goes; refuses a mismatch."""
    h = hashlib.sha256()
    try:
        with z.open(info) as r:
            w = open(dest, "xb") if dest is not None else None
            try:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    h.update(chunk)
                    if w is not None:
                        w.write(chunk)
            finally:
                if w is not None:
                    w.close()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: {info.filename} cannot be read ({str(e)[:120]}); the "
                            f"file is truncated or corrupt") from None
    if h.hexdigest() != digest:
        raise ArtifactError(f"{path}: {info.filename} fails its sha256 check (modified or "
                            f"corrupted)")


def verify_members(path: str | Path) -> tuple[bytes, dict[str, str]]:
    """Checks every member's sha256 against the manifest (extracting nothing).

    Returns:
        the manifest's bytes and its ``files`` map.
    """
    path = Path(path)
    with _open(path) as z:
        raw, m, members = _manifest_and_members(z, path)
        for f, digest in m["files"].items():
            _copy_hashed(z, members[f], None, path, digest)
    return raw, dict(m["files"])


def sign_artifact(path: str | Path, key: Any, signer: str = "") -> str:
    """Signs ``path`` in place (replacing an earlier signature); returns the key id.

    Every member is checked against the manifest first, so only an intact artifact is signed.
    """
    path = Path(path)
    raw, files = verify_members(path)
    sig, kid = make_signature(raw, files, key, signer)
    tmp = path.with_name(path.name + ".sign.tmp")
    try:
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as dst:
            dst.writestr(MANIFEST, raw)
            for f in files:
                with src.open(f) as r, dst.open(f, "w") as w:
                    shutil.copyfileobj(r, w, 1 << 20)
            dst.writestr(SIGNATURE, sig)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("signed %s with %s", path, kid)
    return kid


def verify_artifact(path: str | Path, trusted_keys: Iterable[Any] = ()) -> SignatureInfo:
    """Verifies the signature and every member's sha256 of ``path``.

    Raises:
        ArtifactError: the artifact is unsigned, or naming the member (or the manifest) that
            fails.
    """
    path = Path(path)
    raw, files = verify_members(path)
    sig = read_signature(path)
    if sig is None:
        raise ArtifactError(f"{path}: not signed (no {SIGNATURE}); sign it with "
                            f"`ember sign {path.name} --key KEY.pem`")
    return check_signature(path, sig, raw, files, list(trusted_keys))


_EXTRACTED: list[str] = []


def _cleanup() -> None:
    for d in _EXTRACTED:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)

# payloads that are machine code: loaded only from a trusted artifact
_NATIVE_BACKENDS = {"cuda": "CUDA cubins", "mobile": "an aarch64 shared library"}


def _native_payload(backend: str, info: Mapping[str, Any]) -> str | None:
    """What native code the artifact's program would load, or None for a data-only program."""
    if backend == "cpu" and info.get("kind") == "aoti":
        return "an AOTInductor shared library"
    return _NATIVE_BACKENDS.get(backend)


@dataclass
class LoadedArtifact:
    """What `read_artifact` rebuilt: the IR, a runnable program and the manifest's records
    (`ember.compiled.load` makes a `CompiledModel` of it)."""

    graph: Graph
    program: Any
    target: str
    backend: str
    pipeline: str = ""
    records: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None  # the extracted members (kept until the process exits)


def read_artifact(path: str | Path, *, fallback: str | None = None,
                  trusted_keys: Iterable[Any] | None = None, trust_native: bool = False
                  ) -> LoadedArtifact:
    """Reads a ``.ember`` artifact: its IR, weights and a runnable program.

    Nothing in the artifact is evaluated: dims are parsed by a strict grammar, weights are
    safetensors, and a native program (AOTInductor ``.so``, CUDA cubins, a mobile ``.so``) is
    loaded only from a trusted artifact; otherwise Ember rebuilds a data-only program from the
    IR and weights and says so in one line.

    Args:
        path: the artifact.
        fallback: a backend to use when the artifact's backend cannot run here (e.g.
            "reference" to run a CUDA artifact's IR on the CPU). Default: refuse with the reason.
        trusted_keys: public keys (PEM paths or bytes) whose signature makes the artifact
            trusted; a signature that does not verify is refused whatever the keys.
        trust_native: load a native program even from an unsigned artifact.

    Raises:
        ArtifactError: one line naming the artifact, the member or field, and the problem.
    """
    path = Path(path)
    tmp = tempfile.mkdtemp(prefix="ember-load-")
    ok = False
    try:
        cm = _load(path, Path(tmp), fallback, list(trusted_keys or ()), trust_native)
        ok = True
        return cm
    except CompilerError as e:  # a backend's refusal, or a field naming what Ember does not know
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__).replace(tmp + "/", "")
        if isinstance(e, ArtifactError) and msg == str(e):
            raise
        raise ArtifactError(msg if str(path) in msg else f"{path}: {msg}") from None
    except (MemoryError, RecursionError) as e:
        raise ArtifactError(f"{path}: too large or too deeply nested to load "
                            f"({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001  (bad input must end as Ember's one-line error)
        log.debug("loading %s failed", path, exc_info=True)
        raise ArtifactError(f"{path}: cannot be loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    finally:
        if ok:
            _EXTRACTED.append(tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _load(path: Path, root: Path, fallback: str | None, trusted_keys: list[Any],
          trust_native: bool) -> LoadedArtifact:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ember.backends.registry import get_backend


    with _open(path) as z:
        raw, m, members = _manifest_and_members(z, path)
        files: dict[str, str] = m["files"]
        signature = None
        if SIGNATURE in members:
            signature = check_signature(
                path, _read_member(z, members[SIGNATURE], path, 1 << 20), raw, files,
                trusted_keys)
        if members["ir.json"].file_size > _MAX_IR_BYTES:
            raise ArtifactError(f"{path}: ir.json is {members['ir.json'].file_size} bytes "
                                f"(at most {_MAX_IR_BYTES})")
        for f, digest in files.items():
            dest = root / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            _copy_hashed(z, members[f], dest, path, digest)
    try:
        weights = load_file(str(root / "weights.safetensors"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: weights.safetensors is unreadable ({str(e)[:120]})") \
            from None
    for alias, canon in (m.get("weight_aliases") or {}).items():
        if not isinstance(canon, str) or canon not in weights:
            raise ArtifactError(f"{path}: {MANIFEST} field 'weight_aliases': {str(alias)[:60]} "
                                f"names no stored tensor")
        weights[str(alias)] = weights[canon]
    try:
        graph = graph_from_json(json.loads((root / "ir.json").read_text()), weights)
        verify(graph)
    except (ValueError, KeyError, TypeError, RecursionError, CompilerError) as e:
        raise ArtifactError(f"{path}: ir.json is invalid ({str(e).splitlines()[0][:200]})") \
            from None
    backend = m["backend"]
    be = get_backend(backend)
    info = m.get("backend_info") or {}
    native = _native_payload(backend, info)
    trust = {"signature": str(signature) if signature else "unsigned",
             "native": native or "none"}
    avail = be.available()
    if not avail.ok:
        if fallback is None:
            raise ArtifactError(f"{path}: built for backend '{backend}' (target "
                                f"'{m['target']}'), which cannot run here: {avail.reason}. "
                                f"Load with fallback='reference' to run its IR on the CPU.")
        backend = fallback
        program = get_backend(fallback).compile(graph, [])
    elif native and not (trust_native or (signature and signature.trusted)):
        why = ("signed by a key that is not trusted" if signature else "unsigned")
        if backend == "mobile":
            backend = "reference"
            program = get_backend("reference").compile(graph, [])
            how = "its IR on the reference interpreter"
        else:
            program = be.load(root / "payload", info, graph=graph, allow_native=False)
            how = "a program rebuilt from its IR and weights"
        trust["native"] = f"not loaded ({native}): {why}"
        log.warning("%s: %s artifact with %s: running %s (pass trusted_keys= / --trust KEY, "
                    "or trust_native=True / --trust-native, to load it)", path.name, why,
                    native, how)
    else:
        program = be.load(root / "payload", info, graph=graph)
    placement = dict(m.get("placement") or {})
    placement["trust"] = trust
    return LoadedArtifact(graph, program, target=m["target"], backend=backend,
                          pipeline=m.get("passes", ""), records=m.get("pass_records", {}),
                          fidelity=m.get("fidelity", {}), placement=placement, manifest=m,
                          root=root)
