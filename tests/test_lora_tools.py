"""LoRA tools: inspect, coverage, format detection, merge numerics, EMA maths; against the real
musubi-tuner scripts when MUSUBI_TUNER_DIR is set."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from musubi_pipe.errors import PipelineError
from musubi_pipe.tools import lora

MUSUBI_DIR = os.environ.get("MUSUBI_TUNER_DIR")
needs_musubi = pytest.mark.skipif(not MUSUBI_DIR, reason="set MUSUBI_TUNER_DIR to a musubi-tuner checkout with .venv")


def musubi_python() -> str:
    for venv in (".venv", "venv"):
        for exe in ("bin/python", "Scripts/python.exe"):
            p = Path(MUSUBI_DIR, venv, exe)
            if p.exists():
                return str(p)
    pytest.skip("no .venv in MUSUBI_TUNER_DIR")


def lora_tensors(family="wan", variant="t2v-1.3B", blocks=(0,), rank=4, alpha=2.0, layout="musubi", seed=0,
                 extra=None, only=None):
    """A state dict in a real key layout: random down/up for the family's modules in `blocks`."""
    rng = np.random.default_rng(seed)
    sd = {}
    for ln, m in lora.target_modules(family, variant).items():
        if int(re.search(r"\.(\d+)\.", m.module).group(1)) not in blocks:
            continue
        if only and not re.search(only, m.module):
            continue
        down = rng.standard_normal((rank, m.in_features), dtype=np.float32) * 0.1
        up = rng.standard_normal((m.out_features, rank), dtype=np.float32) * 0.1
        if layout == "musubi":
            sd[f"{ln}.lora_down.weight"], sd[f"{ln}.lora_up.weight"] = down, up
            if alpha is not None:
                sd[f"{ln}.alpha"] = np.array(alpha, dtype=np.float32)
        else:
            sd[f"diffusion_model.{m.module}.lora_A.weight"], sd[f"diffusion_model.{m.module}.lora_B.weight"] = down, up
            if alpha is not None:
                sd[f"diffusion_model.{m.module}.alpha"] = np.array(alpha, dtype=np.float32)
    sd.update(extra or {})
    return sd


ARCH = {"wan": "wan2.1/lora", "hunyuan_video": "hunyuan-video/lora", "framepack": "framepack/lora"}


def make_lora(path, family="wan", metadata=True, **kw) -> Path:
    meta = {"modelspec.architecture": ARCH[family], "ss_network_dim": str(kw.get("rank", 4)),
            "ss_network_alpha": str(kw.get("alpha", 2.0))} if metadata else None
    save_file(lora_tensors(family=family, **kw), str(path), metadata=meta)
    return Path(path)


def deltas(path, full=False) -> dict[str, np.ndarray]:
    """Every module's weight change keyed by musubi LoRA name, from either layout, computed
    with the safetensors package (independently of tools.lora's reader). Unless `full`, the
    change applied to 6 fixed random inputs (dW @ X): equal for equal dW, and cheap at real sizes."""
    sd = load_file(str(path))
    out = {}
    for k in sd:
        m = re.match(r"^(.*)\.(lora_down|lora_A)\.weight$", k)
        if not m:
            continue
        base = m.group(1)
        up_key = base + (".lora_up.weight" if m.group(2) == "lora_down" else ".lora_B.weight")
        down, up = sd[k].astype(np.float64), sd[up_key].astype(np.float64)
        alpha = sd.get(base + ".alpha")
        scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
        name = base if base.startswith("lora_unet_") else lora.lora_name_of(base.split(".", 1)[1])
        probe = np.random.default_rng(down.shape[1]).standard_normal((down.shape[1], 6))
        out[name] = (up @ down if full else up @ (down @ probe)) * scale
    return out


# ------------------------------------------------------------------ module lists


def test_module_lists_have_musubi_counts_and_shapes():
    assert len(lora.target_modules("wan", "t2v-1.3B")) == 30 * 10
    assert len(lora.target_modules("wan", "t2v-14B")) == 40 * 10
    assert len(lora.target_modules("wan", "i2v-14B")) == 40 * 12  # Wan 2.1 I2V adds k_img, v_img
    assert len(lora.target_modules("wan", "i2v-A14B")) == 40 * 10  # Wan 2.2 uses the plain cross attention
    assert len(lora.target_modules("hv")) == 20 * 8 + 40 * 2
    assert len(lora.target_modules("framepack")) == 20 * 12 + 40 * 5
    t = lora.target_modules("wan", "t2v-14B")["lora_unet_blocks_39_ffn_0"]
    assert (t.module, t.in_features, t.out_features) == ("blocks.39.ffn.0", 5120, 13824)
    t = lora.target_modules("hunyuan_video")["lora_unet_single_blocks_0_linear1"]
    assert (t.in_features, t.out_features) == (3072, 3 * 3072 + 12288)
    assert "lora_unet_transformer_blocks_0_attn_to_out_0" in lora.target_modules("framepack")


