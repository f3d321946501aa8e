"""GGUF export: llama.cpp's block types in torch, solving onto their fixed grids, the writer.

No llama.cpp binaries here (CI does not build llama.cpp): the byte layouts are checked
against the sizes llama.cpp declares and against gguf-py's own numpy dequantizer, an
independent implementation of the same formats."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from abqc.cli import main  # noqa: E402
from abqc.errors import ConfigError  # noqa: E402
from abqc.export import export  # noqa: E402
from abqc.export.ggml_types import (TYPES, dequantize, fit_grid, quantize_blocks,  # noqa: E402
                                    type_for_row, unpack_blocks)
from abqc.export.gguf import llama_rope_permute  # noqa: E402
from abqc.solvers import relative_error, solve  # noqa: E402
from abqc.config import QuantSpec  # noqa: E402
from frontends.tiny import tiny_model  # noqa: E402

#: llama.cpp's block sizes (ggml-common.h): elements and bytes per block
LLAMA_CPP_BLOCKS = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_0": (32, 18), "Q4_1": (32, 20),
                    "Q4_K": (256, 144), "Q3_K": (256, 110), "Q2_K": (256, 84)}


def _weights(n=6, k=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, :64] = 0.0  # an all-zero block (and sub-blocks): scales must stay invertible
    w[1, 3] = 1.0  # an outlier
    return w


@pytest.mark.parametrize("name", list(TYPES))
def test_block_sizes_are_llama_cpps(name):
    t = TYPES[name]
    assert (t.block, t.nbytes) == LLAMA_CPP_BLOCKS[name]
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == (t.block, t.nbytes)
    w = _weights()
    grid = fit_grid(name, w)
    data = quantize_blocks(grid.codes(w), grid)
    assert len(data) == w.numel() // t.block * t.nbytes


@pytest.mark.parametrize("name", list(TYPES))
def test_round_trip_is_the_grid_value(name):
    """Any codes (not only fitted ones) come back as exactly the grid's values, through our
    reader and through gguf-py's dequantizer."""
    t = TYPES[name]
    w = _weights()
    grid = fit_grid(name, w, importance=torch.rand(w.shape[1]) + 0.1)
    codes = torch.randint(0, t.qmax + 1, w.shape, generator=torch.Generator().manual_seed(1),
                          dtype=torch.int32).to(torch.uint8)
    data = quantize_blocks(codes, grid)
    want = grid.values(codes)
    assert torch.equal(dequantize(data, name, w.shape), want)
    back, grid2 = unpack_blocks(data, name, w.shape)
    assert torch.equal(back, codes.to(torch.int32))
    assert all(torch.equal(grid.fields[k], grid2.fields[k]) for k in grid.fields)
    raw = np.frombuffer(data, dtype=np.uint8).reshape(w.shape[0], -1)
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float32)
    assert torch.equal(torch.from_numpy(theirs), want)


@pytest.mark.parametrize("name", list(TYPES))
def test_grid_is_invertible_and_nearest(name):
    w = _weights()
    grid = fit_grid(name, w)
    codes = grid.codes(w)
    v = grid.values(codes)
    assert torch.equal(grid.codes(v), codes)  # no zero scale anywhere, codes distinct values
    a, _ = grid.affine()
    assert bool((a != 0).all())
    # RTN onto the grid is at least as close as the neighbouring codes
    for step in (-1, 1):
        other = grid.values((codes.int() + step).clamp(0, TYPES[name].qmax))
        assert bool(((w - v).abs() <= (w - other).abs() + 1e-7).all())
    # the solver's view of the grid projects onto the same values
    sg = grid.solver_grid()
    assert torch.equal(sg.codes(v), codes)


def test_fallback_types_follow_llama_cpp():
    assert type_for_row("Q3_K", 576).name == "Q4_0"
    assert type_for_row("Q2_K", 576).name == "Q4_0"
    assert type_for_row("Q4_K", 576).name == "Q5_0"
    assert type_for_row("Q3_K", 1536).name == "Q3_K"
    with pytest.raises(ConfigError, match="Q4_0"):
        type_for_row("Q4_0", 48)


