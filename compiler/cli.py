"""The ``ember`` command line: compile, run, generate, inspect, report, bench, sign, verify,
keygen.

Errors exit non-zero with one clear line (no traceback unless ``--debug``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CompilerError

__all__ = ["main"]


def _parse_symbols(items: Sequence[str]) -> dict[str, int]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise CompilerError(f"--symbol '{it}' must be NAME=VALUE (e.g. batch=1)")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise CompilerError(f"--symbol '{it}': value must be an integer") from None
    return out


def _parse_input_shapes(items: Sequence[str]) -> dict[str, list[int | str]] | None:
    """``x=batch,3,224,224`` -> {"x": ["batch", 3, 224, 224]} (ints fixed, names symbolic)."""
    if not items:
        return None
    out: dict[str, list[int | str]] = {}
    for it in items:
        if "=" not in it:
            raise CompilerError(f"--input-shape '{it}' must be NAME=D0,D1,... "
                                f"(e.g. x=batch,3,224,224)")
        k, v = it.split("=", 1)
        out[k.strip()] = [int(d) if d.strip().lstrip("-").isdigit() else d.strip()
                          for d in v.split(",")]
    return out


def _load_inputs(paths: Sequence[str]) -> list[np.ndarray]:
    arrays: list[np.ndarray] = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise CompilerError(f"{path}: no such input file")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    arrays.extend(z[k] for k in z.files)
            else:
                arrays.append(np.load(path, allow_pickle=False))
        except ValueError as e:
            raise CompilerError(f"{path}: not a numpy .npy/.npz file ({e})") from None
    return arrays


def _require_static_onnx(model: str, shapes: dict[str, list[int | str]] | None) -> None:
    """Mobile artifacts are static-shape: every ONNX input dim must be fixed, by the file or by
    ``--input-shape``; otherwise one line says which input and what to pass."""
    import onnx

    from ember.driver import _default_symbol_value

    proto = onnx.load(model, load_external_data=False)
    inits = {t.name for t in proto.graph.initializer}
    for i in proto.graph.input:
        if i.name in inits or not i.type.HasField("tensor_type"):
            continue
        dims: list[int | str] = list((shapes or {}).get(i.name) or [])
        if not dims:
            for k, d in enumerate(i.type.tensor_type.shape.dim):
                fixed = d.HasField("dim_value") and d.dim_value > 0
                dims.append(int(d.dim_value) if fixed else (d.dim_param or f"dim{k}"))
        syms = [d for d in dims if isinstance(d, str)]
        if syms:
            fix = ",".join(str(_default_symbol_value(d)) if isinstance(d, str) else str(d)
                           for d in dims)
            raise CompilerError(
                f"--target mobile compiles static shapes, but input '{i.name}' has symbolic "
                f"dim(s) {', '.join(syms)}: fix them with --input-shape {i.name}={fix} "
                f"(or --symbol {syms[0]}=N)")


def _sign_if_asked(a: argparse.Namespace, out: Path) -> None:
    """``--sign KEY``: signs the artifact just written."""
    if a.sign:
        from ember.artifact import sign_artifact

        print(f"signed {out} with {sign_artifact(out, a.sign, signer=a.signer or '')}")


def _compile_lm(a: argparse.Namespace) -> int:
    """``ember compile MODEL --task generate``: a transformers folder or .gguf -> an LM .ember."""
    from ember.lm import compile_lm
    from ember.lm_artifact import load_hf, save_lm
    from ember.tokenizer import Tokenizer

    if a.passes and a.passes != "O2":
        raise CompilerError("--task generate compiles with the exact O2 pipeline for now")
    model, hf_tok = load_hf(a.model)
    lm = compile_lm(model)
    tok = Tokenizer.from_hf(hf_tok)
    out = Path(a.output or Path(a.model).with_suffix(".ember").name)
    save_lm(lm, tok, out)
    _sign_if_asked(a, out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): causal LM, {lm.spec.layers} "
          f"layers, vocabulary {lm.vocab_size}, up to {lm.max_positions} positions")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    import time

    from ember.generate import GenerationConfig, stream_tokens
    from ember.lm_artifact import load_lm

    lm, tok, defaults = load_lm(a.artifact, trusted_keys=a.trust or (),
                                trust_native=a.trust_native)
    text = tok.apply_chat_template([{"role": "user", "content": a.prompt}]) if a.chat \
        else a.prompt
    ids = tok.encode(text)
    eos = [t for t in (tok.token_id(tok.eos_token), *defaults.get("stop_token_ids", ()))
           if t is not None]
    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                           temperature=a.temperature if a.temperature > 0 else 1.0,
                           top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                           stop_token_ids=tuple(eos))
    t0 = time.perf_counter()
    first = None
    made: list[int] = []

    def tokens() -> Any:
        for t in stream_tokens(lm, ids, cfg):
            made.append(t)
            yield t
    for piece in tok.decoder().feed(tokens()):
        if first is None:
            first = time.perf_counter() - t0
        sys.stdout.write(piece)
        sys.stdout.flush()
    total = time.perf_counter() - t0
    n = len(made)
    rate = (n - 1) / (total - first) if first is not None and n > 1 and total > first else 0.0
    print(f"\n[{len(ids)} prompt tokens, {n} new; time to first token "
          f"{(first or 0) * 1e3:.0f} ms, decode {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_compile(a: argparse.Namespace) -> int:
    import ember
    from ember.driver import make_example_inputs
    from ember.frontends import import_model

    if not Path(a.model).exists():
        raise CompilerError(f"{a.model}: no such file")
    if a.sign:
        from ember.signing import load_public_key

        load_public_key(a.sign)  # a bad key fails now, not after the compile
    if a.task == "generate":
        return _compile_lm(a)
    passes = a.passes or f"O{a.opt}"
    shapes = _parse_input_shapes(a.input_shape)
    if shapes and not str(a.model).lower().endswith(".onnx"):
        raise CompilerError("--input-shape applies to .onnx models (a .pt2 carries its shapes)")
    if a.target == "mobile" and str(a.model).lower().endswith(".onnx") and not (
            a.example or a.symbol):
        _require_static_onnx(a.model, shapes)
    example = None
    if a.example:
        example = [__import__("torch").from_numpy(x) for x in _load_inputs(a.example)]
    elif a.symbol:
        g = import_model(a.model, dynamic_dims=shapes)
        example = make_example_inputs(g, _parse_symbols(a.symbol))
    calib: Any = None
    if a.calib:
        calib = [tuple(__import__("torch").from_numpy(x) for x in _load_inputs([a.calib]))]
    max_drop = _parse_drop(a.max_drop) if a.max_drop is not None else None
    if max_drop is not None:
        if calib is None:
            raise CompilerError("--max-drop needs calibration data: --calib DATA.npz")
        labels = _load_inputs([a.labels])[0] if a.labels else None
        calib = (calib[0], labels)
    elif a.labels:
        raise CompilerError("--labels is used by the planner only: add --max-drop")
    cm = ember.compile(a.model, example, dynamic_dims=shapes, target=a.target, passes=passes,
                       strict=a.strict,
                       verify=a.debug, progress=not a.quiet, calib=calib, max_drop=max_drop,
                       metric=a.metric)
    out = Path(a.output or Path(a.model).with_suffix(".ember").name)
    cm.save(out)
    _sign_if_asked(a, out)
    if a.emit == "onnx":
        from ember.backends.cpu.onnx import export_onnx

        rep = export_onnx(cm.graph, out.with_suffix(".onnx"))
        print(f"wrote {out.with_suffix('.onnx')}" + (f" ({rep})" if str(rep) else ""))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): target={cm.target} "
          f"backend={cm.backend} nodes={len(cm.graph.nodes)}")
    if cm.fidelity and "example_max_rel_error" in cm.fidelity:
        print(f"fidelity vs reference: max rel error {cm.fidelity['example_max_rel_error']:.2e}")
    elif cm.fidelity and "skipped" in cm.fidelity:
        print(f"fidelity not checked: {cm.fidelity['skipped']}")
    if "planner" in cm.records:
        pl = cm.records["planner"]
        sp = f"{pl['speedup']:.2f}x measured" if pl.get("speedup") else "speedup not measured"
        print(f"planner: {pl['pipeline']}\n  held-out {pl['metric']} drop "
              f"{pl['heldout_drop']:+.4f} (budget {pl['max_drop']}), {sp}, predicted "
              f"{pl['predicted_speedup']:.2f}x, {pl['candidates']} candidates")
    return 0


def _parse_drop(text: str) -> float:
    """``"1%"`` -> 0.01, ``"0.01"`` -> 0.01."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise CompilerError(f"--max-drop '{text}': give a percent (1%) or a fraction (0.01)") \
            from None
    if not 0 <= v < 1:
        raise CompilerError(f"--max-drop '{text}': must be in [0, 1) as a fraction, or a percent")
    return v