def test_family_aliases_and_unknown_family():
    assert lora.resolve_family("HV") == "hunyuan_video"
    assert lora.resolve_family("fpack") == "framepack"
    with pytest.raises(PipelineError, match="unknown model family 'flux'"):
        lora.resolve_family("flux")


# ------------------------------------------------------------------ inspect


def test_inspect_musubi_wan_lora(tmp_path):
    p = make_lora(tmp_path / "a.safetensors", blocks=(0, 1), rank=8, alpha=4.0)
    r = lora.read_lora(p)
    assert (r.layout, r.kind, r.family, r.variant) == ("musubi", "lora", "wan", "t2v-1.3B")
    assert r.family_source == "metadata modelspec.architecture=wan2.1/lora"
    assert r.ranks() == {8: 20} and r.alphas() == {"4": 20}
    assert r.modules["lora_unet_blocks_1_ffn_2"].module == "blocks.1.ffn.2"
    assert r.modules["lora_unet_blocks_1_ffn_2"].scale == 0.5
    assert r.metadata["ss_network_dim"] == "8"
    assert r.coverage.matched == 20 and r.coverage.expected == 300 and len(r.coverage.missing) == 280
    assert r.errors == []
    json.dumps(r.as_dict())


def test_inspect_comfy_layout_finds_family_from_module_names(tmp_path):
    p = make_lora(tmp_path / "hv.safetensors", family="hunyuan_video", variant="t2v", blocks=(0,), layout="comfyui",
                  alpha=None, metadata=False)
    r = lora.read_lora(p)
    assert (r.layout, r.family, r.family_source) == ("comfyui", "hunyuan_video", "module names")
    assert r.modules["lora_unet_double_blocks_0_img_mlp_fc1"].module == "double_blocks.0.img_mlp.fc1"
    assert r.alphas() == {"none": 10} and r.errors == []  # no alpha in this layout means scale 1
    assert lora.detect_format(p) == "comfyui"


def test_framepack_module_names_are_recognised(tmp_path):
    p = make_lora(tmp_path / "fp.safetensors", family="framepack", variant="i2v", blocks=(3,), metadata=False)
    r = lora.read_lora(p, family="fp")
    assert r.family == "framepack" and r.coverage.matched == 17 and r.errors == []


def test_refuse_converting_to_the_format_it_is_in(tmp_path):
    p = make_lora(tmp_path / "a.safetensors")
    assert lora.detect_format(p) == "musubi"
    with pytest.raises(PipelineError, match="already in musubi format"):
        lora.refuse_if_already(p, "default")
    lora.refuse_if_already(p, "other")  # converting to ComfyUI is fine