def _layer_inputs(model, path, n=4, seq=64):
    """Σ of `path`'s inputs on random token windows through the tiny model."""
    xs = []
    mod = model.get_submodule(path)
    h = mod.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    ids = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    h.remove()
    x = torch.cat(xs).float()
    return mod.weight.detach().float(), x.T @ x / x.shape[0]


def _tiny_256():
    return tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K"])
def test_fixed_grid_gptq_not_worse_than_rtn(name):
    model = _tiny_256()
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        w, sigma = _layer_inputs(model, path)
        t = type_for_row(name, w.shape[1])
        grid = fit_grid(t.name, w, torch.diagonal(sigma))
        spec = QuantSpec(bits=t.bits, granularity="group", group_size=t.sub)
        rtn = solve("rtn", w, sigma, spec, grid=grid.solver_grid())
        gptq = solve("gptq", w, sigma, spec, grid=grid.solver_grid())
        # both on the fixed grid: their codes mean exactly the grid's values
        for res in (rtn, gptq):
            assert torch.equal(grid.codes(grid.values(res.codes)), res.codes)
        e_rtn = relative_error(w, grid.values(rtn.codes), sigma)
        e_gptq = relative_error(w, grid.values(gptq.codes), sigma)
        assert e_gptq <= e_rtn, (path, e_gptq, e_rtn)


def test_fixed_grid_refused_by_outlier_solver_and_shape_checked():
    w, sigma = _layer_inputs(_tiny_256(), "model.layers.0.mlp.up_proj")
    grid = fit_grid("Q4_0", w).solver_grid()
    spec = QuantSpec(bits=4, granularity="group", group_size=32)
    with pytest.raises(ConfigError, match="quantease_outlier"):
        solve("quantease_outlier", w, sigma, spec, grid=grid)
    with pytest.raises(ConfigError, match="fixed grid"):
        solve("gptq", w[:, :128], sigma[:128, :128], spec, grid=grid)


# ---------------------------------------------------------------------------------- writer

