"""``abqc export``: write a model in the format another engine runs (llama.cpp's GGUF, vLLM's
compressed-tensors, ...). The subcommand is format-generic: ``--format`` picks an exporter
from `abqc.export.FORMAT_MODULES`, the common flags below are passed only when given, and
``--option KEY=VALUE`` passes anything else a format takes (its exporter refuses what it
does not know).

    abqc export default out/smollm2-q4_0.gguf --format gguf --type Q4_0 --method gptq
    abqc export default out/q3k.gguf --format gguf --type Q3_K --option embed_type=Q8_0
"""
from __future__ import annotations

import argparse

from .export import FORMAT_MODULES
from .recipes import parse_solver_option, scalar

HELP = "write a model for another engine (--format gguf: llama.cpp; compressed-tensors: vLLM)"


def add_export_parser(sub) -> argparse.ArgumentParser:
    x = sub.add_parser("export", help=HELP, description=__doc__.split("\n\n")[0])
    x.add_argument("model", help="the source: 'default' (embedded SmolLM2), a directory, a .gguf "
                                 "file, 'tiny:<family>'; GGUF exports solve from the float source")
    x.add_argument("out", help="the file or directory to write (GGUF: a .gguf file)")
    x.add_argument("--format", required=True, choices=sorted(FORMAT_MODULES), help="the export format")
    x.add_argument("--type", default=None,
                   help="the format's weight type (gguf: Q4_0 Q8_0 Q4_1 Q4_K Q3_K Q2_K)")
    x.add_argument("--method", default=None,
                   help="how the weights are solved onto the type's grid: rtn, gptq, quantease, "
                        "gptq_quantease (gguf default: gptq)")
    x.add_argument("--template", default=None, metavar="GGUF",
                   help="gguf: a GGUF of the same model whose metadata and tokenizer are kept "
                        "(default for 'default': the GGUF the embedded model ships)")
    x.add_argument("--nsamples", type=int, default=None, help="calibration windows (default 128)")
    x.add_argument("--seqlen", type=int, default=None, help="calibration window length (default 512)")
    x.add_argument("--seed", type=int, default=None, help="calibration window offsets")
    x.add_argument("--calib-corpus", default=None,
                   help="calibration text: 'pydoc' (default) or a file; never the evaluation text")
    x.add_argument("--solver", action="append", default=[], type=parse_solver_option,
                   metavar="KEY=VALUE", help="a solver option (percdamp, blocksize, act_order, sweeps, ...)")
    x.add_argument("--option", action="append", default=[], type=parse_solver_option,
                   metavar="KEY=VALUE",
                   help="a format-specific option (gguf: embed_type=Q8_0|F32|..., importance=false)")
    return x


def export_options(args) -> dict:
    """The exporter's keyword options from the parsed flags (only those given)."""
    opts = {k: getattr(args, k) for k in ("type", "method", "template", "nsamples", "seqlen",
                                          "seed", "calib_corpus") if getattr(args, k) is not None}
    if args.solver:
        opts["solver_options"] = dict(args.solver)
    for key, value in args.option:
        opts[key] = scalar(value) if isinstance(value, str) else value
    return opts


def cmd_export(args) -> int:
    from .export import export

    path = export(args.model, args.out, args.format, **export_options(args))
    print(f"wrote {path}")
    return 0