def test_truncated_file_is_reported(tmp_path):
    p = make_lora(tmp_path / "a.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(PipelineError, match="truncated: tensor .* ends at byte") as e:
        lora.read_lora(p)
    assert e.value.problems[0].file == str(p) and "re-download" in e.value.problems[0].fix


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a LoRA" * 10)
    with pytest.raises(PipelineError, match="not a safetensors file"):
        lora.read_lora(p)
    (tmp_path / "short.safetensors").write_bytes(b"abc")
    with pytest.raises(PipelineError, match="only 3 bytes"):
        lora.detect_format(tmp_path / "short.safetensors")
    with pytest.raises(PipelineError, match="cannot read the file"):
        lora.read_lora(tmp_path / "missing.safetensors")


def test_mismatched_ranks_are_an_error(tmp_path):
    sd = lora_tensors(blocks=(0,), rank=4)
    sd["lora_unet_blocks_0_self_attn_q.lora_up.weight"] = np.zeros((1536, 8), np.float32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    r = lora.read_lora(tmp_path / "bad.safetensors")
    assert any("blocks.0.self_attn.q: mismatched ranks: lora_down [4, 1536] has rank 4 but lora_up [1536, 8] has rank 8"
               in p.message for p in r.errors)
    with pytest.raises(PipelineError, match="mismatched ranks"):
        lora.load_lora(tmp_path / "bad.safetensors")


def test_alpha_missing_or_misshapen(tmp_path):
    sd = lora_tensors(blocks=(0,))
    del sd["lora_unet_blocks_0_ffn_0.alpha"]
    sd["lora_unet_blocks_0_ffn_2.alpha"] = np.ones((4,), np.float32)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    msgs = [p.message for p in lora.read_lora(tmp_path / "bad.safetensors").errors]
    assert any(m.startswith("blocks.0.ffn.0: alpha is missing") for m in msgs)
    assert any(m.startswith("blocks.0.ffn.2: alpha has shape [4], expected a single number") for m in msgs)
    assert len(msgs) == 2


def test_lora_of_another_architecture(tmp_path):
    p = make_lora(tmp_path / "wan.safetensors")
    r = lora.read_lora(p, family="hunyuan_video")
    assert any("LoRA of another architecture: wan (metadata modelspec.architecture=wan2.1/lora), not hunyuan_video"
               in e.message for e in r.errors)
    assert r.coverage.unknown  # and its keys would not load
    with pytest.raises(PipelineError, match="another architecture"):
        lora.load_lora(p, family="hv")


def test_lora_for_another_model_size(tmp_path):
    p = make_lora(tmp_path / "small.safetensors", variant="t2v-1.3B")
    r = lora.read_lora(p, family="wan", variant="t2v-14B")
    assert len(r.coverage.wrong_shape) == 10
    assert any("shapes for another model size than Wan 2.1 / 2.2 t2v-14B" in e.message and "1536->1536, expected 5120->5120"
               in e.message for e in r.errors)


def test_keys_that_would_not_load_are_listed(tmp_path):
    extra = {"lora_unet_head_head.lora_down.weight": np.zeros((4, 1536), np.float32),
             "lora_unet_head_head.lora_up.weight": np.zeros((64, 4), np.float32),
             "lora_unet_head_head.alpha": np.array(4.0, np.float32)}
    p = tmp_path / "x.safetensors"
    save_file(lora_tensors(extra=extra), str(p), metadata={"modelspec.architecture": "wan2.1/lora"})
    r = lora.read_lora(p)
    assert r.coverage.unknown == ["lora_unet_head_head"]
    assert any("would not load (\"lora key not loaded\")" in e.message for e in r.errors)


def test_mangled_comfy_names_are_caught(tmp_path):
    # what musubi's convert_lora.py --target other writes for FramePack's feed-forward modules
    sd = lora_tensors(family="framepack", variant="i2v", blocks=(0,), layout="comfyui", alpha=None, only=r"^transformer")
    sd = {k.replace("ff_context.net", "ff.context.net").replace("transformer_blocks", "transformer.blocks"): v
          for k, v in sd.items()}
    save_file(sd, str(tmp_path / "fp.safetensors"))
    r = lora.read_lora(tmp_path / "fp.safetensors", family="framepack")
    assert len(r.coverage.misnamed) == 12 and r.coverage.matched == 0
    assert any("mangled names that ComfyUI would not load, e.g. 'transformer.blocks.0.attn.add_k_proj' for the model's "
               "'transformer_blocks.0.attn.add_k_proj'" in e.message for e in r.errors)


def test_lycoris_loha_and_lokr_are_recognised(tmp_path):
    ln = "lora_unet_blocks_0_self_attn_q"
    loha = {f"{ln}.hada_w1_a": np.zeros((1536, 8), np.float32), f"{ln}.hada_w1_b": np.zeros((8, 1536), np.float32),
            f"{ln}.hada_w2_a": np.zeros((1536, 8), np.float32), f"{ln}.hada_w2_b": np.zeros((8, 1536), np.float32),
            f"{ln}.alpha": np.array(8.0, np.float32)}
    save_file(loha, str(tmp_path / "loha.safetensors"))
    r = lora.read_lora(tmp_path / "loha.safetensors", family="wan", variant="t2v-1.3B")
    assert (r.kind, r.modules[ln].rank, r.coverage.matched, r.errors) == ("loha", 8, 1, [])
    lokr = {f"{ln}.lokr_w1": np.zeros((8, 8), np.float32), f"{ln}.lokr_w2": np.zeros((192, 192), np.float32)}
    save_file(lokr, str(tmp_path / "lokr.safetensors"))
    r = lora.read_lora(tmp_path / "lokr.safetensors", family="wan", variant="t2v-1.3B")
    assert (r.kind, r.modules[ln].in_features, r.modules[ln].out_features) == ("lokr", 1536, 1536)
    with pytest.raises(PipelineError, match="LyCORIS loha file; merging supports plain LoRA only"):
        lora.merge_loras(tmp_path / "out.safetensors", [(tmp_path / "loha.safetensors", 1.0)])


# ------------------------------------------------------------------ safetensors I/O


def test_bfloat16_bits_round_to_nearest_even():
    x = np.array([1.0, -2.5, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, np.inf, 0.0], np.float32)
    bits = lora.float32_to_bf16_bits(x)
    # 1+2^-8 is a tie between 1.0 and 1+2^-7: even mantissa wins (1.0); 1+3*2^-8 rounds up to 1+2^-6
    assert list(bits) == [0x3F80, 0xC020, 0x3F80, 0x3F82, 0x7F80, 0x0000]


def test_written_files_read_back_with_the_safetensors_package(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    lora.write_safetensors(tmp_path / "f.safetensors", [("a", "F32", (3, 4)), ("s", "F32", ())],
                           [a, np.array(2.0)], {"k": "v"})
    back = load_file(str(tmp_path / "f.safetensors"))
    assert np.array_equal(back["a"], a) and float(back["s"]) == 2.0
    lora.write_safetensors(tmp_path / "b.safetensors", [("a", "BF16", (3, 4))], [a])
    st = lora.SafetensorsFile(tmp_path / "b.safetensors")
    assert np.allclose(st.float32("a"), a, rtol=2 ** -8) and st.tensors["a"].dtype == "BF16"
    with pytest.raises(PipelineError, match="already exists"):
        lora.write_safetensors(tmp_path / "b.safetensors", [("a", "BF16", (3, 4))], [a])
    assert sorted(os.listdir(tmp_path)) == ["b.safetensors", "f.safetensors"]  # no temporary files left


# ------------------------------------------------------------------ merge


def test_parse_weighted_keeps_windows_paths():
    assert lora.parse_weighted("a.safetensors:0.5") == ("a.safetensors", 0.5)
    assert lora.parse_weighted(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert lora.parse_weighted(r"C:\loras\a.safetensors:-1e-1") == (r"C:\loras\a.safetensors", -0.1)


def test_exact_merge_reproduces_the_weighted_sum_of_deltas(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", rank=4, alpha=2.0, seed=1)
    b = make_lora(tmp_path / "b.safetensors", rank=8, alpha=8.0, seed=2)
    res = lora.merge_loras(tmp_path / "m.safetensors", [(a, 0.7), (b, -0.3)])
    da, db, dm = deltas(a), deltas(b), deltas(tmp_path / "m.safetensors")
    assert set(dm) == set(da) and len(dm) == 10
    for k in dm:
        np.testing.assert_allclose(dm[k], 0.7 * da[k] - 0.3 * db[k], rtol=1e-5, atol=1e-7)
    r = lora.read_lora(tmp_path / "m.safetensors")
    assert r.ranks() == {12: 10} and r.alphas() == {"12": 10} and r.family == "wan" and r.errors == []
    assert res.total_error == 0 and json.loads(r.metadata["musubi_pipe.merged_from"])[1] == {"file": "b.safetensors",
                                                                                              "weight": -0.3}


def test_merge_handles_modules_present_in_only_some_inputs(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", blocks=(0,), seed=1)
    b = make_lora(tmp_path / "b.safetensors", blocks=(0, 1), only=r"self_attn", seed=2)
    res = lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0), (b, 0.5)])
    da, db, dm = deltas(a), deltas(b), deltas(tmp_path / "m.safetensors")
    assert len(dm) == 14 and len(res.partial) == 10
    for k in dm:
        np.testing.assert_allclose(dm[k], da.get(k, 0) + 0.5 * db.get(k, 0), rtol=1e-5, atol=1e-7)
    ranks = lora.read_lora(tmp_path / "m.safetensors").ranks()
    assert ranks == {4: 10, 8: 4}


def test_svd_merge_reports_the_true_truncation_error(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", rank=8, alpha=8.0, seed=3, only=r"attn\.[qo]")
    b = make_lora(tmp_path / "b.safetensors", rank=8, alpha=4.0, seed=4, only=r"self_attn\.q")
    res = lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0), (b, 1.0)], rank=6)
    da, db, dm = (deltas(p, full=True) for p in (a, b, tmp_path / "m.safetensors"))
    num = den = 0.0
    for m in res.modules:
        k = m.lora_name
        full = da[k] + db.get(k, 0)
        s = np.linalg.svd(full, compute_uv=False)
        best = np.sqrt(np.sum(s[6:] ** 2) / np.sum(s ** 2))  # Eckart-Young: the best rank-6 error
        got = np.linalg.norm(dm[k] - full) / np.linalg.norm(full)
        assert m.rank == 6 and got == pytest.approx(best, rel=1e-4) and m.error == pytest.approx(best, rel=1e-4)
        num += np.linalg.norm(dm[k] - full) ** 2
        den += np.linalg.norm(full) ** 2
    assert 0 < res.total_error == pytest.approx(np.sqrt(num / den), rel=1e-4)
    assert lora.read_lora(tmp_path / "m.safetensors").alphas() == {"6": 4} and len(res.partial) == 3


def test_svd_merge_above_the_combined_rank_is_exact(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", rank=2, seed=5, only=r"self_attn\.q")
    b = make_lora(tmp_path / "b.safetensors", rank=2, seed=6, only=r"self_attn\.q")
    res = lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0), (b, 2.0)], rank=32)
    k = "lora_unet_blocks_0_self_attn_q"
    np.testing.assert_allclose(deltas(tmp_path / "m.safetensors")[k], deltas(a)[k] + 2 * deltas(b)[k], rtol=1e-5)
    assert res.modules[0].rank == 4 and res.total_error == 0


