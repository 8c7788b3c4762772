"""Attacks on `ember.load`, `ember inspect` and the importers: every one is refused with Ember's
one-line error, nothing from an input file runs as code, nothing is written outside the temp
area, and a native program loads only from a trusted artifact.

Each attack is what someone holding the file can do: edit any member and recompute the
manifest's sha256 values (they are not secret), forge the payload kind, pack pickles or zip
bombs, name paths outside the artifact, or write a tiny ONNX file that folds into gigabytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import ember
from ember.artifact import sign_artifact, verify_artifact
from ember.errors import ArtifactError, EmberError, FrontendError
from ember.signing import generate_keypair

PAYLOAD = "Max.__new__.__globals__['__builtins__']['open']('PWNED','w')"


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 8)


@pytest.fixture(scope="module")
def ref_art(model, tmp_path_factory) -> Path:
    """A small artifact with a data-only program (reference interpreter), symbolic batch."""
    m, x = model
    cm = ember.compile(m, (x,), target="reference", dynamic_dims={"x": {0: "batch"}})
    return cm.save(tmp_path_factory.mktemp("art") / "ref.ember")


@pytest.fixture(scope="module")
def aoti_art(model, tmp_path_factory) -> Path:
    """A CPU artifact whose program is an AOTInductor package (a shared library)."""
    m, x = model
    cm = ember.compile(m, (x,), target="cpu", backend_options={"mode": "aoti"})
    assert cm.program.info["kind"] == "aoti"
    return cm.save(tmp_path_factory.mktemp("art") / "aoti.ember")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    d = tmp_path_factory.mktemp("keys")
    priv, pub = generate_keypair(d / "k.pem")
    priv2, pub2 = generate_keypair(d / "other.pem")
    return priv, pub, priv2, pub2


@pytest.fixture(autouse=True)
def _sandbox(tmp_path, monkeypatch):
    """Run each attack in its own folder and temp area; afterwards nothing was written to the
    folder and no extraction directory was left behind."""
    work = tmp_path / "cwd"
    work.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield
    assert not (work / "PWNED").exists()
    assert list(work.iterdir()) == [] or all(p.suffix in (".ember", ".html", ".onnx", ".pt2",
                                                          ".pem") for p in work.iterdir())


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def forge(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None], *,
          rehash: bool = True, compression: int = zipfile.ZIP_STORED) -> Path:
    """Rewrites ``src`` with ``edit`` applied to its members; recomputes the manifest's sha256
    values as an attacker can."""
    mem = _members(src)
    edit(mem)
    if rehash and "manifest.json" in mem:
        man = json.loads(mem["manifest.json"])
        if isinstance(man.get("files"), dict):
            man["files"] = {n: hashlib.sha256(mem[n]).hexdigest() if n in mem else d
                            for n, d in man["files"].items()}
            man["files"].update({n: hashlib.sha256(d).hexdigest() for n, d in mem.items()
                                 if n not in ("manifest.json", "signature.json")})
        mem["manifest.json"] = json.dumps(man).encode()
    with zipfile.ZipFile(dst, "w", compression) as z:
        for n, d in mem.items():
            z.writestr(n, d)
    return dst


def edit_json(member: str, fn: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
    def edit(mem: dict[str, bytes]) -> None:
        doc = json.loads(mem[member])
        fn(doc)
        mem[member] = json.dumps(doc).encode()
    return edit


def refused(path: Path, match: str | None = None, **kw) -> str:
    with pytest.raises(ArtifactError, match=match) as e:
        ember.load(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path.name) in msg, msg
    return msg


# ----------------------------------------------------------------------------- no eval of data
@pytest.mark.parametrize("where", ["input_shape", "output_shape", "attr", "meta", "nested"])
@pytest.mark.parametrize("payload", [
    PAYLOAD,
    "__import__('os').system('touch PWNED')",
    "floor(seq).__class__.__mro__",
    "Symbol('x')",
    "(lambda: 1)()",
    "seq" + "+seq" * 400,
    "(" * 200 + "seq" + ")" * 200,
    "seq**1000000000",
    "9" * 5000,
])
def test_dim_payloads_are_parsed_not_evaluated(ref_art, tmp_path, where, payload):
    def fn(ir: dict) -> None:
        if where == "input_shape":
            ir["inputs"][0]["type"]["shape"][0] = payload
        elif where == "output_shape":
            ir["nodes"][0]["outputs"][0]["type"]["shape"][0] = payload
        elif where == "attr":
            ir["nodes"][0]["attrs"]["evil"] = {"$dim": payload}
        elif where == "meta":
            ir["meta"]["evil"] = {"$dim": payload}
        else:
            ir["nodes"][0]["attrs"]["evil"] = [{"$map": {"k": [{"$dim": payload}]}}]
    bad = forge(ref_art, tmp_path / "dim.ember", edit_json("ir.json", fn))
    refused(bad)
    # inspect and the manifest reader go through the same parser
    r = subprocess.run([sys.executable, "-m", "ember.cli", "inspect", str(bad)],
                       capture_output=True, text=True, timeout=120) if where == "attr" and \
        payload == PAYLOAD else None
    if r is not None:
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("ember: error:"), r.stderr


def test_unknown_op_and_dtype_names_are_refused(ref_art, tmp_path):
    bad = forge(ref_art, tmp_path / "op.ember",
                edit_json("ir.json", lambda ir: ir["nodes"][0].update(op="__import__")))
    refused(bad, "unknown op")
    bad = forge(ref_art, tmp_path / "dt.ember", edit_json(
        "ir.json", lambda ir: ir["inputs"][0]["type"].update(dtype="os.system")))
    refused(bad, "unknown dtype")


# ----------------------------------------------------------------------------- edited manifests
@pytest.mark.parametrize("field,value", [
    ("backend", "../../evil"), ("backend", ["cpu"]), ("target", 7), ("files", []),
    ("files", {"ir.json": "00"}), ("weight_aliases", {"x": "missing"}),
    ("backend_info", "aoti"), ("pass_records", [1]), ("format", "zip"),
])
def test_edited_manifest_fields_are_refused(ref_art, tmp_path, field, value):
    def fn(m: dict) -> None:
        m[field] = value
    bad = forge(ref_art, tmp_path / "m.ember", edit_json("manifest.json", fn), rehash=False)
    refused(bad)


def test_manifest_listing_paths_outside_is_refused(ref_art, tmp_path):
    for name in ("../evil", "/etc/passwd", "payload/../../x", "a\\b", ".."):
        def fn(m: dict, name: str = name) -> None:
            m["files"][name] = "0" * 64
        bad = forge(ref_art, tmp_path / "p.ember", edit_json("manifest.json", fn), rehash=False)
        refused(bad, "unsafe")


def test_member_named_outside_is_refused(ref_art, tmp_path):
    def fn(mem: dict) -> None:
        mem["../../escape.txt"] = b"x"
    refused(forge(ref_art, tmp_path / "e.ember", fn), "unsafe member name")
    assert not (tmp_path / "escape.txt").exists()


# ----------------------------------------------------------------------------- native payloads
def test_unsigned_native_artifact_runs_data_only(aoti_art, model, caplog):
    m, x = model
    with caplog.at_level(logging.WARNING, logger="ember.artifact"):
        cm = ember.load(aoti_art)
    assert cm.program.info["kind"] == "eager"  # rebuilt from the IR: no .so opened
    notices = [r.getMessage() for r in caplog.records if "unsigned" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), rtol=1e-4, atol=1e-5)
    assert "not loaded" in cm.summary()
    cm = ember.load(aoti_art, trust_native=True)
    assert cm.program.info["kind"] == "aoti"


def test_signed_native_artifact_loads_for_its_key_only(aoti_art, model, keys, tmp_path):
    m, x = model
    priv, pub, priv2, pub2 = keys
    art = tmp_path / "signed.ember"
    art.write_bytes(aoti_art.read_bytes())
    sign_artifact(art, priv, signer="ci")
    info = verify_artifact(art, [pub])
    assert info.trusted and info.signer == "ci"
    cm = ember.load(art, trusted_keys=[pub])
    assert cm.program.info["kind"] == "aoti"
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), rtol=1e-4, atol=1e-5)
    # a valid signature by a key the caller does not trust does not unlock native code
    assert ember.load(art, trusted_keys=[pub2]).program.info["kind"] == "eager"


def test_unsigned_mobile_artifact_runs_on_the_reference_interpreter(ref_art, model, tmp_path,
                                                                    caplog):
    """A manifest that says "mobile" would make Ember run an aarch64 library under qemu: from an
    unsigned artifact the IR runs on the reference interpreter instead (the library is never
    looked at, so a forged one cannot run)."""
    from ember.backends.registry import get_backend

    if not get_backend("mobile").available():
        pytest.skip("the mobile backend is not installed here")
    m, x = model

    def fn(mem: dict) -> None:
        man = json.loads(mem["manifest.json"])
        man["backend"], man["target"] = "mobile", "mobile"
        man["backend_info"] = {"backend": "mobile", "kind": "tvm"}
        mem["manifest.json"] = json.dumps(man).encode()
        mem["payload/model.so"] = b"\x7fELF forged"
    forged = forge(ref_art, tmp_path / "mob.ember", fn)
    with zipfile.ZipFile(forged) as z:  # the forged library is listed and hashed like any file
        assert "payload/model.so" in json.loads(z.read("manifest.json"))["files"]
    with caplog.at_level(logging.WARNING, logger="ember.artifact"):
        cm = ember.load(forged)
    assert cm.backend == "reference" and "unsigned" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), rtol=1e-4, atol=1e-5)


def test_forged_payload_kind_never_opens_a_library(aoti_art, tmp_path):
    """The manifest says the CPU payload is an ONNX Runtime model, but the payload is the
    AOTInductor package: ORT refuses it as data; no library is opened."""
    def fn(m: dict) -> None:
        m["backend_info"]["kind"] = "onnxruntime"
    refused(forge(aoti_art, tmp_path / "kind.ember", edit_json("manifest.json", fn)))


def _fake_package(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)
    return buf.getvalue()


@pytest.mark.parametrize("proto", range(6))
@pytest.mark.parametrize("nested", [False, True])
def test_pickles_in_a_native_package_are_refused_even_when_trusted(aoti_art, tmp_path, proto,
                                                                   nested):
    evil = pickle.dumps({"a": [1, 2, 3]}, protocol=proto)
    inner = {"model/data/blob": evil}
    pkg = _fake_package({"model/inner.zip": _fake_package(inner)} if nested else inner)

    def fn(mem: dict) -> None:
        name = next(n for n in mem if n.endswith(".pt2"))
        mem[name] = pkg
    bad = forge(aoti_art, tmp_path / "pk.ember", fn)
    refused(bad, "pickled", trust_native=True)


# ----------------------------------------------------------------------------- zip structure
@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_compressed_members_are_refused(ref_art, tmp_path, method):
    def fn(mem: dict) -> None:
        mem["weights.safetensors"] += b""
    refused(forge(ref_art, tmp_path / "c.ember", fn, compression=method), "compressed")


def test_zip_bomb_is_refused_before_extraction(ref_art, tmp_path):
    bomb = tmp_path / "bomb.ember"
    big = b"\0" * (32 << 20)
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_BZIP2) as z:
        for n, d in _members(ref_art).items():
            z.writestr(n, d)
        z.writestr("payload/bomb", big)
    assert bomb.stat().st_size < (1 << 20)
    refused(bomb, "compressed")
    assert not list(Path(tempfile.gettempdir()).glob("ember-load-*"))


def test_duplicate_member_and_forged_sizes_are_refused(ref_art, tmp_path):
    dup = tmp_path / "dup.ember"
    mem = _members(ref_art)
    with zipfile.ZipFile(dup, "w") as z, pytest.warns(UserWarning):
        for n, d in mem.items():
            z.writestr(n, d)
        z.writestr("ir.json", mem["ir.json"])
    refused(dup, "twice")
    # a central directory that declares a larger size than the member holds
    raw = bytearray(ref_art.read_bytes())
    i = raw.rfind(b"PK\x01\x02")  # the last central directory entry
    raw[i + 24:i + 28] = (1 << 30).to_bytes(4, "little")  # uncompressed size
    forged = tmp_path / "size.ember"
    forged.write_bytes(bytes(raw))
    refused(forged)


def test_symlink_member_is_refused(ref_art, tmp_path):
    link = tmp_path / "link.ember"
    with zipfile.ZipFile(link, "w") as z:
        for n, d in _members(ref_art).items():
            z.writestr(n, d)
        info = zipfile.ZipInfo("payload/link")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    refused(link, "not a regular file")


def test_truncated_and_bit_flipped_artifacts(ref_art, tmp_path):
    data = ref_art.read_bytes()
    for k in (0, 1, 22, len(data) // 3, len(data) // 2, len(data) - 23, len(data) - 1):
        p = tmp_path / f"t{k}.ember"
        p.write_bytes(data[:k])
        refused(p)
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, len(data), 60):
        p = tmp_path / "flip.ember"
        b = bytearray(data)
        b[int(pos)] ^= 1 << int(rng.integers(0, 8))
        p.write_bytes(bytes(b))
        try:
            ember.load(p)  # a flip in zip padding or a timestamp changes nothing
        except EmberError as e:
            assert "\n" not in str(e)


def test_directory_and_missing_paths(tmp_path):
    refused_dir = tmp_path / "d.ember"
    refused_dir.mkdir()
    with pytest.raises(ArtifactError, match="not a file"):
        ember.load(refused_dir)
    with pytest.raises(ArtifactError, match="no such artifact"):
        ember.load(tmp_path / "none.ember")


def test_cuda_kernel_manifest_paths_stay_inside(tmp_path):
    from ember.backends.cuda.launch import _inside

    (tmp_path / "k.json").write_text("{}")
    assert _inside(tmp_path, "k.json") == tmp_path / "k.json"
    for bad in ("../k.json", "/etc/passwd", "a/../../b", "", None):
        with pytest.raises(ArtifactError, match="leaves the payload"):
            _inside(tmp_path, bad)
    (tmp_path / "out").symlink_to("/")
    with pytest.raises(ArtifactError, match="leaves the payload"):
        _inside(tmp_path, "out/etc/passwd")


# ----------------------------------------------------------------------------- signatures
def test_sign_verify_and_every_byte_counts(ref_art, keys, tmp_path):
    priv, pub, _, pub2 = keys
    art = tmp_path / "s.ember"
    art.write_bytes(ref_art.read_bytes())
    sign_artifact(art, priv)
    assert verify_artifact(art, [pub]).trusted
    assert not verify_artifact(art, [pub2]).trusted
    assert ember.load(art, trusted_keys=[pub]).placement["trust"]["signature"].startswith(
        "signed by")
    for member in _members(art):
        if member == "signature.json":
            continue
        def fn(mem: dict, member: str = member) -> None:
            d = bytearray(mem[member])
            d[len(d) // 2] ^= 0x20
            mem[member] = bytes(d)
        # flipping one byte; the attacker even recomputes the manifest hashes
        for rehash in (False,) if member == "manifest.json" else (False, True):
            bad = forge(art, tmp_path / "x.ember", fn, rehash=rehash)
            with pytest.raises(ArtifactError) as e:
                verify_artifact(bad, [pub])
            named = "manifest.json" if (rehash or member == "manifest.json") else member
            assert named in str(e.value), (member, rehash, str(e.value))
            with pytest.raises(ArtifactError):
                ember.load(bad, trusted_keys=[pub])
    # a forged signature statement
    def forge_sig(mem: dict) -> None:
        doc = json.loads(mem["signature.json"])
        doc["statement"]["signer"] = "someone else"
        mem["signature.json"] = json.dumps(doc).encode()
    with pytest.raises(ArtifactError, match="does not verify"):
        verify_artifact(forge(art, tmp_path / "f.ember", forge_sig, rehash=False))
    with pytest.raises(ArtifactError, match="not signed"):
        verify_artifact(ref_art)


def test_cli_keygen_sign_verify_inspect(ref_art, tmp_path):
    from ember.cli import main

    art = tmp_path / "c.ember"
    art.write_bytes(ref_art.read_bytes())
    key = tmp_path / "key.pem"
    assert main(["keygen", str(key)]) == 0
    assert main(["sign", str(art), "--key", str(key), "--signer", "me"]) == 0
    assert main(["verify", str(art), "--trust", str(tmp_path / "key.pub.pem")]) == 0
    r = subprocess.run([sys.executable, "-m", "ember.cli", "inspect", str(art), "--trust",
                        str(tmp_path / "key.pub.pem")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "signature: signed by me" in r.stdout, r.stdout + r.stderr
    assert main(["keygen", str(key)]) == 1  # never overwrites a key


# ----------------------------------------------------------------------------- importers
def _onnx(nodes, inits, out_name="y", out_shape=None) -> bytes:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                     [1])],
                          [helper.make_tensor_value_info(out_name, TensorProto.FLOAT,
                                                         out_shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("case", ["range", "tile", "expand", "constant_of_shape"])
def test_tiny_onnx_cannot_fold_into_gigabytes(tmp_path, case):
    from ember.frontends.onnx import import_onnx

    f = helper.make_tensor
    if case == "range":
        inits = [f("s", TensorProto.FLOAT, [], [0.0]), f("e", TensorProto.FLOAT, [], [1e12]),
                 f("d", TensorProto.FLOAT, [], [1.0])]
        nodes = [helper.make_node("Range", ["s", "e", "d"], ["r"], name="bomb"),
                 helper.make_node("Add", ["x", "r"], ["y"])]
    elif case == "tile":
        inits = [f("c", TensorProto.FLOAT, [4], [1, 2, 3, 4]),
                 f("k", TensorProto.INT64, [1], [1 << 34])]
        nodes = [helper.make_node("Tile", ["c", "k"], ["r"], name="bomb"),
                 helper.make_node("Add", ["x", "r"], ["y"])]
    elif case == "expand":
        inits = [f("c", TensorProto.FLOAT, [1], [1.0]),
                 f("k", TensorProto.INT64, [3], [1 << 12, 1 << 12, 1 << 12])]
        nodes = [helper.make_node("Expand", ["c", "k"], ["r"], name="bomb"),
                 helper.make_node("Add", ["x", "r"], ["y"])]
    else:
        inits = [f("k", TensorProto.INT64, [3], [1 << 12, 1 << 12, 1 << 12])]
        nodes = [helper.make_node("ConstantOfShape", ["k"], ["r"], name="bomb",
                                  value=f("v", TensorProto.FLOAT, [1], [1.0])),
                 helper.make_node("Add", ["x", "r"], ["y"])]
    path = tmp_path / "bomb.onnx"
    path.write_bytes(_onnx(nodes, inits))
    assert path.stat().st_size < 1000
    with pytest.raises(FrontendError, match="bomb") as e:
        import_onnx(str(path))
    assert "\n" not in str(e.value)


def test_onnx_payload_with_external_data_escape_is_refused(model, tmp_path):
    m, x = model
    cm = ember.compile(m, (x,), target="cpu", backend_options={"mode": "onnxruntime"})
    art = cm.save(tmp_path / "ort.ember")

    def fn(mem: dict) -> None:
        name = next(n for n in mem if n.endswith(".onnx"))
        mo = onnx.load_from_string(mem[name])
        init = helper.make_tensor("stolen", TensorProto.UINT8, [16], np.zeros(16, np.uint8))
        init.ClearField("int32_data")
        init.data_location = TensorProto.EXTERNAL
        init.external_data.add(key="location", value="../../../../etc/passwd")
        mo.graph.initializer.append(init)
        mem[name] = mo.SerializeToString()
    refused(forge(art, tmp_path / "ext.ember", fn), "external files")


def test_pt2_with_pickled_or_native_members_is_refused(model, tmp_path):
    from ember.frontends.fx import load_pt2

    m, x = model
    good = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, (x,)), str(good))
    assert load_pt2(good).module()(x).shape == (2, 4)

    def rewrite(dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
        mem = _members(good)
        edit(mem)
        with zipfile.ZipFile(dst, "w") as z:
            for n, d in mem.items():
                z.writestr(n, d)
        return dst

    def pickled(mem: dict) -> None:
        name = next(n for n in mem if n.endswith("model_weights_config.json"))
        cfg = json.loads(mem[name])
        for meta in cfg["config"].values():
            meta["use_pickle"] = True
        mem[name] = json.dumps(cfg).encode()
    with pytest.raises(FrontendError, match="pickled or opaque"):
        load_pt2(rewrite(tmp_path / "p.pt2", pickled))

    def native(mem: dict) -> None:
        mem["m/data/aotinductor/model/evil.so"] = b"\x7fELF"
    with pytest.raises(FrontendError, match="compiled code"):
        load_pt2(rewrite(tmp_path / "n.pt2", native))
    r = subprocess.run([sys.executable, "-m", "ember.cli", "compile", str(tmp_path / "p.pt2")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("ember: error:")], r.stderr


# ----------------------------------------------------------------------------- fuzzing
def _load_or_ember_error(path: Path) -> None:
    try:
        cm = ember.load(path)
    except EmberError as e:
        assert "\n" not in str(e), str(e)
        return
    cm(torch.randn(3, 8))  # what loads must run


def _no_leftovers() -> None:
    assert not list(Path(tempfile.gettempdir()).glob("ember-load-*/**/PWNED"))


@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255),
                                st.sampled_from(["set", "insert", "delete"])),
                      min_size=1, max_size=6))
def test_fuzz_artifact_bytes(ref_art, tmp_path, edits):
    b = bytearray(ref_art.read_bytes())
    for frac, val, how in edits:
        i = min(int(frac * len(b)), len(b) - 1)
        if how == "set":
            b[i] = val
        elif how == "insert":
            b.insert(i, val)
        else:
            del b[i]
    p = tmp_path / "fz.ember"
    p.write_bytes(bytes(b))
    _load_or_ember_error(p)
    _no_leftovers()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
    | st.text(max_size=30) | st.sampled_from(["aoti", "cpu", "reference", "batch", "../x",
                                             PAYLOAD, "float32", "linear"]),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.sampled_from(["$dim", "$map", "$float", "name", "type", "shape", "dtype", "kind"]),
        c, max_size=3),
    max_leaves=10)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*prefix, i))


@pytest.mark.parametrize("member", ["manifest.json", "ir.json"])
@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_json_fields_with_valid_hashes(ref_art, tmp_path, member, data):
    doc = json.loads(_members(ref_art)[member])
    paths = [p for p in _paths(doc) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        cur = doc
        try:
            for k in path[:-1]:
                cur = cur[k]
            cur[path[-1]] = data.draw(_json_values)
        except (KeyError, IndexError, TypeError):
            continue
    p = forge(ref_art, tmp_path / "fj.ember",
              lambda mem: mem.__setitem__(member, json.dumps(doc).encode()),
              rehash=member != "manifest.json")
    _load_or_ember_error(p)
    _no_leftovers()
