"""The `abqc` command line: compile a model, evaluate it.

    abqc compile --model default --wbits 4 --abits 8 --dump-ir out/ir
    abqc eval    --model default --wbits 4 --abits 8 --data wikitext2 --seqlen 2048
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from .config import FLOAT_BITS
from .errors import AbqcError

log = logging.getLogger("abqc")


def _int_or_float(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def parse_override(text: str) -> tuple[str, dict[str, Any]]:
    """``"down_proj:wbits=8,abits=16"`` -> ("down_proj", {"wbits": 8, "abits": 16})."""
    pattern, sep, fields = text.rpartition(":")
    if not sep or not pattern or not fields:
        raise argparse.ArgumentTypeError(
            f"--override {text!r} is not PATTERN:key=value[,key=value...], e.g. 'down_proj:wbits=8'")
    out = {}
    for item in fields.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"--override {text!r}: {item!r} is not key=value")
        out[key.strip()] = _int_or_float(value.strip())
    return pattern, out


def parse_solver_option(text: str) -> tuple[str, Any]:
    """``"sweeps=10"`` -> ("sweeps", 10)."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"--solver {text!r} is not KEY=VALUE, e.g. 'sweeps=10'")
    return key.strip(), _int_or_float(value.strip())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M-Instruct), a local directory, a .gguf file, "
                        "'tiny:<llama|qwen2|mistral|opt>' or a hub id")


def _add_quant_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--wbits", type=int, required=required, default=None, help="weight bits, 1..8")
    g.add_argument("--abits", type=int, default=FLOAT_BITS, help="activation bits, 1..8 or 16 (float)")
    g.add_argument("--method", default="rtn",
                   help="rtn | gptq | quantease | quantease_outlier | gptq_quantease (default: rtn)")
    g.add_argument("--solver", action="append", type=parse_solver_option, default=[],
                   metavar="KEY=VALUE", help="solver option, repeatable, e.g. sweeps=10, act_order=true, "
                   "outlier_fraction=0.01")
    g.add_argument("--group-size", type=int, default=0, help="weight group size (0 = per channel)")
    g.add_argument("--symmetric", action="store_true", help="symmetric weight grid")
    g.add_argument("--act-symmetric", action="store_true", help="symmetric activation grid")
    g.add_argument("--override", action="append", type=parse_override, default=[], metavar="PATTERN:K=V,...",
                   help="per-module settings by regex, e.g. 'down_proj:wbits=8' (repeatable)")
    g.add_argument("--exclude", action="append", default=None, metavar="REGEX",
                   help="modules kept in float (repeatable; default: lm_head)")
    g.add_argument("--calib", default="pydoc", help="calibration corpus: 'pydoc' or a text file")
    g.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    g.add_argument("--calib-seqlen", type=int, default=512, help="calibration window length")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--calib-device", default="cpu",
                   help="where the layer-wise solvers run: cpu (default), cuda or cuda:N")
    g.add_argument("--dump-ir", default=None, metavar="DIR", help="write the IR after each pass to DIR")
    g.add_argument("--print-ir", action="store_true", help="print the final IR")
    g.add_argument("--backend", default="kernels", choices=("kernels", "fake_quant"),
                   help="run quantized linears on the generated kernels (default) or keep the "
                        "fake-quant float graph")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abqc", description="Compile LLMs to arbitrary-bit quantized models.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="quantize a model and show its IR and pass timings")
    _add_model_args(c)
    _add_quant_args(c, required=True)
    c.add_argument("--out", default=None, metavar="DIR",
                   help="save the compiled model (safetensors + config.json + tokenizer) to DIR")
    gen = sub.add_parser("generate", help="greedy or sampled text from a saved (or compiled) model")
    gen.add_argument("model", help="a directory saved by 'abqc compile --out', or a model spec")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    _add_quant_args(gen, required=False)
    e = sub.add_parser("eval", help="perplexity of a model, float or compiled")
    _add_model_args(e)
    _add_quant_args(e, required=False)
    e.add_argument("--data", default="wikitext2", help="'wikitext2', 'pydoc' or a text file")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    t = sub.add_parser("tune", help="auto-tune CPU kernels for shapes and bit widths, or show the log")
    t.add_argument("--shapes", default="576x576", help="comma-separated NxK, e.g. 576x1536,4096x4096")
    t.add_argument("--bits", default="W4A8", help="comma-separated WxAy, e.g. W2A8,W4A16")
    t.add_argument("--m", default="1", help="comma-separated token counts (bucketed to 1, 16, 128)")
    t.add_argument("--group-size", type=int, default=0)
    t.add_argument("--log", default=None, metavar="PATH", help="tuning log (default: the cache's)")
    t.add_argument("--show", action="store_true", help="print the tuning log as a table and exit")
    t.add_argument("--extend", action="store_true",
                   help="for keys already tuned, measure the schedules their record has not tried "
                        "(added by a newer abqc) and keep the fastest")
    t.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="tune CPU kernels (default) or the b1 tensor-core kernels of the current GPU")
    return parser


def _compile_from_args(args, model, tok):
    import abqc

    options = dict(method=args.method, group_size=args.group_size, symmetric=args.symmetric,
                   act_symmetric=args.act_symmetric, overrides=dict(args.override),
                   nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=args.seed,
                   calib_corpus=args.calib, calib_device=args.calib_device, dump_ir=args.dump_ir,
                   solver_options=dict(args.solver), backend=args.backend)
    if args.exclude is not None:
        options["exclude"] = tuple(args.exclude)
    return abqc.compile(model, wbits=args.wbits, abits=args.abits, tokenizer=tok, **options)