def test_svd_merge_error_is_unchanged_by_the_faster_merge(tmp_path):
    # Errors recorded with the merge as it was before it shared the Gram matrices, ran on one BLAS
    # thread per module and projected in float32 (commit 0867f80); the rewrite must not change them.
    a = make_lora(tmp_path / "a.safetensors", rank=8, alpha=8.0, seed=11, blocks=(0, 1), only=r"attn")
    b = make_lora(tmp_path / "b.safetensors", rank=16, alpha=4.0, seed=12, blocks=(0, 1), only=r"self_attn")
    res = lora.merge_loras(tmp_path / "m.safetensors", [(a, 0.7), (b, -0.5)], rank=12)
    errors = {m.lora_name: m.error for m in res.modules}
    assert res.total_error == pytest.approx(0.1460456998293785, rel=1e-6)
    assert errors["lora_unet_blocks_0_self_attn_q"] == pytest.approx(0.20063700962770148, rel=1e-6)
    assert errors["lora_unet_blocks_1_self_attn_q"] == pytest.approx(0.2029780127957967, rel=1e-6)
    assert errors["lora_unet_blocks_1_cross_attn_k"] == 0  # only in a, rank 8 <= 12: exact
    # ... and the written file has that error against the exact weighted sum
    da, db, dm = (deltas(p, full=True) for p in (a, b, tmp_path / "m.safetensors"))
    num = sum(np.linalg.norm(dm[k] - (0.7 * da[k] - 0.5 * db.get(k, 0))) ** 2 for k in dm)
    den = sum(np.linalg.norm(0.7 * da[k] - 0.5 * db.get(k, 0)) ** 2 for k in dm)
    assert np.sqrt(num / den) == pytest.approx(res.total_error, rel=1e-5)