def _template(model, path, *, permute=True):
    """An F32 GGUF of `model` as convert_hf_to_gguf.py lays it out (llama names, q/k rows
    in rotary order), with minimal llama metadata."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    nmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, p in model.named_parameters():
        g = nmap.get_name(name, try_suffixes=(".weight",))
        t = p.detach().float()
        if permute and g.endswith("attn_q.weight"):
            t = llama_rope_permute(t, cfg.num_attention_heads)
        if permute and g.endswith("attn_k.weight"):
            t = llama_rope_permute(t, cfg.num_key_value_heads)
        w.add_tensor(g, t.numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _read(path):
    r = gguf.GGUFReader(str(path))
    out = {}
    for t in r.tensors:
        data = np.asarray(t.data)
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = (t.tensor_type.name, torch.from_numpy(np.array(data)).float())
    return r, out


@pytest.mark.parametrize("name", ["Q4_0", "Q3_K"])
def test_written_gguf_reads_back_as_the_grid_values(tmp_path, name):
    model = _tiny_256()
    tmpl = _template(model, tmp_path / "f32.gguf")
    out = export((model, None), tmp_path / "m.gguf", "gguf", type=name, method="rtn",
                 template=tmpl, importance=False)
    reader, got = _read(out)
    _, ref = _read(tmpl)
    assert reader.fields["general.file_type"].contents() == int(
        getattr(gguf.LlamaFileType, {"Q4_0": "MOSTLY_Q4_0", "Q3_K": "MOSTLY_Q3_K_S"}[name]))
    assert reader.fields["llama.block_count"].contents() == 2
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:2] == ["t0", "t1"]
    assert list(got) == list(ref)
    for g, (qtype, values) in got.items():
        w = ref[g][1]
        if w.ndim == 1:
            assert qtype == "F32" and torch.equal(values, w)
            continue
        want_type = "Q8_0" if g in ("token_embd.weight", "output.weight") else name
        assert qtype == want_type, g
        grid = fit_grid(want_type, w)  # RTN without importance: the grid of the laid-out weight
        assert torch.equal(values.reshape(w.shape), grid.values(grid.codes(w))), g


def test_gptq_export_beats_rtn_export_on_the_model(tmp_path):
    """The whole path (calibration engine, fixed grids, rotary permutation, writer): the
    GGUF's tensors, read back, give the tiny model a lower calibration loss with GPTQ than
    with RTN onto the same type."""
    model = _tiny_256()
    tmpl = _template(model, tmp_path / "f32.gguf")
    calib = torch.randint(0, 256, (8, 64), generator=torch.Generator().manual_seed(3))
    errs = {}
    nmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    cfg = model.config
    with torch.no_grad():
        ref_logits = model(calib).logits
    for method in ("rtn", "gptq"):
        out = export((model, None), tmp_path / f"{method}.gguf", "gguf", type="Q3_K",
                     method=method, template=tmpl, calib=calib, importance=True)
        _, got = _read(out)
        q = tiny_model("llama", hidden_size=256, intermediate_size=512, head_dim=64)
        sd = {}
        for name, p in q.named_parameters():
            g = nmap.get_name(name, try_suffixes=(".weight",))
            t = got[g][1].reshape(p.shape)
            for key, n in (("attn_q.weight", cfg.num_attention_heads),
                           ("attn_k.weight", cfg.num_key_value_heads)):
                if g.endswith(key):  # undo the rotary order: the inverse row permutation
                    idx = llama_rope_permute(torch.arange(t.shape[0]), n)
                    t = t[torch.argsort(idx)]
            sd[name] = t
        q.load_state_dict(sd, strict=False)
        with torch.no_grad():
            errs[method] = float(((q(calib).logits - ref_logits) ** 2).mean())
    assert errs["gptq"] < errs["rtn"], errs


def test_template_of_another_model_is_refused(tmp_path):
    tmpl = _template(_tiny_256(), tmp_path / "f32.gguf")
    other = tiny_model("llama", seed=1, hidden_size=256, intermediate_size=512, head_dim=64)
    with pytest.raises(ConfigError, match="does not hold the source model's weights"):
        export((other, None), tmp_path / "m.gguf", "gguf", type="Q4_0", method="rtn",
               template=tmpl, importance=False)
    assert not (tmp_path / "m.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["f32.gguf"]  # nothing half-written


def test_cli_unknown_type_names_the_allowed_ones(tmp_path, capsys):
    rc = main(["export", "tiny:llama", str(tmp_path / "m.gguf"), "--format", "gguf", "--type", "Q5_K"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Q5_K" in err and "Q4_0, Q8_0, Q4_1, Q4_K, Q3_K, Q2_K" in err


def test_cli_without_template_says_how_to_make_one(tmp_path, capsys):
    rc = main(["export", "tiny:llama", str(tmp_path / "m.gguf"), "--format", "gguf", "--type", "Q4_0",
               "--method", "rtn"])
    assert rc == 2
    assert "--template" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_cli_export_writes_gguf(tmp_path, capsys):
    model = tiny_model("llama")  # hidden 64: Q4_0 blocks of 32 fit
    tmpl = _template(model, tmp_path / "f32.gguf")
    out = tmp_path / "m.gguf"
    rc = main(["export", "tiny:llama", str(out), "--format", "gguf", "--type", "Q4_0", "--method",
               "rtn", "--template", str(tmpl), "--option", "importance=false"])
    assert rc == 0 and out.is_file()
    _, got = _read(out)
    assert got["blk.0.attn_q.weight"][0] == "Q4_0"


def test_llama_cpp_build_flags_follow_the_cpu():
    """The anchor build turns AVX-512 options on only where the CPU has them, AMX never."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from anchors import llama_cpp

    avx2 = llama_cpp.build_flags({"avx2", "fma", "f16c"})
    assert avx2["GGML_AVX2"] == "ON" and avx2["GGML_NATIVE"] == "OFF"
    assert all(avx2[o] == "OFF" for o in llama_cpp.AVX512_OPTIONS)
    full = llama_cpp.build_flags({"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                                  "avx512_vnni", "amx_int8", "amx_tile"})
    assert full["GGML_AVX512"] == "ON" and full["GGML_AVX512_VNNI"] == "ON"
    assert full["GGML_AVX512_BF16"] == "OFF" and full["GGML_AVX512_VBMI"] == "OFF"
    assert all(full[f"GGML_AMX_{x}"] == "OFF" for x in ("TILE", "INT8", "BF16"))
    assert llama_cpp.build_key(avx2) != llama_cpp.build_key(full)
