"""Export to llama.cpp: abqc-calibrated weights solved onto a GGUF block type, in a GGUF file.

``abqc export --format gguf --type Q4_0 --method gptq SOURCE OUT.gguf``

Why a separate solve, not a conversion of a compiled model: a GGUF type fixes its own grid
(block size, fp16 scales, 6/4-bit sub-block scales, symmetry), and abqc's grids differ. So
the exporter starts from the float source, and for every linear of the decoder blocks

1. fixes the type's grid from the weights (`ggml_types.fit_grid`, the squared error weighted
   by diag(Σ) of the layer's inputs: llama.cpp's importance matrix, from abqc's own
   calibration data),
2. lets the solver (``rtn``, ``gptq``, ``quantease``, ``gptq_quantease``) choose the codes on
   that fixed grid (``solvers.solve(..., grid=...)``), block after block, each block's
   inputs coming from the already-quantized blocks before it (abqc's calibration engine),
3. packs the codes into llama.cpp's bytes.

Tensor types (llama.cpp's ``--pure`` mix, with its fallbacks): every block linear in
``--type``; rows that do not split into the type's blocks take llama.cpp's fallback
(Q3_K/Q2_K -> Q4_0, Q4_K -> Q5_0; SmolLM2's 576-wide rows); the token embedding and the
output projection in ``embed_type`` (Q8_0 by default: llama.cpp's default Q6_K for the
output needs rows of 256, and Q8_0 is its fallback), rounded (no calibration data reaches
an embedding lookup); norms and other 1-D tensors F32. ``llama-quantize --pure
--token-embedding-type q8_0 --output-tensor-type q8_0`` gives the same mix.

Metadata (hyperparameters, tokenizer, chat template) come from a *template* GGUF of the same
model: for the embedded SmolLM2, the GGUF it ships; for another model, an F32/F16 GGUF from
llama.cpp's ``convert_hf_to_gguf.py`` (``python bench/anchors/llama_cpp.py convert DIR OUT``).
Every tensor of the template is matched to the source model's weight (q/k rows in
llama.cpp's rotary order) and checked to hold the same values, so a template of another
model is refused, naming the tensor.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import LinearAnnotation, METHODS, QuantSpec
from ..errors import ConfigError
from . import register
from .ggml_types import TYPES, TypeGrid, fit_grid, ggml_type, quantize_blocks, type_for_row

log = logging.getLogger("abqc")

#: the --type choices (Q5_0 exists only as Q4_K's fallback)
EXPORT_TYPES = ("Q4_0", "Q8_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K")
#: methods that solve onto a fixed grid
GGUF_METHODS = ("rtn", "gptq", "quantease", "gptq_quantease")
#: general.file_type written for each --type (llama.cpp's enum; Q3_K/Q4_K: the _S mixes,
#: the closest to one type for every tensor)
FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q8_0": "MOSTLY_Q8_0", "Q4_1": "MOSTLY_Q4_1",
              "Q4_K": "MOSTLY_Q4_K_S", "Q3_K": "MOSTLY_Q3_K_S", "Q2_K": "MOSTLY_Q2_K"}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'abqc[export]'") from None
    return gguf


def llama_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows in llama.cpp's rotary order (convert_hf_to_gguf's permutation for llama):
    per head, the two rotary halves interleaved."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _template_array(t) -> np.ndarray:
    """A template tensor's values as float32 [rows, cols] (or 1-D), dequantized."""
    gguf = _gguf()
    data = np.asarray(t.data)
    if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                         gguf.GGMLQuantizationType.BF16):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, t.tensor_type).astype(np.float32)


def _hf_names(model: nn.Module, arch: str, n_blocks: int) -> dict[str, str]:
    """GGUF tensor name -> the source model's parameter name (gguf's name map)."""
    gguf = _gguf()
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        raise ConfigError(f"template architecture {arch!r} is unknown to the gguf package")
    nmap = gguf.get_tensor_name_map(archs[arch], n_blocks)
    out = {}
    for name, _ in model.named_parameters():
        g = nmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if g is not None:
            out[g] = name
    return out


def _match(gname: str, hf: torch.Tensor, tmpl: np.ndarray, heads: dict[str, int]
           ) -> tuple[torch.Tensor, int | None]:
    """(the source weight in the template's layout, the head count its rows were permuted
    by or None), checked against the template's values."""
    ref = torch.from_numpy(np.ascontiguousarray(tmpl)).float().reshape(hf.shape)
    cands = [(hf.float(), None)]
    for key, n in heads.items():
        if gname.endswith(key) and hf.ndim == 2:
            cands.append((llama_rope_permute(hf.float(), n), n))
    tol = 1e-3 * float(hf.abs().max()) + 1e-6
    for c, n in cands:
        if float((c - ref).abs().max()) <= tol:
            return c, n
    raise ConfigError(f"template tensor {gname!r} does not hold the source model's weights "
                      f"(max difference {float((cands[0][0] - ref).abs().max()):.3g}); pass a template "
                      "GGUF converted from this model")