def test_svd_merge_of_a_lora_with_itself_loses_nothing(tmp_path):
    # The stacked factors have rank 8 but only 4 independent directions: the directions with no
    # weight are dropped, and rank 4 holds the whole sum.
    a = make_lora(tmp_path / "a.safetensors", rank=4, seed=7, only=r"self_attn")
    res = lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0), (a, 0.5)], rank=4)
    assert res.total_error < 1e-6
    da, dm = deltas(a, full=True), deltas(tmp_path / "m.safetensors", full=True)
    for k in dm:
        np.testing.assert_allclose(dm[k], 1.5 * da[k], rtol=1e-4, atol=1e-6)


def test_svd_merge_of_bfloat16_inputs(tmp_path):
    sd = {k: v for k, v in lora_tensors(rank=8, seed=8, only="ffn").items()}
    bits = {k: lora.float32_to_bf16_bits(v) for k, v in sd.items()}
    entries = [(k, "BF16", v.shape) for k, v in sd.items()]
    lora.write_safetensors(tmp_path / "a.safetensors", entries, [sd[k] for k, _, _ in entries],
                           {"modelspec.architecture": "wan2.1/lora"})
    assert lora.SafetensorsFile(tmp_path / "a.safetensors").raw(entries[0][0]).tolist() == bits[entries[0][0]].tolist()
    res = lora.merge_loras(tmp_path / "m.safetensors", [(tmp_path / "a.safetensors", 1.0), (tmp_path / "a.safetensors", 1.0)],
                           rank=8, dtype="float32")
    assert res.total_error < 1e-6
    w, a = lora.load_lora(tmp_path / "m.safetensors"), lora.load_lora(tmp_path / "a.safetensors")
    for ln in w.report.modules:
        np.testing.assert_allclose(w.delta(ln), 2 * a.delta(ln), rtol=1e-4, atol=1e-7)


def test_merge_work_runs_ahead_in_order_and_bounded():
    import threading
    import time

    running, most, lock = [0], [0], threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.002 * (i % 3))  # later items finish first now and then
        with lock:
            running[0] -= 1
        return i * i

    taken = []
    for value in lora._in_order(work, iter(range(50)), workers=3):
        taken.append(value)
    assert taken == [i * i for i in range(50)] and 1 < most[0] <= 3


def test_merge_of_mixed_layouts_converts_in_memory_and_writes_comfy_layout(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", rank=4, alpha=1.0, seed=1)
    b = make_lora(tmp_path / "b.safetensors", rank=4, alpha=None, layout="comfyui", seed=2)
    lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0), (b, 1.0)], layout="comfyui", dtype="float16")
    out = load_file(str(tmp_path / "m.safetensors"))
    assert "diffusion_model.blocks.0.cross_attn.o.lora_A.weight" in out and not any(k.endswith("alpha") for k in out)
    assert out["diffusion_model.blocks.0.cross_attn.o.lora_A.weight"].dtype == np.float16
    da, db, dm = deltas(a), deltas(b), deltas(tmp_path / "m.safetensors")
    for k in dm:
        assert np.linalg.norm(dm[k] - (da[k] + db[k])) / np.linalg.norm(da[k] + db[k]) < 1e-3  # float16 storage


