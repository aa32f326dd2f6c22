"""Teacher couplings (stepdistill.couplings): agreement with the stock diffusers pipelines, exact window-boundary
states, per-sample determinism, crash/resume, argument checks, solvers, SD3-style flow teachers and the CLI."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stepdistill.methods import reflow_couplings as RC
from stepdistill.cli import reflow as cli_reflow
from stepdistill.data import couplings as couplings_io
from stepdistill.models import denoiser
from stepdistill import errors
from stepdistill import ode
from stepdistill.data import prompts as prompts_io
from stepdistill import parametrization
from stepdistill.flow_scheduler import PiecewiseRectifiedFlowScheduler
from tiny_models import PROMPTS, v_prediction_pipe, cs_ac, point_mass_pipe, tiny_sd3_pipe, tiny_sdxl_pipe


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # small kernels: see tests/conftest.py


def _capture(pipe, prompts, noise, steps, guidance, **kw):
    """Run the stock pipeline, returning its final latent and the latents after every step."""
    seen = {}

    def cb(p, i, t, kwargs):
        seen[i + 1] = kwargs["latents"].clone()
        return kwargs

    with torch.no_grad():
        out = pipe(prompts, latents=noise, num_inference_steps=steps, guidance_scale=guidance, output_type="latent",
                   callback_on_step_end=cb, **kw).images
    return out, seen


# ----------------------------------------------------------------------------------------------------
# VP (SD-family) teachers


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_couplings_equal_the_stock_pipeline_with_the_student_scheduler(tiny_random_pipe, tmp_path, prediction_type):
    """ddim couplings == StableDiffusionPipeline + PiecewiseRectifiedFlowScheduler(K) from the same noise, at the
    end and at every window boundary; the stored grid and boundaries are the scheduler's; boundary 0 is the
    noise's flow state, boundary K the data; embeddings are pipe.encode_prompt's."""
    from diffusers import StableDiffusionPipeline

    pipe = v_prediction_pipe(tiny_random_pipe) if prediction_type == "v_prediction" else tiny_random_pipe
    K, N, w = 2, 4, 3.0
    res = RC.generate_couplings(pipe, PROMPTS, tmp_path / "c", num_steps=N, num_windows=K, guidance_scale=w,
                               shard_size=3, batch_size=2, progress=False)
    assert res.num_generated == 5 and len(res.shards_written) == 2 and res.couplings_per_second > 0
    cs = couplings_io.load_couplings(tmp_path / "c")
    m = cs.manifest
    assert m["teacher"] == "vp" and m["prediction_type"] == prediction_type and len(m["shards"]) >= 1
    noise, data, states = cs.tensor("noise"), cs.tensor("data"), cs.boundary_states(torch.arange(5))
    assert states.shape == (5, K + 1, 4, 8, 8)

    student = StableDiffusionPipeline(**pipe.components)
    student.scheduler = PiecewiseRectifiedFlowScheduler.from_config(pipe.scheduler.config, num_windows=K)
    assert student.scheduler.sigma_max == pytest.approx(m["sigma_max"], abs=1e-9)
    torch.testing.assert_close(torch.tensor(m["sigma_boundaries"]).float(), student.scheduler.window_sigmas)
    assert torch.equal(torch.tensor(m["step_sigmas"], dtype=torch.float64), student.scheduler.window_aligned_sigmas(N))

    out, seen = _capture(student, PROMPTS, noise, N, w)
    scale = data.abs().max()
    torch.testing.assert_close(data, out, atol=2e-6 * scale, rtol=0)
    for j, gi in enumerate(m["boundary_grid_indices"]):
        want = parametrization.vp_state_to_flow(noise if gi == 0 else seen[gi], m["sigma_boundaries"][j])
        torch.testing.assert_close(states[:, j], want, atol=2e-6 * scale, rtol=0, msg=f"boundary {j}")
    # exact ends: the first boundary state is the noise (as a flow state), the last one is the data
    assert torch.equal(states[:, 0], parametrization.vp_state_to_flow(noise, m["sigma_max"]))
    assert torch.equal(states[:, -1], data)
    torch.testing.assert_close(parametrization.flow_state_to_vp_input(states[:, 0], m["sigma_max"], cs_ac(pipe))[0], noise)
    # noise i is torch.Generator().manual_seed(seed + i); the prompt table is deduplicated
    assert torch.equal(noise[3], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))[0])
    assert m["prompts"] == ["a red circle", "a blue square", "a small green triangle", "a big red square"]
    assert cs.prompt_index.tolist() == [0, 1, 0, 2, 3]
    # embeddings per shard (shard_size 3): each shard's distinct prompts, then its unconditional row
    assert cs.cond_row.tolist() == [0, 1, 0, 3, 4]
    with torch.no_grad():
        e, _ = pipe.encode_prompt(m["prompts"][:2] + [""] + m["prompts"][2:] + [""], device="cpu",
                                  num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(cs.prompt_embeds, e)
    torch.testing.assert_close(cs.conditioning(torch.tensor([3]))["encoder_hidden_states"], e[3:4])


def test_deterministic_per_sample_regardless_of_batch_size(tiny_random_pipe, tmp_path):
    kw = dict(num_steps=3, num_windows=1, guidance_scale=2.0, progress=False)
    RC.generate_couplings(tiny_random_pipe, PROMPTS[:4], tmp_path / "a", batch_size=1, **kw)
    RC.generate_couplings(tiny_random_pipe, PROMPTS[:4], tmp_path / "b", batch_size=4, **kw)
    RC.generate_couplings(tiny_random_pipe, PROMPTS[2:4], tmp_path / "c", seed=2, batch_size=2, **kw)
    a, b, c = (couplings_io.load_couplings(tmp_path / d) for d in "abc")
    assert torch.equal(a.tensor("noise"), b.tensor("noise"))
    assert torch.equal(a.tensor("noise")[2:], c.tensor("noise"))  # sample i only depends on seed + i
    scale = a.tensor("data").abs().max()
    # batched BLAS kernels may round differently; nothing else may differ
    torch.testing.assert_close(a.tensor("boundary_states"), b.tensor("boundary_states"), atol=1e-6 * scale, rtol=0)
    torch.testing.assert_close(a.tensor("data")[2:], c.tensor("data"), atol=1e-6 * scale, rtol=0)


def test_crash_resumes_without_redoing_or_losing_shards(tiny_random_pipe, tmp_path):
    kw = dict(num_steps=2, num_windows=2, guidance_scale=2.0, shard_size=2, batch_size=2, progress=False)
    out = tmp_path / "c"
    with pytest.raises(RC.CouplingInterrupted):
        RC.generate_couplings(tiny_random_pipe, PROMPTS, out, stop_after_shards=1, **kw)
    first = out / "couplings-00000.safetensors"
    manifest_text = (out / "manifest.json").read_text()
    assert "completed" not in json.loads(manifest_text)  # the shard headers are the done markers
    assert first.exists() and not (out / "couplings-00001.safetensors").exists()
    with pytest.raises(errors.CouplingError, match="incomplete.*re-run"):
        couplings_io.load_couplings(out)
    stat, blob = first.stat(), first.read_bytes()

    # a second crash, and a damaged shard (a foreign file under a shard's name) that must be regenerated
    with pytest.raises(RC.CouplingInterrupted):
        RC.generate_couplings(tiny_random_pipe, PROMPTS, out, stop_after_shards=1, **kw)
    assert (out / "manifest.json").read_text() == manifest_text  # written once, never rewritten
    second = out / "couplings-00001.safetensors"
    stat2 = second.stat()
    (out / "couplings-00002.safetensors").write_bytes(b"not a shard")

    res = RC.generate_couplings(tiny_random_pipe, PROMPTS, out, **kw)
    assert res.shards_skipped == [first.name, second.name] and res.shards_written == ["couplings-00002.safetensors"]
    assert res.num_generated == 1
    assert first.stat().st_mtime_ns == stat.st_mtime_ns and first.read_bytes() == blob
    assert second.stat().st_mtime_ns == stat2.st_mtime_ns
    assert not list(out.glob("*.tmp"))
    cs = couplings_io.load_couplings(out)
    assert len(cs) == 5 and cs.seed.tolist() == [0, 1, 2, 3, 4]
    # identical to an uninterrupted run
    RC.generate_couplings(tiny_random_pipe, PROMPTS, tmp_path / "ref", **kw)
    ref = couplings_io.load_couplings(tmp_path / "ref")
    torch.testing.assert_close(cs.tensor("boundary_states"), ref.tensor("boundary_states"), atol=0, rtol=0)
    # finished: a rerun does nothing
    again = RC.generate_couplings(tiny_random_pipe, PROMPTS, out, **kw)
    assert again.num_generated == 0 and len(again.shards_skipped) == 3


def test_two_workers_make_the_set_one_worker_makes(tiny_random_pipe, tmp_path):
    """``--shard-index I --num-shards 2`` (two invocations on one directory) == one run; either half alone is an
    incomplete set that names the fix; training reads several directories (a list or a glob) as one set."""
    kw = {"num_steps": 2, "num_windows": 2, "guidance_scale": 2.0, "shard_size": 2, "batch_size": 2, "progress": False}
    RC.generate_couplings(tiny_random_pipe, PROMPTS, tmp_path / "one", **kw)
    half = RC.generate_couplings(tiny_random_pipe, PROMPTS, tmp_path / "two", shard_index=1, num_shards=2, **kw)
    assert half.shards_written == ["couplings-00001.safetensors"]
    with pytest.raises(errors.CouplingError, match="incomplete.*every --shard-index"):
        couplings_io.load_couplings(tmp_path / "two")
    other = RC.generate_couplings(tiny_random_pipe, PROMPTS, tmp_path / "two", shard_index=0, num_shards=2, **kw)
    assert other.shards_written == ["couplings-00000.safetensors", "couplings-00002.safetensors"]
    a, b = couplings_io.load_couplings(tmp_path / "one"), couplings_io.load_couplings(tmp_path / "two")
    for name in ("boundary_states", "noise", "data", "prompt_index", "seed", "index"):
        assert torch.equal(a.tensor(name), b.tensor(name)), name
    assert (tmp_path / "one" / "manifest.json").read_text() == (tmp_path / "two" / "manifest.json").read_text()
    lazy = couplings_io.load_couplings(tmp_path / "two", max_in_memory_bytes=0)  # read per row from the shards
    assert not lazy.in_memory and lazy.prompt_embeds is None
    for i in (0, 3, 4):
        assert torch.equal(lazy[i]["states"], a[i]["states"])
        assert torch.equal(lazy[i]["cond"]["encoder_hidden_states"], a[i]["cond"]["encoder_hidden_states"])
    with pytest.raises(errors.CouplingError, match="shard-index"):
        RC.generate_couplings(tiny_random_pipe, PROMPTS, tmp_path / "x", shard_index=2, num_shards=2, **kw)
    # version 1 sets (``data`` and all K + 1 ``boundary_states`` stored) read back the same
    v1 = tmp_path / "v1"
    shutil.copytree(tmp_path / "one", v1)
    manifest = json.loads((v1 / "manifest.json").read_text())
    (v1 / "manifest.json").write_text(json.dumps({**manifest, "version": 1, "embeddings": "embeddings.safetensors"}))
    table = torch.zeros((len(manifest["prompts"]) + 1, *a.prompt_embeds.shape[1:]))
    for name in manifest["shards"]:
        with safe_open(str(v1 / name), framework="pt") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        start = parametrization.vp_state_to_flow(t["noise"], manifest["sigma_max"])
        t["boundary_states"] = torch.cat([start[:, None], t.pop("later_states")], 1)
        t["data"] = t["boundary_states"][:, -1].clone()
        table[t["prompt_index"]] = t.pop("emb_prompt_embeds")[t.pop("prompt_row")]
        save_file(t, str(v1 / name), metadata=meta)
    save_file({"prompt_embeds": table}, str(v1 / "embeddings.safetensors"))
    old = couplings_io.load_couplings(v1)
    assert torch.equal(old.tensor("boundary_states"), a.tensor("boundary_states"))
    assert torch.equal(old[3]["states"], a[3]["states"]) and torch.equal(old.tensor("data"), a.tensor("data"))
    assert torch.equal(old[3]["cond"]["encoder_hidden_states"], a[3]["cond"]["encoder_hidden_states"])
    # several directories as one training set, in order; settings must agree
    both = couplings_io.load_couplings(f"{tmp_path}/one,{tmp_path}/two")
    assert len(both) == 10 and both.manifest["num_couplings"] == 10
    assert torch.equal(both[7]["states"], b[2]["states"]) and torch.equal(both[1]["states"], a[1]["states"])
    assert len(couplings_io.load_couplings(str(tmp_path / "[ot]*"))) == 10
    with pytest.raises(errors.CouplingError, match="matches no directory"):
        couplings_io.load_couplings(str(tmp_path / "none-*"))
    RC.generate_couplings(tiny_random_pipe, PROMPTS[:2], tmp_path / "k1", **{**kw, "num_windows": 1})
    with pytest.raises(errors.CouplingError, match="differ in .*num_windows"):
        couplings_io.load_couplings([tmp_path / "one", tmp_path / "k1"])


def test_changed_arguments_raise_a_clear_error(tiny_random_pipe, tmp_path):
    kw = dict(num_steps=2, num_windows=1, guidance_scale=2.0, progress=False)
    RC.generate_couplings(tiny_random_pipe, PROMPTS[:2], tmp_path, **kw)
    with pytest.raises(errors.CouplingArgumentsMismatch, match=r"guidance_scale: on disk 2\.0, requested 4\.0.*new output"):
        RC.generate_couplings(tiny_random_pipe, PROMPTS[:2], tmp_path, **{**kw, "guidance_scale": 4.0})
    with pytest.raises(errors.CouplingArgumentsMismatch, match="prompts_sha256"):
        RC.generate_couplings(tiny_random_pipe, PROMPTS[:3], tmp_path, **kw)
    with pytest.raises(errors.CouplingArgumentsMismatch, match="solver"):
        RC.generate_couplings(tiny_random_pipe, PROMPTS[:2], tmp_path, **{**kw, "solver": "dpmpp"})
    # batch size is not an argument of the result
    assert RC.generate_couplings(tiny_random_pipe, PROMPTS[:2], tmp_path, batch_size=1, **kw).num_generated == 0
    with pytest.raises(errors.CouplingError, match="num_steps .* >= num_windows"):
        RC.generate_couplings(tiny_random_pipe, PROMPTS[:2], tmp_path / "x", num_steps=2, num_windows=4,
                             progress=False)


def test_sdxl_couplings_equal_the_stock_pipeline(tmp_path):
    """SDXL: pooled embeddings, zero unconditional row (force_zeros_for_empty_prompt) and time ids, as the stock
    StableDiffusionXLPipeline + PiecewiseRectifiedFlowScheduler computes them."""
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_sdxl_pipe()
    RC.generate_couplings(pipe, PROMPTS[:2], tmp_path, num_steps=4, num_windows=2, guidance_scale=3.0, progress=False)
    cs = couplings_io.load_couplings(tmp_path)
    assert cs.manifest["time_ids"] == [64, 64, 0, 0, 64, 64] and cs.pooled.shape == (3, 16)
    assert cs.prompt_embeds[-1].abs().max() == 0 and cs.pooled[-1].abs().max() == 0
    student = StableDiffusionXLPipeline(**pipe.components)
    student.set_progress_bar_config(disable=True)
    student.scheduler = PiecewiseRectifiedFlowScheduler.from_config(pipe.scheduler.config, num_windows=2)
    out, seen = _capture(student, PROMPTS[:2], cs.tensor("noise"), 4, 3.0)
    data = cs.tensor("data")
    torch.testing.assert_close(data, out, atol=2e-6 * data.abs().max(), rtol=0)
    cond = cs.conditioning(torch.tensor([1, 0]))
    assert cond["added_cond_kwargs"]["time_ids"].shape == (2, 6) and cond["added_cond_kwargs"]["text_embeds"].shape == (2, 16)


# ----------------------------------------------------------------------------------------------------
# solvers


@pytest.mark.parametrize("solver", ode.SOLVERS)
def test_every_solver_is_exact_on_a_straight_teacher(tiny_random_pipe, tmp_path, solver):
    pipe, c = point_mass_pipe(tiny_random_pipe)
    RC.generate_couplings(pipe, PROMPTS[:3], tmp_path, num_steps=5, num_windows=3, solver=solver,
                         guidance_scale=3.0, progress=False)
    cs = couplings_io.load_couplings(tmp_path)
    st, b = cs.boundary_states(torch.arange(3)), cs.sigma_boundaries
    torch.testing.assert_close(cs.tensor("data"), c.expand(3, -1, -1, -1), atol=2e-4, rtol=0)
    for j in range(len(b)):  # every boundary state on the straight line noise -> c
        line = c + float(b[j] / b[0]) * (st[:, 0] - c)
        torch.testing.assert_close(st[:, j], line, atol=2e-4, rtol=0)


def test_solver_error_decreases_with_steps_and_is_zero_against_itself(tiny_random_pipe):
    rep = RC.coupling_solver_error(tiny_random_pipe, PROMPTS[:2],
                                  solvers=[("ddim", 3), ("ddim", 12), ("dpmpp", 12), ("euler", 12), ("ddim", 48)],
                                  reference=("ddim", 48), guidance_scale=2.0)
    r = {(x["solver"], x["steps"]): x for x in rep["results"]}
    assert r[("ddim", 48)]["rmse"] < 1e-5 * rep["reference"]["data_rms"]
    assert r[("ddim", 3)]["rmse"] > r[("ddim", 12)]["rmse"] > 0
    assert r[("dpmpp", 12)]["rmse"] < r[("ddim", 3)]["rmse"] and r[("euler", 12)]["rmse"] < r[("ddim", 3)]["rmse"]
    assert all(x["seconds"] > 0 and x["nfe"] == x["steps"] for x in rep["results"])


def test_teacher_spacing_keeps_boundaries_exact(tiny_random_pipe):
    teacher = denoiser.TeacherFlow(tiny_random_pipe)
    g_sigma, idx = ode.coupling_grid(7, 3, teacher.sigma_max, "sigma", teacher.clock)
    g_teach, idx2 = ode.coupling_grid(7, 3, teacher.sigma_max, "teacher", teacher.clock)
    assert idx == idx2 == [0, 3, 5, 7]
    assert torch.equal(g_sigma[idx], g_teach[idx])
    assert not torch.allclose(g_sigma, g_teach)
    t = parametrization.vp_timestep_for_sigma(g_teach[:3], teacher.alphas_cumprod).double()  # uniform in t inside window 0
    assert (t[1] - t[0]).item() == pytest.approx((t[2] - t[1]).item(), rel=1e-3)


# ----------------------------------------------------------------------------------------------------
# SD3-style flow-matching teachers


@pytest.mark.parametrize("solver", ["ddim", "euler"])
def test_sd3_couplings_equal_the_stock_flowmatch_pipeline(tmp_path, solver):
    """Flow teachers: Euler in flow space == StableDiffusion3Pipeline with the same sigmas (shift 1), at the end and
    at every window boundary; boundary 0 is the noise itself; the uncond row is encode_prompt('')."""
    pipe = tiny_sd3_pipe()
    K, N, w = 3, 6, 3.0
    RC.generate_couplings(pipe, PROMPTS[:3], tmp_path, num_steps=N, num_windows=K, guidance_scale=w, solver=solver,
                         shard_size=2, progress=False)
    cs = couplings_io.load_couplings(tmp_path)
    m = cs.manifest
    assert m["teacher"] == "flow" and m["sigma_max"] == 1.0 and m["latent_shape"] == [16, 8, 8]
    sched = PiecewiseRectifiedFlowScheduler(prediction_type="flow", num_windows=K)
    torch.testing.assert_close(torch.tensor(m["sigma_boundaries"]).float(), sched.window_sigmas)
    noise, data, st = cs.tensor("noise"), cs.tensor("data"), cs.boundary_states(torch.arange(3))
    assert torch.equal(st[:, 0], noise) and torch.equal(st[:, -1], data)
    out, seen = _capture(pipe, PROMPTS[:3], noise, N, w, sigmas=m["step_sigmas"][:-1])
    torch.testing.assert_close(data, out, atol=1e-5, rtol=0)
    for j, gi in enumerate(m["boundary_grid_indices"][1:], 1):
        torch.testing.assert_close(st[:, j], seen[gi], atol=1e-5, rtol=0)
    with torch.no_grad():
        e, ne, p, npool = pipe.encode_prompt(prompt=PROMPTS[:3], prompt_2=None, prompt_3=None,
                                             do_classifier_free_guidance=True)
    assert m["prompts"] == PROMPTS[:2]  # PROMPTS[2] repeats PROMPTS[0]
    # per shard (shard_size 2): [P0, P1, uncond], [P2, uncond]
    torch.testing.assert_close(cs.prompt_embeds, torch.cat([e[:2], ne[:1], e[2:], ne[:1]]))
    torch.testing.assert_close(cs.pooled, torch.cat([p[:2], npool[:1], p[2:], npool[:1]]))
    cond = cs.conditioning(torch.tensor([2, 0]))
    assert set(cond) == {"encoder_hidden_states", "pooled_projections"}
    torch.testing.assert_close(cond["encoder_hidden_states"], torch.cat([e[2:], e[:1]]))


def test_sd3_dpmpp_converges_and_shifted_spacing(tmp_path):
    pipe = tiny_sd3_pipe(shift=3.0)
    rep = RC.coupling_solver_error(pipe, PROMPTS[:2], solvers=[("dpmpp", 4), ("dpmpp", 16), ("ddim", 16)],
                                  reference=("ddim", 128), guidance_scale=3.0)
    r = [x["rmse"] for x in rep["results"]]
    assert r[0] > r[1] and r[1] < r[2]
    teacher = denoiser.TeacherFlow(pipe)
    g, idx = ode.coupling_grid(8, 2, 1.0, "teacher", teacher.clock)
    assert g[idx].tolist() == [1.0, 0.5, 0.0]
    u = teacher.native_clock(g[:5])  # un-shifted sigma is uniform inside window 0: the scheduler's own shift
    torch.testing.assert_close(u[1:] - u[:-1], (u[1] - u[0]).expand(4), atol=1e-9, rtol=0)
    torch.testing.assert_close(teacher.from_native_clock(torch.tensor([0.5], dtype=torch.float64)),
                               torch.tensor([0.75], dtype=torch.float64))  # 3 u / (1 + 2 u)


# ----------------------------------------------------------------------------------------------------
# command line


def test_cli_couple_and_solver_error(tiny_random_pipe, tmp_path, capsys):
    import argparse

    model = tmp_path / "tiny"
    tiny_random_pipe.save_pretrained(model)
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    parser = argparse.ArgumentParser()
    cli_reflow.add_reflow_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reflow", "couple", "--model", str(model), "--prompts", str(tmp_path / "prompts.txt"),
                              "--out", str(tmp_path / "c"), "--steps", "2", "--windows", "2", "--guidance", "2",
                              "--device", "cpu"])
    args.func(args)
    assert "2 couplings" in capsys.readouterr().out
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert m["model"] == str(model) and m["prompts"] == ["a red circle", "a blue square"] and m["num_windows"] == 2
    assert set(load_file(str(tmp_path / "c" / "couplings-00000.safetensors"))) == {
        "noise", "later_states", "prompt_row", "prompt_index", "seed", "guidance", "index",  # endpoints stored once
        "emb_prompt_embeds"}  # the shard's own embeddings (version 2)
    args = parser.parse_args(["reflow", "solver-error", "--model", str(model), "--prompts", "toy:2",
                              "--solvers", "ddim:2,dpmpp:4", "--reference", "ddim:8", "--guidance", "2",
                              "--device", "cpu", "--json", str(tmp_path / "err.json")])
    args.func(args)
    assert "dpmpp" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "err.json").read_text())["results"]) == 2
    assert prompts_io.read_prompts("toy:3")[0] == prompts_io.read_prompts("toy:3:0")[0] and len(prompts_io.read_prompts("toy:3")[0]) == 3


def test_couple_workers_come_from_the_flags_or_torchrun(monkeypatch):
    import argparse

    args = argparse.Namespace(shard_index=0, num_shards=None, device="cpu")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli_reflow.coupling_worker(args) == (0, 1, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert cli_reflow.coupling_worker(args) == (2, 4, "cpu")  # torchrun: rank r of world w
    args.shard_index, args.num_shards = 1, 3
    assert cli_reflow.coupling_worker(args) == (1, 3, "cpu")  # explicit flags win