def cmd_run(a: argparse.Namespace) -> int:
    import ember

    cm = ember.load(a.artifact, fallback="reference" if a.fallback else None,
                    trusted_keys=a.trust or (), trust_native=a.trust_native)
    inputs = _load_inputs(a.input)
    outs = cm(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if a.output:
        if len(a.output) == 1 and a.output[0].endswith(".npz"):
            np.savez(a.output[0], **dict(zip(cm.output_names, outs)))
        elif len(a.output) != len(outs):
            raise CompilerError(f"model has {len(outs)} outputs ({', '.join(cm.output_names)}) "
                                f"but {len(a.output)} --output paths were given "
                                f"(or give one .npz)")
        else:
            for p, o in zip(a.output, outs):
                np.save(p, o)
    for n, o in zip(cm.output_names, outs):
        print(f"{n}: {o.dtype}{list(o.shape)}  mean={float(np.mean(o)):.6g}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    import ember
    from ember.artifact import read_manifest

    if a.json:
        print(json.dumps(read_manifest(a.artifact), indent=1))
        return 0
    cm = ember.load(a.artifact, fallback="reference", trusted_keys=a.trust or (),
                    trust_native=a.trust_native)
    print(f"artifact: {a.artifact}")
    print(cm.summary())
    if a.ir:
        print(cm.graph)
    return 0


def cmd_sign(a: argparse.Namespace) -> int:
    from ember.artifact import sign_artifact

    kid = sign_artifact(a.artifact, a.key, signer=a.signer or "")
    print(f"signed {a.artifact} with {kid}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from ember.artifact import verify_artifact

    info = verify_artifact(a.artifact, a.trust or ())
    print(f"{a.artifact}: signature and every file verify; {info}")
    if a.trust and not info.trusted:
        raise CompilerError(f"{a.artifact}: signed by {info.key_id}, which is not among the "
                            f"--trust keys")
    return 0


def cmd_keygen(a: argparse.Namespace) -> int:
    from ember.signing import generate_keypair

    priv, pub = generate_keypair(a.output, a.public)
    print(f"wrote {priv} (private: keep it secret) and {pub} (public: give it to whoever "
          f"loads your artifacts, as --trust {pub.name})")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from ember.report import write_report

    out = write_report(a.artifact, a.output or Path(a.artifact).with_suffix(".html").name,
                       measure=not a.no_measure)
    print(f"wrote {out}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from ember.bench import bench_model_file

    rows = bench_model_file(a.model, repeats=a.repeats, threads=a.threads,
                            symbols=_parse_symbols(a.symbol), passes=a.passes)
    print(rows)
    return 0


def _trust_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust", action="append", metavar="KEY.pub.pem",
                   help="trust artifacts signed by this public key: their native program "
                        "(AOTInductor .so, cubins, mobile .so) is loaded (repeatable)")
    p.add_argument("--trust-native", action="store_true",
                   help="load a native program even from an unsigned artifact")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ember", description="Ember ahead-of-time model compiler")
    p.add_argument("--debug", action="store_true", help="tracebacks and IR checks")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compile", help="compile a .onnx or torch.export .pt2 model, or a causal "
                       "LM (transformers folder or .gguf) with --task generate")
    c.add_argument("model")
    c.add_argument("--task", choices=["forward", "generate"], default="forward",
                   help="generate: a causal LM with a KV cache, its tokenizer and template")
    c.add_argument("-o", "--output", help="artifact path (default: MODEL.ember)")
    c.add_argument("--target", default="cpu", choices=["cpu", "cuda", "mobile", "reference"])
    c.add_argument("-O", dest="opt", type=int, default=2, choices=[0, 1, 2, 3])
    c.add_argument("--passes", help='pipeline text, e.g. "O2,quantize{scheme=w8a8-dynamic}"')
    c.add_argument("--example", nargs="+", help="example inputs (.npy each, or one .npz)")
    c.add_argument("--input-shape", nargs="+", help="ONNX input shapes, NAME=D0,D1,... with "
                   "ints fixed and names symbolic, e.g. x=batch,3,224,224")
    c.add_argument("--symbol", nargs="+", help="values for symbolic dims of generated "
                   "example inputs, e.g. batch=1 seq=128")
    c.add_argument("--calib", help="calibration inputs (.npz)")
    c.add_argument("--max-drop", help="accuracy budget for the planner: 1%% or 0.01 (needs "
                   "--calib)")
    c.add_argument("--labels", help="labels for --calib (.npy): task accuracy as the metric")
    c.add_argument("--metric", choices=["accuracy", "top1_agreement", "cosine"],
                   help="planner metric (default: accuracy with labels, else by output shape)")
    c.add_argument("--emit", choices=["onnx"], help="also write the optimized IR as ONNX")
    c.add_argument("--strict", action="store_true", help="fallbacks are errors")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    c.add_argument("--sign", metavar="KEY.pem", help="sign the artifact with this private key")
    c.add_argument("--signer", help="a name recorded in the signature")
    c.set_defaults(fn=cmd_compile)

    r = sub.add_parser("run", help="run an artifact on .npy inputs")
    r.add_argument("artifact")
    r.add_argument("--input", nargs="+", required=True, help=".npy files in input order, or .npz")
    r.add_argument("--output", nargs="+", help=".npy per output, or one .npz")
    r.add_argument("--fallback", action="store_true",
                   help="run on the reference backend if the artifact's backend is unavailable")
    _trust_args(r)
    r.set_defaults(fn=cmd_run)

    i = sub.add_parser("inspect", help="print an artifact's manifest and IR summary")
    i.add_argument("artifact")
    i.add_argument("--ir", action="store_true", help="print the whole IR")
    i.add_argument("--json", action="store_true", help="print the raw manifest")
    _trust_args(i)
    i.set_defaults(fn=cmd_inspect)

    gn = sub.add_parser("generate", help="generate text with a causal-LM artifact, streaming")
    gn.add_argument("artifact")
    gn.add_argument("--prompt", required=True)
    gn.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gn.add_argument("--max-new-tokens", type=int, default=128)
    gn.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gn.add_argument("--top-k", type=int, default=0)
    gn.add_argument("--top-p", type=float, default=1.0)
    gn.add_argument("--seed", type=int, default=0)
    _trust_args(gn)
    gn.set_defaults(fn=cmd_generate)

    sg = sub.add_parser("sign", help="sign an artifact (Ed25519; covers the manifest and "
                        "every file)")
    sg.add_argument("artifact")
    sg.add_argument("--key", required=True, metavar="KEY.pem", help="private key (ember keygen)")
    sg.add_argument("--signer", help="a name recorded in the signature")
    sg.set_defaults(fn=cmd_sign)

    vf = sub.add_parser("verify", help="verify an artifact's signature and every file's sha256")
    vf.add_argument("artifact")
    vf.add_argument("--trust", action="append", metavar="KEY.pub.pem",
                    help="require a signature by this public key (repeatable)")
    vf.set_defaults(fn=cmd_verify)

    kg = sub.add_parser("keygen", help="write a new Ed25519 signing key pair")
    kg.add_argument("output", help="private key path (e.g. ember-key.pem)")
    kg.add_argument("--public", help="public key path (default: OUTPUT with .pub.pem)")
    kg.set_defaults(fn=cmd_keygen)

    rp = sub.add_parser("report", help="write a self-contained HTML report on an artifact")
    rp.add_argument("artifact")
    rp.add_argument("-o", "--output", help="HTML path (default: ARTIFACT.html)")
    rp.add_argument("--no-measure", action="store_true",
                    help="skip timing the reference interpreter node by node")
    rp.set_defaults(fn=cmd_report)

    b = sub.add_parser("bench", help="time eager, Inductor, ONNX Runtime and Ember side by side")
    b.add_argument("model", help=".onnx or .pt2 file")
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--symbol", nargs="+", help="symbolic dim values, e.g. batch=1 seq=128")
    b.add_argument("--passes", default="O2")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(a.fn(a) or 0)
    except CompilerError as e:
        if a.debug:
            traceback.print_exc()
        msg = str(e)
        print(f"ember: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ember: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (one line for users; --debug for the traceback)
        if a.debug:
            traceback.print_exc()
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"ember: internal error: {type(e).__name__}: {first} (rerun with --debug)",
              file=sys.stderr)
        return 2


def _entry() -> Any:  # python -m ember.cli
    raise SystemExit(main())


if __name__ == "__main__":
    _entry()