def test_merge_in_bfloat16(tmp_path):
    a = make_lora(tmp_path / "a.safetensors", seed=1, only="ffn")
    lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0), (a, 1.0)], dtype="bfloat16")
    w = lora.load_lora(tmp_path / "m.safetensors")
    for ln in w.report.modules:
        full = 2 * lora.load_lora(a).delta(ln)
        assert np.linalg.norm(w.delta(ln) - full) / np.linalg.norm(full) < 1e-2


def test_merge_refuses_different_architectures_and_existing_output(tmp_path):
    a = make_lora(tmp_path / "a.safetensors")
    h = make_lora(tmp_path / "h.safetensors", family="hunyuan_video", variant="t2v")
    with pytest.raises(PipelineError, match=r"different architectures \(a.safetensors: wan, h.safetensors: hunyuan_video\)"):
        lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0), (h, 1.0)])
    big = make_lora(tmp_path / "big.safetensors", variant="t2v-14B", only="self_attn.q")
    with pytest.raises(PipelineError, match="has shape 5120->5120 but another input has 1536->1536"):
        lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0), (big, 1.0)])
    (tmp_path / "m.safetensors").write_bytes(b"keep me")
    with pytest.raises(PipelineError, match="already exists"):
        lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0)])
    assert (tmp_path / "m.safetensors").read_bytes() == b"keep me"
    lora.merge_loras(tmp_path / "m.safetensors", [(a, 1.0)], force=True)
    assert lora.detect_format(tmp_path / "m.safetensors") == "musubi"


# ------------------------------------------------------------------ reference converter (tests only) and EMA maths


def reference_convert(sd: dict, target: str) -> dict:
    """What musubi's convert_lora.py does, in numpy: to "other" scale down and up by sqrt(alpha/rank) and
    drop alpha; to "default" rename and add alpha = rank where missing."""
    names = lora._all_module_names()
    out = {}
    if target == "other":
        for k, v in sd.items():
            ln, param = k.split(".", 1)
            if param == "alpha":
                continue
            rank = sd[f"{ln}.lora_down.weight"].shape[0]
            scale = np.sqrt(np.float32(sd[f"{ln}.alpha"]) / rank)
            new = "lora_A.weight" if param == "lora_down.weight" else "lora_B.weight"
            out[f"diffusion_model.{names[ln]}.{new}"] = v * scale
        return out
    for k, v in sd.items():
        module, param = re.match(r"^diffusion_model\.(.*)\.(lora_A\.weight|lora_B\.weight|alpha)$", k).groups()
        ln = lora.lora_name_of(module)
        out[f"{ln}.{ {'lora_A.weight': 'lora_down.weight', 'lora_B.weight': 'lora_up.weight'}.get(param, param)}"] = v
        if param == "lora_A.weight" and f"diffusion_model.{module}.alpha" not in sd:
            out[f"{ln}.alpha"] = np.array(v.shape[0], dtype=np.int64)
    return out