def _default_template(source: Any) -> Path | None:
    if source == "default":
        from frontends.embedded import gguf_path

        return gguf_path()
    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".gguf"):
        return Path(source)
    return None


def _load_source(source: Any, tokenizer):
    from frontends import hf

    if isinstance(source, (str, os.PathLike)):
        model, tok = hf.load(str(source))
        return model, tokenizer or tok
    if isinstance(source, tuple) and len(source) == 2:
        return source[0], tokenizer or source[1]
    if isinstance(source, nn.Module) and hasattr(source, "config"):
        return source, tokenizer
    raise ConfigError(f"GGUF export solves from the float source model; got {type(source).__name__}. "
                      "Pass a source ('default', a directory, a .gguf) or a transformers model "
                      "(a compiled abqc model is already on abqc's grid, not GGUF's)")


def solve_linears(model: nn.Module, type_name: str, method: str, windows: torch.Tensor | None,
                  importance: bool = True, solver_options: dict | None = None,
                  batch_size: int = 8) -> dict[str, tuple[torch.Tensor, TypeGrid, dict]]:
    """Module path -> (codes, grid, stats) for every linear of the decoder blocks, solved onto
    `type_name`'s grid (llama.cpp's fallback type where rows do not split into its blocks).

    ``rtn`` needs no data (`windows` None: importance off); the others run abqc's
    block-sequential engine on `windows` with Σ of each layer's (quantized-chain) inputs."""
    from ..calibration.blocks import decoder_blocks
    from ..calibration.engine import calibrate_blocks
    from ..solvers import solve

    prefix, blocks = decoder_blocks(model)
    anns: dict[str, LinearAnnotation] = {}
    for b, block in enumerate(blocks):
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                path = f"{prefix}.{b}.{name}"
                t = type_for_row(type_name, mod.in_features)
                spec = QuantSpec(bits=t.bits, granularity="group", group_size=t.sub)
                anns[path] = LinearAnnotation(path, spec, None, method)
    if method == "rtn" and windows is None:
        out = {}
        for path in anns:
            w = model.get_submodule(path).weight.detach().float()
            grid = fit_grid(type_for_row(type_name, w.shape[1]).name, w)
            out[path] = (grid.codes(w), grid, {"method": "rtn"})
        return out

    def ggml_solve(meth, w, sigma, spec, **opts):
        t = type_for_row(type_name, w.shape[1])
        grid = fit_grid(t.name, w, torch.diagonal(sigma) if importance else None)
        res = solve(meth, w, sigma, spec, grid=grid.solver_grid(), **opts)
        res.stats["type_grid"] = grid  # stats travel with the result (SolveResult.to shares them)
        return res

    # true-sequential groups by name: [q k v] -> [o] -> [gate up] -> [down] (Llama-like blocks)
    order = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
    groups: dict[int, list[list[str]]] = {}
    for b in range(len(blocks)):
        mine = [p for p in anns if p.startswith(f"{prefix}.{b}.")]
        gs = [[p for p in mine if p.rsplit(".", 1)[-1] in names] for names in order]
        rest = [p for p in mine if not any(p in g for g in gs)]
        if rest:
            raise ConfigError(f"GGUF export knows the solve order of Llama-like blocks; block {b} "
                              f"has other linears: {rest}")
        groups[b] = [g for g in gs if g]
    results = calibrate_blocks(model, anns, groups, windows, ggml_solve, batch_size,
                               solver_options or {})
    out = {}
    for path, res in results.items():
        grid = res.stats.pop("type_grid")
        out[path] = (res.codes, grid, res.stats)
    return out


def _copy_metadata(reader, writer, file_type: int) -> None:
    gguf = _gguf()
    skip = {"general.architecture", "general.file_type", "general.quantization_version",
            "general.alignment"}
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


