"""Signing and verifying ``.ember`` artifacts (Ed25519, through the `cryptography` package).

The artifact's ``manifest.json`` holds the sha256 of every other member, so a signature over
the manifest covers the whole artifact. The signature lives in one more member,
``signature.json``::

    {"statement": {"format": "ember-signature", "version": 1, "algorithm": "ed25519",
                   "manifest_sha256": "...", "files": {"ir.json": "<sha256>", ...},
                   "public_key": "<base64 raw key>", "key_id": "ed25519:<16 hex>",
                   "signer": "...", "signed_at": "2026-12-08T01:00:00Z"},
     "signature": "<base64 Ed25519 signature of the canonical JSON of the statement>"}

A signature proves who wrote the artifact only when the caller names the keys it trusts
(``trusted_keys``): the key inside the statement is whoever signed, not a reason to trust them.
Keys are PEM files: ``ember keygen`` writes a private key (PKCS#8) and its public key
(SubjectPublicKeyInfo). This is the same idea as OpenSSF model-signing (a signed statement of
every file's digest, checked before use), with a plain key instead of a sigstore identity.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError, CompilerError

__all__ = [
    "SIGNATURE",
    "KeyRef",
    "SignatureInfo",
    "generate_keypair",
    "load_public_key",
    "key_id",
    "make_signature",
    "check_signature",
]

log = logging.getLogger(__name__)

SIGNATURE = "signature.json"
_MAX_SIGNATURE_BYTES = 1 << 20
KeyRef = str | os.PathLike | bytes | Any  # a PEM path, PEM bytes, or an Ed25519PublicKey


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:  # a dependency of Ember; absent only in a broken install
        raise CompilerError(f"signing needs the 'cryptography' package: {e}") from None
    return ed25519


def _raw_public(pub: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(pub: Any) -> str:
    """``ed25519:`` and the first 16 hex digits of the sha256 of the raw public key."""
    return "ed25519:" + hashlib.sha256(_raw_public(pub)).hexdigest()[:16]


def generate_keypair(private_path: str | Path, public_path: str | Path | None = None
                     ) -> tuple[Path, Path]:
    """Writes a new Ed25519 private key (PEM, mode 0600) and its public key (PEM)."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    priv_path = Path(private_path)
    pub_path = Path(public_path) if public_path else priv_path.with_suffix(".pub.pem")
    if priv_path.exists():
        raise CompilerError(f"{priv_path}: exists; refusing to overwrite a key")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def _read_pem(ref: str | os.PathLike | bytes, what: str) -> tuple[bytes, str]:
    if isinstance(ref, bytes):
        return ref, what
    p = Path(ref)
    if not p.is_file():
        raise CompilerError(f"{p}: no such {what} file")
    if p.stat().st_size > 64 << 10:
        raise CompilerError(f"{p}: too large for a {what} (PEM expected)")
    return p.read_bytes(), str(p)


def _load_private_key(ref: str | os.PathLike | bytes) -> Any:
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    data, name = _read_pem(ref, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise CompilerError(f"{name}: not a PEM private key without a password ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise CompilerError(f"{name}: an Ed25519 key is needed (ember keygen writes one)")
    return key


def load_public_key(ref: KeyRef) -> Any:
    """An Ed25519 public key from a PEM path or bytes (a private key PEM gives its public
    half); an ``Ed25519PublicKey`` passes through."""
    from cryptography.hazmat.primitives import serialization

    ed25519 = _crypto()
    if isinstance(ref, ed25519.Ed25519PublicKey):
        return ref
    if not isinstance(ref, str | os.PathLike | bytes):
        raise CompilerError(f"a trusted key must be a PEM path or bytes, not "
                            f"{type(ref).__name__}")
    data, name = _read_pem(ref, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        return _load_private_key(ref).public_key()
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise CompilerError(f"{name}: an Ed25519 public key is needed")
    return key


def _canonical(statement: Mapping[str, Any]) -> bytes:
    return json.dumps(statement, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode()


@dataclass(frozen=True)
class SignatureInfo:
    """What a verified signature says: who (key id, signer name), when, and whether the key
    is one the caller trusts."""

    key_id: str
    signer: str
    signed_at: str
    trusted: bool

    def __str__(self) -> str:
        who = f"{self.signer} " if self.signer else ""
        return (f"signed by {who}({self.key_id}) at {self.signed_at}; "
                + ("a trusted key" if self.trusted else "key not among the trusted keys"))


def check_signature(path: Path, raw_signature: bytes, manifest_bytes: bytes,
                    files: Mapping[str, str], trusted_keys: Iterable[KeyRef] = ()
                    ) -> SignatureInfo:
    """Checks ``signature.json`` against the manifest's bytes and file digests.

    Raises:
        ArtifactError: naming the artifact and what does not match (a tampered manifest or
            signature); never returns for a signature that does not verify.
    """
    from cryptography.exceptions import InvalidSignature

    ed25519 = _crypto()
    if len(raw_signature) > _MAX_SIGNATURE_BYTES:
        raise ArtifactError(f"{path}: {SIGNATURE} is too large")
    try:
        doc = json.loads(raw_signature)
        st = doc["statement"]
        sig = base64.b64decode(doc["signature"], validate=True)
        pub = ed25519.Ed25519PublicKey.from_public_bytes(
            base64.b64decode(st["public_key"], validate=True))
        if st.get("format") != "ember-signature" or st.get("algorithm") != "ed25519":
            raise ValueError("not an ember-signature statement with algorithm ed25519")
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: {SIGNATURE} is malformed ({str(e)[:120]})") from None
    try:
        pub.verify(sig, _canonical(st))
    except InvalidSignature:
        raise ArtifactError(f"{path}: {SIGNATURE} does not verify (the signed statement was "
                            f"changed or the signature is forged)") from None
    if st.get("manifest_sha256") != hashlib.sha256(manifest_bytes).hexdigest():
        raise ArtifactError(f"{path}: manifest.json does not match its signature (the manifest "
                            f"was changed after signing)")
    if st.get("files") != dict(files):
        raise ArtifactError(f"{path}: the signed file list differs from manifest.json")
    raw = _raw_public(pub)
    trusted = any(_raw_public(load_public_key(k)) == raw for k in trusted_keys)
    return SignatureInfo(key_id(pub), str(st.get("signer", ""))[:100],
                         str(st.get("signed_at", ""))[:40], trusted)


def make_signature(manifest_bytes: bytes, files: Mapping[str, str],
                   key: str | os.PathLike | bytes, signer: str = "") -> tuple[bytes, str]:
    """The ``signature.json`` bytes signing a manifest (and so every member it lists), and the
    signing key's id."""
    priv = _load_private_key(key)
    st = {"format": "ember-signature", "version": 1, "algorithm": "ed25519",
          "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "files": dict(files),
          "public_key": base64.b64encode(_raw_public(priv.public_key())).decode(),
          "key_id": key_id(priv.public_key()), "signer": signer,
          "signed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    doc = {"statement": st, "signature": base64.b64encode(priv.sign(_canonical(st))).decode()}
    return json.dumps(doc, indent=1).encode(), str(st["key_id"])