def is_saved_model(spec: str) -> bool:
    """Whether `spec` is a directory written by ``abqc compile --out`` / ``cm.save``."""
    cfg = os.path.join(spec, "config.json")
    if not os.path.isfile(cfg):
        return False
    try:
        with open(cfg, encoding="utf-8") as f:
            return (json.load(f).get("quantization_config") or {}).get("quant_method") == "abqc"
    except (OSError, ValueError):
        return False


def _model_from_args(args):
    """(model, tokenizer): a saved abqc model as is, else the source model, compiled when
    --wbits is given."""
    import abqc
    from frontends import hf

    if is_saved_model(args.model):
        cm = abqc.load(args.model)
        if cm.tokenizer is None:
            raise AbqcError(f"{args.model} was saved without a tokenizer; save it with one")
        return cm, cm.tokenizer
    model, tok = hf.load(args.model)
    if args.wbits is not None:
        model = _compile_from_args(args, model, tok)
    return model, tok


def cmd_generate(args) -> int:
    import torch

    model, tok = _model_from_args(args)
    ids = tok(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def cmd_compile(args) -> int:
    from frontends import hf

    model, tok = hf.load(args.model)
    cm = _compile_from_args(args, model, tok)
    if args.out:
        cm.save(args.out, tok)
        print(f"saved to {args.out}/ (load with abqc.load or AutoModelForCausalLM.from_pretrained)")
    if args.print_ir:
        cm.print_ir()
    print(cm.summary())
    for i, name, dt in cm.pass_timings:
        print(f"  {i:03d} {name:<24} {dt:7.2f}s")
    if args.dump_ir:
        print(f"IR after each pass written to {args.dump_ir}/")
    return 0


def cmd_eval(args) -> int:
    import abqc.eval

    model, tok = _model_from_args(args)
    label = {"model": args.model, "wbits": args.wbits, "abits": args.abits if args.wbits else FLOAT_BITS}
    if is_saved_model(args.model):
        label.update(method="saved abqc model", wbits=model.config.wbits, abits=model.config.abits)
    elif args.wbits is not None:
        label.update(method=args.method, group_size=args.group_size, backend=args.backend)
    else:
        label.update(method="fp32")
    res = abqc.eval.perplexity(model, tok, args.data, seqlen=args.seqlen, max_windows=args.max_windows,
                               batch_size=args.batch_size, json_path=args.json, progress=not args.quiet,
                               extra=label)
    print(json.dumps(res))
    print(f"perplexity {res['ppl']:.4f} ({res['windows']} windows x {res['seqlen']} tokens, {args.data})")
    return 0


def _parse_list(text: str, what: str, parse) -> list:
    try:
        return [parse(item.strip()) for item in text.split(",") if item.strip()]
    except (ValueError, IndexError):
        raise AbqcError(f"{what} {text!r} is not understood; e.g. "
                        + {"shapes": "576x1536,4096x4096", "bits": "W2A8,W4A16", "m": "1,16"}[what]) from None


def cmd_tune(args) -> int:
    from .codegen import tuning
    from .codegen.compute import KernelShape
    from .config import ACT_BITS, WEIGHT_BITS

    tlog = tuning.TuningLog(args.log)
    if args.show:
        print(tlog.table() if tlog.records else f"(no tuned kernels in {tlog.path})")
        return 0
    shapes = _parse_list(args.shapes, "shapes", lambda s: tuple(int(v) for v in s.lower().split("x", 1)))
    bits = _parse_list(args.bits, "bits", lambda s: tuple(int(v) for v in s.upper()[1:].split("A", 1)))
    ms = _parse_list(args.m, "m", int)
    for w, a in bits:
        if w not in WEIGHT_BITS or a not in ACT_BITS:
            raise AbqcError(f"W{w}A{a} is not allowed; weights 1..8, activations 1..8 or 16")
    if args.device == "cuda" and args.extend:
        raise AbqcError("--extend applies to the CPU tuner; the CUDA tuner has no added schedules to try")
    if args.device == "cuda":
        import torch

        from .codegen.cuda import runtime as cuda_rt

        try:
            for n, k in shapes:
                for w, a in bits:
                    cuda_rt.problem_for(KernelShape(n, k, w, a, args.group_size), 1)
        except ValueError as e:
            raise AbqcError(str(e)) from None
        if not torch.cuda.is_available():
            raise AbqcError("--device cuda needs a CUDA GPU; torch.cuda.is_available() is False here")
    for n, k in shapes:
        for w, a in bits:
            for m in ms:
                shape = KernelShape(n, k, w, a, args.group_size)
                rec = cuda_rt.tune(shape, m, "cuda", tlog) if args.device == "cuda" else \
                    tuning.tune(shape, m, tlog, progress=not args.quiet, extend=args.extend)
                print(f"{rec['key']}: {rec['formulation']} {json.dumps(rec['params'])} {rec['ms']:.4f} ms")
    print(f"tuning log: {tlog.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[abqc] %(message)s")
    try:
        return {"compile": cmd_compile, "eval": cmd_eval, "tune": cmd_tune,
                "generate": cmd_generate}[args.cmd](args)
    except AbqcError as e:
        print(f"abqc: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