@register("gguf")
def export_gguf(source: Any, out: Path, *, type: str = "Q4_0", method: str = "gptq",  # noqa: A002
                template: str | os.PathLike | None = None, tokenizer=None,
                embed_type: str = "Q8_0", importance: bool = True, nsamples: int = 128,
                seqlen: int = 512, seed: int = 0, calib_corpus: str = "pydoc",
                calib: torch.Tensor | None = None, solver_options: dict | None = None,
                batch_size: int = 8, **unknown) -> Path:
    """Write `source` (float; see the module docstring) as a GGUF of `type` to `out`.

    `method` chooses the codes on the type's grid; `importance` weights the grid fit by
    diag(Σ); calibration: `nsamples` windows of `seqlen` tokens of `calib_corpus` (abqc's
    default, Python's pydoc text; never the evaluation text), or `calib` [n, seqlen] ids."""
    if unknown:
        import inspect

        allowed = [p for p in inspect.signature(export_gguf).parameters if p not in ("source", "out", "unknown")]
        raise ConfigError(f"unknown GGUF export option(s) {sorted(unknown)}; allowed: {allowed}")
    gguf = _gguf()
    if type not in EXPORT_TYPES:
        raise ConfigError(f"GGUF type {type!r} is not allowed; use one of {', '.join(EXPORT_TYPES)}")
    if embed_type not in TYPES and embed_type != "F32":
        raise ConfigError(f"embed_type={embed_type!r} is not allowed; use F32 or one of {', '.join(TYPES)}")
    if method not in GGUF_METHODS:
        raise ConfigError(f"method={method!r} cannot solve onto a GGUF grid; use one of "
                          f"{', '.join(GGUF_METHODS)}" + (" (known methods: " + ", ".join(METHODS) + ")"
                                                          if method not in METHODS else ""))
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"GGUF output {str(out)!r} must end in .gguf")
    template = Path(template) if template is not None else _default_template(source)
    if template is None or not template.is_file():
        raise ConfigError(f"GGUF export needs a template GGUF of the same model for its metadata "
                          f"and tokenizer ({template or 'none given'}); make one with "
                          "`python bench/anchors/llama_cpp.py convert MODEL_DIR OUT.gguf` and pass "
                          "--template")
    model, tok = _load_source(source, tokenizer)
    model = model.float().eval()
    t0 = time.perf_counter()

    windows = calib
    if windows is None and (method != "rtn" or importance):
        if tok is None:
            raise ConfigError(f"method {method!r} (or importance=True) needs calibration data: "
                              "a tokenizer or calib=<LongTensor [n, seqlen]>")
        from frontends import corpus

        windows = corpus.calibration_windows(tok, corpus.load_text(calib_corpus), nsamples, seqlen, seed)
    solved = solve_linears(model, type, method, windows, importance, solver_options, batch_size)
    t_solve = time.perf_counter() - t0

    reader = gguf.GGUFReader(template)
    arch = reader.fields["general.architecture"].contents()
    n_blocks = int(reader.fields[f"{arch}.block_count"].contents())
    heads = {}
    if arch == "llama":
        nh = int(reader.fields["llama.attention.head_count"].contents())
        nkv = int(reader.fields.get("llama.attention.head_count_kv", reader.fields["llama.attention.head_count"]).contents())
        heads = {"attn_q.weight": nh, "attn_k.weight": nkv}
    names = _hf_names(model, arch, n_blocks)
    params = dict(model.named_parameters())
    by_param = {f"{p}.weight": v for p, v in solved.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    counts: dict[str, int] = {}
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_metadata(reader, writer, int(getattr(gguf.LlamaFileType, FILE_TYPES[type])))
        for t in reader.tensors:
            hf_name = names.get(t.name)
            if hf_name is None:
                raise ConfigError(f"template tensor {t.name!r} has no counterpart in the source "
                                  f"model ({model.__class__.__name__})")
            w, n_head = _match(t.name, params[hf_name].detach(), _template_array(t), heads)
            if w.ndim == 2 and hf_name in by_param:
                codes, grid, _ = by_param[hf_name]
                if n_head is not None:
                    codes, grid = permute_rows(codes, grid, n_head)
                data, qtype = quantize_blocks(codes, grid), grid.type.name
            elif w.ndim == 2 and embed_type != "F32":
                et = type_for_row(embed_type, w.shape[1])
                grid = fit_grid(et.name, w)
                data, qtype = quantize_blocks(grid.codes(w), grid), et.name
            else:
                arr = w.float().numpy()
                writer.add_tensor(t.name, arr)
                counts["F32"] = counts.get("F32", 0) + 1
                continue
            rows = w.shape[0]
            writer.add_tensor(t.name, np.frombuffer(data, dtype=np.uint8).reshape(rows, -1),
                              raw_dtype=gguf.GGMLQuantizationType[qtype])
            counts[qtype] = counts.get(qtype, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.info("GGUF %s (%s, %s): %s; solved in %.1fs, %.1f MB", out, type, method,
             ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), t_solve,
             out.stat().st_size / 2**20)
    return out


def permute_rows(codes: torch.Tensor, grid: TypeGrid, n_head: int) -> tuple[torch.Tensor, TypeGrid]:
    """Codes and grid with rows in llama.cpp's rotary order (blocks are per row, so a row
    permutation of the weight is the same permutation of its blocks)."""
    n, k = codes.shape
    idx = llama_rope_permute(torch.arange(n), n_head)
    per_row = k // grid.type.block
    fields = {key: v.reshape(n, per_row, *v.shape[1:])[idx].reshape(v.shape)
              for key, v in grid.fields.items()}
    return codes[idx], TypeGrid(grid.type, grid.shape, fields)


__all__ = ["EXPORT_TYPES", "GGUF_METHODS", "export_gguf", "llama_rope_permute", "permute_rows",
           "solve_linears"]