@pytest.mark.parametrize("family,variant", [("wan", "i2v-14B"), ("hunyuan_video", "t2v"), ("framepack", "i2v")])
def test_reference_conversion_keeps_every_delta(tmp_path, family, variant):
    sd = lora_tensors(family=family, variant=variant, blocks=(0,), rank=4, alpha=1.0,
                      only=r"(k_img|ffn\.0|mlp\.fc1|linear1|proj_out|to_add_out)")
    save_file(sd, str(tmp_path / "musubi.safetensors"))
    save_file(reference_convert(sd, "other"), str(tmp_path / "comfy.safetensors"))
    back = reference_convert(load_file(str(tmp_path / "comfy.safetensors")), "default")
    save_file(back, str(tmp_path / "back.safetensors"))
    d0, d1, d2 = (deltas(tmp_path / f) for f in ("musubi.safetensors", "comfy.safetensors", "back.safetensors"))
    assert set(d0) == set(d1) == set(d2)
    for k in d0:
        np.testing.assert_allclose(d1[k], d0[k], rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(d2[k], d0[k], rtol=1e-5, atol=1e-8)
    assert lora.read_lora(tmp_path / "comfy.safetensors", family=family, variant=variant).errors == []


def reference_ema(state_dicts: list[dict], beta=0.95, beta2=None, sigma_rel=None) -> dict:
    """lora_post_hoc_ema.py's loop over files in order (alpha from the first file)."""
    out = {k: v.astype(np.float32) for k, v in state_dicts[0].items()}
    for b, sd in zip(lora.ema_betas(len(state_dicts), beta, beta2, sigma_rel), state_dicts[1:]):
        for k, v in sd.items():
            if not k.endswith(".alpha"):
                out[k] = out[k] * np.float32(b) + v.astype(np.float32) * np.float32(1 - b)
    return out


def test_ema_betas_and_shares():
    assert lora.ema_betas(4, 0.9, 0.99) == pytest.approx([0.9, 0.945, 0.99])
    assert lora.ema_betas(2, 0.9, 0.99) == [0.9]
    shares = lora.ema_coefficients(3, 0.5)
    assert shares == pytest.approx([0.25, 0.25, 0.5]) and sum(shares) == pytest.approx(1)
    # power-function EMA: the first fold has beta 0, so the oldest checkpoint counts for nothing
    shares = lora.ema_coefficients(3, sigma_rel=0.2)
    gamma = lora.sigma_rel_to_gamma(0.2)
    assert shares[0] == 0 and shares[1] == pytest.approx(0.5 ** (gamma + 1)) and sum(shares) == pytest.approx(1)
    assert gamma ** 3 + 7 * gamma ** 2 + (16 - 0.2 ** -2) * gamma + (12 - 0.2 ** -2) == pytest.approx(0, abs=1e-9)
    with pytest.raises(PipelineError, match="no positive gamma"):
        lora.sigma_rel_to_gamma(1.0)


# ------------------------------------------------------------------ the real musubi-tuner scripts


def run_musubi(script: str, *args: str) -> None:
    script_path = Path(MUSUBI_DIR, "src", "musubi_tuner", script)
    done = subprocess.run([musubi_python(), str(script_path), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@needs_musubi
def test_real_convert_lora_matches_the_reference(tmp_path):
    sd = lora_tensors(family="wan", variant="i2v-14B", blocks=(0, 1), rank=4, alpha=1.0)
    src = tmp_path / "musubi.safetensors"
    save_file(sd, str(src), metadata={"modelspec.architecture": "wan2.1/lora"})
    run_musubi("convert_lora.py", "--input", str(src), "--output", str(tmp_path / "comfy.safetensors"), "--target", "other")
    real = load_file(str(tmp_path / "comfy.safetensors"))
    ref = reference_convert(sd, "other")
    assert set(real) == set(ref)
    for k in ref:
        np.testing.assert_allclose(real[k], ref[k], rtol=1e-6)
    assert lora.detect_format(tmp_path / "comfy.safetensors") == "comfyui"
    run_musubi("convert_lora.py", "--input", str(tmp_path / "comfy.safetensors"), "--output",
               str(tmp_path / "back.safetensors"), "--target", "default")
    d0, d2 = deltas(src), deltas(tmp_path / "back.safetensors")
    for k in d0:
        np.testing.assert_allclose(d2[k], d0[k], rtol=1e-5, atol=1e-8)
    assert lora.read_lora(tmp_path / "back.safetensors", family="wan", variant="i2v-14B").errors == []


@needs_musubi
@pytest.mark.parametrize("options", [{"beta": 0.9, "beta2": 0.99}, {"sigma_rel": 0.2}])
def test_real_post_hoc_ema_matches_the_reference(tmp_path, options):
    files, sds = [], []
    for i in range(4):
        sd = lora_tensors(blocks=(0,), rank=4, alpha=4.0, seed=10 + i, only="self_attn")
        save_file(sd, str(tmp_path / f"e{i}.safetensors"))
        files.append(str(tmp_path / f"e{i}.safetensors"))
        sds.append(sd)
    args = [a for k, v in options.items() for a in (f"--{k}", str(v))]
    run_musubi("lora_post_hoc_ema.py", *files, "--no_sort", "--output_file", str(tmp_path / "ema.safetensors"), *args)
    real = load_file(str(tmp_path / "ema.safetensors"))
    ref = reference_ema(sds, beta=options.get("beta", 0.95), beta2=options.get("beta2"), sigma_rel=options.get("sigma_rel"))
    assert set(real) == set(ref)
    for k in ref:
        np.testing.assert_allclose(real[k], ref[k], rtol=1e-5, atol=1e-7)


@needs_musubi
def test_real_convert_lora_mangles_framepack_names_and_inspect_says_so(tmp_path):
    src = make_lora(tmp_path / "fp.safetensors", family="framepack", variant="i2v", blocks=(0,))
    run_musubi("convert_lora.py", "--input", str(src), "--output", str(tmp_path / "other.safetensors"), "--target", "other")
    r = lora.read_lora(tmp_path / "other.safetensors", family="framepack")
    # attention names survive (they are in its Qwen-Image table); feed-forward and single-block names do not
    assert len(r.coverage.misnamed) == 4 + 5 and r.coverage.matched == 8
    assert any("mangled names" in e.message for e in r.errors)


NAMES_SCRIPT = r'''
import json, sys, torch
torch.cuda.current_device = lambda: 0  # wan/modules/t5.py calls it at import time
from accelerate import init_empty_weights
from musubi_tuner.wan.configs import WAN_CONFIGS
from musubi_tuner.wan.modules.model import WanModel
import musubi_tuner.networks.lora as lh, musubi_tuner.networks.lora_wan as lw, musubi_tuner.networks.lora_framepack as lf
from musubi_tuner.hunyuan_model.models import HYVideoDiffusionTransformer, HUNYUAN_VIDEO_CONFIG
from musubi_tuner.frame_pack.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked
def names(mod, model):
    net = mod.create_arch_network(1.0, 4, 1, None, [], model)
    return {l.lora_name: [l.lora_down.weight.shape[1], l.lora_up.weight.shape[0]] for l in net.unet_loras}
out = {}
for task in ["t2v-1.3B", "t2v-14B", "i2v-14B", "t2v-1.3B-FC", "i2v-A14B"]:
    c = WAN_CONFIGS[task]
    with init_empty_weights():
        m = WanModel(model_type="i2v" if c.i2v else ("flf2v" if c.flf2v else "t2v"), model_version="2.2" if c.v2_2 else "2.1",
                     dim=c.dim, ffn_dim=c.ffn_dim, freq_dim=c.freq_dim, in_dim=c.in_dim, num_heads=c.num_heads,
                     num_layers=c.num_layers, out_dim=c.out_dim, text_len=c.text_len)
    out["wan/" + task] = names(lw, m)
with init_empty_weights():
    m = HYVideoDiffusionTransformer(text_states_dim=4096, text_states_dim_2=768, in_channels=16, out_channels=16,
                                    **HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"])
out["hunyuan_video/t2v"] = names(lh, m)
with init_empty_weights():
    m = HunyuanVideoTransformer3DModelPacked(has_image_proj=True, has_clean_x_embedder=True)
out["framepack/i2v"] = names(lf, m)
json.dump(out, open(sys.argv[1], "w"))
'''


@needs_musubi
def test_module_lists_equal_the_modules_musubi_networks_create(tmp_path):
    (tmp_path / "names.py").write_text(NAMES_SCRIPT)
    done = subprocess.run([musubi_python(), str(tmp_path / "names.py"), str(tmp_path / "names.json")],
                          capture_output=True, text=True, timeout=300, cwd=MUSUBI_DIR)
    assert done.returncode == 0, done.stderr[-3000:]
    real = json.loads((tmp_path / "names.json").read_text())
    for key, modules in real.items():
        family, variant = key.split("/")
        mine = {n: [m.in_features, m.out_features] for n, m in lora.target_modules(family, variant).items()}
        assert mine == modules, key


# ------------------------------------------------------------------ command line


def test_cli_inspect_and_merge(tmp_path):
    from click.testing import CliRunner

    from musubi_pipe.cli import main

    a = make_lora(tmp_path / "a.safetensors", rank=4, alpha=2.0, seed=1)
    b = make_lora(tmp_path / "b.safetensors", rank=4, alpha=4.0, seed=2)
    run = CliRunner().invoke
    res = run(main, ["lora", "inspect", str(a)])
    assert res.exit_code == 0 and "format:  musubi (lora)" in res.output and "rank 4 x10" in res.output
    res = run(main, ["lora", "inspect", str(a), "--family", "framepack", "--json"])
    assert res.exit_code == 1
    data = json.loads(res.output)
    assert data["family"] == "wan" and data["coverage"]["family"] == "framepack" and len(data["coverage"]["unknown"]) == 10
    out = tmp_path / "m.safetensors"
    res = run(main, ["lora", "merge", str(out), f"{a}:0.5", f"{b}:-1", "--format", "comfyui"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"wrote {out} (comfyui format, 10 modules, rank 8)")
    da, db, dm = deltas(a), deltas(b), deltas(out)
    for k in dm:
        np.testing.assert_allclose(dm[k], 0.5 * da[k] - db[k], rtol=1e-5, atol=1e-8)
    res = run(main, ["lora", "merge", str(out), str(a)])
    assert res.exit_code == 1 and "already exists" in res.output and "--force" in res.output
    res = run(main, ["lora", "merge", str(out), str(a), str(b), "--rank", "2", "--force"])
    assert res.exit_code == 0 and "relative error of the weight change" in res.output
    (tmp_path / "junk.safetensors").write_text("hello")
    res = run(main, ["lora", "inspect", str(tmp_path / "junk.safetensors")])
    assert res.exit_code == 1 and "not a safetensors file" in res.output
